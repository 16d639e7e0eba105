/* Engine internals shared by the files of server/.  Not installed. */

#ifndef FLEECE_INTERNAL_H
#define FLEECE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <inttypes.h>
#include <stdint.h>
#include <sys/types.h>

#include "fleece.h"
#include "monotonic.h"
#include "vector.h"

#define ZERO_SLOT UINT32_MAX    /* a copy of an all-zero cluster */
#define NO_SLOT (UINT32_MAX - 1) /* none allocated (store_put_run) */

/* Buckets of the copy latency histogram (metrics.c), +Inf aside. */
#define FL_COPY_HIST_N 16

/* Growable arrays (common/include/vector.h). */
DEFINE_VECTOR_TYPE (slot_vector, uint32_t);
DEFINE_VECTOR_TYPE (thread_vector, pthread_t);

/* ---- error.c ---- */
extern int fl_error (int err, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
/* The error just recorded was already logged once: the caller logs it
 * as debug only (fleece_last_error_is_repeat).
 */
extern void fl_error_repeat (void);
extern void fl_debug (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));
extern void fl_warn (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));
extern bool fl_is_zero (const void *buf, size_t len);
extern int fl_pread_all (int fd, const char *what, const char *path,
                         void *buf, size_t count, uint64_t offset);
extern int fl_pwrite_all (int fd, const char *what, const char *path,
                          const void *buf, size_t count, uint64_t offset,
                          bool dsync);
extern int fl_fdatasync (int fd, const char *what, const char *path);

/* ---- lock.c: one writer per image, QEMU-compatible ---- */
/* Lock fd's image (what: "disk" or "store"), or refuse it if another
 * process uses it.  *locked: whether the locks are now held (false with
 * locking=off, or locking=auto on a file system without OFD locks).
 */
extern int fl_lock_image (int fd, const char *what, const char *path,
                          enum fleece_locking mode, bool *locked);

/* ---- disk.c: the live disk ---- */
struct disk {
  /* Set by disk_open, then constant. */
  int fd;
  char *path;
  uint64_t size;
  bool is_block;
  bool can_punch;               /* regular file on a fs with holes */
  bool can_seek_data;
  bool locked;                  /* lock.c's locks are held on fd */
  int logical_block;            /* a block device's, else 0 */
  uint8_t id[16];
};

extern int disk_open (struct disk *d, const char *path,
                      enum fleece_locking locking);
/* The size of a block device (the disk's, or the store's). */
extern int fl_block_size (int fd, const char *what, const char *path,
                          uint64_t *size);
extern void disk_close (struct disk *d);
extern int disk_pread (struct disk *d, void *buf, size_t count,
                       uint64_t offset);
extern int disk_pwrite (struct disk *d, const void *buf, size_t count,
                        uint64_t offset, bool fua);
extern int disk_zero (struct disk *d, uint64_t count, uint64_t offset,
                      bool may_trim, bool fast, bool fua);
extern int disk_trim (struct disk *d, uint64_t count, uint64_t offset,
                      bool fua);
extern int disk_flush (struct disk *d);
extern int disk_extents (struct disk *d, uint64_t count, uint64_t offset,
                         fleece_extent_fn fn, void *opaque);

/* ---- store.c: the CBW store file ---- */
struct store {
  /* Set by store_open, then constant. */
  int fd;
  char *path;
  uint32_t cluster_size;
  uint64_t data_offset;
  bool is_file;
  bool persistent;
  bool loading;                 /* meta-load.c loads it: no punching */
  bool locked;                  /* lock.c's locks are held on fd */
  uint64_t created;             /* when the store was formatted */
  uint64_t sb_sequence;         /* of the last superblock written */
  uint32_t features;            /* FLEECE_SB_PARTIAL, once set kept */

  uint32_t max_slots;           /* store-max in slots, 0: unlimited */
  uint32_t warn_slots;          /* high-water mark in slots, 0: off */

