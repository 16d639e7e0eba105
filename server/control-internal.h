/* What control.c (the commands) and control-socket.c (the service that
 * runs them for the socket's clients) share.  Not installed.
 */

#ifndef FLEECE_CONTROL_INTERNAL_H
#define FLEECE_CONTROL_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <jansson.h>

#include "fleece-control.h"
#include "internal.h"

struct ctl_event;
struct ctl_client;

/* The group this server is prepared for (group.c): at most one at a
 * time.  Owned by the service thread (or the caller of ctl_handle_line).
 */
struct ctl_group {
  bool held;                    /* between prepare and its end */
  struct ctl_client *owner;     /* the coordinator; NULL outside the
                                   service */
  char id[FLEECE_SNAPSHOT_NAME_MAX + 1];
  char name[FLEECE_SNAPSHOT_NAME_MAX + 1];
  bool checkpoint;              /* commit makes a checkpoint */
  int deadline_ms;
  uint64_t deadline_ns;         /* monotonic */
  uint64_t drain_ns;
  uint64_t prepared_ns;         /* monotonic: the drain ended */
  /* The last group released without a commit, and why: what a late
   * commit is told.
   */
  char ended_id[FLEECE_SNAPSHOT_NAME_MAX + 1];
  char ended_why[160];
};

struct ctl {
  /* Set by ctl_open, then constant. */
  struct fleece *fl;
  char *path;
  dev_t dev;                    /* the socket ctl_open created */
  ino_t ino;
  int listen_fd;
  int wake_rd, wake_wr;         /* self-pipe */
  char *on_cbw_error;
  bool persistent;
  void (*log_event) (const char *, const char *, const char *);
  uint64_t opened_ns;
  char *greeting;

  /* Owned by the service thread, and by ctl_close once it is joined. */
  pthread_t thread;
  bool started;
  struct ctl_client *clients[CTL_MAX_CLIENTS];
  size_t nclients;
  struct ctl_client *current;   /* whose request runs; NULL outside the
                                   service (tests, fuzzer) */
  uint64_t accept_paused_until;
  struct ctl_group group;

  /* Protected by ev_lock. */
  pthread_mutex_t ev_lock;
  struct ctl_event *ev_head, **ev_tail;
  size_t nevents;
  uint64_t events_dropped;
  /* The kinds dropped since the last delivery: the engine's event names
   * (static strings), each with its count. */
  struct ctl_dropped { const char *event; uint64_t n; } dropped_kind[4];
  bool stopping;
};

/* ---- control.c ---- */
/* A JSON string of text that may not be valid UTF-8. */
extern json_t *ctl_str (const char *s);
/* v as one compact line, malloc'd (v is consumed); NULL if out of memory. */
extern char *ctl_dump (json_t *v);
/* {"return":ret} (ret consumed), or {"error":{"class","desc"}}; "id". */
extern char *ctl_make_reply (json_t *ret, const char *class,
                             const char *desc, json_t *id);

/* ---- control-socket.c ---- */
/* subscribe-events: the client whose request runs stays however idle. */
extern void ctl_subscribe_current (struct ctl *ctl);
/* Queue an event whose data is {key: subject, "reason": reason}. */
extern void ctl_queue_event (struct ctl *ctl, const char *event,
                             const char *key, const char *subject,
                             const char *reason);

/* ---- group.c: group-prepare, group-commit, group-abort ---- */
extern json_t *ctl_group_prepare (struct ctl *ctl, json_t *args);
extern json_t *ctl_group_commit (struct ctl *ctl, json_t *args);
extern json_t *ctl_group_abort (struct ctl *ctl, json_t *args);
/* Release a hold past its deadline; ms until the deadline, or -1. */
extern int ctl_group_tick (struct ctl *ctl);
/* Client c is closing: release the hold it prepared. */
extern void ctl_group_client_gone (struct ctl *ctl, struct ctl_client *c);
/* The service stops: release any hold, quietly. */
extern void ctl_group_close (struct ctl *ctl);

#endif /* FLEECE_CONTROL_INTERNAL_H */
