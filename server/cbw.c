/* Copy-before-write: preserve a cluster's old data before the first live
 * write to it in a snapshot generation.
 *
 * State.  fl->state holds the newest snapshot generation G and the number
 * of live snapshots; cgen[c] is the generation in which cluster c was last
 * written while snapshots existed.  A write in generation G to a cluster
 * with cgen[c] == G needs nothing: its old data was preserved (or needed
 * by nobody) by the first write of this generation.  That test is one
 * acquire load per cluster and takes no lock (docs/design.md invariant 4).
 *
 * The copy runs outside the write gate: the writer copies for the
 * generation it saw, then enters the gate and repeats the lock-free test
 * before it writes (engine.c).  Snapshot creation thus only waits for
 * writes that are in their pwrite, never for a copy; a write that raced a
 * creation copies again for the new snapshot.
 *
 * Otherwise the writer takes the cluster range lock, re-checks (another
 * writer may have copied meanwhile), and copies the clusters that some
 * snapshot needs: a live, unbroken snapshot with a generation in
 * (cgen[c], G] that has not released c.  One copy serves all of them
 * (invariant 2).  Adjacent clusters are read with one pread and, when the
 * store hands out adjacent slots, written with one pwrite; all-zero
 * clusters are recorded, not stored (invariant 5; store_put_run).  The copy is published
 * in the copy map before cgen[c] is set to G with release order: a reader
 * that sees the new cgen finds the copy.
 *
 * Failure (invariant 6).  A failed read of the live disk fails the write:
 * it could not have succeeded anyway.  A failed store write (or a full
 * store) either fails the live write and leaves everything as it was
 * (fail-write), or breaks every snapshot that needed the copy, records
 * why, and lets the live write go on (break-snapshot): a broken snapshot
 * fails every read, so it never returns wrong data, and its copies are
 * freed at once (snap_free_broken): it needs none any more.
 *
 * Lock order: cbw_locks range, then snaps_lock (read), then copy map
 * shard and store locks.
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cleanup.h"
#include "internal.h"

#define MAX_RUN_BYTES (8u << 20)

/* What one cbw_range did, for persistent stores: the record to wait for
 * before any cluster of the range may be overwritten, and the clusters
 * whose cgen to publish once it is stable.
 */
struct cbw_ctx {
  uint64_t c0;
  uint64_t wait;                /* highest record sequence to wait for */
  uint32_t gen;                 /* the generation copied for */
  uint8_t *publish;             /* persistent only: PUB_* for c0 + i */
  bool broke;                   /* broke a snapshot: free its copies */
};

#define PUB_CGEN   1            /* cgen[c] = gen */
#define PUB_UNPART 2            /* ... then remove c's completed entry */

/* cgen[c] = gen: the cluster's old data is safe.  With a persistent
 * store only once its record is stable (cbw_range), when gen is the
 * generation the writer copies for: a writer compares cgen with that
 * one, so an older generation (an entry of an older generation finished
 * first, cbw.c's part_finish_old) is published at once, as without a
 * persistent store, and a later copy of the cluster starts from it.
 */
static void
publish (struct fleece *fl, struct cbw_ctx *ctx, uint64_t c, uint32_t gen)
{
  if (ctx->publish && gen == ctx->gen)
    ctx->publish[c - ctx->c0] |= PUB_CGEN;
  else
    atomic_store_explicit (&fl->cgen[c], gen, memory_order_release);
}

/* Does any snapshot need a copy of cluster c made in generation gen,
 * c having last been written in generation lo?  A broken snapshot needs
 * nothing, once its BROKEN record is stable.  Called with snaps_lock
 * held.
 */
static bool
needs_copy (struct fleece *fl, struct cbw_ctx *ctx, uint64_t c, uint32_t lo,
            uint32_t gen)
{
  size_t i;

  for (i = 0; i < snap_needing_count (fl); i++) {
    struct fleece_snap *s = snap_needing (fl, i);
    if (!snap_reads_copy (s, c, lo, gen))
      continue;
    if (!atomic_load (&s->broken))
      return true;
    if (atomic_load (&s->broken_seq) > ctx->wait)
      ctx->wait = atomic_load (&s->broken_seq);
  }
  return false;
}

static void
count_holders (struct fleece *fl, uint64_t c, uint32_t lo, uint32_t gen)
{
  size_t i;

  for (i = 0; i < fl->nsnaps; i++) {
    struct fleece_snap *s = fl->snaps[i];
    if (snap_reads_copy (s, c, lo, gen) && !atomic_load (&s->broken))
      atomic_fetch_add (&s->held, 1);
  }
}

