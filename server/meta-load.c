/* Loading a persistent store: the state of the metadata log replayed
 * into memory before the engine serves (meta_init calls meta_load).
 *
 * docs/store-format.md describes the format, meta.c how the log is
 * written and record.c how each record is encoded.  Loading picks the
 * half whose STATE has the higher sequence, reads its image (the header
 * and copy table here, the snapshots in snapshot.c, the bitmaps in
 * bitmap.c), and applies the records that follow it up to the first one
 * whose magic, checksum or sequence is wrong.  That end is judged
 * (tail_verdict): a write torn by a crash, which was never acknowledged
 * and is ignored, or damage, which breaks every snapshot and makes every
 * recording bitmap inconsistent, loudly (fl_warn).  Telling them apart
 * relies on everything past the end of the log being zero: making a half
 * active zeroes what an earlier use of it left (meta_image).  A copy
 * whose slot the store file no longer holds whole (a truncation) breaks
 * only the snapshots that read it.
 *
 * Records may repeat what the image holds (the cut of an image drops
 * nothing that is not in it, meta.c): applying one twice is harmless.
 * Nothing here runs concurrently with anything: the engine has no
 * threads and no clients yet.
 */

#include <config.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <xxhash.h>

#include "fleece-wire.h"
#include "internal.h"

/* Generations stay below this: a new snapshot takes the next one. */
#define GEN_LIMIT     (UINT32_MAX - 1)

int
meta_damaged (struct fleece *fl, const char *what)
{
  return fl_error (EINVAL, "store: %s: %s: the metadata is damaged; the "
                   "store cannot be trusted (remove it to start afresh, "
                   "losing its snapshots and bitmaps)", fl->store.path, what);
}

/* Copies were written, and synced, before their records: a slot that a
 * record names and that is not wholly inside the store (up to the bytes
 * the copy uses: the disk's last cluster may be short) lost its data
 * since, to a truncation.  Its data is gone and is never read.
 */
static bool
copy_in_store (struct fleece *fl, const struct copy *cp)
{
  uint64_t need = fl->disk.size - (uint64_t) cp->cluster * fl->cluster_size;

  if (need > fl->cluster_size)
    need = fl->cluster_size;
  return fl->store.data_offset + (uint64_t) cp->slot * fl->cluster_size +
    need <= fl->meta.load_size;
}

/* Keep a lost copy aside: once every record is applied (a later RELEASE
 * may make it unneeded), the snapshots that still read it are broken
 * (break_lost).  cgen still counts it, so that the copy ranges of the
 * cluster stay disjoint.
 */
static int
lose_copy (struct fleece *fl, const struct copy *cp)
{
  struct meta *m = &fl->meta;

  if (copy_vector_append (&m->lost, *cp) == -1)
    return fl_error (ENOMEM, "loading the store: out of memory");
  if (cp->hi > atomic_load (&fl->cgen[cp->cluster]))
    atomic_store (&fl->cgen[cp->cluster], cp->hi);
  return 0;
}

/* Break snapshot s at load, for reason, and say so whatever the debug
 * level: the operator must learn that a snapshot was lost.
 */
static void
break_at_load (struct fleece *fl, struct fleece_snap *s, const char *reason)
{
  if (atomic_load (&s->broken))
    return;
  snprintf (s->broken_reason, sizeof s->broken_reason, "%s", reason);
  /* Broken in memory only, no BROKEN record: keep its copies, which the
   * log still gives it (snap_keeps_copies), or the next load would find
   * their slots claimed twice.
   */
  atomic_store (&s->broken_unrecorded, true);
  atomic_store (&s->broken, true);
  fl_warn ("store: %s: snapshot '%s' is broken (its export fails every "
           "read): %s", fl->store.path, s->name, reason);
}

static void
break_lost (struct fleece *fl)
{
  struct meta *m = &fl->meta;
  char reason[256];
  size_t i, j;

  for (i = 0; i < m->lost.len; i++) {
    const struct copy *cp = &m->lost.ptr[i];
    for (j = 0; j < fl->nsnaps; j++) {
      if (!snap_reads_copy (fl->snaps[j], cp->cluster, cp->lo, cp->hi))
        continue;
      snprintf (reason, sizeof reason, "the store file ends before the end "
                "of slot %" PRIu32 ", which held the copy of cluster %"
                PRIu32 ": the store was truncated and the copy is lost",
                cp->slot, cp->cluster);
      break_at_load (fl, fl->snaps[j], reason);
    }
  }
}

