/* Snapshots: creation, deletion, and reads of the point-in-time image.
 *
 * Creation (invariant 3) closes the write gate, which drains the live
 * writes in flight, bumps the generation, publishes the snapshot, and
 * opens the gate: writers stall for the drain and a few stores.
 * Everything that can be slow (allocation, name checks) happens before,
 * and the list of snapshots is an array of FLEECE_SNAPSHOTS_MAX slots
 * allocated once, so that it never moves under a reader and creation can
 * append to it without waiting for the copies in flight.
 *
 * Reads (invariant 1).  Snapshot S (generation g) sees cluster c as:
 *   - zeroes, if a client of S released (trimmed) c;
 *   - the copy covering g, if cgen[c] >= g: c was written after S was
 *     created, so its old data was copied first, or S is broken;
 *   - the live disk, if cgen[c] < g.
 * The last case takes no lock, so that a backup never makes a live write
 * wait (QEMU's fleecing holds a lock there that writers queue on).  It is
 * validated instead, like a seqlock: after reading the live data, a full
 * fence and a reload of cgen[c].  A writer publishes the copy and stores
 * cgen[c] = G before it writes the live disk, so if cgen[c] is still
 * below g after the read, no overwrite of c can have reached the disk
 * before or during the read.  If it moved, the cluster is read again,
 * now from its copy.  A cluster is retried at most once: once copied, it
 * stays copied for S.
 *
 * Deletion removes the snapshot from the list (new copies stop counting
 * it), waits for its reads in flight (io_lock), then frees every copy that
 * no remaining snapshot needs.  Handles opened before deletion see
 * EINVAL (NBD has no ENOENT), and the server's log says it was deleted.
 *
 * Trim (release) marks whole clusters released for S and frees copies
 * nobody else needs; a later write to c copies nothing for S.  A partial
 * cluster is not released: the client may still read the rest of it.
 *
 * Persistence (meta.c): creation and deletion write an image of the
 * state before they return; a deletion's freed slots are reused only
 * once that image is stable, a release's once its RELEASE record is.
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

int
fleece_check_name (const char *what, const char *name)
{
  size_t i, len = name ? strlen (name) : 0;

  if (len == 0)
    return fl_error (EINVAL, "%s name is empty", what);
  if (len > FLEECE_SNAPSHOT_NAME_MAX)
    return fl_error (EINVAL, "%s name is %zu bytes long, the limit is %d",
                     what, len, FLEECE_SNAPSHOT_NAME_MAX);
  for (i = 0; i < len; i++) {
    unsigned char ch = name[i];
    if (ch == '/')
      return fl_error (EINVAL, "%s name '%s' contains '/'", what, name);
    if (ch < 0x20 || ch == 0x7f)
      return fl_error (EINVAL, "%s name contains control character 0x%02x "
                       "at byte %zu", what, ch, i);
  }
  return 0;
}

/* The code point of the 2- or 3-byte UTF-8 sequence at p (*len = its
 * length), or 0 with *len = 1: every bidirectional control and every
 * non-ASCII space is in the Basic Multilingual Plane.
 */
static uint32_t
utf8_at (const unsigned char *p, size_t avail, size_t *len)
{
  if (p[0] >= 0xc2 && p[0] <= 0xdf && avail >= 2 && (p[1] & 0xc0) == 0x80) {
    *len = 2;
    return ((p[0] & 0x1fu) << 6) | (p[1] & 0x3fu);
  }
  if (p[0] >= 0xe0 && p[0] <= 0xef && avail >= 3 &&
      (p[1] & 0xc0) == 0x80 && (p[2] & 0xc0) == 0x80) {
    *len = 3;
    return ((p[0] & 0x0fu) << 12) | ((p[1] & 0x3fu) << 6) | (p[2] & 0x3fu);
  }
  *len = 1;
  return 0;
}

/* Unicode whitespace that is not ASCII (ASCII whitespace other than the
 * space is a control character, refused anyway).
 */
static bool
is_unicode_space (uint32_t cp)
{
  return cp == 0x00a0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200b) ||
    cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f ||
    cp == 0x3000 || cp == 0xfeff;
}

/* The embeddings, overrides and isolates of the Unicode bidirectional
 * algorithm: in a name they make a listing show it differently from
 * what it is ("Trojan Source").
 */
static bool
is_bidi_control (uint32_t cp)
{
  return (cp >= 0x202a && cp <= 0x202e) || (cp >= 0x2066 && cp <= 0x2069);
}

