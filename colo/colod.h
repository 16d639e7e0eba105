/* fleece-colod: what main.c, primary.c and secondary.c share.
 *
 * main.c parses the command line, logs, runs the control socket (status,
 * checkpoint, promote, events) and holds the status both roles fill in;
 * primary.c and secondary.c are the two roles.  docs/replication.md is
 * the operator's description; fleece-colod(1) the options.
 */

#ifndef COLO_COLOD_H
#define COLO_COLOD_H

#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "journal.h"
#include "tls.h"
#include "wire.h"

#define COLOD_DEFAULT_INTERVAL_MS     1000
#define COLOD_DEFAULT_HB_INTERVAL_MS  200
#define COLOD_DEFAULT_HB_TIMEOUT_MS   3000
#define COLOD_DEFAULT_MAX_EXTENT      (4u << 20)
#define COLOD_MAX_RESENDS             5
#define COLOD_DEFAULT_HANDSHAKE_TIMEOUT_MS 3000
/* Secondary: connections in their TLS handshake or before their HELLO
 * at once; more are closed as they come.
 */
#define COLOD_MAX_PENDING             64

/* Exit statuses. */
#define COLOD_EXIT_ERROR       1      /* could not start, I/O errors */
#define COLOD_EXIT_USAGE       2      /* the command line is wrong */
#define COLOD_EXIT_REFUSED     3      /* the peer refused the pairing */

/* Everything the command line says. */
struct colod_options {
  const char *role;             /* "primary" | "secondary" | ... */
  const char *state_dir;
  const char *control;          /* NULL: STATE_DIR/control.sock */
  /* primary */
  const char *fleece_socket, *nbd_uri, *peer;
  int interval_ms;
  uint32_t max_extent;
  /* secondary */
  const char *listen, *disk, *on_promote, *promote_store;
  bool auto_failover, discard_diverged;
  /* both */
  int hb_interval_ms, hb_timeout_ms;
  struct colo_tls_config tls;
  bool verbose;
  /* fault injection and test hooks */
  uint64_t debug_corrupt_epoch;   /* primary: damage this epoch once */
  int debug_extent_delay_ms;      /* secondary: sleep before each extent */
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
  uint64_t last_epoch_ms;         /* its duration */
  bool last_epoch_full;
  uint64_t epoch_in_flight, bytes_in_flight, resync_remaining;
  uint64_t epochs_durable, epochs_refused, reconnects;
  int64_t last_heartbeat_ms;      /* monotonic; 0: none yet */
  int64_t rtt_us;
};

struct colod {
  struct colod_options opt;
  volatile sig_atomic_t stop;

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

/* Log a line to stderr: "fleece-colod: ROLE: message". */
extern void colod_log (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));
extern void colod_debug (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));

/* Send an event to every `events' client and log it; data is consumed. */
extern void colod_event (const char *name, json_t *data);

extern const char *colod_failover_name (enum colod_failover f);
extern void colod_set_failover (enum colod_failover f, const char *why);

/* Milliseconds: CLOCK_MONOTONIC and wall clock. */
extern int64_t colod_now_ms (void);
extern int64_t colod_wall_ms (void);
extern int64_t colod_wall_us (void);
/* With colod.lock held: wait on colod.cond for at most ms. */
extern void colod_wait_ms (int ms);
/* Sleep up to ms, returning early when the daemon stops. */
extern void colod_sleep_ms (int ms);

extern void colod_hex (const uint8_t *id, size_t n, char *out);

/* Start the control socket thread; stop it. */
extern int colod_control_start (const char *path);
extern void colod_control_stop (void);

/* A connection to the peer: the TLS conn with its encoder and decoder. */
struct colod_conn {
  struct colo_conn *conn;
  struct colo_wire_encoder enc;
  struct colo_wire_decoder *dec;
};

extern struct colod_conn *colod_conn_wrap (struct colo_conn *c);
extern void colod_conn_close (struct colod_conn *c);
/* Wake a thread blocked on the connection (shutdown of the socket). */
extern void colod_conn_abort (struct colod_conn *c);
extern int colod_send (struct colod_conn *c, const struct colo_msg *m,
                       char *err, size_t errlen);
/* 1 with *m, 0 if the peer closed, -1 with err (an ERROR frame from the
 * peer is reported as -1 with its message).
 */
extern int colod_recv (struct colod_conn *c, const struct colo_msg **m,
                       char *err, size_t errlen);
/* Tell the peer why we drop it (ERROR), best effort. */
extern void colod_send_error (struct colod_conn *c, uint32_t code,
                              const char *msg);

/* The generation history relation of two sides. */
enum colod_relation {
  REL_SAME,            /* same current generation */
  REL_BEHIND,          /* ours is an older entry of theirs */
  REL_AHEAD,           /* theirs is an older entry of ours */
  REL_DIVERGED,        /* a common generation, then each its own */
  REL_UNRELATED,       /* nothing in common */
};
/* How `ours' relates to `theirs'; *fork is the first epoch of the
 * generation after the common one on the longer side (REL_BEHIND: on
 * theirs; REL_AHEAD: on ours).
 */
extern enum colod_relation
colod_relate (const struct colo_generation *ours, uint32_t nours,
              const struct colo_generation *theirs, uint32_t ntheirs,
              uint64_t *fork);
extern const char *colod_relation_name (enum colod_relation r);
/* A journal's generation history as the wire has it: its length. */
extern uint32_t colod_history_from_journal (const struct journal_state *js,
                                            struct colo_generation *out);
/* Start a HELLO from this side: zeroed, then what both roles send
 * alike (type, role, version, channel).
 */
extern struct colo_msg_hello *colod_hello_init (struct colo_msg *m,
                                                uint16_t role,
                                                uint32_t channel);

extern int colod_run_primary (void);
extern int colod_run_secondary (void);
/* primary.json (primary.c): 1 loaded, 0 none, -1 damaged. */
extern int colod_load_primary_identity (uint8_t volume_id[16],
                                        struct colo_generation *history,
                                        uint32_t *history_len,
                                        uint64_t *acked, bool *demoted);
extern int colod_write_diverged (const char *state_dir, uint64_t base,
                                 uint64_t disk_size, uint32_t cs,
                                 const uint8_t *bits, uint64_t nbits);
/* fleece-colod demote: see primary.c. */
extern int colod_demote (void);

#endif /* COLO_COLOD_H */