/* Break the snapshots that needed cluster c.  Called with snaps_lock
 * held; the event listener does not block.
 */
static int
break_snapshots (struct fleece *fl, struct cbw_ctx *ctx, uint64_t c,
                 uint32_t lo, uint32_t gen, const char *why)
{
  char reason[256];
  size_t i;
  int r = 0;

  snprintf (reason, sizeof reason, "copy-before-write of cluster %" PRIu64
            " failed: %.180s", c, why);
  pthread_mutex_lock (&fl->break_lock);
  for (i = 0; i < snap_needing_count (fl) && r == 0; i++) {
    struct fleece_snap *s = snap_needing (fl, i);
    if (snap_reads_copy (s, c, lo, gen))
      r = snap_break_locked (fl, s, reason, &ctx->wait, &ctx->broke);
  }
  pthread_mutex_unlock (&fl->break_lock);
  return r;
}

/* cbw-timeout: the store write of one run, in a thread of its own so
 * that the writer can give up on it.  The job is freed by the writer,
 * or, if the writer gave up, by the thread when the write ends; the
 * writer joins the thread, or, if it gave up, leaves it to cbw_reap.
 */
struct cbw_job {
  struct fleece *fl;
  char *buf;
  uint32_t n, *slots;
  uint64_t len;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool done, abandoned;
  int r, err;
  char msg[256];
};

static void
cbw_job_free (struct cbw_job *j)
{
  pthread_mutex_destroy (&j->lock);
  pthread_cond_destroy (&j->cond);
  free (j->buf);
  free (j->slots);
  free (j);
}

static void *
cbw_job_run (void *arg)
{
  struct cbw_job *j = arg;
  struct fleece *fl = j->fl;
  bool abandoned;

  j->r = store_put_run (&fl->store, j->buf, j->n, j->len, j->slots,
                        &fl->st_bytes_copied);
  if (j->r == -1) {
    j->err = errno;
    snprintf (j->msg, sizeof j->msg, "%s", fleece_last_error ());
  }
  pthread_mutex_lock (&j->lock);
  j->done = true;
  abandoned = j->abandoned;
  pthread_cond_signal (&j->cond);
  pthread_mutex_unlock (&j->lock);
  if (abandoned) {
    store_free_run (&fl->store, j->slots, j->n);
    cbw_job_free (j);
  }
  return NULL;
}

/* Join the threads of abandoned copies that have ended (all of them, and
 * waiting, when all is set: fleece_close).
 */
void
cbw_reap (struct fleece *fl, bool all)
{
  size_t i = 0;

  pthread_mutex_lock (&fl->orphan_lock);
  while (i < fl->orphans.len) {
    if (all ? pthread_join (fl->orphans.ptr[i], NULL) == 0
        : pthread_tryjoin_np (fl->orphans.ptr[i], NULL) == 0)
      fl->orphans.ptr[i] = fl->orphans.ptr[--fl->orphans.len];
    else
      i++;
  }
  pthread_mutex_unlock (&fl->orphan_lock);
}

/* Keep an abandoned copy's thread to join later; false if out of memory
 * (then the caller waits for it).
 */
static bool
adopt (struct fleece *fl, pthread_t t)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fl->orphan_lock);
  return thread_vector_append (&fl->orphans, t) == 0;
}

/* store_put_run with cbw-timeout.  On success or failure *bufp and *slotsp
 * stay the caller's; on a timeout they belong to the job.
 */
