/* Copy-before-write: preserve a cluster's old data before the first live
 * write to it in a snapshot generation.
 *
 * State.  fl->state holds the newest snapshot generation G and the number
 * of live snapshots; cgen[c] is the generation in which cluster c was last
 * written while snapshots existed.  A write in generation G to a cluster
 * with cgen[c] == G needs nothing: its old data was preserved (or needed
 * by nobody) by the first write of this generation.  That test is one
 * acquire load per cluster and takes no lock (DESIGN.md invariant 4).
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
 * clusters are recorded, not stored (invariant 5).  The copy is published
 * in the copy map before cgen[c] is set to G with release order: a reader
 * that sees the new cgen finds the copy.
 *
 * Failure (invariant 6).  A failed read of the live disk fails the write:
 * it could not have succeeded anyway.  A failed store write (or a full
 * store) either fails the live write and leaves everything as it was
 * (fail-write), or breaks every snapshot that needed the copy, records
 * why, and lets the live write go on (break-snapshot): a broken snapshot
 * fails every read, so it never returns wrong data.
 *
 * Lock order: cbw_locks range, then snaps_lock (read), then copy map
 * shard and store locks.
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define MAX_RUN_BYTES (8u << 20)

bool
snap_is_released (const struct fleece_snap *s, uint64_t c)
{
  _Atomic uint64_t *bits = atomic_load (&s->released);

  return bits && (atomic_load_explicit (&bits[c / 64], memory_order_relaxed)
                  >> (c % 64)) & 1;
}

/* Does snapshot s read the copy of cluster c that serves generations
 * (lo, hi]?  Every decision about copies (make one, count its readers,
 * break on failure, free it) asks this.
 */
bool
snap_reads_copy (const struct fleece_snap *s, uint64_t c, uint32_t lo,
                 uint32_t hi)
{
  return s->gen > lo && s->gen <= hi && !snap_is_released (s, c);
}

/* Does any snapshot need a copy of cluster c made in generation gen,
 * c having last been written in generation lo?  Called with snaps_lock
 * held.
 */
static bool
needs_copy (struct fleece *fl, uint64_t c, uint32_t lo, uint32_t gen)
{
  size_t i;

  for (i = 0; i < fl->nsnaps; i++) {
    struct fleece_snap *s = fl->snaps[i];
    if (!atomic_load (&s->broken) && snap_reads_copy (s, c, lo, gen))
      return true;
  }
  return false;
}

static void
count_holders (struct fleece *fl, uint64_t c, uint32_t lo, uint32_t gen)
{
  size_t i;

  for (i = 0; i < fl->nsnaps; i++) {
    struct fleece_snap *s = fl->snaps[i];
    if (snap_reads_copy (s, c, lo, gen))
      atomic_fetch_add (&s->held, 1);
  }
}

/* Break the snapshots that needed cluster c.  Called with snaps_lock
 * held; the event listener does not block.
 */
static void
break_snapshots (struct fleece *fl, uint64_t c, uint32_t lo, uint32_t gen,
                 const char *why)
{
  size_t i;

  for (i = 0; i < fl->nsnaps; i++) {
    struct fleece_snap *s = fl->snaps[i];
    bool expect = false;
    if (!snap_reads_copy (s, c, lo, gen))
      continue;
    /* The reason is written before broken is set, once. */
    if (atomic_load (&s->broken))
      continue;
    snprintf (s->broken_reason, sizeof s->broken_reason,
              "copy-before-write of cluster %" PRIu64 " failed: %.180s", c,
              why);
    if (atomic_compare_exchange_strong (&s->broken, &expect, true))
      fl_emit_event (fl, "SNAPSHOT_BROKEN", s->name, s->broken_reason);
  }
}

#define NO_SLOT (UINT32_MAX - 1)

/* Write the non-zero clusters of a run of n clusters (len bytes at buf)
 * to the store, with as few writes as the allocator's runs allow.
 * slots[i] receives cluster i's slot, ZERO_SLOT, or NO_SLOT if nothing was
 * allocated for it before a failure.
 */
static int
store_run (struct fleece *fl, const char *buf, uint32_t n, uint64_t len,
           uint32_t *slots)
{
  uint32_t cs = fl->cluster_size, i, j, k, first;

  for (i = 0; i < n; i++) {
    uint64_t clen = i == n - 1 ? len - (uint64_t) i * cs : cs;
    slots[i] = fl_is_zero (buf + (uint64_t) i * cs, clen)
      ? ZERO_SLOT : NO_SLOT;
  }
  for (i = 0; i < n; ) {
    int got;
    uint64_t blen;

    if (slots[i] == ZERO_SLOT) {
      i++;
      continue;
    }
    for (j = i; j < n && slots[j] != ZERO_SLOT; j++)
      ;
    got = store_alloc (&fl->store, j - i, &first);
    if (got <= 0)
      return -1;
    for (k = 0; k < (uint32_t) got; k++)
      slots[i + k] = first + k;
    blen = (uint64_t) got * cs;
    if (blen > len - (uint64_t) i * cs)
      blen = len - (uint64_t) i * cs;
    if (store_write (&fl->store, first, got, buf + (uint64_t) i * cs,
                     blen) == -1)
      return -1;
    atomic_fetch_add_explicit (&fl->st_bytes_copied, blen,
                               memory_order_relaxed);
    i += got;
  }
  return 0;
}

