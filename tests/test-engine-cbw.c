/* Copy-before-write and snapshots, checked against a naive model, in the
 * style of QEMU's tests/unit/test-hbitmap.c.
 *
 * The model is deliberately dumb: the live disk is a byte array and each
 * live snapshot is a full copy of that array taken when it was created
 * (with the clusters a client trimmed zeroed).  After every operation of
 * a seeded random sequence the test reads the whole live disk and every
 * snapshot through the engine, plus some unaligned sub-ranges, and
 * compares them with the model.
 *
 * The statistics are modelled too, without the engine's generations: each
 * cluster has a version, bumped by every live write, zero or trim that
 * touches it, and each snapshot remembers the versions it saw.  A live
 * operation preserves version v of cluster c exactly when some live
 * snapshot that has not released c saw v (docs/design.md invariant 2: one copy,
 * however many snapshots share it); the copy is kept while such a snapshot
 * exists, and takes no store space if the cluster was all zeroes
 * (invariant 5).  So cbw_clusters, cbw_zero_clusters, bytes_copied,
 * copies, store_clusters_used and each snapshot's clusters_held are all
 * known exactly after every operation.
 *
 * The random runs are repeated with subcluster=true (sub-cluster copies,
 * writes of a few blocks or less, the last block short); there the data
 * is checked against the model after every operation, and the copy
 * statistics, which count blocks, by directed cases: a 4 KiB write
 * copies 4 KiB, the rest of a cluster is copied once, zero blocks are
 * not stored, a partial copy of an older generation is finished, and the
 * engine's heap per copied and per partly copied cluster (mallinfo2).
 *
 * Then directed cases: one copy for N snapshots, zero detection,
 * coalescing of adjacent clusters, the store shrinking when snapshots go,
 * extents of a sparse disk, handles of deleted snapshots, names, and bad
 * configurations.
 *
 * Environment: FLEECE_TEST_SEED repeats a run, FLEECE_TEST_OPS sets the
 * number of random operations per run.
 *
 * Size.  Over 1000 lines on purpose: the random model run and the
 * directed cases check one engine through one harness (the model, its
 * statistics, the helpers that read every snapshot back); split in
 * files, each would carry a copy of that harness or a header of it
 * that no other test uses.
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <malloc.h>
#ifdef __SANITIZE_ADDRESS__
/* libasan's (sanitizer/allocator_interface.h, which GCC 12 does not
 * install).
 */
extern size_t __sanitizer_get_current_allocated_bytes (void);
#endif

#include "fleece.h"
#include "test-engine.h"

#define KiB 1024u
#define MiB (1024u * 1024u)
#define MAX_SNAPS 6

static struct rng rng;

/* ---- The model ---- */

struct msnap {
  char name[32];
  struct fleece_snap *h;        /* an open handle */
  uint8_t *data;                /* content at creation, released zeroed */
  uint32_t *ver;                /* version of each cluster at creation */
  bool *released;
};

struct model {
  struct fleece *fl;
  uint64_t size;
  uint32_t cs;
  uint64_t nclusters;
  uint8_t *live;
  uint32_t *cur;                /* current version of each cluster */
  struct msnap snaps[MAX_SNAPS];
  unsigned nsnaps;
  unsigned next_name;
  /* Expected cumulative statistics. */
  uint64_t cbw_clusters, cbw_zero, bytes_copied, bytes_written;
  uint32_t last_gen;            /* of the newest snapshot */
  bool sub;                     /* subcluster=true: statistics not modelled,
                                 * the data is */
  /* Scratch. */
  uint8_t *buf, *wbuf;
  /* What the run is doing, for failure messages. */
  unsigned op;
  const char *opname;
  bool failed;
};

static uint64_t
clen (const struct model *m, uint64_t c)
{
  uint64_t start = c * m->cs;

  return m->size - start < m->cs ? m->size - start : m->cs;
}

static bool
is_zero (const uint8_t *p, size_t len)
{
  size_t i;

  for (i = 0; i < len; i++)
    if (p[i])
      return false;
  return true;
}