  /* Protected by lock. */
  pthread_mutex_t lock;
  bool above_warn;              /* crossed warn_slots, not yet below */
  bool warn_pending;            /* the crossing is not yet reported */
  uint32_t warn_asked;          /* ... the allocation that crossed: slots
                                 * asked for, */
  uint32_t warn_held;           /* ... and data slots held before it */
  uint64_t *used;               /* bitmap of allocated slots */
  uint32_t nslots;              /* slots the bitmap covers */
  uint32_t nused;                /* data and metadata */
  uint32_t nmeta;               /* metadata: the image (meta.c) */
  uint32_t hint;                /* where the next search starts */
  struct punch_queue *punch;    /* punch.c's thread, NULL: inline */
  uint32_t punch_pending;       /* slots queued, still marked used */
  pthread_cond_t punch_cond;    /* a run queued, or released */
};

/* Open or create the store.  *cluster_size: the configured size or 0;
 * on return the store's.  A persistent store that validates is kept
 * (*existing = true), otherwise it is formatted.
 */
extern int store_open (struct store *s, const char *path,
                       uint32_t *cluster_size, const struct disk *d,
                       bool persistent, enum fleece_locking locking,
                       bool *existing);
extern int store_set_limits (struct store *s, uint64_t max_bytes,
                             unsigned warn_percent);
/* What crossed the store-warn mark: a copy of asked slots, when the
 * store held held data slots; it holds used now.
 */
struct store_warning {
  uint32_t asked, held, used;
};
extern bool store_take_warning (struct store *s, struct store_warning *w);
extern void store_close (struct store *s);
extern void store_release_locked (struct store *s, uint32_t first,
                                  uint32_t n, bool meta);
/* punch.c: freed slots punched out of the file on a thread. */
extern void store_punch (struct store *s, uint32_t first, uint32_t n);
extern int store_start_puncher (struct store *s);
extern void store_stop_puncher (struct store *s);
extern bool store_punch_queue_locked (struct store *s, uint32_t first,
                                      uint32_t n, bool meta);
extern void store_punch_drain (struct store *s);
/* Allocate n contiguous slots if possible; returns how many were
 * allocated (>= 1) at *first, or -1 on error.
 */
extern int store_alloc (struct store *s, uint32_t n, uint32_t *first);
extern void store_free (struct store *s, uint32_t slot);
/* Free n slots at once, sorting slots in place; adjacent ones are
 * punched out of the file together.
 */
extern void store_free_slots (struct store *s, uint32_t *slots, size_t n);
extern int store_write (struct store *s, uint32_t slot, uint32_t nslots,
                        const void *buf, size_t len);
extern int store_write_part (struct store *s, uint32_t slot,
                             uint64_t within, const void *buf, size_t len);
extern int store_read (struct store *s, uint32_t slot, uint64_t within,
                       void *buf, size_t len);
extern int store_put_run (struct store *s, const char *buf, uint32_t n,
                          uint64_t len, uint32_t *slots,
                          _Atomic uint64_t *copied);
extern void store_free_run (struct store *s, const uint32_t *slots,
                            uint32_t n);
extern void store_usage (struct store *s, uint64_t *used, uint64_t *total,
                         uint64_t *file_bytes);
/* Persistent stores. */
extern int store_alloc_run (struct store *s, uint32_t n, uint32_t *first);
extern int store_claim (struct store *s, uint32_t slot, bool meta);
extern void store_free_meta (struct store *s, uint32_t slot);
extern void store_free_meta_run (struct store *s, uint32_t first,
                                 uint32_t n);
extern int store_write_superblock (struct store *s, const struct disk *d,
                                   bool clean);
extern int store_sync (struct store *s);
extern int store_meta_pwrite (struct store *s, const void *buf, size_t len,
                              uint64_t offset);
extern int store_meta_pread (struct store *s, void *buf, size_t len,
                             uint64_t offset);