/* A copy completed from a partly copied cluster: its entry goes, and
 * its slot, claimed by the entry, is the copy's (true: claimed already).
 */
static bool
copy_completes_partial (struct fleece *fl, const struct copy *cp)
{
  struct partial_view pv;

  if (fl->block_size == 0 ||
      !partial_find (&fl->partials, cp->cluster, &pv) ||
      pv.lo != cp->lo || pv.hi != cp->hi)
    return false;
  partial_remove (&fl->partials, cp->cluster);
  if (pv.slot != NO_SLOT && pv.slot == cp->slot)
    return true;
  if (pv.slot != NO_SLOT)
    store_free (&fl->store, pv.slot);
  return false;
}

static int
load_copy (struct fleece *fl, const struct copy *cp)
{
  struct copy have;
  bool claimed;

  if (cp->cluster >= fl->nclusters || cp->lo >= cp->hi ||
      cp->hi >= GEN_LIMIT ||
      (cp->slot != ZERO_SLOT && cp->slot >= UINT32_MAX - 1))
    return meta_damaged (fl, "a copy record is out of range");
  /* A copy no snapshot reads any more (an image can hold one whose
   * release was pending) is skipped: its slot may have been reused.
   */
  if (!copy_needed (fl, cp))
    return 0;
  if (cp->slot != ZERO_SLOT && !copy_in_store (fl, cp))
    return lose_copy (fl, cp);
  if (copymap_overlap (&fl->copies, cp->cluster, cp->lo, cp->hi, &have)) {
    if (memcmp (&have, cp, sizeof have) == 0)
      return 0;                 /* repeated after an image: the same copy */
    return meta_damaged (fl, "two copies of a cluster overlap");
  }
  claimed = copy_completes_partial (fl, cp);
  if (cp->slot != ZERO_SLOT && !claimed &&
      store_claim (&fl->store, cp->slot, false) == -1)
    return -1;
  if (copymap_insert (&fl->copies, cp) == -1)
    return -1;
  if (cp->hi > atomic_load (&fl->cgen[cp->cluster]))
    atomic_store (&fl->cgen[cp->cluster], cp->hi);
  return 0;
}

/* A damaged partly copied cluster (a PARTIAL record at offset at of the
 * store, or an entry of the image's partial table there): refused, with
 * where and what.
 */