/* Report a model failure once per run, with what was going on. */
static void fail (struct model *m, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
static void
fail (struct model *m, const char *fmt, ...)
{
  char msg[512];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  if (!m->failed)
    diag ("op %u (%s): %s", m->op, m->opname, msg);
  m->failed = true;
}

/* Some live snapshot that has not released c saw its current version:
 * the next live operation on c must preserve it.
 */
static bool
model_needs_copy (const struct model *m, uint64_t c)
{
  unsigned i;

  for (i = 0; i < m->nsnaps; i++)
    if (!m->snaps[i].released[c] && m->snaps[i].ver[c] == m->cur[c])
      return true;
  return false;
}

/* Before a live write, zero or trim of [off, off+len). */
static void
model_cbw (struct model *m, uint64_t off, uint64_t len)
{
  uint64_t c, c0 = off / m->cs, c1 = (off + len - 1) / m->cs;

  for (c = c0; c <= c1; c++) {
    if (model_needs_copy (m, c)) {
      m->cbw_clusters++;
      if (is_zero (m->live + c * m->cs, clen (m, c)))
        m->cbw_zero++;
      else
        m->bytes_copied += clen (m, c);
    }
    m->cur[c]++;
  }
  m->bytes_written += len;
}

/* Copies the model expects now: distinct old versions still seen by an
 * unreleasing snapshot, and how many of them hold data.
 */
static void
model_copies (const struct model *m, uint64_t *copies, uint64_t *used)
{
  uint64_t c;
  unsigned i, j;

  *copies = *used = 0;
  for (c = 0; c < m->nclusters; c++) {
    for (i = 0; i < m->nsnaps; i++) {
      const struct msnap *s = &m->snaps[i];
      bool seen = false;
      if (s->released[c] || s->ver[c] == m->cur[c])
        continue;
      for (j = 0; j < i; j++)
        if (!m->snaps[j].released[c] && m->snaps[j].ver[c] == s->ver[c])
          seen = true;
      if (seen)
        continue;
      (*copies)++;
      if (!is_zero (s->data + c * m->cs, clen (m, c)))
        (*used)++;
    }
  }
}

static void
check_stats (struct model *m)
{
  struct fleece_stats st;
  uint64_t copies, used, c;
  unsigned i;

  settled_stats (m->fl, &st);
  model_copies (m, &copies, &used);
  if (st.snapshots != m->nsnaps)
    fail (m, "stats: %u snapshots, model %u", st.snapshots, m->nsnaps);
  if (m->sub)
    goto snapshots;             /* copies are counted per block */
  if (st.cbw_clusters != m->cbw_clusters)
    fail (m, "stats: cbw_clusters %" PRIu64 ", model %" PRIu64,
          st.cbw_clusters, m->cbw_clusters);
  if (st.cbw_zero_clusters != m->cbw_zero)
    fail (m, "stats: cbw_zero_clusters %" PRIu64 ", model %" PRIu64,
          st.cbw_zero_clusters, m->cbw_zero);
  if (st.bytes_copied != m->bytes_copied)
    fail (m, "stats: bytes_copied %" PRIu64 ", model %" PRIu64,
          st.bytes_copied, m->bytes_copied);
  if (st.copies != copies)
    fail (m, "stats: copies %" PRIu64 ", model %" PRIu64, st.copies, copies);
  if (st.store_clusters_used != used)
    fail (m, "stats: store_clusters_used %" PRIu64 ", model %" PRIu64,
          st.store_clusters_used, used);
  if (st.store_bytes_used != used * m->cs)
    fail (m, "stats: store_bytes_used %" PRIu64 ", model %" PRIu64,
          st.store_bytes_used, used * m->cs);
  if (st.bytes_written != m->bytes_written)
    fail (m, "stats: bytes_written %" PRIu64 ", model %" PRIu64,
          st.bytes_written, m->bytes_written);
  if (st.cbw_errors != 0)
    fail (m, "stats: cbw_errors %" PRIu64, st.cbw_errors);

 snapshots:
  for (i = 0; i < m->nsnaps; i++) {
    const struct msnap *s = &m->snaps[i];
    struct fleece_snap_info info;
    uint64_t held = 0, released = 0;

    for (c = 0; c < m->nclusters; c++) {
      released += s->released[c];
      held += !s->released[c] && s->ver[c] != m->cur[c];
    }
    if (fleece_snapshot_info (m->fl, s->name, &info) == -1) {
      fail (m, "fleece_snapshot_info: %s: %s", s->name, fleece_last_error ());
      continue;
    }
    if (info.clusters_held != held && !m->sub)
      fail (m, "snapshot %s: clusters_held %" PRIu64 ", model %" PRIu64,
            s->name, info.clusters_held, held);
    if (info.clusters_released != released)
      fail (m, "snapshot %s: clusters_released %" PRIu64 ", model %" PRIu64,
            s->name, info.clusters_released, released);
    if (info.broken)
      fail (m, "snapshot %s is broken: %s", s->name, info.broken_reason);
    if (info.readers != 1)
      fail (m, "snapshot %s: %u readers, expected 1", s->name, info.readers);
  }
}

static void
compare (struct model *m, const char *what, const uint8_t *got,
         const uint8_t *want, uint64_t off, uint64_t len)
{
  int64_t d = test_first_diff (got, want, len);

  if (d >= 0)
    fail (m, "%s: read %" PRIu64 "+%" PRIu64 " differs from the model at "
          "offset %" PRIu64 " (cluster %" PRIu64 "): 0x%02x, expected 0x%02x",
          what, off, len, off + d, (off + d) / m->cs, got[d], want[d]);
}

/* A random range: unaligned or cluster aligned, crossing cluster edges,
 * sometimes ending at the end of the disk (the last, short cluster).
 */
static void
rand_range (struct model *m, uint64_t maxlen, uint64_t *off, uint64_t *len)
{
  uint64_t o, l;

  if (rng_one_in (&rng, 4))
    o = rng_below (&rng, m->nclusters) * m->cs;
  else
    o = rng_below (&rng, m->size);
  if (rng_one_in (&rng, 4))
    l = (1 + rng_below (&rng, maxlen / m->cs + 1)) * m->cs;
  else
    l = 1 + rng_below (&rng, maxlen);
  if (m->sub && rng_one_in (&rng, 2))   /* a few blocks, or less */
    l = 1 + rng_below (&rng, 3 * 4 * KiB);
  if (rng_one_in (&rng, 8)) {           /* the tail of the disk */
    l = 1 + rng_below (&rng, m->cs + m->cs / 2);
    if (l > m->size)
      l = m->size;
    o = m->size - l;
  }
  if (o + l > m->size)
    l = m->size - o;
  *off = o;
  *len = l;
}

static void
check_snap_read (struct model *m, struct msnap *s, uint64_t off,
                 uint64_t len)
{
  char what[64];

  snprintf (what, sizeof what, "snapshot %s", s->name);
  if (fleece_snap_pread (s->h, m->buf, len, off) == -1) {
    fail (m, "fleece_snap_pread: %s: %" PRIu64 "+%" PRIu64 ": %s", s->name,
          off, len, fleece_last_error ());
    return;
  }
  compare (m, what, m->buf, s->data + off, off, len);
}

struct ext_check {
  struct model *m;
  const char *what;
  const uint8_t *data;
  uint64_t next;
};

static int
ext_cb (void *opaque, uint64_t offset, uint64_t length, uint32_t type)
{
  struct ext_check *e = opaque;

  if (offset != e->next)
    fail (e->m, "%s: extent at %" PRIu64 ", expected %" PRIu64, e->what,
          offset, e->next);
  if (length == 0)
    fail (e->m, "%s: empty extent at %" PRIu64, e->what, offset);
  if ((type & FLEECE_EXTENT_ZERO) && !is_zero (e->data + offset, length))
    fail (e->m, "%s: extent %" PRIu64 "+%" PRIu64 " reported zero, but "
          "holds data (first non-zero byte near cluster %" PRIu64 ")",
          e->what, offset, length, offset / e->m->cs);
  e->next = offset + length;
  return 0;
}

static void
check_extents (struct model *m)
{
  struct ext_check e = { .m = m, .what = "live", .data = m->live };
  unsigned i;

  if (fleece_live_extents (m->fl, m->size, 0, ext_cb, &e) == -1)
    fail (m, "fleece_live_extents: %s", fleece_last_error ());
  else if (e.next != m->size)
    fail (m, "live extents end at %" PRIu64, e.next);
  for (i = 0; i < m->nsnaps; i++) {
    struct msnap *s = &m->snaps[i];
    e = (struct ext_check) { .m = m, .what = s->name, .data = s->data };
    /* A snapshot's reply may cover less than asked (a bounded number of
     * extents from the disk), as NBD allows: ask again for the rest, as a
     * client does, and each reply must cover something.
     */
    while (e.next < m->size) {
      uint64_t from = e.next;
      if (fleece_snap_extents (s->h, m->size - from, from, ext_cb, &e)
          == -1) {
        fail (m, "fleece_snap_extents: %s: %s", s->name,
              fleece_last_error ());
        break;
      }
      if (e.next == from) {
        fail (m, "snapshot %s: no extent from %" PRIu64, s->name, from);
        break;
      }
    }
    if (e.next != m->size)
      fail (m, "snapshot %s: extents end at %" PRIu64, s->name, e.next);
  }
}

/* Everything the engine returns must match the model. */
static void
check_all (struct model *m)
{
  unsigned i, k;

  if (fleece_live_pread (m->fl, m->buf, m->size, 0) == -1)
    fail (m, "fleece_live_pread: %s", fleece_last_error ());
  else
    compare (m, "live", m->buf, m->live, 0, m->size);
  for (i = 0; i < m->nsnaps; i++) {
    struct msnap *s = &m->snaps[i];
    check_snap_read (m, s, 0, m->size);
    for (k = 0; k < 3; k++) {
      uint64_t off, len;
      rand_range (m, 3 * m->cs, &off, &len);
      check_snap_read (m, s, off, len);
    }
  }
  check_stats (m);
}

/* ---- Operations ---- */

static void
op_pwrite (struct model *m, uint64_t maxlen)
{
  uint64_t off, len;
  uint32_t flags = rng_one_in (&rng, 8) ? FLEECE_F_FUA : 0;

  rand_range (m, maxlen, &off, &len);
  switch (rng_below (&rng, 6)) {
  case 0:
    memset (m->wbuf, 0, len);
    break;
  case 1:
    memset (m->wbuf, 1 + rng_below (&rng, 255), len);
    break;
  default:
    rng_fill (&rng, m->wbuf, len);
  }
  model_cbw (m, off, len);
  if (fleece_live_pwrite (m->fl, m->wbuf, len, off, flags) == -1) {
    fail (m, "fleece_live_pwrite %" PRIu64 "+%" PRIu64 ": %s", off, len,
          fleece_last_error ());
    return;
  }
  memcpy (m->live + off, m->wbuf, len);
}

static void
op_zero (struct model *m)
{
  uint64_t off, len;
  uint32_t flags = rng_one_in (&rng, 2) ? FLEECE_F_MAY_TRIM : 0;

  rand_range (m, 4 * m->cs, &off, &len);
  model_cbw (m, off, len);
  if (fleece_live_zero (m->fl, len, off, flags) == -1) {
    fail (m, "fleece_live_zero %" PRIu64 "+%" PRIu64 ": %s", off, len,
          fleece_last_error ());
    return;
  }
  memset (m->live + off, 0, len);
}

/* After a trim the live content of the range is unspecified: read it
 * back into the model.  Snapshots must still hold the old content.
 */
static void
op_trim (struct model *m)
{
  uint64_t off, len;

  rand_range (m, 4 * m->cs, &off, &len);
  model_cbw (m, off, len);
  if (fleece_live_trim (m->fl, len, off, 0) == -1) {
    fail (m, "fleece_live_trim %" PRIu64 "+%" PRIu64 ": %s", off, len,
          fleece_last_error ());
    return;
  }
  if (fleece_live_pread (m->fl, m->live + off, len, off) == -1)
    fail (m, "fleece_live_pread after trim: %s", fleece_last_error ());
}

static void
op_create (struct model *m)
{
  struct msnap *s = &m->snaps[m->nsnaps];

  snprintf (s->name, sizeof s->name, "snap-%u", m->next_name++);
  if (fleece_snapshot_create (m->fl, s->name) == -1) {
    fail (m, "fleece_snapshot_create %s: %s", s->name, fleece_last_error ());
    return;
  }
  s->h = fleece_snap_get (m->fl, s->name);
  if (s->h == NULL) {
    fail (m, "fleece_snap_get %s: %s", s->name, fleece_last_error ());
    return;
  }
  {
    struct fleece_snap_info info = { .generation = 0 };
    if (fleece_snapshot_info (m->fl, s->name, &info) == -1 ||
        info.generation <= m->last_gen ||
        strcmp (info.name, s->name) != 0 || info.broken)
      fail (m, "snapshot %s: generation %u after %u, or bad info", s->name,
            info.generation, m->last_gen);
    m->last_gen = info.generation;
  }
  s->data = malloc (m->size);
  s->ver = malloc (m->nclusters * sizeof *s->ver);
  s->released = calloc (m->nclusters, sizeof *s->released);
  assert (s->data && s->ver && s->released);
  memcpy (s->data, m->live, m->size);
  memcpy (s->ver, m->cur, m->nclusters * sizeof *s->ver);
  m->nsnaps++;
}

static void
msnap_free (struct msnap *s)
{
  free (s->data);
  free (s->ver);
  free (s->released);
}

/* Delete snapshot i; sometimes keep the handle open to check that it
 * fails with EINVAL afterwards (what NBD carries; the snapshot is then
 * unknown: ENOENT).
 */
static void
op_delete (struct model *m, unsigned i)
{
  struct msnap s = m->snaps[i];
  bool keep = rng_one_in (&rng, 2);
  struct fleece_snap *h2;

  if (!keep)
    fleece_snap_put (s.h);
  memmove (&m->snaps[i], &m->snaps[i + 1],
           (m->nsnaps - i - 1) * sizeof m->snaps[0]);
  m->nsnaps--;
  if (fleece_snapshot_delete (m->fl, s.name) == -1)
    fail (m, "fleece_snapshot_delete %s: %s", s.name, fleece_last_error ());
  if (keep) {
    errno = 0;
    if (fleece_snap_pread (s.h, m->buf, 1, 0) != -1 || errno != EINVAL)
      fail (m, "read of deleted snapshot %s: did not fail with EINVAL",
            s.name);
    fleece_snap_put (s.h);
  }
  errno = 0;
  h2 = fleece_snap_get (m->fl, s.name);
  if (h2 != NULL || errno != ENOENT) {
    fail (m, "fleece_snap_get of deleted %s did not fail with ENOENT",
          s.name);
    fleece_snap_put (h2);
  }
  msnap_free (&s);
}

/* A client of snapshot i trims a range: whole clusters in it (the short
 * last one counts as whole if the range reaches the end) read as zeroes
 * from now on; partial clusters are unchanged.
 */
static void
op_snap_trim (struct model *m, unsigned i)
{
  struct msnap *s = &m->snaps[i];
  uint64_t off, len, end, c0, c1, c;

  rand_range (m, 6 * m->cs, &off, &len);
  if (fleece_snap_trim (s->h, len, off) == -1) {
    fail (m, "fleece_snap_trim %s %" PRIu64 "+%" PRIu64 ": %s", s->name,
          off, len, fleece_last_error ());
    return;
  }
  end = off + len;
  c0 = (off + m->cs - 1) / m->cs;
  c1 = end == m->size ? m->nclusters : end / m->cs;
  for (c = c0; c < c1; c++) {
    s->released[c] = true;
    memset (s->data + c * m->cs, 0, clen (m, c));
  }
}

/* A second handle to a snapshot reads the same. */
static void
op_second_handle (struct model *m, unsigned i)
{
  struct msnap *s = &m->snaps[i];
  struct fleece_snap *h = fleece_snap_get (m->fl, s->name);
  uint64_t off, len;

  if (h == NULL) {
    fail (m, "fleece_snap_get %s: %s", s->name, fleece_last_error ());
    return;
  }
  rand_range (m, 8 * m->cs, &off, &len);
  if (fleece_snap_pread (h, m->buf, len, off) == -1)
    fail (m, "second handle of %s: %s", s->name, fleece_last_error ());
  else
    compare (m, s->name, m->buf, s->data + off, off, len);
  fleece_snap_put (h);
}

/* Initial content: random data in most 4 KiB blocks, the others left as
 * holes (so zero), and a few whole zero clusters.
 */
static void
fill_disk (struct model *m, const char *path)
{
  uint64_t b, nblocks = (m->size + 4095) / 4096;
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

  if (fd == -1 || ftruncate (fd, m->size) == -1)
    bail_out ("%s: %m", path);
  memset (m->live, 0, m->size);
  for (b = 0; b < nblocks; b++) {
    uint64_t off = b * 4096, len = m->size - off < 4096 ? m->size - off : 4096;
    if ((off / m->cs) % 7 == 3 || rng_one_in (&rng, 4))
      continue;                 /* a hole */
    rng_fill (&rng, m->live + off, len);
    if (pwrite (fd, m->live + off, len, off) != (ssize_t) len)
      bail_out ("pwrite: %s: %m", path);
  }
  close (fd);
}

static void
random_run (uint64_t size, uint32_t cs, unsigned nops)
{
  const char *disk = test_path ("disk"), *store = test_path ("store");
  struct model m = { .size = size, .cs = cs, .sub = test_subcluster };
  unsigned counts[9] = { 0 }, maxsnaps = 0;
  static const char *names[9] = {
    "pwrite", "pwrite-large", "zero", "trim", "create", "delete",
    "snap-trim", "second-handle", "extents",
  };

  m.nclusters = (size + cs - 1) / cs;
  m.live = malloc (size);
  m.buf = malloc (size);
  m.wbuf = malloc (size);
  m.cur = calloc (m.nclusters, sizeof *m.cur);
  assert (m.live && m.buf && m.wbuf && m.cur);
  fill_disk (&m, disk);
  m.fl = test_open (disk, store, cs);
  m.opname = "open";
  check_all (&m);

  for (m.op = 0; m.op < nops && !m.failed; m.op++) {
    unsigned k, r = rng_below (&rng, 100);

    if (r < 35) k = 0;
    else if (r < 40) k = 1;
    else if (r < 50) k = 2;
    else if (r < 57) k = 3;
    else if (r < 68) k = 4;
    else if (r < 76) k = 5;
    else if (r < 88) k = 6;
    else if (r < 94) k = 7;
    else k = 8;
    if (k == 4 && m.nsnaps == MAX_SNAPS)
      k = 5;
    if ((k == 5 || k == 6 || k == 7) && m.nsnaps == 0)
      k = 4;
    m.opname = names[k];
    counts[k]++;
    switch (k) {
    case 0: op_pwrite (&m, 3 * cs); break;
    case 1: op_pwrite (&m, 12 * cs); break;
    case 2: op_zero (&m); break;
    case 3: op_trim (&m); break;
    case 4: op_create (&m); break;
    case 5: op_delete (&m, rng_below (&rng, m.nsnaps)); break;
    case 6: op_snap_trim (&m, rng_below (&rng, m.nsnaps)); break;
    case 7: op_second_handle (&m, rng_below (&rng, m.nsnaps)); break;
    case 8: check_extents (&m); break;
    }
    if (m.nsnaps > maxsnaps)
      maxsnaps = m.nsnaps;
    check_all (&m);
  }
  ok (!m.failed, "random run, disk %" PRIu64 " bytes, %" PRIu32 " byte "
      "clusters%s: live disk, snapshots and statistics match the model "
      "after each of %u operations", size, cs,
      m.sub ? ", subcluster (data only)" : "", m.op);
  diag ("  pwrite %u, large %u, zero %u, trim %u, create %u, delete %u, "
        "snap-trim %u, second handle %u, extents %u; up to %u snapshots",
        counts[0], counts[1], counts[2], counts[3], counts[4], counts[5],
        counts[6], counts[7], counts[8], maxsnaps);
  diag ("  %" PRIu64 " clusters copied, %" PRIu64 " of them zero, %" PRIu64
        " bytes copied", m.cbw_clusters, m.cbw_zero, m.bytes_copied);

  /* Deleting every snapshot frees every copy. */
  m.opname = "delete all";
  while (m.nsnaps > 0)
    op_delete (&m, m.nsnaps - 1);
  check_all (&m);
  {
    struct fleece_stats st;
    settled_stats (m.fl, &st);
    ok (st.copies == 0 && st.store_clusters_used == 0 &&
        st.partial_clusters == 0 && !m.failed,
        "after deleting every snapshot%s: %" PRIu64 " copies, %" PRIu64
        " partly copied, %" PRIu64 " store clusters used",
        m.sub ? " (subcluster)" : "", st.copies, st.partial_clusters,
        st.store_clusters_used);
  }
  fleece_close (m.fl);
  free (m.live);
  free (m.buf);
  free (m.wbuf);
  free (m.cur);
}

/* ---- Directed cases ---- */

/* A disk of n clusters of random non-zero data; returns its content. */
static uint8_t *
make_disk (const char *path, uint64_t size)
{
  uint8_t *data = malloc (size);
  uint64_t i;

  assert (data);
  rng_fill (&rng, data, size);
  for (i = 0; i < size; i++)
    data[i] |= data[i] == 0;
  test_write_disk (path, data, size);
  return data;
}

static void
snap_read_equals (struct fleece *fl, const char *name, const uint8_t *want,
                  uint64_t off, uint64_t len, const char *what)
{
  struct fleece_snap *h = fleece_snap_get (fl, name);
  uint8_t *buf = malloc (len);
  bool good = false;

  assert (buf);
  if (h && fleece_snap_pread (h, buf, len, off) == 0)
    good = memcmp (buf, want + off, len) == 0;
  else
    diag ("%s: %s", name, fleece_last_error ());
  ok (good, "%s: snapshot %s reads %" PRIu64 "+%" PRIu64 " as at creation",
      what, name, off, len);
  fleece_snap_put (h);
  free (buf);
}

static uint64_t
held (struct fleece *fl, const char *name)
{
  struct fleece_snap_info info;

  if (fleece_snapshot_info (fl, name, &info) == -1) {
    diag ("fleece_snapshot_info: %s", fleece_last_error ());
    return UINT64_MAX;
  }
  return info.clusters_held;
}

/* Invariant 2: N snapshots with no write between them share one copy. */
static void
test_one_copy (void)
{
  const uint32_t cs = 16 * KiB;
  const uint64_t size = 64 * cs;
  const char *disk = test_path ("disk"), *store = test_path ("store");
  uint8_t *data = make_disk (disk, size), patch[100];
  struct fleece *fl = test_open (disk, store, cs);
  struct fleece_stats s0, s1, s2;
  char name[16];
  bool all_held = true;
  int i;

  for (i = 0; i < 5; i++) {
    snprintf (name, sizeof name, "n%d", i);
    if (fleece_snapshot_create (fl, name) == -1)
      bail_out ("fleece_snapshot_create: %s", fleece_last_error ());
  }
  settled_stats (fl, &s0);
  memset (patch, 0xab, sizeof patch);
  if (fleece_live_pwrite (fl, patch, sizeof patch, 7 * cs + 5000, 0) == -1)
    bail_out ("fleece_live_pwrite: %s", fleece_last_error ());
  settled_stats (fl, &s1);
  ok (s1.cbw_clusters == s0.cbw_clusters + 1 && s1.copies == s0.copies + 1 &&
      s1.store_clusters_used == s0.store_clusters_used + 1 &&
      s1.bytes_copied == s0.bytes_copied + cs,
      "one overwrite under 5 snapshots: cbw_clusters +%" PRIu64 ", copies +%"
      PRIu64 ", store clusters +%" PRIu64 ", bytes copied +%" PRIu64
      " (expected 1, 1, 1, %" PRIu32 ")",
      s1.cbw_clusters - s0.cbw_clusters, s1.copies - s0.copies,
      s1.store_clusters_used - s0.store_clusters_used,
      s1.bytes_copied - s0.bytes_copied, cs);
  for (i = 0; i < 5; i++) {
    snprintf (name, sizeof name, "n%d", i);
    all_held &= held (fl, name) == 1;
  }
  ok (all_held, "each of the 5 snapshots counts the shared copy in "
      "clusters_held");
  for (i = 0; i < 5; i++) {
    snprintf (name, sizeof name, "n%d", i);
    snap_read_equals (fl, name, data, 6 * cs, 3 * cs, "one copy");
  }

  /* A second write in the same generation copies nothing. */
  if (fleece_live_pwrite (fl, patch, sizeof patch, 8 * cs - 50, 0) == -1)
    bail_out ("fleece_live_pwrite: %s", fleece_last_error ());
  settled_stats (fl, &s2);
  ok (s2.cbw_clusters == s1.cbw_clusters + 1 && s2.copies == s1.copies + 1,
      "a write across clusters 7 and 8 copies only cluster 8 (+%" PRIu64
      " clusters)", s2.cbw_clusters - s1.cbw_clusters);

  /* A sixth snapshot needs its own copy of cluster 7 at the next write. */
  if (fleece_snapshot_create (fl, "n5") == -1)
    bail_out ("fleece_snapshot_create: %s", fleece_last_error ());
  if (fleece_live_pwrite (fl, patch, 10, 7 * cs, 0) == -1)
    bail_out ("fleece_live_pwrite: %s", fleece_last_error ());
  settled_stats (fl, &s1);
  ok (s1.cbw_clusters == s2.cbw_clusters + 1 && s1.copies == s2.copies + 1 &&
      held (fl, "n5") == 1 && held (fl, "n0") == 2,
      "a newer snapshot gets one new copy; n5 holds 1, n0 holds 2");
  if (fleece_snapshot_delete (fl, "n5") == -1)
    bail_out ("fleece_snapshot_delete: %s", fleece_last_error ());
  settled_stats (fl, &s2);
  ok (s2.copies == 2 && s2.store_clusters_used == 2,
      "deleting n5 frees its copy only (%" PRIu64 " copies left)", s2.copies);
  for (i = 0; i < 5; i++) {
    snprintf (name, sizeof name, "n%d", i);
    fleece_snapshot_delete (fl, name);
  }
  settled_stats (fl, &s2);
  ok (s2.copies == 0 && s2.store_clusters_used == 0 && s2.snapshots == 0,
      "deleting all snapshots frees all copies");
  fleece_close (fl);
  free (data);
}

/* A byte map of extent types over the whole disk. */
struct ext_map {
  uint8_t *type;
  uint64_t next;
  bool contiguous;
};

static int
map_cb (void *opaque, uint64_t offset, uint64_t length, uint32_t type)
{
  struct ext_map *x = opaque;

  if (offset != x->next)
    x->contiguous = false;
  memset (x->type + offset, type, length);
  x->next = offset + length;
  return 0;
}

/* Is every byte of [off, off+len) of type t? */
static bool
map_is (const struct ext_map *x, uint64_t off, uint64_t len, uint8_t t)
{
  uint64_t i;

  for (i = off; i < off + len; i++)
    if (x->type[i] != t)
      return false;
  return true;
}

/* Invariant 5: a cluster of zeroes is recorded, not stored. */
static void
test_zero_detection (void)
{
  const uint32_t cs = 16 * KiB;
  const uint64_t size = 32 * cs;
  const char *disk = test_path ("disk"), *store = test_path ("store");
  uint8_t *data = malloc (size), patch[300];
  struct fleece *fl;
  struct fleece_stats s0, s1;
  struct ext_check e;
  struct model fake = { .cs = cs };

  assert (data);
  rng_fill (&rng, data, size);
  memset (data + 3 * cs, 0, cs);                /* written zeroes */
  test_write_disk (disk, data, size);
  fl = test_open (disk, store, cs);
  if (fleece_snapshot_create (fl, "z") == -1)
    bail_out ("fleece_snapshot_create: %s", fleece_last_error ());
  settled_stats (fl, &s0);
  memset (patch, 0x5a, sizeof patch);
  if (fleece_live_pwrite (fl, patch, sizeof patch, 3 * cs + 1000, 0) == -1)
    bail_out ("fleece_live_pwrite: %s", fleece_last_error ());
  settled_stats (fl, &s1);
  ok (s1.cbw_zero_clusters == s0.cbw_zero_clusters + 1 &&
      s1.cbw_clusters == s0.cbw_clusters + 1 &&
      s1.store_clusters_used == s0.store_clusters_used &&
      s1.bytes_copied == s0.bytes_copied && s1.copies == s0.copies + 1,
      "overwriting a zero cluster: cbw_zero_clusters +%" PRIu64
      ", store_clusters_used +%" PRIu64 ", bytes_copied +%" PRIu64,
      s1.cbw_zero_clusters - s0.cbw_zero_clusters,
      s1.store_clusters_used - s0.store_clusters_used,
      s1.bytes_copied - s0.bytes_copied);
  snap_read_equals (fl, "z", data, 2 * cs + 7, 3 * cs, "zero cluster");

  {
    struct fleece_snap *h = fleece_snap_get (fl, "z");
    e = (struct ext_check) { .m = &fake, .what = "z", .data = data };
    fake.failed = false;
    ok (h && fleece_snap_extents (h, size, 0, ext_cb, &e) == 0 &&
        e.next == size && !fake.failed,
        "snapshot extents never report data as zero");
    fleece_snap_put (h);
  }
  {
    struct fleece_snap *h = fleece_snap_get (fl, "z");
    struct ext_map x = { .type = malloc (size), .contiguous = true };
    assert (x.type);
    ok (h && fleece_snap_extents (h, size, 0, map_cb, &x) == 0 &&
        x.contiguous && x.next == size &&
        map_is (&x, 3 * cs, cs, FLEECE_EXTENT_HOLE | FLEECE_EXTENT_ZERO),
        "snapshot extents report the zero cluster as HOLE|ZERO");
    fleece_snap_put (h);
    free (x.type);
  }
  fleece_close (fl);
  free (data);
}

/* Adjacent clusters are copied together (one read, one write into
 * adjacent store slots).
 */
static void
test_coalescing (void)
{
  const uint32_t cs = 16 * KiB;
  const uint64_t size = 64 * cs;
  const char *disk = test_path ("disk"), *store = test_path ("store");
  uint8_t *data = make_disk (disk, size), *patch = malloc (8 * cs);
  struct fleece *fl = test_open (disk, store, cs);
  struct fleece_stats s0, s1;
  const uint64_t off = 10 * cs + 777, len = 7 * cs - 277;   /* 10..17 */

  assert (patch);
  memset (patch, 0xc3, 8 * cs);
  if (fleece_snapshot_create (fl, "c") == -1)
    bail_out ("fleece_snapshot_create: %s", fleece_last_error ());
  settled_stats (fl, &s0);
  if (fleece_live_pwrite (fl, patch, len, off, 0) == -1)
    bail_out ("fleece_live_pwrite: %s", fleece_last_error ());
  settled_stats (fl, &s1);
  ok (s1.cbw_clusters == s0.cbw_clusters + 8 && s1.copies == s0.copies + 8 &&
      s1.store_clusters_used == s0.store_clusters_used + 8 &&
      s1.bytes_copied == s0.bytes_copied + 8 * cs,
      "one write over 8 uncopied clusters: cbw_clusters +%" PRIu64
      ", copies +%" PRIu64 ", bytes copied +%" PRIu64,
      s1.cbw_clusters - s0.cbw_clusters, s1.copies - s0.copies,
      s1.bytes_copied - s0.bytes_copied);
  ok (s1.store_clusters_total == 8,
      "... into 8 adjacent store slots (store spans %" PRIu64 " slots)",
      s1.store_clusters_total);
  snap_read_equals (fl, "c", data, 9 * cs, 10 * cs, "coalescing");
  fleece_close (fl);
  free (data);
  free (patch);
}

/* Deleting snapshots frees the copies and punches them out of the store
 * file.
 */
static void
test_store_shrinks (void)
{
  const uint32_t cs = 16 * KiB;
  const uint64_t size = 64 * cs;
  const char *disk = test_path ("disk"), *store = test_path ("store");
  uint8_t *data = make_disk (disk, size), *patch = malloc (40 * cs);
  struct fleece *fl = test_open (disk, store, cs);
  struct fleece_stats s0, s1;

  assert (patch);
  rng_fill (&rng, patch, 40 * cs);
  patch[0] |= 1;
  if (fleece_snapshot_create (fl, "a") == -1 ||
      fleece_live_pwrite (fl, patch, 40 * cs, 3 * cs, 0) == -1 ||
      fleece_snapshot_create (fl, "b") == -1 ||
      fleece_live_pwrite (fl, patch + 1, 40 * cs - 1, 3 * cs, 0) == -1)
    bail_out ("%s", fleece_last_error ());
  settled_stats (fl, &s0);
  ok (s0.store_clusters_used == 80 && s0.copies == 80,
      "two generations of 40 clusters: %" PRIu64 " store clusters used",
      s0.store_clusters_used);
  snap_read_equals (fl, "a", data, 0, size, "two generations");
  if (fleece_snapshot_delete (fl, "a") == -1 ||
      fleece_snapshot_delete (fl, "b") == -1)
    bail_out ("%s", fleece_last_error ());
  settled_stats (fl, &s1);
  ok (s1.store_clusters_used == 0 && s1.copies == 0 &&
      s1.store_clusters_total == 0,
      "after deleting both: %" PRIu64 " used, %" PRIu64 " copies",
      s1.store_clusters_used, s1.copies);
  ok (s1.store_file_bytes + 70 * cs <= s0.store_file_bytes,
      "the store file shrank from %" PRIu64 " to %" PRIu64 " bytes on disk",
      s0.store_file_bytes, s1.store_file_bytes);
  fleece_close (fl);
  free (data);
  free (patch);
}

/* Extents of a snapshot of a sparse disk: holes are HOLE|ZERO, data is
 * data, before and after the live disk changes under the snapshot.
 */
static void
test_extents_sparse (void)
{
  const uint32_t cs = 16 * KiB;
  const uint64_t size = 1 * MiB + 12 * KiB;     /* 65 clusters, last short */
  const char *disk = test_path ("disk"), *store = test_path ("store");
  uint8_t *data = calloc (1, size), *patch = malloc (2 * cs);
  struct ext_map x = { .type = malloc (size) };
  struct fleece *fl;
  struct fleece_snap *h;
  const uint32_t HZ = FLEECE_EXTENT_HOLE | FLEECE_EXTENT_ZERO;
  struct model fake = { .cs = cs };
  struct ext_check e;
  int pass;

  assert (data && patch && x.type);
  rng_fill (&rng, data + 20 * cs, 10 * cs);
  data[20 * cs] |= 1;
  data[30 * cs - 1] |= 1;
  test_write_disk (disk, NULL, size);           /* all hole */
  {
    int fd = open (disk, O_WRONLY | O_CLOEXEC);
    if (fd == -1 ||
        pwrite (fd, data + 20 * cs, 10 * cs, 20 * cs) != 10 * cs)
      bail_out ("%s: %m", disk);
    close (fd);
  }
  fl = test_open (disk, store, cs);
  if (fleece_snapshot_create (fl, "sp") == -1 ||
      (h = fleece_snap_get (fl, "sp")) == NULL)
    bail_out ("%s", fleece_last_error ());

  for (pass = 0; pass < 2; pass++) {
    const char *when = pass == 0 ? "before" : "after";
    x.next = 0;
    x.contiguous = true;
    memset (x.type, 0xff, size);
    ok (fleece_snap_extents (h, size, 0, map_cb, &x) == 0 &&
        x.contiguous && x.next == size,
        "%s live changes: snapshot extents cover the disk", when);
    ok (map_is (&x, 0, 20 * cs, HZ) && map_is (&x, 30 * cs, size - 30 * cs,
                                               HZ),
        "%s live changes: the holes are HOLE|ZERO", when);
    ok (map_is (&x, 20 * cs, 10 * cs, 0),
        "%s live changes: the data is data", when);
    /* Unaligned sub-range queries agree. */
    x.next = 19 * cs + 100;
    ok (fleece_snap_extents (h, 2 * cs, 19 * cs + 100, map_cb, &x) == 0 &&
        map_is (&x, 19 * cs + 100, cs - 100, HZ) &&
        map_is (&x, 20 * cs, cs + 100, 0),
        "%s live changes: an unaligned query across the edge agrees", when);
    if (pass == 1)
      break;
    /* Now change the live disk: data into a hole, into the data, zero
     * with trim, trim, and the short last cluster.
     */
    rng_fill (&rng, patch, 2 * cs);
    patch[0] |= 1;
    if (fleece_live_pwrite (fl, patch, cs + 10, 5 * cs - 5, 0) == -1 ||
        fleece_live_pwrite (fl, patch, 100, 25 * cs + 3, 0) == -1 ||
        fleece_live_zero (fl, 2 * cs, 26 * cs, FLEECE_F_MAY_TRIM) == -1 ||
        fleece_live_trim (fl, cs, 28 * cs, 0) == -1 ||
        fleece_live_pwrite (fl, patch, 1000, size - 1000, 0) == -1)
      bail_out ("%s", fleece_last_error ());
  }
  snap_read_equals (fl, "sp", data, 0, size, "sparse");
  e = (struct ext_check) { .m = &fake, .what = "sp", .data = data };
  ok (fleece_snap_extents (h, size, 0, ext_cb, &e) == 0 && !fake.failed,
      "snapshot extents never report data as zero");
  fleece_snap_put (h);
  fleece_close (fl);
  free (data);
  free (patch);
  free (x.type);
}

/* Handles of a deleted snapshot fail with EINVAL (NBD has no ENOENT),
 * saying it was deleted; only the first failure is to be logged.  The
 * name is then unknown: ENOENT.
 */
static void
test_deleted_handle (void)
{
  const uint32_t cs = 16 * KiB;
  const uint64_t size = 16 * cs;
  const char *disk = test_path ("disk"), *store = test_path ("store");
  uint8_t *data = make_disk (disk, size), buf[512];
  struct fleece *fl = test_open (disk, store, cs);
  struct fleece_snap *h;
  struct fleece_snap_info info;
  struct fleece_stats st;
  struct model fake = { .cs = cs };
  struct ext_check e = { .m = &fake, .what = "gone", .data = data };
  int r;

  memset (buf, 0x11, sizeof buf);

  if (fleece_snapshot_create (fl, "gone") == -1 ||
      (h = fleece_snap_get (fl, "gone")) == NULL ||
      fleece_live_pwrite (fl, buf, sizeof buf, cs, 0) == -1)
    bail_out ("%s", fleece_last_error ());
  ok (fleece_snap_pread (h, buf, sizeof buf, 0) == 0 &&
      memcmp (buf, data, sizeof buf) == 0, "a handle reads before delete");
  if (fleece_snapshot_delete (fl, "gone") == -1)
    bail_out ("fleece_snapshot_delete: %s", fleece_last_error ());
  errno = 0;
  r = fleece_snap_pread (h, buf, sizeof buf, 0);
  ok (r == -1 && errno == EINVAL &&
      strstr (fleece_last_error (), "snapshot 'gone' was deleted") != NULL,
      "a read through the handle after delete fails with EINVAL (%s)",
      fleece_last_error ());
  ok (!fleece_last_error_is_repeat (), "... and is to be logged");
  errno = 0;
  r = fleece_snap_pread (h, buf, sizeof buf, cs);
  ok (r == -1 && errno == EINVAL,
      "... also of a cluster that had a copy");
  ok (fleece_last_error_is_repeat (), "... which is not logged again");
  errno = 0;
  r = fleece_snap_extents (h, size, 0, ext_cb, &e);
  ok (r == -1 && errno == EINVAL, "extents after delete fail with EINVAL");
  errno = 0;
  r = fleece_snap_trim (h, 2 * cs, 0);
  ok (r == -1 && errno == EINVAL, "trim after delete fails with EINVAL");
  errno = 0;
  ok (fleece_snap_get (fl, "gone") == NULL && errno == ENOENT,
      "fleece_snap_get after delete fails with ENOENT");
  errno = 0;
  ok (fleece_snapshot_info (fl, "gone", &info) == -1 && errno == ENOENT,
      "fleece_snapshot_info after delete fails with ENOENT");
  settled_stats (fl, &st);
  ok (st.copies == 0 && st.store_clusters_used == 0,
      "the copies are freed although a handle is still open");
  fleece_snap_put (h);
  fleece_close (fl);
  free (data);
}

static bool
mentions (const char *what)
{
  return strstr (fleece_last_error (), what) != NULL;
}

/* Name checks: each refusal says why. */
static void
test_names (void)
{
  const uint32_t cs = 16 * KiB;
  const char *disk = test_path ("disk"), *store = test_path ("store");
  uint8_t *data = make_disk (disk, 4 * cs);
  struct fleece *fl = test_open (disk, store, cs);
  char longname[FLEECE_SNAPSHOT_NAME_MAX + 2];
  struct fleece_stats st;
  static const struct { const char *name, *why, *mention; } bad[] = {
    { "", "empty", "empty" },
    { "a/b", "a slash", "'/'" },
    { "a\x01" "b", "a control character", "0x01" },
    { "a\x7f" "b", "DEL", "0x7f" },
  };
  size_t i;
  int r;

  for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    errno = 0;
    r = fleece_check_name ("snapshot", bad[i].name);
    ok (r == -1 && errno == EINVAL && mentions (bad[i].mention),
        "fleece_check_name refuses %s: %s", bad[i].why,
        fleece_last_error ());
    errno = 0;
    r = fleece_snapshot_create (fl, bad[i].name);
    ok (r == -1 && errno == EINVAL && mentions (bad[i].mention),
        "fleece_snapshot_create refuses %s", bad[i].why);
  }
  memset (longname, 'x', sizeof longname);
  longname[FLEECE_SNAPSHOT_NAME_MAX + 1] = '\0';        /* 129 bytes */
  errno = 0;
  r = fleece_snapshot_create (fl, longname);
  ok (r == -1 && errno == EINVAL &&
      mentions ("129") && mentions ("128"),
      "fleece_snapshot_create refuses a 129-byte name: %s",
      fleece_last_error ());
  longname[FLEECE_SNAPSHOT_NAME_MAX] = '\0';            /* 128 bytes */
  ok (fleece_snapshot_create (fl, longname) == 0,
      "a 128-byte name is accepted");
  ok (fleece_snapshot_create (fl, "dup") == 0, "create dup");
  errno = 0;
  r = fleece_snapshot_create (fl, "dup");
  ok (r == -1 && errno == EEXIST &&
      mentions ("dup") && mentions ("exists"),
      "a duplicate name is refused: %s", fleece_last_error ());
  errno = 0;
  r = fleece_snapshot_delete (fl, "nope");
  ok (r == -1 && errno == ENOENT &&
      mentions ("nope") && mentions ("not exist"),
      "deleting an unknown snapshot fails with ENOENT: %s",
      fleece_last_error ());
  settled_stats (fl, &st);
  ok (st.snapshots == 2, "only the two good snapshots exist (%u)",
      st.snapshots);
  fleece_close (fl);
  free (data);
}