/* ---- gate.c: drains live writes at snapshot creation ---- */
#define GATE_SLOTS 32
struct gate {
  atomic_int closing;
  int depth;                    /* nested closures; admin_lock */
  struct {
    atomic_long n;
    char pad[64 - sizeof (atomic_long)];
  } slot[GATE_SLOTS] __attribute__ ((aligned (64)));
  pthread_mutex_t lock;
  pthread_cond_t cond;
};

extern void gate_init (struct gate *g);
extern void gate_destroy (struct gate *g);
extern int gate_enter (struct gate *g);
extern void gate_leave (struct gate *g, int slot);
extern int gate_close_until (struct gate *g, uint64_t deadline);
extern void gate_close (struct gate *g);
extern void gate_open (struct gate *g);

/* ---- rangelock.c: exclusive cluster ranges for copy-before-write ---- */
struct range {
  uint64_t start, end;
};
DEFINE_VECTOR_TYPE (range_vector, struct range);

struct rangelock {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  range_vector held;            /* protected by lock */
};

extern void rangelock_init (struct rangelock *rl);
extern void rangelock_destroy (struct rangelock *rl);
extern int rangelock_acquire (struct rangelock *rl, uint64_t start,
                              uint64_t end);
extern void rangelock_release (struct rangelock *rl, uint64_t start,
                               uint64_t end);

/* ---- copymap.c: which store slot holds a cluster's old data ---- */

/* A copy of cluster's data as it was before a write in generation hi.
 * It serves every snapshot whose generation g satisfies lo < g <= hi.
 */
struct copy {
  uint32_t cluster;
  uint32_t lo, hi;
  uint32_t slot;                /* ZERO_SLOT: the data was all zeroes */
};

DEFINE_VECTOR_TYPE (copy_vector, struct copy);

#define COPYMAP_SHARDS 64
struct copymap {
  struct copymap_shard {
    pthread_mutex_t lock;
    struct copy *tab;           /* open addressing, linear probing */
    uint32_t cap;               /* power of two, or 0 */
    uint32_t n;
  } shard[COPYMAP_SHARDS];
};

extern void copymap_init (struct copymap *m);
extern void copymap_destroy (struct copymap *m);
extern int copymap_insert (struct copymap *m, const struct copy *c);
extern bool copymap_lookup (struct copymap *m, uint32_t cluster,
                            uint32_t gen, struct copy *out);
/* Remove the copies of cluster (or of every cluster, cluster ==
 * UINT32_MAX) for which keep returns false; each removed copy is passed
 * to drop.
 */
extern void copymap_prune (struct copymap *m, uint32_t cluster,
                           bool (*keep) (void *, const struct copy *),
                           void (*drop) (void *, const struct copy *),
                           void *opaque);
extern uint64_t copymap_count (struct copymap *m);
/* A copy of cluster whose range meets (lo, hi], if any. */
extern bool copymap_overlap (struct copymap *m, uint32_t cluster,
                             uint32_t lo, uint32_t hi, struct copy *out);
/* Call fn for every copy, shard by shard, each shard locked. */
extern int copymap_foreach (struct copymap *m,
                            int (*fn) (void *, const struct copy *),
                            void *opaque);

/* ---- partial.c: clusters partly copied (subcluster=true) ---- */
#define PARTIAL_SHARDS 64
#define PARTIAL_WORDS_MAX 16    /* 1024 blocks: 4 MiB clusters of 4 KiB */
#define PARTIAL_UNRECORDED UINT64_MAX
#define PARTIAL_DONE (UINT64_MAX - 1) /* completed: the copy owns the slot */

/* A copy of some blocks of cluster, made in generation hi (lo: the
 * cluster's cgen before); bits: PARTIAL_WORDS_MAX... in use, words of
 * "copied" then words of "zero".
 */