static int
put_run_timed (struct fleece *fl, char **bufp, uint32_t n, uint64_t len,
                 uint32_t **slotsp)
{
  struct cbw_job *j;
  struct timespec deadline;
  pthread_t t;
  int r;

  if (fl->cbw_timeout_ns == 0)
    return store_put_run (&fl->store, *bufp, n, len, *slotsp,
                          &fl->st_bytes_copied);
  j = calloc (1, sizeof *j);
  if (j == NULL)
    return fl_error (ENOMEM, "copy-before-write: out of memory");
  j->fl = fl;
  j->buf = *bufp;
  j->slots = *slotsp;
  j->n = n;
  j->len = len;
  pthread_mutex_init (&j->lock, NULL);
  pthread_cond_init (&j->cond, NULL);
  cbw_reap (fl, false);
  r = pthread_create (&t, NULL, cbw_job_run, j);
  if (r != 0) {
    j->buf = NULL;
    j->slots = NULL;
    cbw_job_free (j);
    return fl_error (r, "copy-before-write: pthread_create: %s",
                     strerror (r));
  }
  clock_gettime (CLOCK_REALTIME, &deadline);
  deadline.tv_sec += fl->cbw_timeout_ns / 1000000000;
  deadline.tv_nsec += fl->cbw_timeout_ns % 1000000000;
  if (deadline.tv_nsec >= 1000000000) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000;
  }
  pthread_mutex_lock (&j->lock);
  while (!j->done)
    if (pthread_cond_timedwait (&j->cond, &j->lock, &deadline) ==
        ETIMEDOUT)
      break;
  if (!j->done && adopt (fl, t)) {
    j->abandoned = true;
    pthread_mutex_unlock (&j->lock);
    *bufp = NULL;
    *slotsp = NULL;
    return fl_error (EIO, "copy-before-write: the store %s took "
                     "longer than cbw-timeout (%" PRIu64 " ms) to take a "
                     "copy", fl->store.path, fl->cbw_timeout_ns / 1000000);
  }
  pthread_mutex_unlock (&j->lock);
  pthread_join (t, NULL);
  r = j->r;
  if (r == -1)
    fl_error (j->err, "%s", j->msg);
  j->buf = NULL;
  j->slots = NULL;
  cbw_job_free (j);
  return r;
}

/* The store failed for clusters [a, a+n): apply the cbw error policy.
 * Returns 0 if the live write may go on.
 */
static int
store_failed (struct fleece *fl, struct cbw_ctx *ctx, uint64_t a, uint32_t n,
              uint32_t gen)
{
  int err = errno;
  char why[256];
  uint32_t i;

  atomic_fetch_add (&fl->st_cbw_errors, 1);
  if (fl->on_cbw_error == FLEECE_CBW_FAIL_WRITE) {
    errno = err;
    return -1;                  /* the message stands as recorded */
  }
  snprintf (why, sizeof why, "%s", fleece_last_error ());
  for (i = 0; i < n; i++) {
    uint32_t lo = atomic_load_explicit (&fl->cgen[a + i],
                                        memory_order_relaxed);
    if (break_snapshots (fl, ctx, a + i, lo, gen, why) == -1)
      return -1;
    publish (fl, ctx, a + i, gen);
  }
  return 0;
}

/* Copy clusters [a, a+n), every one of which some snapshot needs. */
static int
copy_run (struct fleece *fl, struct cbw_ctx *ctx, uint64_t a, uint32_t n,
          uint32_t gen)
{
  uint32_t cs = fl->cluster_size, i;
  uint64_t start = a * cs;
  uint64_t len = (uint64_t) n * cs;
  struct wbuf rec = { 0 };
  bool data = false;
  char *buf;
  uint32_t *slots;
  int r = -1;

  if (start + len > fl->disk.size)
    len = fl->disk.size - start;
  buf = malloc (len);
  slots = malloc (n * sizeof *slots);
  if (buf == NULL || slots == NULL) {
    fl_error (ENOMEM, "copy-before-write: malloc: out of memory");
    goto out;
  }
  if (disk_pread (&fl->disk, buf, len, start) == -1)
    goto out;                   /* the live disk itself failed */

  if (put_run_timed (fl, &buf, n, len, &slots) == -1) {
    int err = errno;
    if (slots)
      store_free_run (&fl->store, slots, n);
    errno = err;
    r = store_failed (fl, ctx, a, n, gen);
    goto out;
  }
  rec_copies_begin (&rec);
  for (i = 0; i < n; i++) {
    uint64_t c = a + i;
    struct copy cp = {
      .cluster = c,
      .lo = atomic_load_explicit (&fl->cgen[c], memory_order_relaxed),
      .hi = gen,
      .slot = slots[i],
    };
    if (copymap_insert (&fl->copies, &cp) == -1) {
      int err = errno;
      store_free_run (&fl->store, slots + i, n - i);
      errno = err;
      r = store_failed (fl, ctx, c, n - i, gen);
      n = i;                    /* the record holds the copies made */
      goto record;
    }
    rec_put_copy (&rec, &cp);
    data |= cp.slot != ZERO_SLOT;
    count_holders (fl, c, cp.lo, gen);
    atomic_fetch_add_explicit (&fl->st_cbw_clusters, 1,
                               memory_order_relaxed);
    if (cp.slot == ZERO_SLOT)
      atomic_fetch_add_explicit (&fl->st_cbw_zero, 1, memory_order_relaxed);
    publish (fl, ctx, c, gen);
  }
  r = 0;
 record:
  if (fl->meta.on && n > 0) {
    uint64_t seq;
    rec_copies_end (&rec, n);
    seq = meta_append (fl, REC_COPY, &rec, data);
    if (seq == 0)
      r = -1;
    else if (seq > ctx->wait)
      ctx->wait = seq;
  }
 out:
  free (rec.p);
  free (buf);
  free (slots);
  return r;
}

