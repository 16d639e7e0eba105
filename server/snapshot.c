/* Snapshots: creation, deletion, release (trim), breaking, and their
 * part of a persistent store's image.
 *
 * Creation (invariant 3) closes the write gate, which drains the live
 * writes in flight, bumps the generation, publishes the snapshot, and
 * opens the gate: writers stall for the drain and a few stores.
 * Everything that can be slow (allocation, name checks) happens before,
 * and the list of snapshots is an array of FLEECE_SNAPSHOTS_MAX slots
 * allocated once, so that it never moves under a reader and creation can
 * append to it without waiting for the copies in flight.
 *
 * What a snapshot holds: the copies it reads (snap_reads_copy) and the
 * clusters its clients released; which copies a snapshot still needs
 * decides every copy, count and free (cbw.c, the prunes below).  Reads
 * and extents are snapshot-read.c's.
 *
 * Breaking (invariant 6): a snapshot that lost a copy it needs is marked
 * broken for good, with a BROKEN record first when the store is
 * persistent (snap_break_locked); it then fails every read, and its
 * copies are freed once that is stable (snap_free_broken).
 *
 * Deletion removes the snapshot from the list, waits for its reads in
 * flight (io_lock) and writes the image without it; until that image
 * is stable, copies are still made and kept for it (fl->deleting,
 * snap_needing), since a crash would bring it back.  Then it frees every
 * copy that no remaining snapshot needs.  Handles opened before deletion
 * see EINVAL (NBD has no ENOENT), and the server's log says it was
 * deleted.
 *
 * Trim (release) marks whole clusters released for the snapshot and
 * frees the copies nobody else needs; a later write to such a cluster
 * copies nothing for it.  A partial cluster is not released: the client
 * may still read the rest of it.
 *
 * Persistence (meta.c): creation and deletion write an image of the
 * state before they return; a deletion's freed slots are reused only
 * once that image is stable, a release's once its RELEASE record is.
 * The snapshots' part of the image is built and loaded here
 * (snap_image_put, snap_image_get), as bitmap.c does the bitmaps'.
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

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


/* Called with admin_lock or snaps_lock held. */
static struct fleece_snap *
find_snap (struct fleece *fl, const char *name)
{
  size_t i;

  for (i = 0; i < fl->nsnaps; i++)
    if (strcmp (fl->snaps[i]->name, name) == 0)
      return fl->snaps[i];
  return NULL;
}

static void
snap_free (struct fleece_snap *s)
{
  pthread_rwlock_destroy (&s->io_lock);
  free ((void *) atomic_load (&s->released));
  free (s);
}

