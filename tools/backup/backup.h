/* fleece-backup: what its files share (see main.c for the design).
 *
 * Everything here belongs to the one thread that runs the loop, except
 * the bitmap loader's own state (bitmap.c), which is written by its
 * thread and read after the join.  The files, in the order of a pull:
 *
 *   main.c         command line, signals, main (messages: lib/messages.c)
 *   uri.c          URI arguments checked before connecting: the scheme,
 *                  the export name (libnbd connects)
 *   nbd.c          connecting, reconnecting and closing an NBD handle
 *   rw.h, rw-nbd.c, rw-file.c
 *                  the source and the target behind one operations
 *                  table: an NBD export, a local file or block device
 *   bitmap.c       the dirty bitmap of --sync=incremental
 *   jobs.c         jobs, their lists, starting them, completion callbacks
 *   plan.c         the planner: source extents (and the bitmap) to jobs
 *   batch.c        batches: flush, then verify, then trim the source
 *   progress.c     --rate (a token bucket) and --progress
 *   loop.c         finishing jobs, the poll loop, the end of a pull
 */

#ifndef FLEECE_BACKUP_H
#define FLEECE_BACKUP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libnbd.h>

#include "vector.h"
#include "messages.h"
#include "rw.h"

#define MAX_RETRIES      5
#define RETRY_DELAY_MS   100             /* doubled after each failure */
#define STATUS_SPAN      (1ull << 30)    /* most bytes per block status */
#define ZERO_MAX         (256ull << 20)  /* largest zero or trim */
#define BATCH_DISCARD    (64ull << 20)   /* flush + trim this often */
#define BATCH_DEFAULT    (1ull << 30)    /* flush this often */
#define MAX_REQUEST_SIZE (32u << 20)
#define PROGRESS_MS      100

enum sync_mode { SYNC_FULL, SYNC_TOP, SYNC_INCREMENTAL };
extern const char *const sync_names[];

/* The command line (main.c); constant once parsed, except that
 * --fallback-full may turn an incremental pull into a full one before it
 * starts, and that request_size is lowered to what the servers accept.
 */
struct config {
  enum sync_mode sync;
  const char *since;
  bool progress, verify, discard_source, fallback_full, quiet, retry;
  uint64_t rate;                /* bytes per second; 0: unlimited */
  unsigned requests;
  uint32_t request_size;
  const char *source, *target;
  /* The export opened on SOURCE's server instead of SOURCE's own, by
   * name (backup --control: snapshot/NAME); NULL: SOURCE's own.
   */
  const char *source_export;
};
extern struct config cfg;

/* main.c: memory and sleep.  The messages (warn, die, usage_error) are
 * lib/messages.h's; main sets die to disconnect (loop.c) before it exits.
 */
extern void *xmalloc (size_t n);
extern void *xcalloc (size_t n, size_t size);
extern void sleep_ms (unsigned ms);
/* main.c: a size with an optional K, M, G or T suffix, from min to max,
 * or a usage error naming opt.
 */
extern uint64_t parse_size (const char *opt, const char *s, uint64_t min,
                            uint64_t max);

/* uri.c: checking a URI argument before connecting. */
extern char *pct_decode (const char *s, size_t n);
extern char *uri_export (const char *s, char *err, size_t errlen);

/* nbd.c */
extern struct nbd_handle *nbd_open_uri (const char *uri, const char *export,
                                        const char *name, bool extents,
                                        char **msg, bool *refused);
extern void nbd_finish (struct nbd_handle *h, bool disconnected);
extern bool nbd_lost (struct nbd_handle *h);
extern void nbd_reconnect (struct rw *rw, bool extents);
extern void limit_request_size (struct nbd_handle *h);

/* bitmap.c: the dirty bitmap, loaded by incremental_prepare. */
struct dirty_bitmap {
  uint64_t granularity;
  uint64_t nbits;
  uint8_t *bits;
  uint64_t dirty;               /* granules set */
  uint64_t dirty_bytes;         /* bytes of the disk they cover */
};
extern struct dirty_bitmap bm;
extern bool bit_test (uint64_t i);
extern uint64_t bit_find (uint64_t i, bool set);
extern void bitmap_start (void);
extern void incremental_prepare (const char *snapshot);
extern void bitmap_close (void);

/* jobs.c */
enum job_kind { JOB_COPY, JOB_ZERO, JOB_VERIFY, JOB_STATUS, JOB_FLUSH,
                JOB_TRIM };