/* Sub-cluster copies (subcluster=true, partial.c).  A cluster that a
 * write covers only in part gets an entry in fl->partials and only the
 * blocks written are copied, into one slot allocated for the cluster at
 * its first block with data; a later write copies the blocks it covers
 * that are not copied yet.  Each copied block is published (its bit set
 * under the shard lock) before the write that follows overwrites it,
 * as cgen is for a whole cluster.  When the last block is copied the
 * entry becomes an ordinary copy and cgen[c] is published.  An entry of
 * an older generation is finished first (its missing blocks, which
 * nobody has written since, are copied for it), so that a cluster has
 * at most one entry.
 *
 * Persistent stores.  The blocks copied by one write are described by
 * one PARTIAL record holding the entry's whole state (its slot and both
 * bitmaps), appended after the data is written, and the record of the
 * completed copy is an ordinary COPY.  Like cgen for whole copies, a
 * copied block counts for the lock-free test (part_done) only once the
 * entry's newest record is stable; until then writers take the range
 * lock, which the copier holds until its records are stable.  A slot an
 * entry gave up is freed only once an image without it is stable.
 */

/* The bytes of cluster c on the disk: [*cs, *ce). */
static void
cluster_bounds (struct fleece *fl, uint64_t c, uint64_t *cs, uint64_t *ce)
{
  *cs = c << fl->cluster_bits;
  *ce = *cs + fl->cluster_size;
  if (*ce > fl->disk.size)
    *ce = fl->disk.size;
}

static uint32_t
cluster_blocks (struct fleece *fl, uint64_t c)
{
  uint64_t cs, ce;

  cluster_bounds (fl, c, &cs, &ce);
  return (ce - cs + fl->block_size - 1) >> fl->block_bits;
}

/* Blocks [*b0, *b1] of cluster c are those [offset, end) covers. */
static void
covered_blocks (struct fleece *fl, uint64_t c, uint64_t offset, uint64_t end,
                uint32_t *b0, uint32_t *b1)
{
  uint64_t cs, ce;

  cluster_bounds (fl, c, &cs, &ce);
  if (offset < cs)
    offset = cs;
  if (end > ce)
    end = ce;
  *b0 = (offset - cs) >> fl->block_bits;
  *b1 = (end - 1 - cs) >> fl->block_bits;
}

static bool
all_copied (struct fleece *fl, const struct partial_view *v, uint32_t b0,
            uint32_t b1)
{
  uint32_t b;

  for (b = b0; b <= b1; b++)
    if (!partial_copied (&fl->partials, v, b))
      return false;
  return true;
}

/* An entry's slot, which nobody reads any more: with a persistent store
 * only once an image without the entry is stable, so that no record
 * after the one that still names the slot can reuse it (meta.c).
 */
static void
part_free_slot (struct fleece *fl, const struct partial_view *v)
{
  uint32_t slot = v->slot;

  /* A completed entry's slot is its copy's (part_complete). */
  if (slot != NO_SLOT && v->seq != PARTIAL_DONE)
    meta_free_slots (fl, &slot, 1);
}

/* Drop c's entry and give its slot back: nobody reads it any more. */
static void
part_drop_entry (struct fleece *fl, uint64_t c, const struct partial_view *v)
{
  partial_remove (&fl->partials, c);
  part_free_slot (fl, v);
}

/* Persistent stores: append the record of a copy or of a partly copied
 * cluster (data: it points at data in the store, synced first), and free
 * rec; the range's clusters are published once the newest is stable
 * (cbw_range).
 */
static int
part_record (struct fleece *fl, struct cbw_ctx *ctx, uint16_t type,
             struct wbuf *rec, bool data)
{
  uint64_t seq = meta_append (fl, type, rec, data);

  wb_free (rec);
  if (seq == 0)
    return -1;
  if (seq > ctx->wait)
    ctx->wait = seq;
  return 0;
}

/* The PARTIAL record of v, whose bits are in none yet. */
static int
part_record_partial (struct fleece *fl, struct cbw_ctx *ctx, uint64_t c,
                     struct partial_view *v)
{
  struct wbuf rec = { 0 };
  int r;

  rec_put_partial (&rec, v, fl->partials.words);
  r = part_record (fl, ctx, REC_PARTIAL, &rec, v->slot != NO_SLOT);
  if (r == 0) {
    v->seq = ctx->wait;
    partial_recorded (&fl->partials, c, v->seq);
  }
  return r;
}