static int
partial_damaged (struct fleece *fl, uint64_t at, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

static int
partial_damaged (struct fleece *fl, uint64_t at, const char *fmt, ...)
{
  char what[400];
  int n;
  va_list ap;

  n = snprintf (what, sizeof what, "the partly copied cluster at offset %"
                PRIu64 " ", at);
  va_start (ap, fmt);
  vsnprintf (what + n, sizeof what - n, fmt, ap);
  va_end (ap);
  return meta_damaged (fl, what);
}

/* Check an entry: its blocks within its cluster, a slot for the blocks
 * with data.  Returns 1 if that slot is not inside the store file (up
 * to its last block with data): the blocks were synced before the
 * record, so the store was truncated since, as for a lost copy.
 */
static int
check_partial (struct fleece *fl, const struct partial_view *v,
               uint32_t words, uint64_t at)
{
  const uint32_t bs = fl->block_size, W = fl->partials.words;
  uint64_t cbytes, end;
  uint32_t b, nb, last = 0;
  bool data = false;

  if (words != W)
    return partial_damaged (fl, at, "has bitmaps of %" PRIu32 " words, "
                            "this store's clusters need %" PRIu32, words, W);
  if (v->cluster >= fl->nclusters || v->lo >= v->hi || v->hi >= GEN_LIMIT)
    return partial_damaged (fl, at, "names cluster %" PRIu32 " of %" PRIu64
                            ", generations (%" PRIu32 ", %" PRIu32 "]: out "
                            "of range", v->cluster, fl->nclusters, v->lo,
                            v->hi);
  cbytes = fl->disk.size - (uint64_t) v->cluster * fl->cluster_size;
  if (cbytes > fl->cluster_size)
    cbytes = fl->cluster_size;
  nb = (cbytes + bs - 1) / bs;
  for (b = 0; b < W * 64; b++) {
    bool copied = v->bits[b / 64] >> (b % 64) & 1;
    bool zero = v->bits[W + b / 64] >> (b % 64) & 1;
    if ((copied || zero) && b >= nb)
      return partial_damaged (fl, at, "claims block %" PRIu32 " of cluster "
                              "%" PRIu32 ", which has %" PRIu32 " blocks",
                              b, v->cluster, nb);
    if (zero && !copied)
      return partial_damaged (fl, at, "says block %" PRIu32 " is zero but "
                              "not copied", b);
    if (copied && !zero) {
      data = true;
      last = b + 1;
    }
  }
  if (v->slot == ZERO_SLOT || (data && v->slot == NO_SLOT))
    return partial_damaged (fl, at, "has blocks with data but no slot "
                            "(slot %" PRIu32 ")", v->slot);
  if (v->slot == NO_SLOT)
    return 0;
  end = (uint64_t) last * bs;
  if (end > cbytes)
    end = cbytes;
  end += fl->store.data_offset + (uint64_t) v->slot * fl->cluster_size;
  if (end > fl->meta.load_size) {
    fl_debug ("store: %s: the partly copied cluster at offset %" PRIu64
              " has its blocks in slot %" PRIu32 ", up to byte %" PRIu64
              ", past the end of the store (%" PRIu64 " bytes)",
              fl->store.path, at, v->slot, end, fl->meta.load_size);
    return 1;
  }
  return 0;
}

/* A partly copied cluster whose blocks the store lost: its snapshots
 * break once every record is applied (break_lost), as for a copy.
 */
static int
lose_partial (struct fleece *fl, const struct copy *cp)
{
  struct partial_view old;

  if (partial_find (&fl->partials, cp->cluster, &old)) {
    partial_remove (&fl->partials, cp->cluster);
    if (old.slot != NO_SLOT)
      store_free (&fl->store, old.slot);
  }
  return lose_copy (fl, cp);
}

/* A partly copied cluster, from a PARTIAL record or the image: it
 * replaces what an earlier one said of the cluster (the record holds the
 * entry's whole state; a different range means that the earlier entry
 * was given up), unless its copy was completed since.
 *
 * *gen rises to the entry's generation, needed or not, as for a copy
 * (apply_record): an entry made for a snapshot whose creation the crash
 * cut before its image was stable names a generation that no snapshot
 * has.  The next snapshot must get a newer one, or it would read the
 * blocks copied for the lost one, older than its own point in time.
 */
static int
load_partial (struct fleece *fl, struct rbuf *b, uint64_t at, uint32_t *gen)
{
  struct partial_view v, old;
  struct copy have, cp;
  uint32_t words, i;
  int lost;

  if (!rec_get_partial (b, &v, &words))
    return partial_damaged (fl, at, "is truncated, or claims more than %d "
                            "words per bitmap", PARTIAL_WORDS_MAX);
  if (fl->block_size == 0)
    return fl_error (EINVAL, "store: %s: holds clusters copied in part "
                     "(sub-cluster copies; the first at offset %" PRIu64
                     "), which subcluster=false cannot serve: start with "
                     "subcluster=true", fl->store.path, at);
  lost = check_partial (fl, &v, words, at);
  if (lost == -1)
    return -1;
  if (v.hi > *gen)
    *gen = v.hi;
  cp = (struct copy) { .cluster = v.cluster, .lo = v.lo, .hi = v.hi,
                       .slot = v.slot };
  if (!copy_needed (fl, &cp))
    return 0;                   /* its slot may be in use since */
  if (lost)
    return lose_partial (fl, &cp);
  if (copymap_overlap (&fl->copies, v.cluster, v.lo, v.hi, &have)) {
    if (have.lo == v.lo && have.hi == v.hi)
      return 0;                 /* completed: repeated after an image */
    return partial_damaged (fl, at, "overlaps a copy of cluster %" PRIu32,
                            v.cluster);
  }
  if (partial_find (&fl->partials, v.cluster, &old)) {
    if (old.lo == v.lo && old.hi == v.hi) {
      if (old.slot != NO_SLOT && v.slot != NO_SLOT && old.slot != v.slot)
        return partial_damaged (fl, at, "names slot %" PRIu32 ", an "
                                "earlier record slot %" PRIu32, v.slot,
                                old.slot);
      for (i = 0; i < 2 * words; i++)
        v.bits[i] |= old.bits[i];
      if (old.slot != NO_SLOT) {
        v.slot = old.slot;      /* claimed already */
        return partial_load (&fl->partials, &v);
      }
    }
    else if (old.slot != NO_SLOT)
      store_free (&fl->store, old.slot);
  }
  if (v.slot != NO_SLOT && store_claim (&fl->store, v.slot, false) == -1)
    return -1;
  return partial_load (&fl->partials, &v);
}

static int
load_image (struct fleece *fl, const char *p, size_t len, uint32_t *gen)
{
  struct rbuf b = { .p = p, .len = len };
  struct rec_image im;
  uint64_t i;

  if (!rec_get_image (&b, &im))
    return meta_damaged (fl, "the image has a bad magic");
  if (im.cluster_size != fl->cluster_size || im.disk_size != fl->disk.size)
    return meta_damaged (fl, "the image is of another geometry");
  *gen = im.gen;
  if (*gen >= GEN_LIMIT)
    return meta_damaged (fl, "the image's generation is out of range");
  if (b.bad || im.nsnaps > FLEECE_SNAPSHOTS_MAX)
    return meta_damaged (fl, "the image header is not valid");
  if (snap_image_get (fl, &b, im.nsnaps, *gen) == -1 ||
      bitmap_image_get (fl, &b, im.nbitmaps) == -1)
    return -1;
  for (i = 0; i < im.npartials; i++) {
    uint64_t at = fl->store.data_offset +
      (uint64_t) fl->meta.img_slot * fl->cluster_size + b.pos;
    if (load_partial (fl, &b, at, gen) == -1)
      return -1;
  }
  if (!rec_image_table_ok (&b, im.ncopies))
    return meta_damaged (fl, "the image's copy table has the wrong size");
  for (i = 0; i < im.ncopies; i++) {
    struct copy cp;
    rec_get_copy (&b, &cp);
    if (cp.hi > im.gen)
      return meta_damaged (fl, "a copy is newer than the image");
    if (load_copy (fl, &cp) == -1)
      return -1;
  }
  return 0;
}

static int
apply_record (struct fleece *fl, struct rec *r, uint32_t *gen)
{
  struct rbuf *b = &r->payload;

  switch (r->type) {
  case REC_COPY: {
    uint32_t n, i;
    if (!rec_get_copies (b, &n))
      return meta_damaged (fl, "a COPY record has the wrong size");
    for (i = 0; i < n; i++) {
      struct copy cp;
      rec_get_copy (b, &cp);
      if (load_copy (fl, &cp) == -1)
        return -1;
      if (cp.hi > *gen)
        *gen = cp.hi;
    }
    return 0;
  }
  case REC_RELEASE: {
    uint32_t sgen, first, count, c;
    struct fleece_snap *s;
    _Atomic uint64_t *bits;
    if (!rec_get_release (b, &sgen, &first, &count) ||
        first >= fl->nclusters || count > fl->nclusters - first)
      return meta_damaged (fl, "a RELEASE record is out of range");
    s = snap_by_gen (fl, sgen);
    if (s == NULL)
      return 0;                 /* deleted since */
    if (snap_ensure_released (s) == -1)
      return -1;
    bits = atomic_load (&s->released);
    for (c = first; c < first + count; c++) {
      atomic_fetch_or (&bits[c / 64], UINT64_C (1) << (c % 64));
      /* Its slot may be reused by a later record. */
      copymap_prune (&fl->copies, c, copy_needed, copy_free, fl);
    }
    return 0;
  }
  case REC_BROKEN: {
    uint32_t sgen;
    char reason[REC_REASON_MAX + 1];
    struct fleece_snap *s;
    if (!rec_get_broken (b, &sgen, reason))
      return meta_damaged (fl, "a BROKEN record is not valid");
    s = snap_by_gen (fl, sgen);
    if (s && !atomic_load (&s->broken)) {
      snprintf (s->broken_reason, sizeof s->broken_reason, "%s", reason);
      atomic_store (&s->broken, true);
      /* Its copies were freed once this record was stable, and their
       * slots may be reused by later records.
       */
      copymap_prune (&fl->copies, UINT32_MAX, copy_needed, copy_free, fl);
    }
    return 0;
  }
  case REC_PARTIAL: {
    if (load_partial (fl, b, fl->meta.load_at, gen) == -1)
      return -1;
    if (rb_left (b) != 0)
      return partial_damaged (fl, fl->meta.load_at, "(a PARTIAL record) "
                              "has %zu bytes too many", rb_left (b));
    return 0;
  }
  case REC_DIRTY: {
    uint32_t first, count;
    if (!rec_get_dirty (b, &first, &count))
      return meta_damaged (fl, "a DIRTY record is not valid");
    return bitmap_apply_dirty (fl, first, count);
  }
  default:
    return meta_damaged (fl, "a record of an unknown type");
  }
}

/* What ends the log at pos, after the record of sequence prev
 * (docs/store-format.md, "Torn tail or damage").
 *
 * A write is torn only in whole sectors: a crash leaves each 512-byte
 * sector of a group commit's write either written or as it was, and the
 * page cache tears an interrupted pwrite at page boundaries.  Everything
 * past the end of the log was zero before the write (meta_image zeroes a
 * half when it becomes active).  So:
 *
 * - neither the record magic nor the next sequence number at pos: no
 *   record was written there (or its first sector was lost to a crash):
 *   the end of the log;
 * - a record there (its magic, or its sequence number) that fails to
 *   decode, lying within one sector: a torn write cannot do that, it is
 *   damaged;
 * - spanning sectors, one of them after its first all zero, holding at
 *   least 16 of the record's bytes (16 bytes of any record as written hold
 *   a non-zero byte: a sequence number, a checksum, a count, a generation
 *   or text): that sector was never written, the record is torn;
 * - spanning sectors, none of them zero: written whole, damaged;
 * - a zero sector holding fewer than 16 of its bytes, at its end: those
 *   bytes might have been written as zeroes; which it is cannot be told.
 */
enum { TAIL_END, TAIL_TORN, TAIL_DAMAGED, TAIL_UNSURE };
#define SECTOR 512

static int
tail_verdict (const char *half, size_t pos, uint64_t prev)
{
  size_t end, sec, s0, s1;
  uint64_t seq;
  uint32_t len;
  bool magic, unsure = false;
  struct rec r;

  /* A valid record that is not the next one: an earlier use of the half
   * (stores of earlier versions did not zero it), or a later record,
   * which load judges.
   */
  if (pos + 24 > META_HALF_SIZE ||
      rec_decode (half + pos, META_HALF_SIZE - pos, &r))
    return TAIL_END;
  rec_peek (half + pos, &magic, &len, &seq);
  if (!magic && seq != prev + 1)
    return TAIL_END;
  end = magic && pos + REC_HDR_SIZE <= META_HALF_SIZE &&
    len <= META_HALF_SIZE - pos - REC_HDR_SIZE ? pos + REC_HDR_SIZE + len
    : pos + 24;
  for (sec = pos / SECTOR + 1; sec * SECTOR < end; sec++) {
    s0 = sec * SECTOR;
    s1 = s0 + SECTOR < META_HALF_SIZE ? s0 + SECTOR : META_HALF_SIZE;
    if (!fl_is_zero (half + s0, s1 - s0))
      continue;
    if ((end < s1 ? end : s1) - s0 >= 16)
      return TAIL_TORN;
    unsure = true;
  }
  return unsure ? TAIL_UNSURE : TAIL_DAMAGED;
}

/* What ends the log of half h at pos, after the record of sequence prev
 * (tail_verdict): damage, or doubt, breaks every snapshot and makes every
 * recording bitmap inconsistent, loudly.  Returns the highest sequence
 * number found in the half.
 */
static uint64_t
judge_end (struct fleece *fl, const char *half, int h, size_t pos,
           uint64_t prev)
{
  uint64_t newest = prev;
  int verdict = tail_verdict (half, pos, prev);
  char why[256];
  struct rec r;
  size_t q, i;

  /* A valid newer record past the end means a damaged record, not a torn
   * tail (or a tail torn out of order): records may be missing.
   */
  for (q = pos + 8; q + REC_HDR_SIZE <= META_HALF_SIZE; q += 8)
    if (rec_decode (half + q, META_HALF_SIZE - q, &r) && r.seq > newest)
      newest = r.seq;
  if (newest > prev)
    snprintf (why, sizeof why, "the store's metadata log has a damaged "
              "record (sequence %" PRIu64 ") followed by valid ones: copies "
              "may be missing", prev + 1);
  else if (verdict == TAIL_DAMAGED)
    snprintf (why, sizeof why, "the last record of the store's metadata "
              "log (sequence %" PRIu64 ", offset %zu of half %d) is "
              "damaged, not torn (it was written whole): a copy may be "
              "missing", prev + 1, pos, h);
  else if (verdict == TAIL_UNSURE)
    snprintf (why, sizeof why, "the last record of the store's metadata "
              "log (sequence %" PRIu64 ", offset %zu of half %d) fails its "
              "checksum, and whether a crash tore it or it is damaged cannot "
              "be told: a copy may be missing", prev + 1, pos, h);
  else {
    if (verdict == TAIL_TORN)
      fl_debug ("store: %s: the log ends with a record torn by a crash "
                "(sequence %" PRIu64 "): it was never acknowledged, ignored",
                fl->store.path, prev + 1);
    return newest;
  }
  fl_warn ("store: %s: %s; every snapshot is marked broken, every "
           "recording bitmap inconsistent", fl->store.path, why);
  for (i = 0; i < fl->nsnaps; i++)
    break_at_load (fl, fl->snaps[i], why);
  bitmap_distrust_recording (fl, why);
  return newest;
}

/* Partly copied clusters no unbroken snapshot reads any more go, as
 * copies do; their slots are given back.
 */
static bool
partial_needed (void *opaque, const struct partial_view *v)
{
  struct copy cp = { .cluster = v->cluster, .lo = v->lo, .hi = v->hi };

  return copy_needed (opaque, &cp);
}

static void
partial_unclaim (void *opaque, const struct partial_view *v)
{
  struct fleece *fl = opaque;

  if (v->slot != NO_SLOT)
    store_free (&fl->store, v->slot);
}

/* Count, for each snapshot, the copies it reads. */
static int
count_held (void *opaque, const struct copy *cp)
{
  struct fleece *fl = opaque;
  size_t i;

  for (i = 0; i < fl->nsnaps; i++)
    if (snap_reads_copy (fl->snaps[i], cp->cluster, cp->lo, cp->hi) &&
        !atomic_load (&fl->snaps[i]->broken))
      atomic_fetch_add (&fl->snaps[i]->held, 1);
  return 0;
}

/* Load the state from the log: the newest image, then the records that
 * follow it (meta_init).
 */
int
meta_load (struct fleece *fl)
{
  struct meta *m = &fl->meta;
  char *region = NULL, *img = NULL;
  struct rec st[2], r;
  struct rec_state sv[2];
  size_t sz[2], pos;
  uint32_t slot, nslots, gen, i;
  uint64_t len, hash, prev, newest;
  int h, ret = -1;
  struct stat sb;
  const char *half;

  region = malloc (FLEECE_STORE_META_SIZE);
  if (region == NULL)
    return fl_error (ENOMEM, "loading the store: out of memory");
  if (store_meta_pread (&fl->store, region, FLEECE_STORE_META_SIZE,
                        FLEECE_STORE_HEADER_SIZE) == -1)
    goto out;
  for (h = 0; h < 2; h++) {
    sz[h] = rec_decode (region + (size_t) h * META_HALF_SIZE,
                        META_HALF_SIZE, &st[h]);
    if (sz[h] && !rec_get_state (&st[h], &sv[h]))
      sz[h] = 0;
  }
  if (!sz[0] && !sz[1]) {
    meta_damaged (fl, "neither half of the metadata log starts with a "
                  "valid STATE record");
    goto out;
  }
  h = !sz[0] ? 1 : !sz[1] ? 0 : st[1].seq > st[0].seq;
  slot = sv[h].slot;
  nslots = sv[h].nslots;
  len = sv[h].len;
  hash = sv[h].hash;
  gen = sv[h].gen;
  if (fstat (fl->store.fd, &sb) == -1) {
    fl_error (errno, "store: fstat: %s: %m", fl->store.path);
    goto out;
  }
  /* The image must be wholly inside the store: without it nothing can
   * be loaded.  A copy that is not loses only its snapshots (lose_copy).
   */
  m->load_size = sb.st_size;
  if (!fl->store.is_file &&
      fl_block_size (fl->store.fd, "store", fl->store.path,
                     &m->load_size) == -1)
    goto out;
  if (len == 0 || nslots != (len + fl->cluster_size - 1) / fl->cluster_size
      || slot >= UINT32_MAX - 1 || nslots >= UINT32_MAX - 1 - slot) {
    meta_damaged (fl, "the STATE record points outside the store");
    goto out;
  }
  if (fl->store.data_offset + (uint64_t) slot * fl->cluster_size + len >
      m->load_size) {
    char what[200];
    snprintf (what, sizeof what, "the STATE record points outside the "
              "store: its image ends at byte %" PRIu64 ", the store has %"
              PRIu64 " (it was truncated)", fl->store.data_offset +
              (uint64_t) slot * fl->cluster_size + len, m->load_size);
    meta_damaged (fl, what);
    goto out;
  }
  img = malloc (len);
  if (img == NULL) {
    fl_error (ENOMEM, "loading the store: out of memory for a %" PRIu64
              "-byte image", len);
    goto out;
  }
  if (store_read (&fl->store, slot, 0, img, len) == -1)
    goto out;
  if (XXH64 (img, len, 0) != hash) {
    meta_damaged (fl, "the image's checksum is wrong");
    goto out;
  }
  for (i = 0; i < nslots; i++)
    if (store_claim (&fl->store, slot + i, true) == -1)
      goto out;
  m->img_slot = slot;
  m->img_nslots = nslots;
  if (load_image (fl, img, len, &gen) == -1)
    goto out;

  /* The records after the STATE, up to the end of the log. */
  prev = st[h].seq;
  half = region + (size_t) h * META_HALF_SIZE;
  for (pos = sz[h]; pos < META_HALF_SIZE; ) {
    size_t n = rec_decode (half + pos, META_HALF_SIZE - pos, &r);
    if (n == 0 || r.seq != prev + 1)
      break;
    m->load_at = FLEECE_STORE_HEADER_SIZE + (uint64_t) h * META_HALF_SIZE +
      pos;
    if (apply_record (fl, &r, &gen) == -1)
      goto out;
    prev = r.seq;
    pos += n;
  }
  newest = judge_end (fl, half, h, pos, prev);
  break_lost (fl);
  /* What each half holds that is not zero: zeroed when it is next made
   * active (meta_image).
   */
  for (i = 0; i < 2; i++) {
    const char *p = region + (size_t) i * META_HALF_SIZE;
    size_t e = META_HALF_SIZE;
    while (e > 0 && p[e - 1] == 0)
      e--;
    m->used_end[i] = e;
  }
  m->seq = newest;
  m->durable = newest;
  atomic_store (&m->durable_pub, newest);
  m->half = h;
  m->pos = pos;
  for (i = 0; i < fl->nsnaps; i++)
    if (fl->snaps[i]->gen > gen)
      gen = fl->snaps[i]->gen;
  atomic_store (&fl->state, ((uint64_t) gen << 32) | fl->nsnaps);

  /* Copies no unbroken snapshot reads any more (trimmed, deleted or
   * broken before the crash) go; the rest are counted.
   */
  copymap_prune (&fl->copies, UINT32_MAX, copy_needed, copy_free, fl);
  partial_prune (&fl->partials, partial_needed, partial_unclaim, fl);
  copymap_foreach (&fl->copies, count_held, fl);
  for (i = 0; i < fl->nsnaps; i++) {
    _Atomic uint64_t *bits = atomic_load (&fl->snaps[i]->released);
    uint64_t w, n = 0;
    for (w = 0; bits && w < (fl->nclusters + 63) / 64; w++)
      n += __builtin_popcountll (atomic_load (&bits[w]));
    atomic_store (&fl->snaps[i]->nreleased, n);
  }
  ret = 0;
 out:
  free (region);
  free (img);
  copy_vector_reset (&m->lost);
  return ret;
}

