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

  /* Protected by ev_lock. */
  pthread_mutex_t ev_lock;
  struct ctl_event *ev_head, **ev_tail;
  size_t nevents;
  uint64_t events_dropped;
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

#endif /* FLEECE_CONTROL_INTERNAL_H */
