/* Fleece engine API.
 *
 * The engine owns the live disk, the copy-before-write (CBW) store and the
 * snapshots.  It knows nothing of NBD: the nbdkit plugin (plugin/fleece.c)
 * and the tests call it directly.  Every function that can fail returns -1
 * (or NULL), sets errno to the value a client should see, and records a
 * message naming the call and the object in a thread-local buffer read with
 * fleece_last_error().  The engine never prints.
 *
 * Thread safety: every function may be called from any thread at any time,
 * except fleece_open, fleece_start and fleece_close which bracket all
 * others.
 *
 * Threads: fleece_open starts none, so that a server may open the engine
 * (and fail on a bad disk or store) before it forks into the background;
 * fleece_start starts them in the process that then uses the engine.  A
 * process that forks after fleece_start must not use the engine in the
 * child.
 */

#ifndef FLEECE_H
#define FLEECE_H

#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FLEECE_CLUSTER_SIZE_MIN      4096u
#define FLEECE_CLUSTER_SIZE_MAX      (4u << 20)
#define FLEECE_CLUSTER_SIZE_DEFAULT  (64u << 10)
#define FLEECE_SNAPSHOT_NAME_MAX     128
#define FLEECE_SNAPSHOTS_MAX         1024

/* What a failed copy-before-write does (docs/design.md invariant 6). */
enum fleece_cbw_error {
  FLEECE_CBW_BREAK_SNAPSHOT = 0, /* live write succeeds, snapshots break */
  FLEECE_CBW_FAIL_WRITE = 1,     /* live write fails, nothing changes */
};

/* Image locking (server/lock.c, nbdkit-fleece-plugin(1) LOCKING): the
 * disk and the store are locked against a second writer, QEMU's way.
 */
enum fleece_locking {
  FLEECE_LOCKING_ON = 0,        /* lock, or refuse to start */
  FLEECE_LOCKING_AUTO = 1,      /* lock where the file system can */
  FLEECE_LOCKING_OFF = 2,       /* never lock */
};

struct fleece_config {
  const char *disk;             /* file or block device, required */
  const char *store;            /* store file, required */
  uint32_t cluster_size;        /* 0 = default */
  enum fleece_cbw_error on_cbw_error;
  uint64_t store_max;           /* cap on the store's data, bytes; 0: none */
  unsigned store_warn;          /* STORE_HIGH_WATER event at this percent
                                 * of store_max; 0: off */
  bool persistent;              /* snapshots and bitmaps survive restarts
                                 * and crashes (docs/durability.md) */
  uint32_t cbw_timeout_ms;      /* break the snapshot when the store takes
                                 * longer to take a copy; 0: wait */
  enum fleece_locking locking;  /* 0: FLEECE_LOCKING_ON */
  bool whole_clusters;          /* subcluster=false: copy-before-write
                                 * copies whole clusters; otherwise only
                                 * the blocks a write covers (not yet
                                 * with persistent) */
};

/* Flags for live writes, the same bits as nbdkit's. */
#define FLEECE_F_MAY_TRIM   (1u << 0)
#define FLEECE_F_FUA        (1u << 1)
#define FLEECE_F_FAST_ZERO  (1u << 3)

/* Extent types, the same bits as NBD base:allocation. */
#define FLEECE_EXTENT_HOLE  (1u << 0)
#define FLEECE_EXTENT_ZERO  (1u << 1)

typedef int (*fleece_extent_fn) (void *opaque, uint64_t offset,
                                 uint64_t length, uint32_t type);

struct fleece;
struct fleece_snap;

/* Lifecycle.  With cfg->persistent, fleece_open loads the snapshots and
 * bitmaps an earlier run left in the store, and fleece_close records
 * them and marks the store clean.  fleece_start starts the engine's
 * threads (the persistent store's metadata compactor), once, before the
 * first live write: without it a persistent store's writers fail with EIO
 * once its metadata log is full.  fleece_close works whether or not
 * fleece_start ran.
 */
