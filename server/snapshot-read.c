/* Snapshot reads and extents: what snapshot S (generation g) holds, read
 * without making a live write wait.
 *
 * Reads (invariant 1).  S sees cluster c as:
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
 * stays copied for S.  Adjacent live clusters are read with one pread
 * and validated one by one.
 *
 * With subcluster=true a cluster may be partly copied (partial.c): S
 * reads its copied blocks from the copy and the others live, validated
 * the same way with the blocks' bits, which a writer sets before it
 * overwrites a block; it is retried at most once per block.
 *
 * Reads and extents walk a request's clusters the same way (walk:
 * locate each, in order); extents are answered in three steps, below
 * (fleece_snap_extents).  A reader holds S's io_lock for reading, so
 * that a deletion (snapshot.c) can wait for the reads in flight.
 */

#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

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
int
snap_check_readable (struct fleece_snap *s)
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

/* Where the data of cluster c is for snapshot s: W_PART, some blocks
 * copied (subcluster, partial.c), the others live.
 */
enum where { W_ZERO, W_COPY, W_LIVE, W_PART };

/* Does a partly copied cluster's entry serve s?  Into *v if so. */
static bool
part_serves (struct fleece_snap *s, uint64_t c, struct partial_view *v)
{
  struct fleece *fl = s->fl;

  return fl->block_size && partial_find (&fl->partials, c, v) &&
    v->lo < s->gen && s->gen <= v->hi;
}

static int
locate (struct fleece_snap *s, uint64_t c, uint32_t *slot, enum where *w,
        struct partial_view *v)
{
  struct fleece *fl = s->fl;
  struct partial_view pv;
  struct copy cp;

