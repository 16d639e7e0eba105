/* fleece-colod: events (QMP-shaped, docs/control-protocol.md), sent
 * to the control socket's subscribers and logged whether or not anyone
 * subscribed, and the failover states of QEMU colo.c, whose every change
 * is an event.  Each event has a log priority (event_priority): the
 * anomalies are warnings, logged at once; EPOCH_DURABLE, the steady
 * state, goes to the log's once-a-minute summary and to the metrics
 * instead (a line per epoch only with -v).
 *
 * The subscribers are the control clients' sockets (ctl.c adds and
 * removes them); the table is guarded by colod.lock, so an event goes
 * out whole to each subscriber before the next one starts.
 */

#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "clock.h"
#include "colod.h"
#include "events.h"
#include "log.h"
#include "metrics.h"

#define EVENTS_MAX_SUBSCRIBERS 16

/* Under colod.lock: the subscribed clients' sockets (0: a free slot).
 * Written by the control socket's client threads (each adds and removes
 * only its own socket, ctl.c); read by any thread that raises an event
 * (the role's loops and the heartbeat) and by the main thread stopping
 * (colod_events_shutdown_all).
 * A client thread removes its socket before closing it, so a socket in
 * the table is always open and never another connection's reused fd.
 */
static int subscribers[EVENTS_MAX_SUBSCRIBERS];

void
colod_send_line (int fd, json_t *v)
{
  char *s = json_dumps (v, JSON_COMPACT);
  size_t len, off = 0;

  if (s == NULL)
    return;
  len = strlen (s);
  s[len++] = '\n';              /* over the NUL */
  while (off < len) {
    ssize_t r = send (fd, s + off, len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r == -1 && errno == EINTR)
      continue;
    if (r <= 0)
      break;                    /* a client that does not read loses */
    off += r;
  }
  free (s);
}

static int
event_priority (const char *name)
{
  static const struct {
    const char *name;
    int priority;
  } table[] = {
    { "EPOCH_DURABLE", LOG_DEBUG },     /* summarised */
    { "PEER_CONNECTED", LOG_NOTICE },
    { "PEER_LOST", LOG_WARNING },
    { "EPOCH_REFUSED", LOG_WARNING },
    { "FAILOVER_STATE", LOG_WARNING },
    { "SPLIT_BRAIN", LOG_CRIT },
  };
  size_t i;

  for (i = 0; i < sizeof table / sizeof table[0]; i++)
    if (strcmp (name, table[i].name) == 0)
      return table[i].priority;
  return LOG_NOTICE;
}

/* A durable epoch, as the role just published it in colod.st: its
 * summary line and its metrics.  The lag is the RPO lag at that moment
 * (since the epoch's checkpoint on the primary, its arrival on the
 * secondary).
 */
static void
epoch_done (void)
{
  uint64_t epoch, bytes, ms;
  int64_t lag;

  pthread_mutex_lock (&colod.lock);
  epoch = colod.st.last_epoch;
  bytes = colod.st.last_epoch_bytes;
  ms = colod.st.last_epoch_ms;
  lag = colod_wall_ms () - (int64_t) colod.st.committed_at_ms;
  pthread_mutex_unlock (&colod.lock);
  colod_metrics_epoch (bytes, ms);
  colod_log_epoch (epoch, bytes, ms, lag);
}

void
colod_event (const char *name, json_t *data)
{
  int64_t now = colod_wall_ms ();
  json_t *ev = json_pack ("{s:s,s:o,s:{s:I,s:I}}", "event", name,
                          "data", data ? data : json_object (),
                          "timestamp", "seconds", (json_int_t) (now / 1000),
                          "microseconds", (json_int_t) (now % 1000 * 1000));
  size_t i;

  if (ev == NULL)
    return;
  if (strcmp (name, "EPOCH_DURABLE") == 0)
    epoch_done ();
  colod_log_event (event_priority (name), name, json_object_get (ev, "data"));
  pthread_mutex_lock (&colod.lock);
  for (i = 0; i < EVENTS_MAX_SUBSCRIBERS; i++)
    if (subscribers[i] > 0)
      colod_send_line (subscribers[i], ev);
  pthread_mutex_unlock (&colod.lock);
  json_decref (ev);
}

bool
colod_events_subscribe (int fd)
{
  size_t i;
  bool ok = false;

  pthread_mutex_lock (&colod.lock);
  for (i = 0; i < EVENTS_MAX_SUBSCRIBERS && !ok; i++)
    if (subscribers[i] == 0) {
      subscribers[i] = fd;
      ok = true;
    }
  pthread_mutex_unlock (&colod.lock);
  return ok;
}

void
colod_events_unsubscribe (int fd)
{
  size_t i;

  pthread_mutex_lock (&colod.lock);
  for (i = 0; i < EVENTS_MAX_SUBSCRIBERS; i++)
    if (subscribers[i] == fd)
      subscribers[i] = 0;
  pthread_mutex_unlock (&colod.lock);
}

/* With colod.lock held (colod_control_stop). */
void
colod_events_shutdown_all (void)
{
  size_t i;

  for (i = 0; i < EVENTS_MAX_SUBSCRIBERS; i++)
    if (subscribers[i] > 0)
      shutdown (subscribers[i], SHUT_RDWR);
}

void
colod_set_failover (enum colod_failover f, const char *why)
{
  enum colod_failover old;

  pthread_mutex_lock (&colod.lock);
  old = colod.st.failover;
  colod.st.failover = f;
  pthread_cond_broadcast (&colod.cond);
  pthread_mutex_unlock (&colod.lock);
  if (old != f)
    colod_event ("FAILOVER_STATE",
                 json_pack ("{s:s,s:s,s:s}", "from",
                            colod_failover_name (old), "to",
                            colod_failover_name (f), "reason", why));
}