extern struct fleece *fleece_open (const struct fleece_config *cfg);
extern int fleece_start (struct fleece *fl);
extern void fleece_close (struct fleece *fl);
extern bool fleece_persistent (const struct fleece *fl);
extern uint64_t fleece_disk_size (const struct fleece *fl);
extern uint32_t fleece_cluster_size (const struct fleece *fl);
/* Copy-before-write's granularity: the block size of sub-cluster copies,
 * or 0 when it copies whole clusters.
 */
extern uint32_t fleece_copy_block_size (const struct fleece *fl);
extern const char *fleece_disk_path (const struct fleece *fl);
extern const char *fleece_store_path (const struct fleece *fl);
/* "on" (the disk and the store are locked), "off" (locking=off), or
 * with locking=auto on a file system without OFD locks "unsupported"
 * (or "disk only", "store only": one of them could be locked).
 */
extern const char *fleece_locking_state (const struct fleece *fl);
/* Lock an image that another program writes (fleece-colod's secondary
 * disk) as fleece_open locks the disk (nbdkit-fleece-plugin(1),
 * LOCKING); what names it in messages.  0 (*locked: whether the locks
 * are held; closing fd drops them), or -1 with fleece_last_error ().
 */
extern int fleece_lock_image (int fd, const char *what, const char *path,
                              enum fleece_locking mode, bool *locked);

/* The live disk. */
extern int fleece_live_pread (struct fleece *fl, void *buf, uint32_t count,
                              uint64_t offset);
extern int fleece_live_pwrite (struct fleece *fl, const void *buf,
                               uint32_t count, uint64_t offset,
                               uint32_t flags);
extern int fleece_live_zero (struct fleece *fl, uint32_t count,
                             uint64_t offset, uint32_t flags);
extern int fleece_live_trim (struct fleece *fl, uint32_t count,
                             uint64_t offset, uint32_t flags);
extern int fleece_live_flush (struct fleece *fl);
extern int fleece_live_extents (struct fleece *fl, uint32_t count,
                                uint64_t offset, fleece_extent_fn fn,
                                void *opaque);

/* Snapshots.  Names are 1..FLEECE_SNAPSHOT_NAME_MAX bytes, with no '/',
 * no control characters and no DEL.  A new snapshot, bitmap or
 * checkpoint is also refused the names "." and "..", a name of only
 * whitespace and the bidirectional controls U+202A-U+202E and
 * U+2066-U+2069.
 */
extern int fleece_check_name (const char *what, const char *name);
extern int fleece_check_new_name (const char *what, const char *name);
extern int fleece_snapshot_create (struct fleece *fl, const char *name);
extern int fleece_snapshot_delete (struct fleece *fl, const char *name);

/* Open a snapshot for reading; the handle keeps it readable until
 * fleece_snap_put, or until it is deleted, after which reads fail with
 * ENOENT.
 */
extern struct fleece_snap *fleece_snap_get (struct fleece *fl,
                                            const char *name);
extern void fleece_snap_put (struct fleece_snap *snap);
extern const char *fleece_snap_name (const struct fleece_snap *snap);
extern int fleece_snap_pread (struct fleece_snap *snap, void *buf,
                              uint32_t count, uint64_t offset);
/* The client no longer needs this range of the snapshot: stop protecting
 * it, free copies nobody else needs.  Later reads of it return zeroes.
 */
extern int fleece_snap_trim (struct fleece_snap *snap, uint32_t count,
                             uint64_t offset);
extern int fleece_snap_extents (struct fleece_snap *snap, uint32_t count,
                                uint64_t offset, fleece_extent_fn fn,
                                void *opaque);

/* Dirty bitmaps (granularity = cluster size).  Every live write, zero
 * and trim sets the bits of the clusters it touches in every enabled
 * bitmap, inside the write gate.  Names: as snapshot names.  A frozen
 * bitmap (closed by a checkpoint) is read-only: it may be exported,
 * merged into another, or removed.
 */