/* Every block of v copied: make it a copy (the blocks recorded as zero,
 * never written, are written now, unless the whole cluster was zero),
 * then publish cgen[c], then drop the entry.
 */
static int
part_complete (struct fleece *fl, struct cbw_ctx *ctx, uint64_t c,
               struct partial_view *v)
{
  struct copy cp = { .cluster = c, .lo = v->lo, .hi = v->hi,
                     .slot = v->slot == NO_SLOT ? ZERO_SLOT : v->slot };
  uint32_t b, n = cluster_blocks (fl, c);
  uint64_t cs, ce;
  char *zero = NULL;

  cluster_bounds (fl, c, &cs, &ce);
  for (b = 0; cp.slot != ZERO_SLOT && b < n; b++) {
    uint64_t at = (uint64_t) b << fl->block_bits;
    uint64_t len = at + fl->block_size > ce - cs ? ce - cs - at
      : fl->block_size;
    if (!partial_zero (&fl->partials, v, b))
      continue;
    if (zero == NULL && (zero = calloc (1, fl->block_size)) == NULL)
      return fl_error (ENOMEM, "copy-before-write: out of memory");
    if (store_write_part (&fl->store, cp.slot, at, zero, len) == -1) {
      free (zero);
      return -1;
    }
  }
  free (zero);
  if (copymap_insert (&fl->copies, &cp) == -1)
    return -1;
  if (fl->meta.on) {
    struct wbuf rec = { 0 };
    rec_copies_begin (&rec);
    rec_put_copy (&rec, &cp);
    rec_copies_end (&rec, 1);
    /* Failed: the live write fails, c stays partial in memory and its
     * copy unrecorded; the log's error is sticky (meta.c).
     */
    if (part_record (fl, ctx, REC_COPY, &rec, cp.slot != ZERO_SLOT) == -1)
      return -2;
  }
  count_holders (fl, c, cp.lo, cp.hi);
  atomic_fetch_add_explicit (&fl->st_cbw_clusters, 1, memory_order_relaxed);
  if (cp.slot == ZERO_SLOT)
    atomic_fetch_add_explicit (&fl->st_cbw_zero, 1, memory_order_relaxed);
  publish (fl, ctx, c, v->hi);
  if (ctx->publish && v->hi == ctx->gen) {
    /* Readers find cgen first, then the entry: it stays, marked done
     * (its slot is the copy's), until cgen is published (cbw_range).
     */
    partial_recorded (&fl->partials, c, PARTIAL_DONE);
    ctx->publish[c - ctx->c0] |= PUB_UNPART;
  }
  else
    partial_remove (&fl->partials, c);
  return 0;
}

/* Copy blocks [a, a+n) of cluster c, read into buf, for v. */
static int
part_put (struct fleece *fl, uint64_t c, struct partial_view *v,
          const char *buf, uint32_t a, uint32_t n, uint64_t len)
{
  uint32_t b;
  bool zero = fl_is_zero (buf, len), fresh = false;

  if (!zero && v->slot == NO_SLOT) {
    /* Published with the first block's bit, below. */
    if (store_alloc (&fl->store, 1, &v->slot) <= 0) {
      v->slot = NO_SLOT;
      return -1;
    }
    fresh = true;
  }
  if (!zero) {
    if (store_write_part (&fl->store, v->slot,
                          (uint64_t) a << fl->block_bits, buf, len) == -1) {
      if (fresh) {
        store_free (&fl->store, v->slot);
        v->slot = NO_SLOT;
      }
      return -1;
    }
    atomic_fetch_add_explicit (&fl->st_bytes_copied, len,
                               memory_order_relaxed);
  }
  partial_set (&fl->partials, c, a, n, zero, v->slot);
  v->seq = PARTIAL_UNRECORDED;
  for (b = a; b < a + n; b++) {
    v->bits[b / 64] |= UINT64_C (1) << (b % 64);
    if (zero)
      v->bits[fl->partials.words + b / 64] |= UINT64_C (1) << (b % 64);
  }
  return 0;
}

/* Copy the blocks of [b0, b1] that v lacks, a run of missing blocks
 * with one pread; an all-zero block is recorded, not stored.
 */