/* An extent of the source (flags: LIBNBD_STATE_*), or a finished range
 * (flags: LIBNBD_STATE_ZERO if it was zeroed).
 */
struct extent {
  uint64_t offset, length;
  uint32_t flags;
};

DEFINE_VECTOR_TYPE (extent_vector, struct extent);

/* Ranges, and how many bytes they hold. */
struct rvec {
  extent_vector v;
  uint64_t bytes;
};

struct job {
  struct job *next;             /* in one of the lists of P */
  enum job_kind kind;
  unsigned step;                /* COPY: 0 reading, 1 writing */
  uint64_t offset, length;
  int attempts;                 /* failures of this step so far */
  int64_t not_before;           /* retry list: when to start again */
  char *buf;                    /* COPY, VERIFY: source data */
  char *buf2;                   /* VERIFY: target data */
  struct rvec ext;              /* STATUS: the server's extents */
  /* Written by the completion callbacks, read by the loop. */
  int pending;                  /* commands not yet completed */
  int err;                      /* the first error */
  bool err_target;              /* ... was on the target */
};

struct jlist {
  struct job *head, *tail;
  size_t len;
};

/* The state of the pull, all of it owned by the loop. */
struct pull {
  /* Jobs.  Retried jobs keep their slot while they wait. */
  struct jlist ready;           /* not started */
  struct jlist done;            /* completed, not yet looked at */
  struct job *retry;            /* failed, waiting for not_before */
  unsigned slots;               /* COPY, ZERO, VERIFY jobs started */
  unsigned others;              /* STATUS, FLUSH, TRIM jobs started */
  /* The planner: everything before pos has become jobs. */
  uint64_t pos;
  bool planned;                 /* pos reached the end */
  bool status_out;              /* a STATUS job is out */
  uint64_t copy_chunk, zero_chunk;
  /* Finished ranges: not yet flushed; the batch being flushed, verified
   * and trimmed (batch_out).
   */
  struct rvec unflushed, batch;
  bool batch_out;
  size_t batch_verify;          /* VERIFY jobs of the batch still out */
  unsigned flush_failures;
  /* What was done, for the summary and the progress bar. */
  uint64_t read, written, zeroed, verified, trimmed;
  uint64_t total, covered;
};
extern struct pull P;

extern void jl_push (struct jlist *l, struct job *j);
extern struct job *jl_pop (struct jlist *l);
extern void jl_prepend (struct jlist *l, struct jlist *l2);
extern int rvec_append (struct rvec *r, uint64_t offset, uint64_t length,
                        uint32_t flags, bool merge);
extern void rvec_add (struct rvec *r, uint64_t offset, uint64_t length,
                      uint32_t flags, bool merge);
extern void rvec_clear (struct rvec *r);
extern struct job *job_new (enum job_kind kind, uint64_t offset,
                            uint64_t length);
extern void job_free (struct job *j);
extern bool job_has_slot (const struct job *j);
extern bool job_reads_source (const struct job *j);
extern void add_jobs (struct jlist *l, enum job_kind kind, uint64_t offset,
                      uint64_t length, uint64_t chunk);
extern void job_completed (struct job *j, int err, bool target);
extern void job_start (struct job *j);
extern void job_start_other (struct job *j);

/* plan.c */
extern void range_done (uint64_t offset, uint64_t length, bool zero);
extern void plan_piece (uint64_t offset, uint64_t length, uint32_t flags);
extern void plan_more (void);
extern void plan_first (void);
extern void plan_status (struct job *j);

/* batch.c */
extern void redo_ranges (struct rvec *r);
extern void batch_verified (void);
extern void batch_flushed (void);
extern void flush_failed (const char *msg);
extern bool pull_idle (void);
extern void batch_maybe_start (void);

/* progress.c */
extern void rate_start (void);
extern bool rate_take (uint64_t n, bool force, int64_t *wait);
extern void progress_start (void);
extern bool progress_bar (void);
extern void progress_clear (void);
extern void progress_show (void);
extern double progress_seconds (void);

/* loop.c */
extern void poll_handles (int timeout);
extern void disconnect_all (void);
extern void catch_signals (void);
extern void pull_setup (void);
extern void pull_run (void);
extern void pull_end (void);

#endif /* FLEECE_BACKUP_H */