struct partial_view {
  uint32_t cluster, lo, hi;
  uint32_t slot;                /* NO_SLOT until a block with data */
  /* In an entry, only the words in use, then with a persistent store the
   * seq word (partial.c): other stores do not pay for it.
   */
  uint64_t bits[2 * PARTIAL_WORDS_MAX + 1];
  /* Persistent stores: the PARTIAL record that holds these bits, or
   * PARTIAL_UNRECORDED while some are in no record yet, or PARTIAL_DONE.
   * A writer skips the copy of a block only once this record is stable
   * (cbw_done).  0 otherwise.
   */
  uint64_t seq;
};

struct partials {
  /* Set by partial_init, then constant. */
  uint32_t blocks;              /* per cluster */
  uint32_t words;               /* per bitmap */
  bool has_seq;                 /* persistent: entries keep their seq */
  _Atomic uint64_t n;           /* entries */
  struct partial_shard {
    pthread_mutex_t lock;       /* guards the chains and the entries */
    struct partial **bucket;
    uint32_t nbuckets;          /* power of two, or 0 */
    uint32_t n;
  } shard[PARTIAL_SHARDS];
};

extern void partial_init (struct partials *pt, uint32_t blocks,
                          bool has_seq);
extern void partial_destroy (struct partials *pt);
extern bool partial_find (struct partials *pt, uint32_t cluster,
                          struct partial_view *out);
extern int partial_add (struct partials *pt, uint32_t cluster, uint32_t lo,
                        uint32_t hi);
extern void partial_set (struct partials *pt, uint32_t cluster,
                         uint32_t first, uint32_t n, bool zero,
                         uint32_t slot);
extern void partial_remove (struct partials *pt, uint32_t cluster);
/* Persistent stores: the bits of cluster's entry are in record seq. */
extern void partial_recorded (struct partials *pt, uint32_t cluster,
                              uint64_t seq);
/* Loading: cluster's entry becomes v (added if it has none). */
extern int partial_load (struct partials *pt, const struct partial_view *v);
/* Call fn for each entry, each shard locked in turn (the image). */
extern int partial_foreach (struct partials *pt,
                            int (*fn) (void *, const struct partial_view *),
                            void *opaque);
extern void partial_prune (struct partials *pt,
                           bool (*keep) (void *, const struct partial_view *),
                           void (*drop) (void *, const struct partial_view *),
                           void *opaque);
extern bool partial_copied (const struct partials *pt,
                            const struct partial_view *v, uint32_t b);
extern bool partial_zero (const struct partials *pt,
                          const struct partial_view *v, uint32_t b);

/* ---- record.c: the metadata's encodings (docs/store-format.md) ---- */

/* A growable little-endian output buffer and a bounds-checked reader. */
struct wbuf {
  char *p;
  size_t len, cap;
  bool failed;                  /* out of memory */
};
extern void wb_bytes (struct wbuf *b, const void *p, size_t n);
extern void wb_u16 (struct wbuf *b, uint16_t v);
extern void wb_u32 (struct wbuf *b, uint32_t v);
extern void wb_u64 (struct wbuf *b, uint64_t v);
extern void wb_str (struct wbuf *b, const char *s);
extern void wb_words (struct wbuf *b, _Atomic uint64_t *w, uint64_t n);
extern void wb_free (struct wbuf *b);

struct rbuf {
  const char *p;
  size_t len, pos;
  bool bad;                     /* read past the end, or invalid */
};
extern const void *rb_take (struct rbuf *b, size_t n);
extern uint16_t rb_u16 (struct rbuf *b);
extern uint32_t rb_u32 (struct rbuf *b);
extern uint64_t rb_u64 (struct rbuf *b);
/* A string of at most max bytes into out (max + 1 bytes). */
extern void rb_str (struct rbuf *b, char *out, size_t max);
extern void rb_words (struct rbuf *b, _Atomic uint64_t *w, uint64_t n);
extern size_t rb_left (const struct rbuf *b);