static void
refused (const char *disk, const char *store, uint32_t cs, int err,
         const char *mention, const char *what)
{
  struct fleece_config cfg = { .disk = disk, .store = store,
                               .cluster_size = cs };
  struct fleece *fl;

  errno = 0;
  fl = fleece_open (&cfg);
  ok (fl == NULL && (err == 0 || errno == err) && mentions (mention),
      "fleece_open refuses %s: %s", what, fleece_last_error ());
  fleece_close (fl);
}

static void
test_bad_config (void)
{
  const uint32_t cs = 16 * KiB;
  const char *disk = test_path ("disk"), *store = test_path ("store");
  const char *missing = test_path ("no-such-disk");
  uint8_t *data = make_disk (disk, 4 * cs), *back = malloc (4 * cs);
  struct fleece_config cfg = { .disk = disk, .store = store };
  struct fleece *fl;
  int fd;

  assert (back);
  refused (disk, store, 3000, EINVAL, "3000", "cluster size 3000");
  refused (disk, store, 2 * MiB + 1, EINVAL, "2097153",
           "cluster size 2 MiB + 1");
  refused (disk, store, 8 * MiB, EINVAL, "8388608", "cluster size 8 MiB");
  refused (disk, store, 2048, EINVAL, "2048", "cluster size 2048");
  refused (missing, store, 0, ENOENT, missing, "a missing disk");
  refused (test_dir, store, 0, 0, test_dir, "a directory as disk");
  refused (disk, disk, 0, 0, disk, "the disk as its own store");
  fd = open (disk, O_RDONLY | O_CLOEXEC);
  ok (fd >= 0 && pread (fd, back, 4 * cs, 0) == 4 * cs &&
      memcmp (back, data, 4 * cs) == 0,
      "... and the disk is left intact");
  if (fd >= 0)
    close (fd);

  cfg.cluster_size = FLEECE_CLUSTER_SIZE_MIN;
  fl = fleece_open (&cfg);
  ok (fl && fleece_cluster_size (fl) == 4096, "cluster size 4 KiB works");
  fleece_close (fl);
  cfg.cluster_size = FLEECE_CLUSTER_SIZE_MAX;
  fl = fleece_open (&cfg);
  ok (fl && fleece_cluster_size (fl) == 4 * MiB &&
      fleece_disk_size (fl) == 4 * cs,
      "cluster size 4 MiB works on a smaller disk");
  fleece_close (fl);
  cfg.cluster_size = 0;
  fl = fleece_open (&cfg);
  ok (fl && fleece_cluster_size (fl) == FLEECE_CLUSTER_SIZE_DEFAULT &&
      fleece_start (fl) == 0, "cluster size 0 means the default");

  /* Ranges beyond the end. */
  if (fl) {
    struct fleece_snap *h;
    errno = 0;
    ok (fleece_live_pread (fl, back, 20, 4 * cs - 10) == -1 &&
        errno == EINVAL, "a live read beyond the end fails with EINVAL");
    errno = 0;
    ok (fleece_live_pwrite (fl, back, 20, 4 * cs - 10, 0) == -1 &&
        errno == EINVAL, "a live write beyond the end fails with EINVAL");
    if (fleece_snapshot_create (fl, "e") == 0 &&
        (h = fleece_snap_get (fl, "e")) != NULL) {
      errno = 0;
      ok (fleece_snap_pread (h, back, 20, 4 * cs - 10) == -1 &&
          errno == EINVAL, "a snapshot read beyond the end fails with EINVAL");
      fleece_snap_put (h);
    }
  }
  fleece_close (fl);
  free (data);
  free (back);
}

