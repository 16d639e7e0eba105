/* The engine: opens the disk and the store, and runs the live I/O path.
 *
 * Live writes, zeroes and trims enter the write gate and read fl->state
 * once.  With no snapshot they write at once: the cost over a plain pwrite
 * is the gate (one atomic add on a per-thread counter and one load) and
 * that one load of the state (docs/design.md invariant 4).  With snapshots they
 * check lock-free that the clusters they touch are already preserved for
 * the current generation; if not, they leave the gate, copy (cbw.c) and
 * try again, so that a copy never holds up snapshot creation.  Live reads
 * and flushes go straight to the disk.
 */

#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static int
check_cluster_size (uint32_t cs)
{
  if (cs < FLEECE_CLUSTER_SIZE_MIN || cs > FLEECE_CLUSTER_SIZE_MAX ||
      (cs & (cs - 1)) != 0)
    return fl_error (EINVAL, "cluster-size %" PRIu32 " is not a power of "
                     "two between 4K and 4M", cs);
  return 0;
}

/* Sub-cluster copies (cbw.c): blocks of 4 KiB, or of the disk's logical
 * block size if larger, when they are smaller than a cluster.  A
 * persistent store records them (PARTIAL records, docs/store-format.md).
 */
static void
set_copy_block (struct fleece *fl, const struct fleece_config *cfg)
{
  uint32_t bs = FLEECE_CLUSTER_SIZE_MIN;

  if (fl->disk.logical_block > 0 && (uint32_t) fl->disk.logical_block > bs)
    bs = fl->disk.logical_block;
  if (cfg->whole_clusters || bs >= fl->cluster_size ||
      (bs & (bs - 1)) != 0)
    return;
  fl->block_size = bs;
  fl->block_bits = __builtin_ctz (bs);
}

struct fleece *
fleece_open (const struct fleece_config *cfg)
{
  struct fleece *fl;
  uint32_t cs = cfg->cluster_size;
  bool existing, clean;

  if (cs && check_cluster_size (cs) == -1)
    return NULL;
  if (cfg->disk == NULL || cfg->store == NULL) {
    fl_error (EINVAL, "both disk and store must be given");
    return NULL;
  }
  fl = calloc (1, sizeof *fl);
  if (fl == NULL) {
    fl_error (ENOMEM, "fleece_open: out of memory");
    return NULL;
  }
  fl->on_cbw_error = cfg->on_cbw_error;
  fl->locking = cfg->locking;
  fl->cbw_timeout_ns = (uint64_t) cfg->cbw_timeout_ms * 1000000;
  if (disk_open (&fl->disk, cfg->disk, cfg->locking) == -1)
    goto out_free;
  /* A persistent store brings its own cluster size. */
  if (store_open (&fl->store, cfg->store, &cs, &fl->disk, cfg->persistent,
                  cfg->locking, &existing) == -1)
    goto out_disk;
  fl->cluster_size = cs;
  fl->cluster_bits = __builtin_ctz (cs);
  fl->nclusters = (fl->disk.size + cs - 1) / cs;
  if (fl->nclusters >= UINT32_MAX) {
    fl_error (EFBIG, "disk: %s: %" PRIu64 " clusters of %" PRIu32 " bytes, "
              "the limit is %u: use a larger cluster-size", cfg->disk,
              fl->nclusters, cs, UINT32_MAX - 1);
    goto out_store;
  }
  if (store_set_limits (&fl->store, cfg->store_max, cfg->store_warn) == -1)
    goto out_store;
  fl->cgen = calloc (fl->nclusters, sizeof *fl->cgen);
  fl->snaps = calloc (FLEECE_SNAPSHOTS_MAX, sizeof *fl->snaps);
  if (fl->cgen == NULL || fl->snaps == NULL) {
    free ((void *) fl->cgen);
    free (fl->snaps);
    fl_error (ENOMEM, "fleece_open: out of memory for %" PRIu64 " clusters",
              fl->nclusters);
    goto out_store;
  }
  set_copy_block (fl, cfg);
  gate_init (&fl->gate);
  rangelock_init (&fl->cbw_locks);
  copymap_init (&fl->copies);
  partial_init (&fl->partials, fl->block_size
                ? cs >> fl->block_bits : 1, cfg->persistent);
  pthread_mutex_init (&fl->admin_lock, NULL);
  pthread_mutex_init (&fl->break_lock, NULL);
  pthread_mutex_init (&fl->orphan_lock, NULL);
  pthread_rwlock_init (&fl->snaps_lock, NULL);
  pthread_mutex_init (&fl->event_lock, NULL);
  if (meta_init (fl, existing, &clean) == -1 || meta_start (fl, existing, clean) == -1) {
    int err = errno;
    char msg[512];
    snprintf (msg, sizeof msg, "%s", fleece_last_error ());
    fl->meta.on = false;        /* write nothing more to this store */
    fleece_close (fl);
    fl_error (err, "%s", msg);
    return NULL;
  }
  fl_debug ("opened disk %s (%" PRIu64 " bytes, %s), store %s%s, cluster "
            "size %" PRIu32 "%s, locking %s", fl->disk.path, fl->disk.size,
            fl->disk.is_block ? "block device" : "file", fl->store.path,
            !cfg->persistent ? "" : existing ? " (persistent, loaded)"
            : " (persistent, new)", cs,
            existing && !clean ? ", after an unclean stop" : "",
            fleece_locking_state (fl));
  return fl;

 out_store:
  store_close (&fl->store);
 out_disk:
  disk_close (&fl->disk);
 out_free:
  free (fl);
  return NULL;
}

