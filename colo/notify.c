/* fleece-colod: what the daemon tells systemd (sd_notify(3)) when a
 * Type=notify unit runs it (systemd/fleece-colod-*@.service).
 *
 * One thread, started by main before the role and joined after it,
 * reads the status the roles publish in colod.st (under colod.lock)
 * every tick and says:
 *   READY=1     once, when the role is in service: the secondary
 *               listens, the primary is paired (connected); until then
 *               the unit is "activating", its status line saying why
 *   STATUS=     the connection, the last committed epoch and the RPO
 *               lag (as `status' reports it), when that line changes
 *   WATCHDOG=1  every half of the unit's WatchdogSec, when it set one
 *               (sd_watchdog_enabled)
 *   STOPPING=1  once, as soon as colod.stop is set (SIGTERM, SIGINT)
 * The roles are not touched: they already publish their state.  The
 * watchdog is pinged only after colod.lock was taken, so a thread that
 * hangs holding it (every role thread takes it to publish progress)
 * stops the pings and systemd restarts the daemon; a role loop that
 * hangs without the lock is not seen.  Outside systemd (no
 * NOTIFY_SOCKET) no thread is started and nothing is said.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <systemd/sd-daemon.h>

#include "monotonic.h"

#include "clock.h"
#include "colod.h"
#include "events.h"
#include "log.h"
#include "notify.h"

/* Set by colod_notify_start, then constant until colod_notify_stop. */
static pthread_t notify_thread;
static bool notify_running;
static uint64_t notify_watchdog_usec;   /* 0: no watchdog */
/* Only the notify thread, then colod_notify_stop after joining it. */
static bool notify_ready;
static char notify_status[512];

/* Tell systemd MSG (one or more VAR=VALUE lines).  A failure is logged
 * the first time only (the next ticks would repeat it), and is never
 * fatal: replication does not depend on systemd's view of it.
 */
static void
notify_send (const char *msg)
{
  static bool logged;
  int r = sd_notify (0, msg);

  if (r < 0 && !logged) {
    logged = true;
    colod_warn ("sd_notify: %s: %s: %s", getenv ("NOTIFY_SOCKET"), msg,
               strerror (-r));
  }
}

/* The status line, and whether the role is in service.  The line fits
 * (the peer is at most 127 bytes, the rest well under 200); a longer one
 * would be cut, never overrun.
 */
static bool
notify_format (char *buf, size_t len)
{
  const struct colod_status *st = &colod.st;
  bool ready;
  size_t n;

  pthread_mutex_lock (&colod.lock);
  ready = strcmp (st->connection, "listening") == 0 ||
          strcmp (st->connection, "connected") == 0;
  snprintf (buf, len, "%s%s%s", st->connection, st->peer[0] ? " " : "",
            st->peer);
  n = strlen (buf);
  if (st->committed_at_ms)
    snprintf (buf + n, len - n, "; epoch %" PRIu64 " committed, lag %"
              PRId64 " ms", st->last_committed,
              colod_wall_ms () - (int64_t) st->committed_at_ms);
  else
    snprintf (buf + n, len - n, "; no epoch committed yet");
  n = strlen (buf);
  if (st->failover != FAILOVER_NONE)
    snprintf (buf + n, len - n, "; failover %s",
              colod_failover_name (st->failover));
  pthread_mutex_unlock (&colod.lock);
  return ready;
}

static void *
notify_loop (void *arg)
{
  /* Ticks short enough for the watchdog and for STOPPING=1 to follow a
   * SIGTERM closely; the status line changes at most once a tick.
   */
  int tick_ms = 250;
  int64_t last_ping = 0;
  char line[600], status[512];
  bool ready;

  (void) arg;
  if (notify_watchdog_usec && notify_watchdog_usec / 4000 < 250)
    tick_ms = notify_watchdog_usec / 4000 ? notify_watchdog_usec / 4000 : 1;
  while (!colod.stop) {
    ready = notify_format (status, sizeof status);
    if (ready && !notify_ready) {
      notify_ready = true;
      notify_send ("READY=1");
    }
    if (strcmp (status, notify_status) != 0) {
      snprintf (notify_status, sizeof notify_status, "%s", status);
      snprintf (line, sizeof line, "STATUS=%s", status);
      notify_send (line);
    }
    if (notify_watchdog_usec &&
        monotonic_ms () - last_ping >= (int64_t) notify_watchdog_usec / 2000) {
      last_ping = monotonic_ms ();
      notify_send ("WATCHDOG=1");
    }
    colod_sleep_ms (tick_ms);
  }
  notify_send ("STOPPING=1\nSTATUS=stopping");
  return NULL;
}

int
colod_notify_start (void)
{
  int r;

  if (getenv ("NOTIFY_SOCKET") == NULL)
    return 0;
  r = sd_watchdog_enabled (0, &notify_watchdog_usec);
  if (r < 0) {
    colod_warn ("sd_watchdog_enabled: WATCHDOG_USEC: %s", strerror (-r));
    notify_watchdog_usec = 0;
  }
  else if (r == 0)
    notify_watchdog_usec = 0;
  colod_debug ("systemd: notify socket %s, watchdog %" PRIu64 " us",
               getenv ("NOTIFY_SOCKET"), notify_watchdog_usec);
  r = pthread_create (&notify_thread, NULL, notify_loop, NULL);
  if (r != 0) {
    colod_err ("pthread_create: the systemd notify thread: %s",
               strerror (r));
    return -1;
  }
  notify_running = true;
  return 0;
}

void
colod_notify_stop (void)
{
  if (!notify_running)
    return;
  colod.stop = 1;               /* the role has returned */
  pthread_join (notify_thread, NULL);
  notify_running = false;
}