static void
free_slots (struct fleece *fl, const uint32_t *slots, uint32_t n)
{
  uint32_t i;

  for (i = 0; i < n; i++)
    if (slots[i] != ZERO_SLOT && slots[i] != NO_SLOT)
      store_free (&fl->store, slots[i]);
}

/* The store failed for clusters [a, a+n): apply the cbw error policy.
 * Returns 0 if the live write may go on.
 */
static int
store_failed (struct fleece *fl, uint64_t a, uint32_t n, uint32_t gen)
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
    break_snapshots (fl, a + i, lo, gen, why);
    atomic_store_explicit (&fl->cgen[a + i], gen, memory_order_release);
  }
  return 0;
}

/* Copy clusters [a, a+n), every one of which some snapshot needs. */
static int
copy_run (struct fleece *fl, uint64_t a, uint32_t n, uint32_t gen)
{
  uint32_t cs = fl->cluster_size, i;
  uint64_t start = a * cs;
  uint64_t len = (uint64_t) n * cs;
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

  if (store_run (fl, buf, n, len, slots) == -1) {
    int err = errno;
    free_slots (fl, slots, n);
    errno = err;
    r = store_failed (fl, a, n, gen);
    goto out;
  }
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
      free_slots (fl, slots + i, n - i);
      errno = err;
      r = store_failed (fl, c, n - i, gen);
      goto out;
    }
    count_holders (fl, c, cp.lo, gen);
    atomic_fetch_add_explicit (&fl->st_cbw_clusters, 1,
                               memory_order_relaxed);
    if (cp.slot == ZERO_SLOT)
      atomic_fetch_add_explicit (&fl->st_cbw_zero, 1, memory_order_relaxed);
    atomic_store_explicit (&fl->cgen[c], gen, memory_order_release);
  }
  r = 0;
 out:
  free (buf);
  free (slots);
  return r;
}

/* Under the range lock: copy what needs copying in clusters [c0, c1]. */
static int
copy_clusters (struct fleece *fl, uint64_t c0, uint64_t c1, uint32_t gen)
{
  uint64_t c = c0, run = 0, a = 0;
  uint32_t max_run = MAX_RUN_BYTES / fl->cluster_size;

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
      if (lo < gen) {
        need = needs_copy (fl, c, lo, gen);
        if (!need)
          atomic_store_explicit (&fl->cgen[c], gen, memory_order_release);
      }
    }
    if (need && run == 0)
      a = c;
    if (need)
      run++;
    if (run > 0 && (!need || run == max_run)) {
      if (copy_run (fl, a, run, gen) == -1)
        return -1;
      run = 0;
    }
  }
  return 0;
}

/* store-warn: say once, when the store first passes the mark (it is
 * re-armed when the store drops below it again).
 */
static void
report_high_water (struct fleece *fl)
{
  uint64_t used;
  char why[160];

  if (fl->store.warn_slots && store_take_warning (&fl->store, &used)) {
    snprintf (why, sizeof why, "the store holds %" PRIu64 " of at most %"
              PRIu64 " bytes (store-warn at %" PRIu64 " bytes)",
              used * fl->cluster_size,
              (uint64_t) fl->store.max_slots * fl->cluster_size,
              (uint64_t) fl->store.warn_slots * fl->cluster_size);
    fl_emit_event (fl, "STORE_HIGH_WATER", NULL, why);
  }
}

/* True if no cluster of [offset, offset+count) needs a copy in generation
 * gen: the lock-free test of the write path, one acquire load per cluster.
 */
bool
cbw_done (struct fleece *fl, uint64_t offset, uint64_t count, uint32_t gen)
{
  uint64_t c0 = offset >> fl->cluster_bits;
  uint64_t c1 = (offset + count - 1) >> fl->cluster_bits;
  uint64_t c;

  for (c = c0; c <= c1; c++)
    if (atomic_load_explicit (&fl->cgen[c], memory_order_acquire) != gen)
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
  uint64_t t0 = fl_now_ns ();
  int r;

  if (rangelock_acquire (&fl->cbw_locks, c0, c1 + 1) == -1)
    return -1;
  pthread_rwlock_rdlock (&fl->snaps_lock);
  r = copy_clusters (fl, c0, c1, gen);
  pthread_rwlock_unlock (&fl->snaps_lock);
  rangelock_release (&fl->cbw_locks, c0, c1 + 1);
  atomic_fetch_add_explicit (&fl->st_cbw_wait_ns, fl_now_ns () - t0,
                             memory_order_relaxed);
  report_high_water (fl);
  return r;
}