/* Threads start here, never in fleece_open: nbdkit opens the engine in
 * .get_ready, before it forks into the background, and a thread does not
 * survive fork.  The copy threads of cbw-timeout start later still, from
 * the writes that need them.
 */
int
fleece_start (struct fleece *fl)
{
  if (fl->started)
    return fl_error (EINVAL, "fleece_start: the engine of %s is already "
                     "started", fl->disk.path);
  if (meta_start_compactor (fl) == -1 ||
      store_start_puncher (&fl->store) == -1)
    return -1;
  fl->started = true;
  return 0;
}

void
fleece_close (struct fleece *fl)
{
  if (fl == NULL)
    return;
  /* cbw-timeout copies the writers gave up on still hold slots. */
  cbw_reap (fl, true);
  thread_vector_reset (&fl->orphans);
  pthread_mutex_destroy (&fl->orphan_lock);
  meta_close (fl);
  snap_free_all (fl);
  bitmap_free_all (fl);
  free (fl->snaps);
  copymap_destroy (&fl->copies);
  partial_destroy (&fl->partials);
  rangelock_destroy (&fl->cbw_locks);
  gate_destroy (&fl->gate);
  pthread_mutex_destroy (&fl->admin_lock);
  pthread_mutex_destroy (&fl->break_lock);
  pthread_rwlock_destroy (&fl->snaps_lock);
  pthread_mutex_destroy (&fl->event_lock);
  free ((void *) fl->cgen);
  store_close (&fl->store);
  disk_close (&fl->disk);
  free (fl);
}

bool fleece_persistent (const struct fleece *fl) { return fl->meta.on; }
uint64_t fleece_disk_size (const struct fleece *fl) { return fl->disk.size; }
uint32_t fleece_cluster_size (const struct fleece *fl)
{ return fl->cluster_size; }
uint32_t fleece_copy_block_size (const struct fleece *fl)
{ return fl->block_size; }
const char *fleece_disk_path (const struct fleece *fl)
{ return fl->disk.path; }
const char *fleece_store_path (const struct fleece *fl)
{ return fl->store.path; }

const char *
fleece_locking_state (const struct fleece *fl)
{
  if (fl->disk.locked && fl->store.locked)
    return "on";
  if (fl->locking == FLEECE_LOCKING_OFF)
    return "off";
  return fl->disk.locked ? "disk only" : fl->store.locked ? "store only"
    : "unsupported";
}

static int
check_range (struct fleece *fl, const char *op, uint64_t count,
             uint64_t offset)
{
  if (offset + count > fl->disk.size || offset + count < offset)
    return fl_error (EINVAL, "%s: range %" PRIu64 "+%" PRIu64 " is beyond "
                     "the end of the disk (%" PRIu64 " bytes)", op, offset,
                     count, fl->disk.size);
  return 0;
}

int
fleece_live_pread (struct fleece *fl, void *buf, uint32_t count,
                   uint64_t offset)
{
  if (check_range (fl, "read", count, offset) == -1)
    return -1;
  return disk_pread (&fl->disk, buf, count, offset);
}

/* What a live write does to the disk once its old data is safe. */
enum live_op { OP_WRITE, OP_ZERO, OP_TRIM };