/* ---- Sub-cluster copies (subcluster=true) ---- */

/* A write of one block copies one block; the rest of the cluster is
 * copied by the writes that reach it, each block once; the last one
 * makes the cluster an ordinary copy.  The snapshot reads the disk as it
 * was throughout.
 */
static void
test_subcluster_copies (void)
{
  const char *disk = test_path ("sdisk"), *store = test_path ("sstore");
  const uint32_t cs = 64 * KiB, bs = 4 * KiB;
  const uint64_t size = 16 * cs;
  uint8_t *data = make_disk (disk, size), *w = malloc (cs);
  struct fleece *fl;
  struct fleece_stats s0, s1;
  uint32_t b;
  bool each = true;

  memset (data + 8 * cs, 0, cs);        /* cluster 8: all zero */
  memset (data + 9 * cs, 0, cs / 2);    /* cluster 9: half zero */
  test_write_disk (disk, data, size);
  fl = test_open (disk, store, cs);
  ok (fleece_copy_block_size (fl) == bs, "subcluster: blocks of %" PRIu32
      " bytes", fleece_copy_block_size (fl));
  memset (w, 0xa5, cs);
  if (fleece_snapshot_create (fl, "s") == -1)
    bail_out ("fleece_snapshot_create: %s", fleece_last_error ());
  settled_stats (fl, &s0);
  fleece_live_pwrite (fl, w, bs, 2 * cs + 3 * bs, 0);
  settled_stats (fl, &s1);
  ok (s1.bytes_copied - s0.bytes_copied == bs && s1.partial_clusters == 1 &&
      s1.copies == 0 && s1.store_clusters_used == 1,
      "a 4 KiB write copies 4 KiB (%" PRIu64 " bytes), the cluster is partly "
      "copied (%" PRIu64 ")", s1.bytes_copied - s0.bytes_copied,
      s1.partial_clusters);
  snap_read_equals (fl, "s", data, 0, size, "subcluster");
  /* Unaligned, overlapping the copied block: only blocks 2 and 4. */
  fleece_live_pwrite (fl, w, 2 * bs + 2, 2 * cs + 2 * bs + 100, 0);
  settled_stats (fl, &s1);
  ok (s1.bytes_copied - s0.bytes_copied == 3 * bs,
      "an unaligned write over blocks 2-4 copies blocks 2 and 4 only "
      "(%" PRIu64 " bytes in all)", s1.bytes_copied - s0.bytes_copied);
  snap_read_equals (fl, "s", data, 2 * cs - 7, cs + 14, "subcluster");
  for (b = 0; b < cs / bs; b++) {
    fleece_live_pwrite (fl, w, 512, 2 * cs + b * bs + 1000, 0);
    settled_stats (fl, &s1);
    if (b < cs / bs - 1 && s1.copies != 0)
      each = false;
  }
  ok (each && s1.copies == 1 && s1.partial_clusters == 0 &&
      s1.bytes_copied - s0.bytes_copied == cs && s1.cbw_clusters ==
      s0.cbw_clusters + 1 && s1.store_clusters_used == 1,
      "the last block makes one whole copy: %" PRIu64 " copies, %" PRIu64
      " partly copied, %" PRIu64 " bytes copied", s1.copies,
      s1.partial_clusters, s1.bytes_copied - s0.bytes_copied);
  snap_read_equals (fl, "s", data, 0, size, "subcluster");
  /* Zero detection per block. */
  settled_stats (fl, &s0);
  for (b = 0; b < cs / bs; b += 2)
    fleece_live_pwrite (fl, w, 2 * bs, 8 * cs + b * bs, 0);
  settled_stats (fl, &s1);
  ok (s1.bytes_copied == s0.bytes_copied &&
      s1.cbw_zero_clusters == s0.cbw_zero_clusters + 1 &&
      s1.store_clusters_used == s0.store_clusters_used,
      "an all-zero cluster copied block by block takes no store space");
  for (b = 0; b < cs / bs; b++)
    fleece_live_pwrite (fl, w, bs, 9 * cs + b * bs, 0);
  settled_stats (fl, &s1);
  ok (s1.bytes_copied - s0.bytes_copied == cs / 2 &&
      s1.copies == s0.copies + 2 && s1.partial_clusters == 0,
      "a half-zero cluster: only its data blocks are copied (%" PRIu64
      " bytes)", s1.bytes_copied - s0.bytes_copied);
  snap_read_equals (fl, "s", data, 0, size, "subcluster");
  /* A whole-cluster write still copies whole clusters, in one run. */
  settled_stats (fl, &s0);
  fleece_live_pwrite (fl, w, cs, 12 * cs, 0);
  settled_stats (fl, &s1);
  ok (s1.copies == s0.copies + 1 && s1.partial_clusters == 0,
      "an aligned whole-cluster write makes a whole copy at once");
  /* A partly copied cluster that the snapshot's client releases is
   * dropped with its slot, as a copy is.
   */
  settled_stats (fl, &s0);
  fleece_live_pwrite (fl, w, 100, 13 * cs + 5000, 0);
  {
    struct fleece_snap *h = fleece_snap_get (fl, "s");
    ok (h && fleece_snap_trim (h, cs, 13 * cs) == 0,
        "the snapshot releases the partly copied cluster");
    fleece_snap_put (h);
  }
  settled_stats (fl, &s1);
  ok (s1.partial_clusters == 0 &&
      s1.store_clusters_used == s0.store_clusters_used,
      "its entry and slot are gone (%" PRIu64 " partly copied, %" PRIu64
      " slots used, %" PRIu64 " before)", s1.partial_clusters,
      s1.store_clusters_used, s0.store_clusters_used);
  /* A partly copied cluster whose snapshot goes is dropped with its slot. */
  fleece_live_pwrite (fl, w, 100, 14 * cs + 5000, 0);
  settled_stats (fl, &s1);
  ok (s1.partial_clusters == 1, "one cluster partly copied again");
  fleece_snapshot_delete (fl, "s");
  settled_stats (fl, &s1);
  ok (s1.partial_clusters == 0 && s1.copies == 0 &&
      s1.store_clusters_used == 0,
      "deleting the snapshot frees the partly copied cluster's slot");
  fleece_close (fl);
  free (data);
  free (w);
}

