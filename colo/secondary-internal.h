/* fleece-colod secondary, inside: the state secondary.c (pairing,
 * connections, the accept loop), secondary-epochs.c (receiving epochs
 * into the journal) and secondary-promote.c (failover and promotion)
 * share.  secondary.c's note describes the role and its threads.
 */

#ifndef COLO_SECONDARY_INTERNAL_H
#define COLO_SECONDARY_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "colod.h"
#include "conn.h"
#include "journal.h"

/* The threads: the main thread (colod_run_secondary: start-up, the
 * accept loop, the end), the monitor thread (secondary_monitor_thread:
 * failover and promotion), one thread per connection (conn_thread: a
 * data or heartbeat channel once paired), and the data connection's
 * journal writer (secondary-epochs.c).  Lock order: jlock, then
 * colod.lock.
 */
struct secondary {
  /* The journal and the disk.  Guarded by jlock once the connection
   * and monitor threads run; before (start-up) and after (the end) the
   * main thread alone uses them.
   */
  pthread_mutex_t jlock;
  struct journal *j;              /* NULL until the first pairing */
  int lock_fd[COLOD_MAX_DISKS];   /* hold each disk's locks, or -1 */
  bool locked;                    /* lock_fd are open */
  /* The data connection's thread only (an epoch was begun in the
   * journal and not yet ended or aborted).
   */
  bool epoch_open;
  /* Set by the main thread before the monitor thread starts, then
   * constant.
   */
  int64_t started_ms;
  /* The monitor thread only (watch). */
  int64_t require_since;
  /* This side was promoted: primaries are refused.  Set by the monitor
   * thread (promote), cleared by a data connection's thread under jlock
   * (--discard-diverged), read by the connection threads under jlock.
   */
  atomic_bool promoted;
  /* Stopped by an I/O error (exit 1): set by the data connection's
   * thread, read by the main thread at the end.
   */
  atomic_bool failed;
  /* Under colod.lock: the connection threads and what they saw. */
  struct colod_conn *data, *hb;
  bool data_busy, hb_busy;
  bool primary_stopped;           /* it said so: no failover */
  int64_t paired_ms;              /* a primary's data HELLO accepted */
  struct colo_conn *pending[COLOD_MAX_PENDING]; /* before their HELLO */
  unsigned npending;
  unsigned nthreads;              /* connection threads alive */
};

extern struct secondary sec;

/* secondary.c */

/* Copy the journal's identity and epochs into colod.st (status). */
extern void secondary_publish_journal (void);
/* STATE_DIR/diverged is replaced by the epochs received: remove it. */
extern void secondary_drop_diverged (void);
/* 1 with STATE_DIR/diverged in *d (colo_diverged_free), 0 none, -1 bad
 * (said why).
 */
extern int secondary_read_diverged (struct colo_diverged *d);
/* Is d of the group js describes?  If not, say why. */
extern bool secondary_diverged_fits (const struct colo_diverged *d,
                                     const struct journal_state *js);
/* Shut both connections down and wait for their threads to go. */
extern void secondary_drop_channels (void);
/* secondary-disks.c */

/* Take the locks of every disk of the group, or none: 0 or -1 (err). */
extern int secondary_lock_disks (char *err, size_t errlen);
/* Let go of the disks' locks (for the server that takes over). */
extern void secondary_unlock_disk (void);
/* The size of a disk (file or block device), or -1. */
extern int64_t secondary_disk_bytes (const char *path);
/* Record in STATE_DIR/promoted that this side took over as gen. */
extern int secondary_write_promoted (const uint8_t gen[16]);

/* secondary-epochs.c */

/* The data connection after the handshake: epochs until it ends. */
extern void secondary_receive_epochs (struct colod_conn *c);

/* secondary-promote.c */

/* The monitor thread: heartbeats and promotion requests, until stop. */
extern void *secondary_monitor_thread (void *arg);

#endif /* COLO_SECONDARY_INTERNAL_H */