/* Record types. */
#define REC_STATE    0x0001
#define REC_BROKEN   0x0013
#define REC_COPY     0x0020
#define REC_RELEASE  0x0021
#define REC_DIRTY    0x0022
#define REC_PARTIAL  0x0023

#define REC_HDR_SIZE   32
#define REC_REASON_MAX 255      /* bytes of a BROKEN record's reason */

struct rec {
  uint16_t type;
  uint64_t seq;
  struct rbuf payload;
};
extern void rec_encode (struct wbuf *out, uint16_t type, uint64_t seq,
                        const void *payload, size_t len);
extern size_t rec_decode (const char *p, size_t avail, struct rec *r);
extern void rec_peek (const char *p, bool *magic, uint32_t *len,
                      uint64_t *seq);

/* STATE: where the image is. */
struct rec_state {
  uint32_t slot, nslots;
  uint64_t len, hash;
  uint32_t gen;
};
extern void rec_put_state (struct wbuf *b, const struct rec_state *st);
extern bool rec_get_state (const struct rec *r, struct rec_state *st);
extern void rec_put_copy (struct wbuf *b, const struct copy *cp);
extern void rec_get_copy (struct rbuf *b, struct copy *cp);
extern void rec_copies_begin (struct wbuf *b);
extern void rec_copies_end (struct wbuf *b, uint32_t n);
extern bool rec_get_copies (struct rbuf *b, uint32_t *n);
extern void rec_put_release (struct wbuf *b, uint32_t gen, uint32_t first,
                             uint32_t count);
extern bool rec_get_release (struct rbuf *b, uint32_t *gen, uint32_t *first,
                             uint32_t *count);
extern void rec_put_broken (struct wbuf *b, uint32_t gen,
                            const char *reason);
extern bool rec_get_broken (struct rbuf *b, uint32_t *gen, char *reason);
extern void rec_put_dirty (struct wbuf *b, uint32_t first, uint32_t count);
extern bool rec_get_dirty (struct rbuf *b, uint32_t *first,
                           uint32_t *count);
extern void rec_put_partial (struct wbuf *b, const struct partial_view *v,
                             uint32_t words);
extern bool rec_get_partial (struct rbuf *b, struct partial_view *v,
                             uint32_t *words);

/* The image's header; the snapshots and bitmaps that follow it are
 * snapshot.c's and bitmap.c's, then comes the copy table.
 */
struct rec_image {
  uint32_t cluster_size;
  uint64_t disk_size;
  uint32_t gen, nsnaps, nbitmaps, npartials;
  uint64_t ncopies;
};
extern void rec_put_image (struct wbuf *b, const struct rec_image *im);
extern void rec_image_partials (struct wbuf *b, uint32_t n);
extern void rec_image_copies (struct wbuf *b, size_t start);
extern bool rec_get_image (struct rbuf *b, struct rec_image *im);
extern bool rec_image_table_ok (const struct rbuf *b, uint64_t ncopies);

/* ---- meta.c: the metadata log of persistent stores ---- */

struct meta {
  bool on;                      /* persistent=true; constant after open */
  pthread_mutex_t lock;
  pthread_cond_t cond;
  /* Protected by lock. */
  int half;                     /* the active half of the log */
  uint64_t pos;                 /* bytes used in the active half */
  uint64_t seq;                 /* last sequence number handed out */
  uint64_t durable;             /* every record up to here is stable */
  _Atomic uint64_t durable_pub; /* durable, for lock-free checks */
  struct wbuf pend;             /* records appended, not yet written */
  bool pend_data;               /* ... some point at data to sync first */
  bool committing;              /* a writer is writing pend */
  bool imaging;                 /* an image is being written */
  bool want_image;              /* the active half is full */
  bool stopping;
  int err;                      /* errno of a failed write: sticky */
  char errmsg[256];
  uint32_t img_slot, img_nslots; /* the current image in the data area */
  uint64_t used_end[2];         /* bytes of each half that may be non-zero:
                                 * zeroed when the half becomes active */
  /* Loading only. */
  uint64_t load_size;           /* bytes the store file (device) holds */
  uint64_t load_at;             /* store offset of the record applied */
  copy_vector lost;             /* copies whose slot is not wholly in it */
  slot_vector deferred;         /* slots to free once the image is stable */
  bool logging;                 /* meta_start wrote the first image;
                                 * meta_close writes the last */
  pthread_t compactor;
  bool compactor_started;       /* by fleece_start, in this process */
  /* The superblock says clean: cleared before the first live write. */
  atomic_bool sb_clean;
};