/* A cluster partly copied in one generation, written again in the next:
 * each snapshot reads the cluster as it was at its creation.
 */
static void
test_subcluster_generations (void)
{
  const char *disk = test_path ("gdisk"), *store = test_path ("gstore");
  const uint32_t cs = 64 * KiB, bs = 4 * KiB;
  const uint64_t size = 4 * cs;
  uint8_t *data = make_disk (disk, size), *mid = malloc (size);
  uint8_t w[4096];
  struct fleece *fl = test_open (disk, store, cs);
  struct fleece_stats st;

  fleece_snapshot_create (fl, "g1");
  memset (w, 0x11, bs);
  fleece_live_pwrite (fl, w, bs, cs + bs, 0);
  memcpy (mid, data, size);
  memcpy (mid + cs + bs, w, bs);
  fleece_snapshot_create (fl, "g2");
  memset (w, 0x22, bs);
  fleece_live_pwrite (fl, w, bs, cs + 5 * bs, 0);
  fleece_live_pwrite (fl, w, bs, cs + bs, 0);
  snap_read_equals (fl, "g1", data, 0, size, "generations");
  snap_read_equals (fl, "g2", mid, 0, size, "generations");
  settled_stats (fl, &st);
  ok (st.copies == 1 && st.partial_clusters == 1,
      "the first generation's partial copy was finished (%" PRIu64
      " copies), the second's is partial (%" PRIu64 ")", st.copies,
      st.partial_clusters);
  fleece_snapshot_delete (fl, "g1");
  snap_read_equals (fl, "g2", mid, 0, size, "generations");
  fleece_snapshot_delete (fl, "g2");
  settled_stats (fl, &st);
  ok (st.copies == 0 && st.partial_clusters == 0 &&
      st.store_clusters_used == 0, "everything freed");
  fleece_close (fl);
  free (data);
  free (mid);
}