static int
part_copy_blocks (struct fleece *fl, uint64_t c, struct partial_view *v,
                  uint32_t b0, uint32_t b1)
{
  uint64_t cs, ce;
  uint32_t a, e, b;
  char *buf;
  int r = 0;

  cluster_bounds (fl, c, &cs, &ce);
  buf = malloc (fl->cluster_size);
  if (buf == NULL)
    return fl_error (ENOMEM, "copy-before-write: out of memory");
  for (a = b0; a <= b1 && r == 0; a = e) {
    uint64_t start, len;

    if (partial_copied (&fl->partials, v, a)) {
      e = a + 1;
      continue;
    }
    for (e = a; e <= b1 && !partial_copied (&fl->partials, v, e); e++)
      ;
    start = cs + ((uint64_t) a << fl->block_bits);
    len = ((uint64_t) (e - a) << fl->block_bits);
    if (start + len > ce)
      len = ce - start;
    if (disk_pread (&fl->disk, buf, len, start) == -1) {
      free (buf);
      return -2;                /* the live disk failed: fail the write */
    }
    /* Zero detection per block: a zero block inside data is not
     * stored either.
     */
    for (b = a; b < e && r == 0; b++) {
      uint64_t off = (uint64_t) (b - a) << fl->block_bits;
      uint64_t blen = len - off < fl->block_size ? len - off
        : fl->block_size;
      r = part_put (fl, c, v, buf + off, b, 1, blen);
    }
  }
  free (buf);
  return r;
}

/* The store failed while copying blocks of c for v: the error policy,
 * as store_failed; with break-snapshot the entry goes, and its slot.
 */
static int
part_failed (struct fleece *fl, struct cbw_ctx *ctx, uint64_t c,
             struct partial_view *v)
{
  if (store_failed (fl, ctx, c, 1, v->hi) == -1)
    return -1;
  part_drop_entry (fl, c, v);
  return 0;
}

/* Copy blocks [b0, b1] of c for v, and complete v if that was the last
 * of them.
 */
static int
part_copy (struct fleece *fl, struct cbw_ctx *ctx, uint64_t c,
           struct partial_view *v, uint32_t b0, uint32_t b1)
{
  int r = part_copy_blocks (fl, c, v, b0, b1);

  if (r == -2)
    return -1;
  if (r == 0 && all_copied (fl, v, 0, cluster_blocks (fl, c) - 1))
    r = part_complete (fl, ctx, c, v);
  else if (r == 0 && fl->meta.on && v->seq == PARTIAL_UNRECORDED &&
           part_record_partial (fl, ctx, c, v) == -1)
    return -1;                  /* nothing more can be recorded */
  if (r == -2)
    return -1;
  return r == -1 ? part_failed (fl, ctx, c, v) : 0;
}

/* An entry of an older generation than gen: finish it for the snapshots
 * it serves, or drop it if none needs it any more.
 */
static int
part_finish_old (struct fleece *fl, struct cbw_ctx *ctx, uint64_t c,
                 struct partial_view *v)
{
  if (needs_copy (fl, ctx, c, v->lo, v->hi))
    return part_copy (fl, ctx, c, v, 0, cluster_blocks (fl, c) - 1);
  part_drop_entry (fl, c, v);
  return 0;
}

/* Under the range lock: the blocks of cluster c that [offset, end)
 * covers, copied for generation gen.  have: v holds c's entry.
 */
static int
copy_part (struct fleece *fl, struct cbw_ctx *ctx, uint64_t c, uint32_t gen,
           uint64_t offset, uint64_t end, bool have, struct partial_view *v)
{
  uint32_t lo, b0, b1;

  if (have && v->hi != gen) {
    if (part_finish_old (fl, ctx, c, v) == -1)
      return -1;
    have = false;
  }
  lo = atomic_load_explicit (&fl->cgen[c], memory_order_acquire);
  if (lo >= gen)
    return 0;
  if (have && !needs_copy (fl, ctx, c, v->lo, gen)) {
    /* Its snapshots released c, or were deleted or broke, since. */
    part_drop_entry (fl, c, v);
    have = false;
  }
  if (!have) {
    if (!needs_copy (fl, ctx, c, lo, gen)) {
      publish (fl, ctx, c, gen);
      return 0;
    }
    if (partial_add (&fl->partials, c, lo, gen) == -1)
      return store_failed (fl, ctx, c, 1, gen);
    memset (v, 0, sizeof *v);
    v->cluster = c;
    v->lo = lo;
    v->hi = gen;
    v->slot = NO_SLOT;
  }
  covered_blocks (fl, c, offset, end, &b0, &b1);
  return part_copy (fl, ctx, c, v, b0, b1);
}

/* Does cluster c go the sub-cluster way: [offset, end) covers it only
 * in part, or it has an entry already (in *v, *have)?
 */