/* Deletion must not wait behind a stream of reads: prefer writers. */
static void
init_io_lock (pthread_rwlock_t *lock)
{
  pthread_rwlockattr_t attr;

  pthread_rwlockattr_init (&attr);
  pthread_rwlockattr_setkind_np (&attr,
                                 PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init (lock, &attr);
  pthread_rwlockattr_destroy (&attr);
}

/* Check name and allocate a snapshot; called with admin_lock held. */
struct fleece_snap *
snap_prepare (struct fleece *fl, const char *name)
{
  struct fleece_snap *s;

  if (fleece_check_name ("snapshot", name) == -1)
    return NULL;
  if (find_snap (fl, name)) {
    fl_error (EEXIST, "snapshot '%s' already exists", name);
    return NULL;
  }
  if (state_gen (atomic_load (&fl->state)) >= UINT32_MAX - 2) {
    fl_error (ENOSPC, "snapshot '%s': the store has used up its snapshot "
              "generations (2^32)", name);
    return NULL;
  }
  if (fl->nsnaps >= FLEECE_SNAPSHOTS_MAX) {
    fl_error (ENOSPC, "snapshot '%s': there are already %d snapshots",
              name, FLEECE_SNAPSHOTS_MAX);
    return NULL;
  }
  s = calloc (1, sizeof *s);
  if (s == NULL) {
    fl_error (ENOMEM, "snapshot '%s': out of memory", name);
    return NULL;
  }
  s->fl = fl;
  strcpy (s->name, name);
  s->created = time (NULL);
  atomic_init (&s->refs, 1);
  init_io_lock (&s->io_lock);
  return s;
}

void
snap_discard (struct fleece_snap *s)
{
  snap_free (s);
}

/* Make s the newest snapshot; called with the gate closed and admin_lock
 * held.
 */
void
snap_publish (struct fleece *fl, struct fleece_snap *s)
{
  uint64_t st = atomic_load (&fl->state);
  size_t n = atomic_load (&fl->nsnaps);

  /* No snaps_lock here: a copy in flight holds it for reading, and the
   * gate is closed.  Appending is safe for readers (see internal.h).
   */
  s->gen = state_gen (st) + 1;
  fl->snaps[n] = s;
  atomic_store (&fl->nsnaps, n + 1);
  atomic_store (&fl->state, ((uint64_t) s->gen << 32) | (n + 1));
}

/* How long writers were held at the gate. */
void
snap_record_drain (struct fleece *fl, uint64_t ns)
{
  atomic_store (&fl->st_last_drain_ns, ns);
  if (ns > atomic_load (&fl->st_max_drain_ns))
    atomic_store (&fl->st_max_drain_ns, ns);
}

/* Between a new snapshot's publication (writers let in) and its image:
 * the fault injection create_image_delay_ms widens that window, in which
 * writers copy for a snapshot that a crash would take away.
 */
void
snap_before_image (void)
{
  if (fleece_debug.create_image_delay_ms)
    usleep (fleece_debug.create_image_delay_ms * 1000);
}

int
fleece_snapshot_create (struct fleece *fl, const char *name)
{
  struct fleece_snap *s;
  uint64_t t0, drain;
  int r;

  if (fleece_check_new_name ("snapshot", name) == -1)
    return -1;
  pthread_mutex_lock (&fl->admin_lock);
  s = snap_prepare (fl, name);
  if (s == NULL) {
    pthread_mutex_unlock (&fl->admin_lock);
    return -1;
  }
  t0 = monotonic_ns ();
  gate_close (&fl->gate);
  snap_publish (fl, s);
  gate_open (&fl->gate);
  drain = monotonic_ns () - t0;
  snap_record_drain (fl, drain);
  snap_before_image ();
  r = meta_image (fl);
  pthread_mutex_unlock (&fl->admin_lock);
  fl_debug ("snapshot '%s' created, generation %u, writers stalled %"
            PRIu64 " ns", name, s->gen, drain);
  return r;
}

/* Does snapshot s still need the copies it reads?  A broken snapshot
 * fails every read for good, so it needs none, once its broken state is
 * stable: with a persistent store, a crash before its BROKEN record is
 * would bring it back unbroken, reading copies whose slots were reused.
 */
bool
snap_keeps_copies (const struct fleece_snap *s)
{
  return !atomic_load (&s->broken) || atomic_load (&s->broken_unrecorded) ||
    atomic_load (&s->broken_seq) > atomic_load (&s->fl->meta.durable_pub);
}

/* Is copy cp still needed by a live snapshot?  Called with snaps_lock. */
bool
copy_needed (void *opaque, const struct copy *cp)
{
  struct fleece *fl = opaque;
  size_t i;

  for (i = 0; i < snap_needing_count (fl); i++) {
    struct fleece_snap *s = snap_needing (fl, i);
    if (snap_reads_copy (s, cp->cluster, cp->lo, cp->hi) &&
        snap_keeps_copies (s))
      return true;
  }
  return false;
}

/* The slots of the copies a prune drops, gathered while the copy map's
 * shards are locked and freed together once they are not: freeing
 * punches the store file, which is slow, and a locked shard holds up the
 * copies and the snapshot reads that hash to it.
 */
struct dropped {
  struct fleece *fl;
  slot_vector slots;
  bool now;                     /* store_free_slots, not meta_free_slots */
};

static bool
dropped_keep (void *opaque, const struct copy *cp)
{
  struct dropped *d = opaque;

  return copy_needed (d->fl, cp);
}

static void
dropped_add (void *opaque, const struct copy *cp)
{
  struct dropped *d = opaque;
  uint32_t slot = cp->slot;

  if (slot == ZERO_SLOT)
    return;
  if (slot_vector_append (&d->slots, slot) == -1) {
    /* Out of memory: free this one at once. */
    if (d->now)
      store_free (&d->fl->store, slot);
    else
      meta_free_slots (d->fl, &slot, 1);
  }
}

static void
dropped_free (struct dropped *d)
{
  if (d->now)
    store_free_slots (&d->fl->store, d->slots.ptr, d->slots.len);
  else
    meta_free_slots (d->fl, d->slots.ptr, d->slots.len);
  slot_vector_reset (&d->slots);
}

/* Free the copies that only broken snapshots read, now that their
 * broken state is stable (cbw.c, after breaking one): a full store gets
 * its space back without a snapshot-delete.  The slots are reused at
 * once, so a read of a broken snapshot that was in flight checks for
 * the break after reading (fleece_snap_pread).
 */
void
snap_free_broken (struct fleece *fl)
{
  struct dropped drop = { .fl = fl, .now = true };
  size_t i;

  pthread_rwlock_rdlock (&fl->snaps_lock);
  for (i = 0; i < fl->nsnaps; i++)
    if (!snap_keeps_copies (fl->snaps[i]))
      atomic_store (&fl->snaps[i]->held, 0);
  copymap_prune (&fl->copies, UINT32_MAX, dropped_keep, dropped_add, &drop);
  pthread_rwlock_unlock (&fl->snaps_lock);
  if (drop.slots.len)
    fl_debug ("freed %zu copies that only broken snapshots read",
              drop.slots.len);
  dropped_free (&drop);
  cbw_prune_partials (fl);
}

/* Free a copy's slot at once: its release record is stable, or the store
 * is being loaded (meta-load.c).
 */
void
copy_free (void *opaque, const struct copy *cp)
{
  struct fleece *fl = opaque;

  if (cp->slot != ZERO_SLOT)
    store_free (&fl->store, cp->slot);
}

/* Loading a persistent store (meta-load.c): append snapshot name. */
struct fleece_snap *
snap_restore (struct fleece *fl, const char *name, uint32_t gen,
              int64_t created)
{
  struct fleece_snap *s = snap_prepare (fl, name);

  if (s == NULL)
    return NULL;
  s->gen = gen;
  s->created = created;
  fl->snaps[fl->nsnaps] = s;
  atomic_store (&fl->nsnaps, fl->nsnaps + 1);
  return s;
}

static void
snap_unref (struct fleece_snap *s)
{
  if (atomic_fetch_sub (&s->refs, 1) == 1)
    snap_free (s);
}

/* Drop a handle from fleece_snap_get. */
void
fleece_snap_put (struct fleece_snap *s)
{
  if (s) {
    atomic_fetch_sub (&s->readers, 1);
    snap_unref (s);
  }
}

/* At fleece_close: drop the list's references. */
void
snap_free_all (struct fleece *fl)
{
  size_t i;

  for (i = 0; i < fl->nsnaps; i++)
    snap_unref (fl->snaps[i]);
  fl->nsnaps = 0;
}

/* Tests only (test-engine-delete-crash.c): called by a deletion once
 * the snapshot has left the list and before the image without it is
 * written, the moment where a kill -9 leaves the snapshot in the store.
 */
void (*fl_test_delete_hook) (struct fleece *fl, const char *name);

int
fleece_snapshot_delete (struct fleece *fl, const char *name)
{
  struct dropped drop = { .fl = fl };
  struct fleece_snap *s;
  size_t i;
  int r;

  if (fleece_check_name ("snapshot", name) == -1)
    return -1;
  pthread_mutex_lock (&fl->admin_lock);
  pthread_rwlock_wrlock (&fl->snaps_lock);
  s = find_snap (fl, name);
  if (s == NULL) {
    pthread_rwlock_unlock (&fl->snaps_lock);
    pthread_mutex_unlock (&fl->admin_lock);
    return fl_error (ENOENT, "snapshot '%s' does not exist", name);
  }
  for (i = 0; fl->snaps[i] != s; i++)
    ;
  memmove (&fl->snaps[i], &fl->snaps[i + 1],
           (fl->nsnaps - i - 1) * sizeof *fl->snaps);
  fl->nsnaps--;
  /* Out of the list (no longer found, listed or in an image), but still
   * served by every copy until the image without it is stable: a crash
   * before that brings it back, and it must then read what it read
   * before.  A write meanwhile that skipped its copy, or dropped a partly
   * copied cluster only s needs and copied the cluster again under a
   * new range, would leave a stable record that makes it read the wrong
   * data after the crash (snap_needing).  The count in fl->state keeps
   * s until then, so that writers still come to copy.
   */
  fl->deleting = s;
  atomic_store (&s->deleted, true);
  pthread_rwlock_unlock (&fl->snaps_lock);

  /* Wait for reads in flight, then make the deletion stable. */
  pthread_rwlock_wrlock (&s->io_lock);
  pthread_rwlock_unlock (&s->io_lock);
  if (fl_test_delete_hook)
    fl_test_delete_hook (fl, name);
  r = meta_image (fl);

  /* Now free what nobody needs.  Fewer snapshots never needs the gate:
   * a writer that still sees the old count only finds nothing to copy
   * for s.
   */
  pthread_rwlock_wrlock (&fl->snaps_lock);
  fl->deleting = NULL;
  atomic_store (&fl->state, (atomic_load (&fl->state) & ~UINT64_C (0xffffffff))
                | fl->nsnaps);
  pthread_rwlock_unlock (&fl->snaps_lock);
  pthread_rwlock_rdlock (&fl->snaps_lock);
  copymap_prune (&fl->copies, UINT32_MAX, dropped_keep, dropped_add, &drop);
  pthread_rwlock_unlock (&fl->snaps_lock);
  cbw_prune_partials (fl);
  /* Persistent: the freed slots are reused only once an image without
   * their copies is stable (meta_free_slots); a second image makes them
   * free now rather than at the next admin operation or compaction, so
   * that deleting a snapshot makes room in a full store at once.
   */
  dropped_free (&drop);
  if (r == 0 && meta_has_deferred (fl))
    r = meta_image (fl);
  pthread_mutex_unlock (&fl->admin_lock);
  fl_debug ("snapshot '%s' deleted", name);
  snap_unref (s);
  return r;
}

struct fleece_snap *
fleece_snap_get (struct fleece *fl, const char *name)
{
  struct fleece_snap *s;

  if (fleece_check_name ("snapshot", name) == -1)
    return NULL;
  pthread_rwlock_rdlock (&fl->snaps_lock);
  s = find_snap (fl, name);
  if (s) {
    atomic_fetch_add (&s->refs, 1);
    atomic_fetch_add (&s->readers, 1);
  }
  pthread_rwlock_unlock (&fl->snaps_lock);
  if (s == NULL)
    fl_error (ENOENT, "snapshot '%s' does not exist", name);
  return s;
}

const char *
fleece_snap_name (const struct fleece_snap *s)
{
  return s->name;
}

int
snap_ensure_released (struct fleece_snap *s)
{
  _Atomic uint64_t *bits, *expect = NULL;

  if (atomic_load (&s->released))
    return 0;
  bits = calloc ((s->fl->nclusters + 63) / 64, sizeof *bits);
  if (bits == NULL)
    return fl_error (ENOMEM, "snapshot '%s': out of memory", s->name);
  if (!atomic_compare_exchange_strong (&s->released, &expect, bits))
    free ((void *) bits);
  return 0;
}

int
fleece_snap_trim (struct fleece_snap *s, uint32_t count, uint64_t offset)
{
  struct fleece *fl = s->fl;
  struct dropped drop = { .fl = fl };
  uint64_t end = offset + count, c0, c1, c, seq = 0;
  _Atomic uint64_t *bits;
  int r = -1;

  if (end > fl->disk.size || end < offset)
    return fl_error (EINVAL, "snapshot '%s': trim beyond the end", s->name);
  /* Whole clusters only; the last cluster may be short. */
  c0 = (offset + fl->cluster_size - 1) >> fl->cluster_bits;
  c1 = end == fl->disk.size ? fl->nclusters : end >> fl->cluster_bits;
  pthread_rwlock_rdlock (&s->io_lock);
  if (snap_check_readable (s) == -1)
    goto out_unlock_io;
  if (c0 >= c1) {
    r = 0;
    goto out_unlock_io;
  }
  if (snap_ensure_released (s) == -1 || meta_check (fl) == -1)
    goto out_unlock_io;
  bits = atomic_load (&s->released);
  if (rangelock_acquire (&fl->cbw_locks, c0, c1) == -1)
    goto out_unlock_io;
  pthread_rwlock_rdlock (&fl->snaps_lock);
  for (c = c0; c < c1; c++) {
    uint64_t bit = UINT64_C (1) << (c % 64);
    struct copy cp;
    if (atomic_fetch_or (&bits[c / 64], bit) & bit)
      continue;
    atomic_fetch_add (&s->nreleased, 1);
    if (copymap_lookup (&fl->copies, c, s->gen, &cp))
      atomic_fetch_sub (&s->held, 1);
    if (!fl->meta.on)
      copymap_prune (&fl->copies, c, dropped_keep, dropped_add, &drop);
    cbw_release_partial (fl, c);
  }
  if (fl->meta.on) {
    struct wbuf b = { 0 };
    rec_put_release (&b, s->gen, c0, c1 - c0);
    seq = meta_append (fl, REC_RELEASE, &b, false);
    free (b.p);
  }
  pthread_rwlock_unlock (&fl->snaps_lock);
  rangelock_release (&fl->cbw_locks, c0, c1);
  dropped_free (&drop);
  r = fl->meta.on && seq == 0 ? -1 : 0;
 out_unlock_io:
  pthread_rwlock_unlock (&s->io_lock);
  if (seq == 0)
    return r;

  /* Persistent: free the copies only once the release is stable, so that
   * a crash never leaves a record of a copy whose slot was reused.  Not
   * under io_lock: a deletion waiting for it may hold admin_lock, which
   * the compactor needs to make room in the log.
   */
  if (meta_wait (fl, seq) == -1)
    return -1;
  if (rangelock_acquire (&fl->cbw_locks, c0, c1) == -1)
    return -1;
  pthread_rwlock_rdlock (&fl->snaps_lock);
  drop.now = true;
  for (c = c0; c < c1; c++)
    copymap_prune (&fl->copies, c, dropped_keep, dropped_add, &drop);
  pthread_rwlock_unlock (&fl->snaps_lock);
  rangelock_release (&fl->cbw_locks, c0, c1);
  dropped_free (&drop);
  return 0;
}

/* Mark s broken, once (break_lock held), with a stable BROKEN record
 * first when the store is persistent (*wait receives its sequence).
 * Returns -1 if that record cannot be written: then the live write must
 * not go on.
 */
int
snap_break_locked (struct fleece *fl, struct fleece_snap *s,
                   const char *reason, uint64_t *wait, bool *broke)
{
  uint64_t seq = 0;

  if (atomic_load (&s->broken)) {
    if (atomic_load (&s->broken_seq) > *wait)
      *wait = atomic_load (&s->broken_seq);
    return 0;
  }
  snprintf (s->broken_reason, sizeof s->broken_reason, "%s", reason);
  if (fl->meta.on) {
    struct wbuf b = { 0 };
    rec_put_broken (&b, s->gen, s->broken_reason);
    seq = meta_append (fl, REC_BROKEN, &b, false);
    free (b.p);
    if (seq == 0)
      return -1;
    if (seq > *wait)
      *wait = seq;
  }
  atomic_store (&s->broken_seq, seq);
  atomic_store (&s->broken, true);
  *broke = true;
  fl_emit_event (fl, "SNAPSHOT_BROKEN", s->name, s->broken_reason);
  return 0;
}


static void
fill_info (struct fleece_snap *s, struct fleece_snap_info *info)
{
  memset (info, 0, sizeof *info);
  strcpy (info->name, s->name);
  info->generation = s->gen;
  info->created = s->created;
  info->broken = atomic_load (&s->broken);
  if (info->broken)
    snprintf (info->broken_reason, sizeof info->broken_reason, "%s",
              s->broken_reason);
  info->clusters_held = atomic_load (&s->held);
  info->clusters_released = atomic_load (&s->nreleased);
  info->readers = atomic_load (&s->readers);
}

int
fleece_list_snapshots (struct fleece *fl,
                       void (*fn) (void *, const struct fleece_snap_info *),
                       void *opaque)
{
  struct fleece_snap_info info;
  size_t i, n;

  pthread_rwlock_rdlock (&fl->snaps_lock);
  n = fl->nsnaps;
  for (i = 0; i < n; i++) {
    fill_info (fl->snaps[i], &info);
    fn (opaque, &info);
  }
  pthread_rwlock_unlock (&fl->snaps_lock);
  return n;
}

int
fleece_snapshot_info (struct fleece *fl, const char *name,
                      struct fleece_snap_info *info)
{
  struct fleece_snap *s;
  int r = -1;

  pthread_rwlock_rdlock (&fl->snaps_lock);
  s = find_snap (fl, name);
  if (s) {
    fill_info (s, info);
    r = 0;
  }
  pthread_rwlock_unlock (&fl->snaps_lock);
  if (r == -1)
    fl_error (ENOENT, "snapshot '%s' does not exist", name);
  return r;
}

/* ---- persistence: the snapshots' part of the image (meta.c) ---- */

#define IMG_BROKEN   1u
#define IMG_RELEASED 2u         /* its released bits follow */

struct fleece_snap *
snap_by_gen (struct fleece *fl, uint32_t gen)
{
  size_t i;

  for (i = 0; i < fl->nsnaps; i++)
    if (fl->snaps[i]->gen == gen)
      return fl->snaps[i];
  return NULL;
}

/* Called with snaps_lock held. */
void
snap_image_put (struct fleece *fl, struct wbuf *b)
{
  uint64_t nwords = (fl->nclusters + 63) / 64;
  size_t i;

  /* A snapshot being broken appends its BROKEN record before it sets
   * broken, both under break_lock: if the record fell before the cut, the
   * flag is set by the time this lock is ours.
   */
  pthread_mutex_lock (&fl->break_lock);
  for (i = 0; i < fl->nsnaps; i++) {
    struct fleece_snap *s = fl->snaps[i];
    _Atomic uint64_t *rel = atomic_load (&s->released);
    bool broken = atomic_load (&s->broken);

    wb_u32 (b, s->gen);
    wb_u32 (b, (broken ? IMG_BROKEN : 0) | (rel ? IMG_RELEASED : 0));
    wb_u64 (b, (uint64_t) s->created);
    wb_str (b, s->name);
    wb_str (b, broken ? s->broken_reason : "");
    if (rel)
      wb_words (b, rel, nwords);
  }
  pthread_mutex_unlock (&fl->break_lock);
}

/* Load n snapshots of the image, oldest first, none newer than gen. */
int
snap_image_get (struct fleece *fl, struct rbuf *b, uint32_t n, uint32_t gen)
{
  uint64_t nwords = (fl->nclusters + 63) / 64;
  uint32_t i, last_gen = 0;

  for (i = 0; i < n; i++) {
    char name[FLEECE_SNAPSHOT_NAME_MAX + 1], reason[REC_REASON_MAX + 1];
    uint32_t sgen = rb_u32 (b), flags = rb_u32 (b);
    int64_t created = (int64_t) rb_u64 (b);
    struct fleece_snap *s;

    rb_str (b, name, FLEECE_SNAPSHOT_NAME_MAX);
    rb_str (b, reason, REC_REASON_MAX);
    if (b->bad || sgen <= last_gen || sgen > gen ||
        (flags & ~(IMG_BROKEN | IMG_RELEASED)))
      return meta_damaged (fl, "a snapshot in the image is not valid");
    last_gen = sgen;
    s = snap_restore (fl, name, sgen, created);
    if (s == NULL)
      return -1;
    if (flags & IMG_RELEASED) {
      _Atomic uint64_t *bits;
      if (snap_ensure_released (s) == -1)
        return -1;
      bits = atomic_load (&s->released);
      rb_words (b, bits, nwords);
      if (fl->nclusters % 64 &&
          (atomic_load (&bits[nwords - 1]) >> (fl->nclusters % 64)))
        b->bad = true;
    }
    if (flags & IMG_BROKEN) {
      snprintf (s->broken_reason, sizeof s->broken_reason, "%s",
                reason[0] ? reason : "broken in an earlier run");
      atomic_store (&s->broken, true);
    }
  }
  if (b->bad)
    return meta_damaged (fl, "a snapshot in the image is truncated");
  return 0;
}