/* The engine's memory per copied cluster, measured with mallinfo2:
 * whole copies (the copy map) and partly copied clusters (partial.c).
 * docs/design.md quotes these figures.
 */
static size_t
heap_used (void)
{
#ifdef __SANITIZE_ADDRESS__
  /* ASan's malloc is its own, which mallinfo2 does not see either; it
   * counts the bytes asked for itself.
   */
  return __sanitizer_get_current_allocated_bytes ();
#else
  return mallinfo2 ().uordblks;
#endif
}

/* n clusters of 64 KiB on a fresh sparse disk, each written once by
 * write (in a snapshot's generation): the heap the engine holds for
 * them afterwards, per cluster.
 */
static double
heap_per_cluster (uint32_t n, uint32_t len)
{
  const char *disk = test_path ("mdisk"), *store = test_path ("mstore");
  const uint32_t cs = 64 * KiB;
  struct fleece *fl;
  size_t h0, h1;
  uint32_t i;

  test_write_disk (disk, NULL, (uint64_t) n * cs);
  fl = test_open (disk, store, cs);
  fleece_snapshot_create (fl, "m");
  h0 = heap_used ();
  for (i = 0; i < n; i++)
    if (fleece_live_zero (fl, len, (uint64_t) i * cs, 0) == -1)
      bail_out ("fleece_live_zero: %s", fleece_last_error ());
  h1 = heap_used ();
  fleece_close (fl);
  return h1 >= h0 ? (double) (h1 - h0) / n : 0;
}