#define FLEECE_BITMAPS_MAX 64
extern int fleece_bitmap_add (struct fleece *fl, const char *name,
                              bool disabled);
extern int fleece_bitmap_remove (struct fleece *fl, const char *name);
extern int fleece_bitmap_clear (struct fleece *fl, const char *name);
extern int fleece_bitmap_enable (struct fleece *fl, const char *name);
extern int fleece_bitmap_disable (struct fleece *fl, const char *name);
/* target |= each source.  target must not be frozen. */
extern int fleece_bitmap_merge (struct fleece *fl, const char *target,
                                const char *const *sources, size_t n);

/* checkpoint-create NAME, atomically (no write lands between the steps):
 * create snapshot NAME, freeze the bitmap of the previous checkpoint (it
 * then holds exactly the clusters changed between that checkpoint and
 * NAME), and add a new enabled bitmap NAME.
 */
extern int fleece_checkpoint_create (struct fleece *fl, const char *name);

/* Group hold (consistency groups over several servers, group-prepare in
 * docs/control-protocol.md): drain the live writes in flight and hold
 * new ones until fleece_release_writes.  Snapshots and checkpoints
 * created meanwhile are taken with the writes still held.  The drain
 * gives up at deadline_ns (monotonic ns, 0: none): -1 with
 * fleece_last_error () and nothing held.  *drain_ns is how long the
 * drain took.  Release returns how long the writers were held, in ns
 * (0 when nothing was held).
 */
extern int fleece_hold_writes (struct fleece *fl, uint64_t deadline_ns,
                               uint64_t *drain_ns);
extern uint64_t fleece_release_writes (struct fleece *fl);

struct fleece_bitmap_info {
  char name[FLEECE_SNAPSHOT_NAME_MAX + 1];
  char frozen_by[FLEECE_SNAPSHOT_NAME_MAX + 1]; /* "" unless frozen */
  uint32_t granularity;
  uint64_t count;               /* dirty granules */
  uint64_t bit_count;
  int64_t created;
  bool enabled, frozen, inconsistent;
  bool checkpoint;              /* made by checkpoint-create */
  char inconsistent_reason[256];
};
extern int fleece_list_bitmaps (struct fleece *fl,
                                void (*fn) (void *opaque,
                                            const struct fleece_bitmap_info *),
                                void *opaque);
extern int fleece_bitmap_info (struct fleece *fl, const char *name,
                               struct fleece_bitmap_info *info);
/* Test a bit (for tests and the control service). */
extern int fleece_bitmap_test (struct fleece *fl, const char *name,
                               uint64_t cluster);

/* The bitmap export (include/fleece-wire.h, docs/bitmap-export.md): the
 * header and a copy of the bits taken when it is opened.
 */
struct fleece_bitmap_export;
extern struct fleece_bitmap_export *fleece_bitmap_export_open
  (struct fleece *fl, const char *name);
extern uint64_t fleece_bitmap_export_size
  (const struct fleece_bitmap_export *bx);
extern int fleece_bitmap_export_pread (const struct fleece_bitmap_export *bx,
                                       void *buf, uint32_t count,
                                       uint64_t offset);
extern void fleece_bitmap_export_close (struct fleece_bitmap_export *bx);

/* Introspection, for the control service and the tests. */
struct fleece_snap_info {
  char name[FLEECE_SNAPSHOT_NAME_MAX + 1];
  uint32_t generation;
  int64_t created;              /* Unix time, seconds */
  bool broken;
  char broken_reason[256];
  uint64_t clusters_held;       /* copies this snapshot can read */
  uint64_t clusters_released;   /* trimmed by a client */
  uint32_t readers;             /* open handles */
};