static bool
goes_part (struct fleece *fl, uint64_t c, uint64_t offset, uint64_t end,
           bool *have, struct partial_view *v)
{
  uint64_t cs, ce;

  if (fl->block_size == 0)
    return false;
  *have = partial_find (&fl->partials, c, v);
  cluster_bounds (fl, c, &cs, &ce);
  return *have || offset > cs || end < ce;
}

/* Snapshot deletion and broken snapshots: drop the entries no snapshot
 * needs any more, and their slots.  Takes snaps_lock for writing, which
 * excludes every copier (they hold it for reading), so no entry changes
 * under the prune.
 */
static bool
part_keep (void *opaque, const struct partial_view *v)
{
  struct fleece *fl = opaque;
  size_t i;

  for (i = 0; i < snap_needing_count (fl); i++) {
    struct fleece_snap *s = snap_needing (fl, i);
    if (snap_reads_copy (s, v->cluster, v->lo, v->hi) &&
        !atomic_load (&s->broken))
      return true;
  }
  return false;
}

static void
part_drop (void *opaque, const struct partial_view *v)
{
  part_free_slot (opaque, v);
}

/* A snapshot's client released cluster c (snapshot.c, range lock and
 * snaps_lock held): drop c's entry if no snapshot needs it any more, as
 * a release drops the copies, so that a pull with --discard-source keeps
 * the store small.
 */
void
cbw_release_partial (struct fleece *fl, uint64_t c)
{
  struct partial_view v;

  if (fl->block_size && partial_find (&fl->partials, c, &v) &&
      !part_keep (fl, &v))
    part_drop_entry (fl, c, &v);
}

void
cbw_prune_partials (struct fleece *fl)
{
  if (atomic_load (&fl->partials.n) == 0)
    return;
  pthread_rwlock_wrlock (&fl->snaps_lock);
  partial_prune (&fl->partials, part_keep, part_drop, fl);
  pthread_rwlock_unlock (&fl->snaps_lock);
}

/* Under the range lock: copy what needs copying in clusters [c0, c1]
 * for a write of [offset, end).
 */
static int
copy_clusters (struct fleece *fl, struct cbw_ctx *ctx, uint64_t c0,
               uint64_t c1, uint32_t gen, uint64_t offset, uint64_t end)
{
  uint64_t c = c0, run = 0, a = 0;
  uint32_t max_run = MAX_RUN_BYTES / fl->cluster_size;
  struct partial_view v;
  bool have;

  if (max_run == 0)
    max_run = 1;
  for (c = c0; c <= c1 + 1; c++) {
    bool need = false;

    if (c <= c1) {
      uint32_t lo = atomic_load_explicit (&fl->cgen[c], memory_order_acquire);
      /* cgen only moves forward: a writer that saw an older generation
       * than a newer writer already served leaves the cluster alone (it
       * will come back with the new generation, engine.c).
       */
      if (lo < gen && goes_part (fl, c, offset, end, &have, &v)) {
        if (run > 0 && copy_run (fl, ctx, a, run, gen) == -1)
          return -1;
        run = 0;
        if (copy_part (fl, ctx, c, gen, offset, end, have, &v) == -1)
          return -1;
        continue;
      }
      if (lo < gen) {
        need = needs_copy (fl, ctx, c, lo, gen);
        if (!need)
          publish (fl, ctx, c, gen);
      }
    }
    if (need && run == 0)
      a = c;
    if (need)
      run++;
    if (run > 0 && (!need || run == max_run)) {
      if (copy_run (fl, ctx, a, run, gen) == -1)
        return -1;
      run = 0;
    }
  }
  return 0;
}

/* store-warn: say once, when the store first passes the mark (it is
 * re-armed when the store drops below it again), and say what passed
 * it: the copy, and whether it fit.  A copy that did not fit has been
 * given back by now, so what the store holds afterwards may be nothing.
 */
static void
report_high_water (struct fleece *fl)
{
  const uint64_t cs = fl->cluster_size;
  struct store_warning w;
  uint64_t max, warn;
  char why[256];

  if (fl->store.warn_slots == 0 || !store_take_warning (&fl->store, &w))
    return;
  max = (uint64_t) fl->store.max_slots * cs;
  warn = (uint64_t) fl->store.warn_slots * cs;
  if ((uint64_t) w.held + w.asked > fl->store.max_slots)
    snprintf (why, sizeof why, "a copy of %" PRIu64 " bytes did not fit: "
              "the store held %" PRIu64 " of at most %" PRIu64 " bytes "
              "(store-warn at %" PRIu64 " bytes); it holds %" PRIu64
              " bytes now", w.asked * cs, w.held * cs, max, warn,
              w.used * cs);
  else
    snprintf (why, sizeof why, "a copy of %" PRIu64 " bytes took the store "
              "from %" PRIu64 " to %" PRIu64 " of at most %" PRIu64 " bytes "
              "(store-warn at %" PRIu64 " bytes)", w.asked * cs,
              w.held * cs, (w.held + (uint64_t) w.asked) * cs, max, warn);
  fl_emit_event (fl, "STORE_HIGH_WATER", NULL, why);
}