static void
test_subcluster_memory (void)
{
  const uint32_t n = 3000;
  double part, full;

  if (test_under_valgrind ()) {
    /* Its malloc is valgrind's, which mallinfo2 does not see. */
    diag ("under valgrind: the engine's memory is not measured");
    return;
  }
  part = heap_per_cluster (n, 512);
  full = heap_per_cluster (n, 64 * KiB);

  diag ("engine memory, %u clusters of 64 KiB: %.1f bytes per partly "
        "copied cluster, %.1f per copied cluster", n, part, full);
  ok (part > 0 && part <= 96, "a partly copied cluster costs at most 96 "
      "bytes (%.1f)", part);
  ok (full > 0 && full <= 32, "a copied cluster costs at most 32 bytes "
      "(%.1f)", full);
}

int
main (int argc, char *argv[])
{
  bool vg = test_under_valgrind ();
  unsigned nops = test_env_ulong ("FLEECE_TEST_OPS", vg ? 250 : 3000);

  rng.s = test_seed ();
  test_make_dir ("test-engine-cbw");

  random_run (1 * MiB + 12 * KiB, 16 * KiB, nops);
  random_run (384 * KiB + 512, 4 * KiB, nops * 2 / 3);
  /* subcluster=true: 16 blocks a cluster, the last block short. */
  test_subcluster = true;
  random_run (1 * MiB + 12 * KiB + 512, 64 * KiB, nops);
  random_run (1 * MiB + 12 * KiB, 16 * KiB, nops / 2);
  test_subcluster_copies ();
  test_subcluster_generations ();
  test_subcluster_memory ();
  test_subcluster = false;
  test_one_copy ();
  test_zero_detection ();
  test_coalescing ();
  test_store_shrinks ();
  test_extents_sparse ();
  test_deleted_handle ();
  test_names ();
  test_bad_config ();
  return done ();
}