struct fleece_stats {
  uint64_t disk_size;
  uint32_t cluster_size;
  uint32_t generation;
  uint32_t snapshots;
  uint64_t bytes_written;       /* live writes, zeroes and trims */
  uint64_t cbw_clusters;        /* clusters whose old data was preserved */
  uint64_t cbw_zero_clusters;   /* ... of which were zero, not stored */
  uint64_t bytes_copied;        /* bytes written to the store */
  uint64_t cbw_errors;
  uint64_t store_clusters_used; /* data slots in use */
  uint64_t store_clusters_total;/* data slots the store file spans */
  uint64_t store_bytes_used;
  uint64_t store_file_bytes;    /* space the store file occupies on disk */
  uint64_t store_max_bytes;     /* store-max, 0 if none */
  uint64_t copies;              /* copy records, shared by snapshots */
  uint64_t partial_clusters;    /* clusters partly copied (subcluster) */
  uint64_t cbw_wait_ns;         /* time writers spent copying */
  uint64_t max_drain_ns;        /* longest writer stall at creation */
  uint64_t last_drain_ns;
};

extern void fleece_get_stats (struct fleece *fl, struct fleece_stats *st);
/* Wait until the store space freed so far (deleted snapshots, released
 * copies) has been given back: once the engine is started a thread of
 * its own punches it out of the store file, and the statistics count it
 * as used until then.
 */
extern void fleece_wait_freed (struct fleece *fl);
/* Calls fn for every snapshot, oldest first.  Returns the count. */
extern int fleece_list_snapshots (struct fleece *fl,
                                  void (*fn) (void *opaque,
                                              const struct fleece_snap_info *),
                                  void *opaque);
extern int fleece_snapshot_info (struct fleece *fl, const char *name,
                                 struct fleece_snap_info *info);

/* Events (a snapshot broken, ...) go to one listener.  It is called with
 * engine locks held, from the thread that hit the event: it must queue
 * the event and return, never block nor call the engine.
 */
typedef void (*fleece_event_fn) (void *opaque, const char *event,
                                 const char *snapshot, const char *reason);
extern void fleece_set_event_listener (struct fleece *fl, fleece_event_fn fn,
                                       void *opaque);

/* Debug and fault injection (nbdkit -D fleece.FLAG=N in the plugin). */
struct fleece_debug {
  int verbose;                  /* engine debug messages */
  int fail_store_write;         /* fail every store write with EIO */
  int fail_disk_read;           /* fail every live-disk read with EIO */
  int fail_disk_write;          /* fail every live-disk write with EIO */
  int skip_isolation_check;     /* FOR TESTS ONLY: break invariant 1 */
  int live_read_delay_us;       /* widen the snapshot read race window */
  int store_write_delay_ms;     /* slow store: sleep before data writes */
  int fail_meta_write;          /* N: metadata writes after the first N
                                 * fail with EIO */
  int ctl_idle_timeout_ms;      /* N > 0: both control-socket idle
                                 * timeouts are N ms */
  int punch_delay_ms;           /* slow punches: sleep before each run
                                 * of freed slots is punched */
  int ctl_max_events;           /* N > 0: the control service queues at
                                 * most N events (1024) */
  int create_image_delay_ms;    /* sleep between a snapshot's creation
                                 * and its image (a crash there) */
  int no_ofd_locks;             /* the engine tests: act as if the file
                                 * system had no OFD locks (ENOLCK) */
};
extern struct fleece_debug fleece_debug;
typedef void (*fleece_log_fn) (const char *msg);
extern void fleece_set_log (fleece_log_fn fn);
/* Messages that must reach the operator at any debug level: damage found
 * in a persistent store at load and what it cost (docs/store-format.md,
 * Resilience).
 */
extern void fleece_set_warn (fleece_log_fn fn);

/* Errors. */
extern const char *fleece_last_error (void);
/* The last error repeats one already reported for the same object (the
 * reads of a broken or deleted snapshot): log it as debug only.
 */
extern bool fleece_last_error_is_repeat (void);

#ifdef __cplusplus
}
#endif

#endif /* FLEECE_H */
