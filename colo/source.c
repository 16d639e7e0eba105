/* The primary's side of an epoch (source.h): the reader of an epoch's
 * clusters.
 *
 * The reader takes the bitmap export's header and bits with
 * lib/bitmap-export.c (its rules: docs/bitmap-export.md; an epoch's
 * bitmaps must be frozen), opens exports by name with lib/export.c, and
 * reads the clusters that are set from the snapshot export with libnbd,
 * a run of adjacent clusters at a time; each run is cut where the data
 * turns from zero to non-zero or back, so that zero clusters travel as
 * zero records.
 */

#include <config.h>

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>
#include <xxhash.h>

#include "bitmap-export.h"
#include "export.h"
#include "fleece-wire.h"
#include "messages.h"
#include "source.h"

/* ---- exports (lib/export.c, lib/bitmap-export.c) ---- */

static struct nbd_handle *
open_export (const char *base, const char *name, unsigned flags, char *err,
             size_t errlen)
{
  char why[1024];
  struct nbd_handle *h = export_open (base, name, "colo", flags, NULL, why,
                                      sizeof why);

  if (h == NULL)
    seterr (err, errlen, "export %s: %s", name, why);
  return h;
}

/* The bits of bitmap/NAME, checked (lib/bitmap-export.h's rules, and
 * the snapshot's cluster size; frozen, for an epoch); *bits is
 * malloc'ed.
 */
static int
read_bitmap (const char *base, const char *name, uint64_t disk_size,
             uint32_t cs, bool frozen, uint8_t **bits, char *err,
             size_t errlen)
{
  struct bitmap_want want = {
    .name = name, .disk_size = disk_size, .granularity = cs,
    .frozen = frozen,
  };

  return bitmap_export_read (base, &want, NULL, bits, err, errlen);
}

static bool
all_zero (const char *p, size_t n)
{
  return n == 0 || (p[0] == 0 && memcmp (p, p + 1, n - 1) == 0);
}

int
colo_read_epoch (const char *base, const char *snapshot, const char *bitmap,
                 uint32_t max_extent, colo_extent_fn fn, void *opaque,
                 struct colo_epoch_info *info, char *err, size_t errlen)
{
  struct colo_plan plan;
  size_t i;
  int r;

  memset (info, 0, sizeof *info);
  if (colo_plan_epoch (base, snapshot, bitmap == NULL, &bitmap,
                       bitmap ? 1 : 0, NULL, 0, max_extent, &plan, err,
                       errlen) == -1)
    return -1;
  info->disk_size = plan.disk_size;
  info->cluster_size = plan.cluster_size;
  r = colo_plan_read (base, snapshot, &plan, 0, fn, opaque, err, errlen);
  if (r == 0) {
    info->extents = plan.n;
    for (i = 0; i < plan.n; i++)
      if (plan.v[i].zero)
        info->zero_bytes += plan.v[i].length;
    info->data_bytes = plan.total_bytes - info->zero_bytes;
  }
  colo_plan_free (&plan);
  return r;
}

/* ---- epoch plans ---- */

/* What the snapshot says about [start, start + covered): a list of
 * (end, zero) pairs, filled a window at a time from base:allocation.
 */
struct zmap {
  struct nbd_handle *nbd;
  uint64_t size, start, covered;
  struct { uint64_t end; bool zero; } *v;
  size_t n, cap;
  int nbd_err;
};