/* The log's two halves, after the superblock. */
#define META_HALF_SIZE (FLEECE_STORE_META_SIZE / 2)

extern int meta_init (struct fleece *fl, bool existing, bool *was_clean);
/* meta-load.c: load the log into memory (meta_init). */
extern int meta_load (struct fleece *fl);
/* Record why the metadata cannot be trusted; returns -1. */
extern int meta_damaged (struct fleece *fl, const char *what);
extern int meta_start (struct fleece *fl, bool existing, bool was_clean);
extern int meta_start_compactor (struct fleece *fl);
extern void meta_close (struct fleece *fl);
/* Append a record; returns its sequence number (0 when the store is not
 * persistent), or 0 with meta->err set.  data: the record points at data
 * written to the store that must be stable first.
 */
extern uint64_t meta_append (struct fleece *fl, uint16_t type,
                             const struct wbuf *payload, bool data);
extern uint64_t meta_append_with (struct fleece *fl, uint16_t type,
                                  const struct wbuf *payload, bool data,
                                  void (*fn) (void *, uint64_t),
                                  void *opaque);
/* Wait until record seq is stable (group commit). */
extern int meta_wait (struct fleece *fl, uint64_t seq);
/* Before a live write: the store must not claim a clean stop any more. */
extern int meta_dirty (struct fleece *fl);
/* Fail fast once the log could not be written. */
extern int meta_check (struct fleece *fl);
/* Write the whole state as a new image; admin_lock held. */
extern int meta_image (struct fleece *fl);
/* Free n slots now (sorting them in place), or once the next image is
 * stable (persistent).
 */
extern void meta_free_slots (struct fleece *fl, uint32_t *slots, size_t n);
extern bool meta_has_deferred (struct fleece *fl);

/* ---- engine.c, snapshot.c, snapshot-read.c, cbw.c, bitmap.c ---- */
struct bitmap;
struct bitmap_set;

struct fleece {
  /* Set by fleece_open, then constant. */
  struct disk disk;
  struct store store;
  uint32_t cluster_size;
  unsigned cluster_bits;
  uint64_t nclusters;
  enum fleece_cbw_error on_cbw_error;
  enum fleece_locking locking;

  /* Generation of the newest snapshot in the high 32 bits, number of
   * live snapshots in the low 32.  Read lock-free on the write path; only
   * changed with the gate closed.
   */
  _Atomic uint64_t state;

  /* Generation in which each cluster was last written while a snapshot
   * existed (0: never).  A write to cluster c in generation G needs no
   * copy when cgen[c] == G.  Stored with release order after the copy is
   * published, read with acquire order.
   */
  _Atomic uint32_t *cgen;

  struct meta meta;
  uint64_t cbw_timeout_ns;      /* 0: none */
  bool started;                 /* by fleece_start */

  struct gate gate;
  struct rangelock cbw_locks;
  struct copymap copies;
  /* subcluster=true: copies of single blocks (partial.c).  Set at open,
   * then constant: block_size is 0 when copies are whole clusters.
   */
  uint32_t block_size;
  unsigned block_bits;
  struct partials partials;