/* Sub-cluster copies: are the blocks of cluster c that [offset, end)
 * covers copied in generation gen?  A leaf lock, only for clusters
 * partly copied (none: one atomic load).
 */
static bool
part_done (struct fleece *fl, uint64_t c, uint64_t offset, uint64_t end,
           uint32_t gen)
{
  struct partial_view v;
  uint32_t b0, b1;

  if (fl->block_size == 0 || !partial_find (&fl->partials, c, &v) ||
      v.hi != gen)
    return false;
  /* Persistent: the copied blocks may be overwritten only once their
   * record is stable (the copier waits for it under the range lock).
   */
  if (fl->meta.on &&
      v.seq > atomic_load_explicit (&fl->meta.durable_pub,
                                    memory_order_acquire))
    return false;
  covered_blocks (fl, c, offset, end, &b0, &b1);
  return all_copied (fl, &v, b0, b1);
}

/* True if no cluster of [offset, offset+count) needs a copy in generation
 * gen: the lock-free test of the write path, one acquire load per cluster
 * (and for a cluster partly copied, a look at its blocks).
 */
bool
cbw_done (struct fleece *fl, uint64_t offset, uint64_t count, uint32_t gen)
{
  uint64_t c0 = offset >> fl->cluster_bits;
  uint64_t c1 = (offset + count - 1) >> fl->cluster_bits;
  uint64_t c;

  for (c = c0; c <= c1; c++)
    if (atomic_load_explicit (&fl->cgen[c], memory_order_acquire) != gen &&
        !part_done (fl, c, offset, offset + count, gen))
      return false;
  return true;
}

/* Preserve what snapshots up to generation gen need of the clusters of
 * [offset, offset+count).  Called outside the write gate (engine.c), so
 * snapshot creation never waits for a copy; the caller re-checks with
 * cbw_done inside the gate and comes back if a snapshot was created
 * meanwhile.
 */
int
cbw_range (struct fleece *fl, uint64_t offset, uint64_t count, uint32_t gen)
{
  uint64_t c0 = offset >> fl->cluster_bits;
  uint64_t c1 = (offset + count - 1) >> fl->cluster_bits;
  uint64_t t0 = monotonic_ns (), c;
  struct cbw_ctx ctx = { .c0 = c0, .gen = gen };
  int r;

  if (fl->meta.on) {
    /* Nothing can be recorded any more: no copy, no write (meta.c). */
    if (meta_check (fl) == -1)
      return -1;
    ctx.publish = calloc (c1 - c0 + 1, 1);
    if (ctx.publish == NULL)
      return fl_error (ENOMEM, "copy-before-write: out of memory");
  }
  if (rangelock_acquire (&fl->cbw_locks, c0, c1 + 1) == -1) {
    free (ctx.publish);
    return -1;
  }
  pthread_rwlock_rdlock (&fl->snaps_lock);
  r = copy_clusters (fl, &ctx, c0, c1, gen, offset, offset + count);
  pthread_rwlock_unlock (&fl->snaps_lock);
  /* Persistent: the copies' records (and the BROKEN records) are stable
   * before any cluster is declared safe to overwrite.  Still under the
   * range lock, so that no other copier copies these clusters again.
   */
  if (ctx.publish) {
    if (meta_wait (fl, ctx.wait) == -1)
      r = -1;
    else
      for (c = c0; c <= c1; c++) {
        if (ctx.publish[c - c0] & PUB_CGEN)
          atomic_store_explicit (&fl->cgen[c], gen, memory_order_release);
        if (ctx.publish[c - c0] & PUB_UNPART)
          partial_remove (&fl->partials, c);
      }
    free (ctx.publish);
  }
  rangelock_release (&fl->cbw_locks, c0, c1 + 1);
  fl_observe_copy (fl, monotonic_ns () - t0);
  report_high_water (fl);
  /* The snapshots broken here will never be read again: their copies go
   * now (persistent: their BROKEN records are stable by now), so that a
   * full store makes room for the other snapshots.
   */
  if (ctx.broke && r == 0)
    snap_free_broken (fl);
  return r;
}