static int
zmap_cb (void *opaque, const char *metacontext, uint64_t offset,
         uint32_t *entries, size_t nr, int *error)
{
  struct zmap *z = opaque;
  size_t i;

  (void) error;
  if (strcmp (metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  if (offset != z->start)
    return 0;
  for (i = 0; i + 1 < nr; i += 2) {
    bool zero = entries[i + 1] & LIBNBD_STATE_ZERO;
    uint64_t end = z->start + z->covered + entries[i];
    if (entries[i] == 0)
      break;
    if (end > z->size)
      end = z->size;
    if (z->n == z->cap) {
      size_t cap = z->cap ? z->cap * 2 : 64;
      void *p = realloc (z->v, cap * sizeof *z->v);
      if (p == NULL) {
        z->nbd_err = ENOMEM;
        return -1;
      }
      z->v = p;
      z->cap = cap;
    }
    if (z->n && z->v[z->n - 1].zero == zero)
      z->v[z->n - 1].end = end;
    else {
      z->v[z->n].end = end;
      z->v[z->n].zero = zero;
      z->n++;
    }
    z->covered = end - z->start;
    if (end == z->size)
      break;
  }
  return 0;
}

/* Is offset in a zero area, and where does that area end (within the
 * window; the caller asks again from there).
 */
static int
zmap_at (struct zmap *z, uint64_t offset, bool *zero, uint64_t *end,
         char *err, size_t errlen)
{
  size_t i;

  if (z->nbd == NULL) {         /* no base:allocation: all data */
    *zero = false;
    *end = z->size;
    return 0;
  }
  if (offset < z->start || offset >= z->start + z->covered) {
    uint64_t want = z->size - offset > (1ull << 30) ? (1ull << 30)
      : z->size - offset;
    z->start = offset;
    z->covered = 0;
    z->n = 0;
    if (nbd_block_status (z->nbd, want, offset,
                          (nbd_extent_callback) { .callback = zmap_cb,
                                                  .user_data = z },
                          0) == -1) {
      return seterr (err, errlen, "block status at %" PRIu64 ": %s", offset,
                     nbd_get_error ());
    }
    if (z->nbd_err)
      return seterr (err, errlen, "block status: out of memory");
    if (z->covered == 0)
      return seterr (err, errlen, "block status at %" PRIu64 ": the server "
                     "described nothing", offset);
  }
  for (i = 0; i < z->n; i++)
    if (offset < z->v[i].end) {
      *zero = z->v[i].zero;
      *end = z->v[i].end;
      return 0;
    }
  return seterr (err, errlen, "block status at %" PRIu64 ": not covered",
                 offset);
}

static int
plan_push (struct colo_plan *p, uint64_t off, uint64_t len, bool zero)
{
  if (p->n == p->cap) {
    size_t cap = p->cap ? p->cap * 2 : 256;
    void *v = realloc (p->v, cap * sizeof *p->v);
    if (v == NULL)
      return -1;
    p->v = v;
    p->cap = cap;
  }
  p->v[p->n++] = (struct colo_plan_extent) { off, len, zero };
  p->total_bytes += len;
  if (zero)
    p->zero_bytes += len;
  return 0;
}

int
colo_union_bitmaps (const char *base, const char *const *names, size_t n,
                    uint64_t disk_size, uint32_t cluster_size, bool frozen,
                    uint8_t **bits, char *err, size_t errlen)
{
  uint64_t nclusters = (disk_size + cluster_size - 1) / cluster_size, k;
  size_t i;

  *bits = calloc (nclusters / 8 + 1, 1);
  if (*bits == NULL)
    return seterr (err, errlen, "calloc: a bitmap of %" PRIu64 " clusters: "
                   "%s", nclusters, strerror (errno));
  for (i = 0; i < n; i++) {
    uint8_t *b;
    if (read_bitmap (base, names[i], disk_size, cluster_size, frozen, &b, err,
                     errlen) == -1) {
      free (*bits);
      *bits = NULL;
      return -1;
    }
    for (k = 0; k < (nclusters + 7) / 8; k++)
      (*bits)[k] |= b[k];
    free (b);
  }
  return 0;
}

int
colo_plan_epoch (const char *base, const char *snapshot, bool full,
                 const char *const *bitmaps, size_t nbitmaps,
                 const uint8_t *extra, uint64_t extra_nbits,
                 uint32_t max_extent, struct colo_plan *plan,
                 char *err, size_t errlen)
{
  char expname[16 + FLEECE_BITMAP_NAME_SIZE];
  struct zmap z = { 0 };
  struct nbd_handle *nbd = NULL;
  uint8_t *bits = NULL;
  uint64_t nclusters, c, run = 0, run_start = 0, max_run;
  int64_t size, cs;
  int r = -1;

  memset (plan, 0, sizeof *plan);
  snprintf (expname, sizeof expname, "snapshot/%s", snapshot);
  nbd = open_export (base, expname, EXPORT_EXTENTS, err, errlen);
  if (nbd == NULL)
    goto out;
  size = nbd_get_size (nbd);
  cs = nbd_get_block_size (nbd, LIBNBD_SIZE_PREFERRED);
  if (size < 0 || cs <= 0 || (cs & (cs - 1)) != 0) {
    seterr (err, errlen, "%s: size or preferred block size (the cluster "
            "size): %s", expname, nbd_get_error ());
    goto out;
  }
  plan->disk_size = size;
  plan->cluster_size = cs;
  z.size = size;
  z.nbd = nbd_can_meta_context (nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1
    ? nbd : NULL;
  if (max_extent < cs)
    max_extent = cs;
  max_run = max_extent / cs;
  nclusters = ((uint64_t) size + cs - 1) / cs;
  if (!full) {
    if (colo_union_bitmaps (base, bitmaps, nbitmaps, size, cs, true, &bits,
                            err, errlen) == -1)
      goto out;
    if (extra) {
      uint64_t k;
      if (extra_nbits != nclusters) {
        seterr (err, errlen, "%s: a bitmap of %" PRIu64 " clusters for a "
                "disk of %" PRIu64, expname, extra_nbits, nclusters);
        goto out;
      }
      for (k = 0; k < (nclusters + 7) / 8; k++)
        bits[k] |= extra[k];
    }
  }
  for (c = 0; c <= nclusters; c++) {
    bool set = c < nclusters && (bits == NULL || (bits[c / 8] >> (c % 8)) & 1);
    if (set && run == 0)
      run_start = c;
    if (set)
      run++;
    if (run > 0 && (!set || run == max_run)) {
      uint64_t off = run_start * cs, end = (run_start + run) * cs;
      if (end > (uint64_t) size)
        end = size;
      /* Cut the run where the snapshot turns from zero to data, on
       * cluster boundaries (a cluster that is partly data is data).
       */
      while (off < end) {
        bool zero = false;
        uint64_t zend = 0, piece;
        if (zmap_at (&z, off, &zero, &zend, err, errlen) == -1)
          goto out;
        if (zero)
          zend = zend - zend % cs;          /* whole zero clusters only */
        else
          zend = (zend + cs - 1) / cs * cs; /* data rounds up */
        if (zend <= off)
          zero = false, zend = off + cs;
        piece = (zend < end ? zend : end) - off;
        if (plan->n && plan->v[plan->n - 1].zero == zero &&
            plan->v[plan->n - 1].offset + plan->v[plan->n - 1].length == off
            && plan->v[plan->n - 1].length + piece <= max_extent &&
            plan->v[plan->n - 1].offset >= run_start * cs) {
          plan->v[plan->n - 1].length += piece;
          plan->total_bytes += piece;
          if (zero)
            plan->zero_bytes += piece;
        }
        else if (plan_push (plan, off, piece, zero) == -1) {
          seterr (err, errlen, "%s: out of memory", expname);
          goto out;
        }
        off += piece;
      }
      run = 0;
    }
  }
  r = 0;
 out:
  free (bits);
  free (z.v);
  if (nbd) {
    nbd_shutdown (nbd, 0);
    nbd_close (nbd);
  }
  if (r == -1)
    colo_plan_free (plan);
  return r;
}

/* Reads run up to READ_AHEAD extents ahead of the one being handed to
 * fn, so that the server reads (and the socket fills) while the caller
 * sends: libnbd's asynchronous reads, completed in plan order.
 */
#define READ_AHEAD 4

int
colo_plan_read (const char *base, const char *snapshot,
                const struct colo_plan *plan, size_t first,
                colo_extent_fn fn, void *opaque, char *err, size_t errlen)
{
  char expname[16 + FLEECE_BITMAP_NAME_SIZE];
  struct nbd_handle *nbd;
  uint32_t maxlen = 0;
  char *bufs[READ_AHEAD] = { NULL };
  int64_t cookies[READ_AHEAD];
  size_t i, issued;
  int r = -1;

  for (i = first; i < plan->n; i++)
    if (!plan->v[i].zero && plan->v[i].length > maxlen)
      maxlen = plan->v[i].length;
  snprintf (expname, sizeof expname, "snapshot/%s", snapshot);
  nbd = open_export (base, expname, 0, err, errlen);
  if (nbd == NULL)
    return -1;
  if (nbd_get_size (nbd) != (int64_t) plan->disk_size) {
    seterr (err, errlen, "%s: the size changed since the plan", expname);
    goto out;
  }
  for (i = 0; i < READ_AHEAD; i++)
    if ((bufs[i] = malloc (maxlen ? maxlen : 1)) == NULL) {
      seterr (err, errlen, "%s: out of memory", expname);
      goto out;
    }
  for (i = issued = first; i < plan->n; i++) {
    const struct colo_plan_extent *x = &plan->v[i], *bad = x;
    char *buf = bufs[i % READ_AHEAD];
    bool zero = x->zero;
    int done;

    for (; issued < plan->n && issued < i + READ_AHEAD; issued++) {
      const struct colo_plan_extent *y = &plan->v[issued];
      if (y->zero)
        continue;
      cookies[issued % READ_AHEAD] =
        nbd_aio_pread (nbd, bufs[issued % READ_AHEAD], y->length, y->offset,
                       NBD_NULL_COMPLETION, 0);
      if (cookies[issued % READ_AHEAD] == -1) {
        bad = y;
        goto read_error;
      }
    }
    if (!zero) {
      while ((done = nbd_aio_command_completed (nbd,
                                                cookies[i % READ_AHEAD])) == 0)
        if (nbd_poll (nbd, -1) == -1)
          goto read_error;
      if (done == -1)
        goto read_error;
      zero = all_zero (buf, x->length);
    }
    if (fn (opaque, x->offset, x->length, zero, zero ? NULL : buf,
            zero ? 0 : XXH64 (buf, x->length, 0)) == -1)
      goto out;
    continue;
  read_error:
    seterr (err, errlen, "%s: read at %" PRIu64 "+%" PRIu32 ": %s",
            expname, bad->offset, bad->length, nbd_get_error ());
    goto out;
  }
  r = 0;
 out:
  nbd_shutdown (nbd, 0);
  nbd_close (nbd);              /* before the buffers reads may fill */
  for (i = 0; i < READ_AHEAD; i++)
    free (bufs[i]);
  return r;
}

void
colo_plan_free (struct colo_plan *plan)
{
  free (plan->v);
  memset (plan, 0, sizeof *plan);
}