  /* Serialises snapshot creation and deletion. */
  pthread_mutex_t admin_lock;
  /* A group hold (hold.c): the gate is kept closed from hold_t0 until
   * fleece_release_writes.  Protected by admin_lock.
   */
  bool held;
  uint64_t hold_t0;
  pthread_mutex_t break_lock;   /* serialises breaking snapshots */
  /* Threads of cbw-timeout copies the writers gave up on (cbw.c). */
  pthread_mutex_t orphan_lock;
  thread_vector orphans;

  /* Live snapshots, oldest first, in an array allocated once.  Creation
   * only appends (admin_lock held, gate closed): it stores the new entry,
   * then the count, so readers that load the count see whole entries, and
   * it takes no lock that a copy in flight holds.  Deletion moves entries
   * and so takes snaps_lock for writing; copy-before-write, trims and
   * listings hold it for reading.
   */
  pthread_rwlock_t snaps_lock;
  struct fleece_snap **snaps;   /* FLEECE_SNAPSHOTS_MAX slots, never moved */
  _Atomic size_t nsnaps;
  /* The snapshot being deleted (admin_lock held throughout, so at most
   * one), out of the list but still served by copies until the image
   * without it is stable (snapshot.c, snap_needing).  Changes under
   * snaps_lock held for writing.
   */
  struct fleece_snap *deleting;

  /* Dirty bitmaps (bitmap.c).  The list, its flags and checkpoint_active
   * are protected by admin_lock; dirty, the set of enabled bitmaps that
   * writers read inside the gate, only changes with the gate closed.
   */
  struct bitmap *bitmaps[FLEECE_BITMAPS_MAX];
  size_t nbitmaps;
  struct bitmap *checkpoint_active;
  struct bitmap_set *_Atomic dirty;
  /* The newest DIRTY record: bits found set may be set by it. */
  _Atomic uint64_t dirty_seq;

  /* Statistics, updated with relaxed atomics. */
  _Atomic uint64_t st_bytes_written, st_cbw_clusters, st_cbw_zero,
    st_bytes_copied, st_cbw_errors, st_cbw_wait_ns;
  _Atomic uint64_t st_max_drain_ns, st_last_drain_ns;
  /* Copy latency histogram (metrics.c): observations per bucket. */
  _Atomic uint64_t st_copy_hist[FL_COPY_HIST_N + 1];

  /* Event listener. */
  pthread_mutex_t event_lock;
  fleece_event_fn event_fn;
  void *event_opaque;
};

struct fleece_snap {
  /* Set at creation, then constant. */
  struct fleece *fl;
  char name[FLEECE_SNAPSHOT_NAME_MAX + 1];
  uint32_t gen;
  int64_t created;

  /* Handles: the list holds one reference, each open handle one. */
  atomic_uint refs;
  atomic_uint readers;

  /* Readers hold io_lock for reading; deletion takes it for writing so
   * that no read is in flight when the snapshot's copies are freed.
   */
  pthread_rwlock_t io_lock;
  atomic_bool deleted;
  atomic_bool broken;
  char broken_reason[256];      /* set once, before broken */
  /* Its BROKEN record, set before broken: 0 if there is none (not
   * persistent, or loaded from the store).
   */
  _Atomic uint64_t broken_seq;
  /* Broken at load for damage the store does not record: its broken
   * state is on no stable storage, so it keeps its copies.
   */
  atomic_bool broken_unrecorded;
  atomic_uint logged;           /* LOGGED_*: failures already logged once */

  /* Clusters a client trimmed: atomic bits, allocated on first trim. */
  _Atomic (_Atomic uint64_t *) released;
  atomic_ullong held;           /* copies this snapshot reads */
  atomic_ullong nreleased;
};

static inline uint32_t
state_gen (uint64_t st)
{
  return st >> 32;
}

static inline uint32_t
state_nsnaps (uint64_t st)
{
  return st & 0xffffffff;
}

