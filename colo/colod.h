/* fleece-colod: the daemon's shared state (colod.c defines it): the
 * options, the status both roles fill in and the control socket reads,
 * and the requests the control socket passes to the role's loop.
 *
 * The files of fleece-colod, each with its header, depend one way
 * (tests/colo/test-colo-includes.sh checks that their includes make no
 * circle):
 *   main.c                     options and dispatch
 *   primary.c, plugin.c        the primary, and the plugin it ships from
 *   demote.c                   an old primary's diverged clusters
 *   secondary.c                the secondary, with secondary-epochs.c,
 *                              secondary-promote.c and secondary-disks.c
 *   ctl.c conn.c pairing.c     the control socket and its clients, a peer
 *                              connection, the pairing rules
 *   events.c                   events to subscribers, failover states
 *   notify.c                   what it tells systemd (sd_notify)
 *   metrics.c                  its Prometheus metrics
 *   log.c clock.c colod.c      the log, time, this state
 * and on libcolo (wire*.c, tls*.c, journal*.c, state.c, source.c).
 * docs/replication.md is the operator's description; fleece-colod(1)
 * the options.
 */

#ifndef COLO_COLOD_H
#define COLO_COLOD_H

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "tls.h"
#include "wire.h"

#define COLOD_DEFAULT_INTERVAL_MS     1000
#define COLOD_DEFAULT_HB_INTERVAL_MS  200
#define COLOD_DEFAULT_HB_TIMEOUT_MS   3000
#define COLOD_DEFAULT_MAX_EXTENT      (4u << 20)
#define COLOD_MAX_RESENDS             5
/* How long a group checkpoint may hold the writers of its disks. */
#define COLOD_GROUP_DEADLINE_MS       1000
#define COLOD_DEFAULT_HANDSHAKE_TIMEOUT_MS 3000
/* Secondary: connections in their TLS handshake or before their HELLO
 * at once; more are closed as they come.
 */
#define COLOD_MAX_PENDING             64
#define COLOD_DEFAULT_LOG_SUMMARY_S   60
/* Disks of a consistency group: --fleece/--nbd pairs, --disk. */
#define COLOD_MAX_DISKS               COLO_WIRE_MAX_DISKS

/* Exit statuses. */
#define COLOD_EXIT_ERROR       1      /* could not start, I/O errors */
#define COLOD_EXIT_USAGE       2      /* the command line is wrong */
#define COLOD_EXIT_REFUSED     3      /* the peer refused the pairing */

#if ATOMIC_INT_LOCK_FREE != 2
#error "colod.stop is set in a signal handler: it needs a lock-free atomic_int"
#endif

/* Everything the command line says. */
struct colod_options {
  const char *role;             /* "primary" | "secondary" | ... */
  const char *state_dir;
  const char *control;          /* NULL: STATE_DIR/control.sock */
  /* primary: the group's plugins, the i-th --fleece with the i-th
   * --nbd (fleece_socket and nbd_uri are the first)
   */
  const char *fleece_socket, *nbd_uri, *peer;
  const char *fleece_sockets[COLOD_MAX_DISKS], *nbd_uris[COLOD_MAX_DISKS];
  unsigned nfleece, nnbd;
  int interval_ms;
  uint32_t max_extent;
  /* secondary: the group's disks, and a store for each at promotion
   * (disk and promote_store are the first)
   */
  const char *listen, *disk, *on_promote, *promote_store;
  const char *disks[COLOD_MAX_DISKS], *promote_stores[COLOD_MAX_DISKS];
  unsigned ndisks, npromote_stores;
  bool auto_failover, discard_diverged;
  /* both */
  int hb_interval_ms, hb_timeout_ms;
  struct colo_tls_config tls;
  bool verbose;
  const char *log;                /* --log, NULL: the default (log.c) */
  int log_summary_s;              /* --log-summary-interval */
  const char *metrics_listen;     /* --metrics-listen, NULL: none */
  /* fault injection and test hooks */
  uint64_t debug_corrupt_epoch;   /* primary: damage this epoch once */
  int debug_extent_delay_ms;      /* secondary: sleep before each extent */
  uint16_t debug_max_version;     /* HELLO's max_version, 0: the newest */
};

/* Failover states, after QEMU colo.c's (RELAUNCH is not used: a promoted
 * secondary stays promoted until an operator makes it a primary).
 */
enum colod_failover {
  FAILOVER_NONE, FAILOVER_REQUIRE, FAILOVER_ACTIVE, FAILOVER_COMPLETED,
};

/* What `status` reports.  Protected by colod.lock. */
struct colod_status {
  const char *role;
  const char *connection;         /* "disconnected", "connecting",
                                     "connected", "listening", "refused" */
  char peer[128], peer_identity[256];
  enum colod_failover failover;
  char refusal[1100];              /* why the last pairing was refused */
  uint8_t volume_id[16], generation_id[16];
  struct colo_generation history[COLO_WIRE_MAX_HISTORY];
  uint32_t history_len;
  uint64_t last_committed, last_applied;
  uint64_t committed_at_ms;       /* wall clock of the last commit's
                                     checkpoint (primary) or arrival */
  uint64_t last_epoch, last_epoch_bytes, last_epoch_extents;
  /* The last epoch's share of each disk of the group. */
  uint64_t disk_epoch_bytes[COLOD_MAX_DISKS];
  uint64_t disk_epoch_extents[COLOD_MAX_DISKS];
  uint64_t last_epoch_ms;         /* its duration */
  bool last_epoch_full;
  uint64_t epoch_in_flight, bytes_in_flight, resync_remaining;
  uint64_t epochs_durable, epochs_refused, reconnects;
  int64_t last_heartbeat_ms;      /* monotonic; 0: none yet */
  int64_t rtt_us;
};

/* The group's disks: the secondary's --disk, the primary's --fleece. */
extern unsigned colod_ndisks (void);
extern const char *colod_disk_name (unsigned i);

/* "none", "require", "active", "completed" (colod.c). */
extern const char *colod_failover_name (enum colod_failover f);

struct colod {
  /* Set by main before the role starts, then constant. */
  struct colod_options opt;
  /* The daemon stops: set by the signal handler (SIGTERM, SIGINT) and
   * colod_control_stop, read by every thread.  A lock-free atomic, so
   * both a signal handler and other threads may use it.
   */
  atomic_int stop;

  pthread_mutex_t lock;           /* guards status and the events below */
  pthread_cond_t cond;            /* status changes (checkpoint waits) */
  struct colod_status st;

  /* Requests from the control socket, under lock. */
  uint64_t checkpoint_requests, checkpoint_served;
  char checkpoint_error[512];
  bool promote_requested, promote_force;
  char promote_error[512];
};

extern struct colod colod;

#endif /* COLO_COLOD_H */