static int
live_modify (struct fleece *fl, enum live_op op, const void *buf,
             uint32_t count, uint64_t offset, uint32_t flags)
{
  static const char *names[] = { "write", "zero", "trim" };
  bool fua = flags & FLEECE_F_FUA;
  uint64_t st;
  int slot, r;

  if (check_range (fl, names[op], count, offset) == -1)
    return -1;
  if (count == 0)
    return 0;
  if (atomic_load_explicit (&fl->meta.sb_clean, memory_order_relaxed) &&
      meta_dirty (fl) == -1)
    return -1;
  for (;;) {
    slot = gate_enter (&fl->gate);
    /* Persistent: the recording bitmaps must have these clusters on
     * stable storage first; wait for that outside the gate, then check
     * again.
     */
    if (fl->meta.on) {
      uint64_t wait;
      if (bitmap_intent (fl, offset, count, &wait) == -1) {
        gate_leave (&fl->gate, slot);
        return -1;
      }
      if (wait) {
        gate_leave (&fl->gate, slot);
        if (meta_wait (fl, wait) == -1)
          return -1;
        continue;
      }
    }
    st = atomic_load_explicit (&fl->state, memory_order_acquire);
    if (state_nsnaps (st) == 0 ||
        cbw_done (fl, offset, count, state_gen (st)))
      break;                    /* old data safe: write inside the gate */
    gate_leave (&fl->gate, slot);
    if (cbw_range (fl, offset, count, state_gen (st)) == -1)
      return -1;
  }
  bitmap_mark (fl, offset, count);
  switch (op) {
  case OP_WRITE:
    r = disk_pwrite (&fl->disk, buf, count, offset, fua);
    break;
  case OP_ZERO:
    r = disk_zero (&fl->disk, count, offset, flags & FLEECE_F_MAY_TRIM,
                   flags & FLEECE_F_FAST_ZERO, fua);
    break;
  default:
    r = disk_trim (&fl->disk, count, offset, fua);
    break;
  }
  gate_leave (&fl->gate, slot);
  if (r == 0)
    atomic_fetch_add_explicit (&fl->st_bytes_written, count,
                               memory_order_relaxed);
  return r;
}

int
fleece_live_pwrite (struct fleece *fl, const void *buf, uint32_t count,
                    uint64_t offset, uint32_t flags)
{
  return live_modify (fl, OP_WRITE, buf, count, offset, flags);
}

int
fleece_live_zero (struct fleece *fl, uint32_t count, uint64_t offset,
                  uint32_t flags)
{
  return live_modify (fl, OP_ZERO, NULL, count, offset, flags);
}

int
fleece_live_trim (struct fleece *fl, uint32_t count, uint64_t offset,
                  uint32_t flags)
{
  return live_modify (fl, OP_TRIM, NULL, count, offset, flags);
}

int
fleece_live_flush (struct fleece *fl)
{
  return disk_flush (&fl->disk);
}

int
fleece_live_extents (struct fleece *fl, uint32_t count, uint64_t offset,
                     fleece_extent_fn fn, void *opaque)
{
  if (check_range (fl, "extents", count, offset) == -1)
    return -1;
  return disk_extents (&fl->disk, count, offset, fn, opaque);
}

void
fleece_wait_freed (struct fleece *fl)
{
  store_punch_drain (&fl->store);
}

void
fleece_get_stats (struct fleece *fl, struct fleece_stats *st)
{
  uint64_t s = atomic_load (&fl->state);

  memset (st, 0, sizeof *st);
  st->disk_size = fl->disk.size;
  st->cluster_size = fl->cluster_size;
  st->generation = state_gen (s);
  st->snapshots = state_nsnaps (s);
  st->bytes_written = atomic_load (&fl->st_bytes_written);
  st->cbw_clusters = atomic_load (&fl->st_cbw_clusters);
  st->cbw_zero_clusters = atomic_load (&fl->st_cbw_zero);
  st->bytes_copied = atomic_load (&fl->st_bytes_copied);
  st->cbw_errors = atomic_load (&fl->st_cbw_errors);
  st->cbw_wait_ns = atomic_load (&fl->st_cbw_wait_ns);
  st->max_drain_ns = atomic_load (&fl->st_max_drain_ns);
  st->last_drain_ns = atomic_load (&fl->st_last_drain_ns);
  st->copies = copymap_count (&fl->copies);
  st->partial_clusters = atomic_load (&fl->partials.n);
  store_usage (&fl->store, &st->store_clusters_used,
               &st->store_clusters_total, &st->store_file_bytes);
  st->store_bytes_used = st->store_clusters_used * fl->cluster_size;
  st->store_max_bytes = (uint64_t) fl->store.max_slots * fl->cluster_size;
}

void
fleece_set_event_listener (struct fleece *fl, fleece_event_fn fn,
                           void *opaque)
{
  pthread_mutex_lock (&fl->event_lock);
  fl->event_fn = fn;
  fl->event_opaque = opaque;
  pthread_mutex_unlock (&fl->event_lock);
}

void
fl_emit_event (struct fleece *fl, const char *event, const char *snapshot,
               const char *reason)
{
  fl_debug ("event %s: snapshot '%s': %s", event, snapshot ? snapshot : "",
            reason);
  pthread_mutex_lock (&fl->event_lock);
  if (fl->event_fn)
    fl->event_fn (fl->event_opaque, event, snapshot, reason);
  pthread_mutex_unlock (&fl->event_lock);
}