  if (snap_is_released (s, c)) {
    *w = W_ZERO;
    return 0;
  }
  /* cgen first: a copy completed from an entry is published in cgen
   * before the entry goes, so one of the two is seen.
   */
  if (atomic_load_explicit (&fl->cgen[c], memory_order_acquire) < s->gen) {
    *w = part_serves (s, c, v ? v : &pv) ? W_PART : W_LIVE;
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
    return snap_check_readable (s);
  return fl_error (EIO, "snapshot '%s': cluster %" PRIu64 " was overwritten "
                   "but has no copy (internal error)", s->name, c);
}

/* Has a live read of clusters [a, b] been overtaken by a writer?  The
 * fence orders the loads after the data read (see the comment on top).
 */
static bool
live_read_valid (struct fleece_snap *s, uint64_t c)
{
  struct partial_view v;

  atomic_thread_fence (memory_order_seq_cst);
  if (fleece_debug.skip_isolation_check)
    return true;
  return atomic_load_explicit (&s->fl->cgen[c], memory_order_acquire) <
    s->gen && !part_serves (s, c, &v);
}

/* The live read of blocks [b, k) of a partly copied cluster: still
 * valid?  As live_read_valid, with the blocks' bits.
 */
static bool
live_read_valid_part (struct fleece_snap *s, uint64_t c, uint32_t b,
                      uint32_t k, struct partial_view *now)
{
  struct fleece *fl = s->fl;

  atomic_thread_fence (memory_order_seq_cst);
  if (fleece_debug.skip_isolation_check)
    return true;
  if (atomic_load_explicit (&fl->cgen[c], memory_order_acquire) >= s->gen ||
      !part_serves (s, c, now))
    return false;
  for (; b < k; b++)
    if (partial_copied (&fl->partials, now, b))
      return false;
  return true;
}

/* A cluster partly copied for s: each block from the copy (or zeroes)
 * if it is copied, else from the live disk, validated as a live cluster
 * is: after the read, no block read live may have been copied since
 * (a writer sets a block's bit before it overwrites the block).  If one
 * was, or the cluster was completed meanwhile, *again is set.
 */
static int
read_part (struct fleece_snap *s, uint64_t c, const struct partial_view *v,
           char *buf, uint64_t offset, uint64_t end, bool *again)
{
  struct fleece *fl = s->fl;
  uint64_t cs = c << fl->cluster_bits, pos, e;
  struct partial_view now;

  for (pos = offset; pos < end; pos = e) {
    uint32_t b = (pos - cs) >> fl->block_bits, k;
    bool copied = partial_copied (&fl->partials, v, b);
    bool zero = partial_zero (&fl->partials, v, b);
    char *p = buf + (pos - offset);

    for (e = pos, k = b;
         e < end && partial_copied (&fl->partials, v, k) == copied &&
           partial_zero (&fl->partials, v, k) == zero; k++)
      e = cs + ((uint64_t) (k + 1) << fl->block_bits);
    if (e > end)
      e = end;
    if (zero)
      memset (p, 0, e - pos);
    else if (copied) {
      if (store_read (&fl->store, v->slot, pos - cs, p, e - pos) == -1)
        return -1;
    }
    else {
      if (disk_pread (&fl->disk, p, e - pos, pos) == -1)
        return -1;
      if (!live_read_valid_part (s, c, b, k, &now)) {
        *again = true;
        return 0;
      }
    }
  }
  return 0;
}

/* Read [offset, offset+len) which lies within cluster c. */
static int
read_cluster (struct fleece_snap *s, uint64_t c, char *buf, uint32_t len,
              uint64_t offset)
{
  struct fleece *fl = s->fl;
  uint64_t within = offset - (c << fl->cluster_bits);
  struct partial_view v;
  bool again;
  int tries;

  /* A cluster copied block by block may be overtaken once per block. */
  for (tries = 0; tries < 2 + (int) fl->partials.blocks; tries++) {
    enum where w;
    uint32_t slot = 0;

    if (locate (s, c, &slot, &w, &v) == -1)
      return -1;
    switch (w) {
    case W_PART:
      again = false;
      if (read_part (s, c, &v, buf, offset, offset + len, &again) == -1)
        return -1;
      if (!again)
        return 0;
      break;
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

/* The walk of reads and extents: each cluster of [offset, end) located
 * for s, in order; fn gets the part [pos, ce) of cluster c, where s sees
 * it and its slot.  Called with io_lock held.
 */
typedef int (*walk_fn) (void *opaque, uint64_t c, uint64_t pos, uint64_t ce,
                        enum where w, uint32_t slot);

static int
walk (struct fleece_snap *s, uint64_t offset, uint64_t end, walk_fn fn,
      void *opaque)
{
  struct fleece *fl = s->fl;
  uint64_t pos, c, ce;

  for (pos = offset; pos < end; pos = ce) {
    uint32_t slot = 0;
    enum where w;

    c = pos >> fl->cluster_bits;
    ce = (c + 1) << fl->cluster_bits;
    if (ce > end)
      ce = end;
    if (locate (s, c, &slot, &w, NULL) == -1 ||
        fn (opaque, c, pos, ce, w, slot) == -1)
      return -1;
  }
  return 0;
}

/* A read's walk: adjacent live clusters gather into a run, read with one
 * pread when a cluster that is not live, or the end, closes it.
 */
struct read_walk {
  struct fleece_snap *s;
  char *buf;
  uint64_t offset;              /* where buf starts */
  bool in_run;
  uint64_t run_start, run_a;    /* the run's offset and first cluster */
};

/* Read the open run, which ends at end with cluster b. */
static int
read_run_close (struct read_walk *rw, uint64_t end, uint64_t b)
{
  if (!rw->in_run)
    return 0;
  rw->in_run = false;
  return read_live_run (rw->s, rw->buf + (rw->run_start - rw->offset),
                        rw->run_start, end, rw->run_a, b);
}

static int
read_one (void *opaque, uint64_t c, uint64_t pos, uint64_t ce, enum where w,
          uint32_t slot)
{
  struct read_walk *rw = opaque;

  if (w == W_LIVE) {
    if (!rw->in_run) {
      rw->in_run = true;
      rw->run_start = pos;
      rw->run_a = c;
    }
    return 0;
  }
  if (read_run_close (rw, pos, c - 1) == -1)
    return -1;
  return read_cluster (rw->s, c, rw->buf + (pos - rw->offset), ce - pos,
                       pos);
}

int
fleece_snap_pread (struct fleece_snap *s, void *buf, uint32_t count,
                   uint64_t offset)
{
  struct fleece *fl = s->fl;
  struct read_walk rw = { .s = s, .buf = buf, .offset = offset };
  uint64_t end = offset + count;
  int r = -1;

  if (end > fl->disk.size || end < offset)
    return fl_error (EINVAL, "snapshot '%s': read beyond the end", s->name);
  pthread_rwlock_rdlock (&s->io_lock);
  if (snap_check_readable (s) == -1)
    goto out;
  if (walk (s, offset, end, read_one, &rw) == -1 ||
      read_run_close (&rw, end, (end - 1) >> fl->cluster_bits) == -1)
    goto out;
  /* If s broke meanwhile, its copies may have been freed and their slots
   * reused under this read (snap_free_broken breaks it before it frees):
   * what was read cannot be trusted.
   */
  atomic_thread_fence (memory_order_seq_cst);
  if (atomic_load (&s->broken) && snap_check_readable (s) == -1)
    goto out;
  r = 0;
 out:
  pthread_rwlock_unlock (&s->io_lock);
  return r;
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

/* An extents request's walk (step 3). */
struct ext_walk {
  struct ext_out o;
  struct disk_alloc da;
  size_t i;                     /* the first disk extent not yet passed */
  uint64_t live_start, live_end; /* the span asked of the disk */
};

static int
ext_one (void *opaque, uint64_t c, uint64_t pos, uint64_t ce, enum where w,
         uint32_t slot)
{
  struct ext_walk *ew = opaque;

  /* Tests (FLEECE_BREAK_ISOLATION): believe the disk's answer for a
   * cluster copied while it was asked, which step 3 exists to avoid.
   */
  if (fleece_debug.skip_isolation_check && w == W_COPY &&
      pos >= ew->live_start && ce <= ew->live_end)
    w = W_LIVE;
  switch (w) {
  case W_ZERO:
    return ext_emit (&ew->o, pos, ce - pos,
                     FLEECE_EXTENT_HOLE | FLEECE_EXTENT_ZERO);
  case W_COPY:
  case W_PART:                  /* data: safe, never a false hole */
    return ext_emit (&ew->o, pos, ce - pos, 0);
  case W_LIVE:
    return ext_live (&ew->o, &ew->da, &ew->i, pos, ce);
  }
  return 0;
}

int
fleece_snap_extents (struct fleece_snap *s, uint32_t count, uint64_t offset,
                     fleece_extent_fn fn, void *opaque)
{
  struct fleece *fl = s->fl;
  struct ext_walk ew = { .o = { .fn = fn, .opaque = opaque } };
  struct disk_alloc *da = &ew.da;
  uint64_t end = offset + count, c, c1, live_start = 0, live_end = 0;
  int r = -1;

  if (end > fl->disk.size || end < offset)
    return fl_error (EINVAL, "snapshot '%s': extents beyond the end",
                     s->name);
  if (count == 0)
    return 0;

  /* 1. The span of live clusters, in memory. */
  pthread_rwlock_rdlock (&s->io_lock);
  if (snap_check_readable (s) == -1) {
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
  ew.live_start = live_start;
  ew.live_end = live_end;

  /* 2. The disk's allocation over that span, no lock held. */
  if (live_start < live_end && fl->disk.can_seek_data) {
    if (fleece_debug.live_read_delay_us)  /* fault injection for tests */
      usleep (fleece_debug.live_read_delay_us);
    if (disk_extents (&fl->disk, live_end - live_start, live_start,
                      disk_alloc_add, da) == -1 && !da->full)
      return -1;
    if (da->full)
      end = da->end;            /* > live_start >= offset */
    atomic_thread_fence (memory_order_seq_cst);
  }

  /* 3. Each cluster located after the disk answered. */
  pthread_rwlock_rdlock (&s->io_lock);
  if (snap_check_readable (s) == -1 ||
      walk (s, offset, end, ext_one, &ew) == -1)
    goto out;
  if (ext_flush (&ew.o) == -1)
    goto out;
  r = 0;
 out:
  pthread_rwlock_unlock (&s->io_lock);
  return r;
}