/* The rules for a name being given to a new snapshot, bitmap or
 * checkpoint, on top of fleece_check_name's: no "." or "..", not only
 * whitespace, no bidirectional control characters.  Names that a store
 * written by an older version holds are still loaded, found and deleted
 * (fleece_check_name alone).
 */
int
fleece_check_new_name (const char *what, const char *name)
{
  const unsigned char *p = (const unsigned char *) name;
  size_t i, n, len;
  bool blank = true;

  if (fleece_check_name (what, name) == -1)
    return -1;
  if (strcmp (name, ".") == 0 || strcmp (name, "..") == 0)
    return fl_error (EINVAL, "%s name '%s' is refused: '.' and '..' are "
                     "not names", what, name);
  len = strlen (name);
  for (i = 0; i < len; i += n) {
    uint32_t cp = utf8_at (p + i, len - i, &n);
    if (is_bidi_control (cp))
      return fl_error (EINVAL, "%s name contains the bidirectional control "
                       "character U+%04" PRIX32 " at byte %zu: it would be "
                       "shown differently from what it is", what, cp, i);
    if (p[i] != ' ' && !is_unicode_space (cp))
      blank = false;
  }
  if (blank)
    return fl_error (EINVAL, "%s name is only whitespace", what);
  return 0;
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

  for (i = 0; i < fl->nsnaps; i++) {
    struct fleece_snap *s = fl->snaps[i];
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
  uint32_t *slots;
  size_t n, cap;
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
  if (d->n == d->cap) {
    size_t cap = d->cap ? d->cap * 2 : 256;
    uint32_t *p = realloc (d->slots, cap * sizeof *p);
    if (p == NULL) {            /* free this one at once */
      if (d->now)
        store_free (&d->fl->store, slot);
      else
        meta_free_slots (d->fl, &slot, 1);
      return;
    }
    d->slots = p;
    d->cap = cap;
  }
  d->slots[d->n++] = slot;
}

static void
dropped_free (struct dropped *d)
{
  if (d->now)
    store_free_slots (&d->fl->store, d->slots, d->n);
  else
    meta_free_slots (d->fl, d->slots, d->n);
  free (d->slots);
  d->slots = NULL;
  d->n = d->cap = 0;
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
  if (drop.n)
    fl_debug ("freed %zu copies that only broken snapshots read", drop.n);
  dropped_free (&drop);
}

/* Free a copy's slot at once: its release record is stable, or the store
 * is being loaded (meta.c).
 */
void
copy_free (void *opaque, const struct copy *cp)
{
  struct fleece *fl = opaque;

  if (cp->slot != ZERO_SLOT)
    store_free (&fl->store, cp->slot);
}

/* Loading a persistent store (meta.c): append snapshot name. */
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
  /* Fewer snapshots never needs the gate: a writer that still sees the
   * old count only finds nothing to copy for s.
   */
  atomic_store (&fl->state, (atomic_load (&fl->state) & ~UINT64_C (0xffffffff))
                | fl->nsnaps);
  atomic_store (&s->deleted, true);
  pthread_rwlock_unlock (&fl->snaps_lock);

  /* Wait for reads in flight, then free what nobody needs. */
  pthread_rwlock_wrlock (&s->io_lock);
  pthread_rwlock_unlock (&s->io_lock);
  pthread_rwlock_rdlock (&fl->snaps_lock);
  copymap_prune (&fl->copies, UINT32_MAX, dropped_keep, dropped_add, &drop);
  pthread_rwlock_unlock (&fl->snaps_lock);
  /* Persistent: the freed slots are reused only once the image without
   * the snapshot is stable (meta_free_slots).
   */
  dropped_free (&drop);
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

#define LOGGED_DELETED 1u
#define LOGGED_BROKEN  2u

/* The first failure of each kind is logged; the many reads that follow
 * it (a pull has hundreds in flight) are told to log it as debug only.
 */
static int
failed_once (struct fleece_snap *s, unsigned kind)
{
  if (atomic_fetch_or (&s->logged, kind) & kind)
    fl_error_repeat ();
  return -1;
}

/* Can s be read at all?  Called with io_lock held. */
static int
check_readable (struct fleece_snap *s)
{
  /* EINVAL, not ENOENT: NBD has no ENOENT (nbdkit would send EINVAL
   * anyway), and the engine's errno is what the client sees.
   */
  if (atomic_load (&s->deleted)) {
    fl_error (EINVAL, "snapshot '%s' was deleted (snapshot-delete) while "
              "this client had it open", s->name);
    return failed_once (s, LOGGED_DELETED);
  }
  if (atomic_load (&s->broken)) {
    fl_error (EIO, "snapshot '%s' is broken: %s", s->name, s->broken_reason);
    return failed_once (s, LOGGED_BROKEN);
  }
  return 0;
}

/* Where the data of cluster c is for snapshot s. */
enum where { W_ZERO, W_COPY, W_LIVE };

static int
locate (struct fleece_snap *s, uint64_t c, uint32_t *slot, enum where *w)
{
  struct fleece *fl = s->fl;
  struct copy cp;

  if (snap_is_released (s, c)) {
    *w = W_ZERO;
    return 0;
  }
  if (atomic_load_explicit (&fl->cgen[c], memory_order_acquire) < s->gen) {
    *w = W_LIVE;
    return 0;
  }
  if (copymap_lookup (&fl->copies, c, s->gen, &cp)) {
    *w = cp.slot == ZERO_SLOT ? W_ZERO : W_COPY;
    *slot = cp.slot;
    return 0;
  }
  if (snap_is_released (s, c)) {        /* released meanwhile */
    *w = W_ZERO;
    return 0;
  }
  if (atomic_load (&s->broken))
    return check_readable (s);
  return fl_error (EIO, "snapshot '%s': cluster %" PRIu64 " was overwritten "
                   "but has no copy (internal error)", s->name, c);
}

/* Has a live read of clusters [a, b] been overtaken by a writer?  The
 * fence orders the loads after the data read (see the comment on top).
 */
static bool
live_read_valid (struct fleece_snap *s, uint64_t c)
{
  atomic_thread_fence (memory_order_seq_cst);
  if (fleece_debug.skip_isolation_check)
    return true;
  return atomic_load_explicit (&s->fl->cgen[c], memory_order_acquire) <
    s->gen;
}

/* Read [offset, offset+len) which lies within cluster c. */
static int
read_cluster (struct fleece_snap *s, uint64_t c, char *buf, uint32_t len,
              uint64_t offset)
{
  struct fleece *fl = s->fl;
  uint64_t within = offset - (c << fl->cluster_bits);
  int tries;

  for (tries = 0; tries < 2; tries++) {
    enum where w;
    uint32_t slot = 0;

    if (locate (s, c, &slot, &w) == -1)
      return -1;
    switch (w) {
    case W_ZERO:
      memset (buf, 0, len);
      return 0;
    case W_COPY:
      return store_read (&fl->store, slot, within, buf, len);
    case W_LIVE:
      if (disk_pread (&fl->disk, buf, len, offset) == -1)
        return -1;
      if (live_read_valid (s, c))
        return 0;
      break;                    /* copied under us: read the copy */
    }
  }
  return fl_error (EIO, "snapshot '%s': cluster %" PRIu64 " changed twice "
                   "during a read (internal error)", s->name, c);
}

/* Read a run of live clusters [a, b] with one pread, then validate each
 * and re-read those a writer overtook.
 */
static int
read_live_run (struct fleece_snap *s, char *buf, uint64_t start,
               uint64_t end, uint64_t a, uint64_t b)
{
  struct fleece *fl = s->fl;
  uint64_t c;

  if (fleece_debug.live_read_delay_us)    /* fault injection for tests */
    usleep (fleece_debug.live_read_delay_us);
  if (disk_pread (&fl->disk, buf, end - start, start) == -1)
    return -1;
  for (c = a; c <= b; c++) {
    uint64_t cs = c << fl->cluster_bits, ce = cs + fl->cluster_size;
    if (cs < start)
      cs = start;
    if (ce > end)
      ce = end;
    if (!live_read_valid (s, c) &&
        read_cluster (s, c, buf + (cs - start), ce - cs, cs) == -1)
      return -1;
  }
  return 0;
}

int
fleece_snap_pread (struct fleece_snap *s, void *buf, uint32_t count,
                   uint64_t offset)
{
  struct fleece *fl = s->fl;
  char *p = buf;
  uint64_t end = offset + count, pos = offset;
  uint64_t run_start = 0, run_a = 0;
  bool in_run = false;
  int r = -1;

  if (end > fl->disk.size || end < offset)
    return fl_error (EINVAL, "snapshot '%s': read beyond the end", s->name);
  pthread_rwlock_rdlock (&s->io_lock);
  if (check_readable (s) == -1)
    goto out;
  while (pos < end) {
    uint64_t c = pos >> fl->cluster_bits;
    uint64_t ce = (c + 1) << fl->cluster_bits;
    uint32_t slot = 0;
    enum where w;

    if (ce > end)
      ce = end;
    if (locate (s, c, &slot, &w) == -1)
      goto out;
    if (w == W_LIVE) {
      if (!in_run) {
        in_run = true;
        run_start = pos;
        run_a = c;
      }
    }
    else {
      if (in_run) {
        in_run = false;
        if (read_live_run (s, p + (run_start - offset), run_start, pos,
                           run_a, c - 1) == -1)
          goto out;
      }
      if (read_cluster (s, c, p + (pos - offset), ce - pos, pos) == -1)
        goto out;
    }
    pos = ce;
  }
  if (in_run && read_live_run (s, p + (run_start - offset), run_start, end,
                               run_a, (end - 1) >> fl->cluster_bits) == -1)
    goto out;
  /* If s broke meanwhile, its copies may have been freed and their slots
   * reused under this read (snap_free_broken breaks it before it frees):
   * what was read cannot be trusted.
   */
  atomic_thread_fence (memory_order_seq_cst);
  if (atomic_load (&s->broken) && check_readable (s) == -1)
    goto out;
  r = 0;
 out:
  pthread_rwlock_unlock (&s->io_lock);
  return r;
}

int
ensure_released_bits (struct fleece_snap *s)
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
  if (check_readable (s) == -1)
    goto out_unlock_io;
  if (c0 >= c1) {
    r = 0;
    goto out_unlock_io;
  }
  if (ensure_released_bits (s) == -1 || meta_check (fl) == -1)
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

/* Extents.  A request is answered in three steps, so that its cost
 * depends on the range asked and on the disk's own allocation, never on
 * how finely copy-before-write has cut the live clusters into runs, and
 * so that no engine lock is held while the disk is asked:
 *
 *   1. under io_lock, in memory: find the span of clusters that are
 *      live for s (cgen[c] < g, not released);
 *   2. no lock: ask the disk for its allocation over that span once
 *      (SEEK_DATA/SEEK_HOLE), at most SNAP_EXT_DISK_MAX extents.  On
 *      tmpfs a seek walks the page cache under the inode lock that
 *      writers need, and SEEK_HOLE in data walks to the next hole,
 *      however far: the number of seeks is what has to be bounded.  When
 *      the budget runs out the answer stops there: nbdkit lets a plugin
 *      cover less than asked, and the client asks again for the rest;
 *   3. a full fence, then under io_lock, each cluster located again: a
 *      cluster still live now was live during the whole of step 2 (a
 *      writer stores cgen[c] before it writes the disk, as for reads), so
 *      the disk's allocation of it is its point-in-time allocation and a
 *      hole there is a hole of s.  A cluster copied meanwhile is reported
 *      from its copy.  Step 3 is what keeps invariant 1, so a hole is
 *      never reported for a cluster from a disk answer older than its
 *      last cgen load.
 */
#define SNAP_EXT_DISK_MAX 64

struct disk_alloc {
  uint64_t end;                 /* the disk extents cover up to here */
  size_t n;
  bool full;                    /* the budget ran out */
  struct { uint64_t end; uint32_t type; } e[SNAP_EXT_DISK_MAX];
};

/* disk_extents callback: record an extent, merged with the last one if
 * it has the same type.  Each call follows at most two seeks, so a full
 * list bounds the seeks of a request.
 */
static int
disk_alloc_add (void *opaque, uint64_t offset, uint64_t length,
                uint32_t type)
{
  struct disk_alloc *da = opaque;

  if (da->n > 0 && da->e[da->n - 1].type == type) {
    da->e[da->n - 1].end = offset + length;
    da->end = offset + length;
    return 0;
  }
  if (da->n == SNAP_EXT_DISK_MAX) {
    da->full = true;
    return -1;                  /* stop here: not an error */
  }
  da->e[da->n].end = offset + length;
  da->e[da->n].type = type;
  da->n++;
  da->end = offset + length;
  return 0;
}

/* Adjacent extents of one type are passed to the caller as one. */
struct ext_out {
  fleece_extent_fn fn;
  void *opaque;
  uint64_t start, len;
  uint32_t type;
};

static int
ext_emit (struct ext_out *o, uint64_t offset, uint64_t length, uint32_t type)
{
  if (o->len > 0 && o->type == type && o->start + o->len == offset) {
    o->len += length;
    return 0;
  }
  if (o->len > 0 && o->fn (o->opaque, o->start, o->len, o->type) == -1)
    return -1;
  o->start = offset;
  o->len = length;
  o->type = type;
  return 0;
}

static int
ext_flush (struct ext_out *o)
{
  return o->len > 0 ? o->fn (o->opaque, o->start, o->len, o->type) : 0;
}

/* Report [offset, end) of a live cluster with the disk's allocation
 * (*i: the first disk extent that may meet it, advanced).
 */
static int
ext_live (struct ext_out *o, const struct disk_alloc *da, size_t *i,
          uint64_t offset, uint64_t end)
{
  while (offset < end) {
    uint64_t e;
    while (*i < da->n && da->e[*i].end <= offset)
      ++*i;
    if (*i == da->n)            /* not asked: data is always safe */
      return ext_emit (o, offset, end - offset, 0);
    e = da->e[*i].end < end ? da->e[*i].end : end;
    if (ext_emit (o, offset, e - offset, da->e[*i].type) == -1)
      return -1;
    offset = e;
  }
  return 0;
}

int
fleece_snap_extents (struct fleece_snap *s, uint32_t count, uint64_t offset,
                     fleece_extent_fn fn, void *opaque)
{
  struct fleece *fl = s->fl;
  struct ext_out o = { .fn = fn, .opaque = opaque };
  struct disk_alloc da = { 0 };
  uint64_t end = offset + count, pos, c, c1, live_start = 0, live_end = 0;
  size_t i = 0;
  int r = -1;

  if (end > fl->disk.size || end < offset)
    return fl_error (EINVAL, "snapshot '%s': extents beyond the end",
                     s->name);
  if (count == 0)
    return 0;

  /* 1. The span of live clusters, in memory. */
  pthread_rwlock_rdlock (&s->io_lock);
  if (check_readable (s) == -1) {
    pthread_rwlock_unlock (&s->io_lock);
    return -1;
  }
  c1 = (end - 1) >> fl->cluster_bits;
  for (c = offset >> fl->cluster_bits; c <= c1; c++)
    if (atomic_load_explicit (&fl->cgen[c], memory_order_acquire) < s->gen
        && !snap_is_released (s, c)) {
      if (live_end == 0)
        live_start = c << fl->cluster_bits;
      live_end = (c + 1) << fl->cluster_bits;
    }
  pthread_rwlock_unlock (&s->io_lock);
  if (live_start < offset)
    live_start = offset;
  if (live_end > end)
    live_end = end;

  /* 2. The disk's allocation over that span, no lock held. */
  if (live_start < live_end && fl->disk.can_seek_data) {
    if (fleece_debug.live_read_delay_us)  /* fault injection for tests */
      usleep (fleece_debug.live_read_delay_us);
    if (disk_extents (&fl->disk, live_end - live_start, live_start,
                      disk_alloc_add, &da) == -1 && !da.full)
      return -1;
    if (da.full)
      end = da.end;             /* > live_start >= offset */
    atomic_thread_fence (memory_order_seq_cst);
  }

  /* 3. Each cluster located after the disk answered. */
  pthread_rwlock_rdlock (&s->io_lock);
  if (check_readable (s) == -1)
    goto out;
  for (pos = offset; pos < end; ) {
    uint64_t ce;
    uint32_t slot = 0;
    enum where w;

    c = pos >> fl->cluster_bits;
    ce = (c + 1) << fl->cluster_bits;
    if (ce > end)
      ce = end;
    if (locate (s, c, &slot, &w) == -1)
      goto out;
    /* Tests (FLEECE_BREAK_ISOLATION): believe the disk's answer for a
     * cluster copied while it was asked, which step 3 exists to avoid.
     */
    if (fleece_debug.skip_isolation_check && w == W_COPY &&
        pos >= live_start && ce <= live_end)
      w = W_LIVE;
    switch (w) {
    case W_ZERO:
      if (ext_emit (&o, pos, ce - pos,
                    FLEECE_EXTENT_HOLE | FLEECE_EXTENT_ZERO) == -1)
        goto out;
      break;
    case W_COPY:
      if (ext_emit (&o, pos, ce - pos, 0) == -1)
        goto out;
      break;
    case W_LIVE:
      if (ext_live (&o, &da, &i, pos, ce) == -1)
        goto out;
      break;
    }
    pos = ce;
  }
  if (ext_flush (&o) == -1)
    goto out;
  r = 0;
 out:
  pthread_rwlock_unlock (&s->io_lock);
  return r;
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
      if (ensure_released_bits (s) == -1)
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