/* The snapshots that copies are made and kept for (snaps_lock held):
 * the live ones, then the one being deleted until the image without it
 * is stable.  A persistent store that crashes before that image brings
 * the snapshot back, so until then it must read what it read before:
 * a copy or a partly copied cluster it needs is neither skipped, nor
 * dropped, nor given up to a new entry with another range (docs/
 * durability.md statement 7).
 */
static inline size_t
snap_needing_count (const struct fleece *fl)
{
  return fl->nsnaps + (fl->deleting != NULL);
}

static inline struct fleece_snap *
snap_needing (const struct fleece *fl, size_t i)
{
  return i < fl->nsnaps ? fl->snaps[i] : fl->deleting;
}

/* snapshot-read.c: can s be read at all?  io_lock held. */
extern int snap_check_readable (struct fleece_snap *s);
extern int snap_break_locked (struct fleece *fl, struct fleece_snap *s,
                              const char *reason, uint64_t *wait,
                              bool *broke);
extern bool snap_is_released (const struct fleece_snap *s, uint64_t c);
extern bool snap_reads_copy (const struct fleece_snap *s, uint64_t c,
                             uint32_t lo, uint32_t hi);
/* One copy-before-write took ns: its histogram and cbw-wait-ns. */
extern void fl_observe_copy (struct fleece *fl, uint64_t ns);
extern void fl_emit_event (struct fleece *fl, const char *event,
                           const char *snapshot, const char *reason);
extern bool cbw_done (struct fleece *fl, uint64_t offset, uint64_t count,
                      uint32_t gen);
extern int cbw_range (struct fleece *fl, uint64_t offset, uint64_t count,
                      uint32_t gen);
extern void cbw_reap (struct fleece *fl, bool all);
extern void cbw_prune_partials (struct fleece *fl);
extern void cbw_release_partial (struct fleece *fl, uint64_t c);
extern void snap_free_all (struct fleece *fl);
extern struct fleece_snap *snap_prepare (struct fleece *fl, const char *name);
extern void snap_discard (struct fleece_snap *s);
extern void snap_publish (struct fleece *fl, struct fleece_snap *s);
extern void snap_before_image (void);
extern void snap_record_drain (struct fleece *fl, uint64_t ns);
extern void bitmap_mark (struct fleece *fl, uint64_t offset, uint64_t count);
extern void bitmap_distrust_recording (struct fleece *fl, const char *reason);
extern int bitmap_intent (struct fleece *fl, uint64_t offset, uint64_t count,
                          uint64_t *wait);
extern int bitmap_apply_dirty (struct fleece *fl, uint32_t first,
                               uint32_t count);
extern void bitmap_free_all (struct fleece *fl);
/* The image (meta.c): snapshots, with snaps_lock held; bitmaps, with
 * admin_lock held.
 */
extern void snap_image_put (struct fleece *fl, struct wbuf *b);
extern int snap_image_get (struct fleece *fl, struct rbuf *b, uint32_t n,
                           uint32_t gen);
extern struct fleece_snap *snap_by_gen (struct fleece *fl, uint32_t gen);
extern void bitmap_image_put (struct fleece *fl, struct wbuf *b);
extern int bitmap_image_get (struct fleece *fl, struct rbuf *b, uint32_t n);
extern uint32_t bitmap_count_all (struct fleece *fl);
extern struct fleece_snap *snap_restore (struct fleece *fl, const char *name,
                                         uint32_t gen, int64_t created);
extern bool copy_needed (void *opaque, const struct copy *cp);
extern bool snap_keeps_copies (const struct fleece_snap *s);
/* Tests only: called inside fleece_snapshot_delete (snapshot.c). */
extern void (*fl_test_delete_hook) (struct fleece *fl, const char *name);
extern void snap_free_broken (struct fleece *fl);
extern void copy_free (void *opaque, const struct copy *cp);
extern int snap_ensure_released (struct fleece_snap *s);

#endif /* FLEECE_INTERNAL_H */
