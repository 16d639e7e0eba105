/* fleece-colod: the daemon's control socket and its clients.
 *
 * Each daemon has a control socket, STATE_DIR/control.sock unless
 * --control says otherwise, speaking the plugin's QMP-shaped JSON lines
 * (docs/control-protocol.md): a greeting, then {"execute":CMD} requests
 * with the commands query-status, checkpoint (primary), promote
 * (secondary), metrics (Prometheus text, metrics.c) and
 * subscribe-events.  Only the daemon's user and root may connect
 * (SO_PEERCRED, as the plugin's socket).  A client has a thread of its
 * own (there are few, and a checkpoint or a promotion waits in it for
 * the role's loop); at most CONTROL_MAX_LINE bytes a request.
 *
 * The other subcommands (status, checkpoint, promote, metrics, events)
 * are the clients, lib/ctl-client.c's.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "clock.h"
#include "colod.h"
#include "ctl.h"
#include "events.h"
#include "log.h"
#include "metrics.h"
#include "ctl-client.h"

#define CONTROL_MAX_LINE    4096

/* Threads: the main thread (colod_control_start and _stop), the control
 * thread (accepts, starts a client thread per connection) and the
 * detached client threads.  Lock: colod.lock (colod.h), the daemon's one
 * lock, which also guards colod.st and the subscribers (events.c).
 */
static struct {
  /* Written by the main thread in colod_control_start before the
   * control thread starts (pthread_create orders the writes), then only
   * read until colod_control_stop (main thread) has joined it; client
   * threads never touch them.
   */
  int fd;                         /* the control thread accepts on it */
  char *path;
  pthread_t thread;
  int wake[2];                    /* the main thread writes [1] to stop
                                     the control thread, which polls [0] */
  /* Main thread only. */
  bool running;
  /* Under colod.lock: how many client threads are alive.  The control
   * thread raises it before starting one, each client thread lowers it
   * as it ends, and colod_control_stop (main thread) waits for 0.
   */
  unsigned nclients;
} ctl = { .fd = -1, .wake = { -1, -1 } };

/* Each disk of the group: its epoch (the group's: every disk is at
 * the same one) and its share of the last epoch.
 */
static json_t *
disks_json (const struct colod_status *st)
{
  json_t *a = json_array ();
  unsigned i;

  for (i = 0; a && i < colod_ndisks (); i++)
    json_array_append_new (a, json_pack ("{s:i,s:s,s:I,s:I,s:I,s:I}",
                                         "index", (int) i,
                                         "disk", colod_disk_name (i),
                                         "last-committed-epoch",
                                         (json_int_t) st->last_committed,
                                         "last-applied-epoch",
                                         (json_int_t) st->last_applied,
                                         "last-epoch-bytes", (json_int_t)
                                         st->disk_epoch_bytes[i],
                                         "last-epoch-extents", (json_int_t)
                                         st->disk_epoch_extents[i]));
  return a;
}

static json_t *
status_json (void)
{
  struct colod_status *st = &colod.st;
  char vol[33], gen[33], id[33];
  json_t *hist = json_array (), *o;
  int64_t now = monotonic_ms (), wall = colod_wall_ms ();
  uint32_t i;

  colod_hex (st->volume_id, 16, vol);
  colod_hex (st->generation_id, 16, gen);
  for (i = 0; i < st->history_len; i++) {
    colod_hex (st->history[i].id, 16, id);
    json_array_append_new (hist, json_pack ("{s:s,s:I}", "generation", id,
                                            "first-epoch", (json_int_t)
                                            st->history[i].start_epoch));
  }
  o = json_pack ("{s:s,s:s,s:s,s:s,s:s,s:s,s:o,s:I,s:I,s:I,s:I,s:I,s:I,"
                 "s:b,s:I,s:I,s:I,s:I,s:I,s:I}",
                 "role", st->role,
                 "connection", st->connection,
                 "peer", st->peer,
                 "failover", colod_failover_name (st->failover),
                 "volume-id", vol,
                 "generation", gen,
                 "history", hist,
                 "last-committed-epoch", (json_int_t) st->last_committed,
                 "last-applied-epoch", (json_int_t) st->last_applied,
                 "last-epoch", (json_int_t) st->last_epoch,
                 "last-epoch-bytes", (json_int_t) st->last_epoch_bytes,
                 "last-epoch-extents", (json_int_t) st->last_epoch_extents,
                 "last-epoch-duration-ms", (json_int_t) st->last_epoch_ms,
                 "last-epoch-full", st->last_epoch_full,
                 "epoch-in-flight", (json_int_t) st->epoch_in_flight,
                 "bytes-in-flight", (json_int_t) st->bytes_in_flight,
                 "resync-remaining-bytes", (json_int_t) st->resync_remaining,
                 "epochs-durable", (json_int_t) st->epochs_durable,
                 "epochs-refused", (json_int_t) st->epochs_refused,
                 "reconnects", (json_int_t) st->reconnects);
  if (o == NULL)
    return NULL;
  json_object_set_new (o, "disks", disks_json (st));
  if (st->peer_identity[0])
    json_object_set_new (o, "peer-identity",
                         json_string (st->peer_identity));
  if (st->refusal[0])
    json_object_set_new (o, "refusal", json_string (st->refusal));
  json_object_set_new (o, "rpo-lag-ms", st->committed_at_ms
                       ? json_integer (wall - (int64_t) st->committed_at_ms)
                       : json_null ());
  json_object_set_new (o, "heartbeat-age-ms", st->last_heartbeat_ms
                       ? json_integer (now - st->last_heartbeat_ms)
                       : json_null ());
  if (st->rtt_us >= 0 && st->last_heartbeat_ms)
    json_object_set_new (o, "heartbeat-rtt-us", json_integer (st->rtt_us));
  return o;
}

/* checkpoint: ask the primary's loop for an epoch and wait for it. */
static json_t *
cmd_checkpoint (json_t *args, char *err, size_t errlen)
{
  uint64_t ticket;
  int64_t deadline = monotonic_ms () + 600000;
  json_t *wait = json_object_get (args, "wait");
  json_t *r = NULL;

  if (strcmp (colod.opt.role, "primary") != 0) {
    snprintf (err, errlen, "checkpoint: this daemon is a %s; epochs are "
              "made by the primary", colod.opt.role);
    return NULL;
  }
  pthread_mutex_lock (&colod.lock);
  ticket = ++colod.checkpoint_requests;
  pthread_cond_broadcast (&colod.cond);
  while (wait != json_false () && colod.checkpoint_served < ticket &&
         !colod.stop && monotonic_ms () < deadline)
    colod_wait_ms (100);
  if (wait == json_false ())
    r = json_pack ("{s:b}", "queued", 1);
  else if (colod.checkpoint_served < ticket)
    snprintf (err, errlen, "checkpoint: %s", colod.stop ? "the daemon is "
              "stopping" : "no durable epoch within 600 s");
  else if (colod.checkpoint_error[0])
    snprintf (err, errlen, "%s", colod.checkpoint_error);
  else
    r = json_pack ("{s:I}", "epoch", (json_int_t) colod.st.last_committed);
  pthread_mutex_unlock (&colod.lock);
  return r;
}

static json_t *
cmd_promote (json_t *args, char *err, size_t errlen)
{
  json_t *r = NULL;
  bool force = json_is_true (json_object_get (args, "force"));
  int64_t deadline = monotonic_ms () + 600000;

  if (strcmp (colod.opt.role, "secondary") != 0) {
    snprintf (err, errlen, "promote: this daemon is a %s; only a secondary "
              "can be promoted", colod.opt.role);
    return NULL;
  }
  pthread_mutex_lock (&colod.lock);
  if (colod.st.failover == FAILOVER_COMPLETED)
    snprintf (err, errlen, "promote: already promoted");
  else if (!force && colod.st.failover == FAILOVER_NONE &&
           strcmp (colod.st.connection, "connected") == 0)
    snprintf (err, errlen, "promote: the primary %s is connected and its "
              "heartbeats arrive; stop it first, or give force to promote "
              "anyway (both sides would then be written: split brain)",
              colod.st.peer);
  else {
    colod.promote_requested = true;
    colod.promote_force = force;
    pthread_cond_broadcast (&colod.cond);
    while (colod.st.failover != FAILOVER_COMPLETED && !colod.stop &&
           colod.promote_requested && monotonic_ms () < deadline)
      colod_wait_ms (1000);
    if (colod.st.failover == FAILOVER_COMPLETED) {
      char gen[33];
      colod_hex (colod.st.generation_id, 16, gen);
      r = json_pack ("{s:s,s:I}", "generation", gen, "epoch",
                     (json_int_t) colod.st.last_committed);
    }
    else
      snprintf (err, errlen, "promote: %s", colod.promote_error[0]
                ? colod.promote_error : "the daemon is stopping");
  }
  pthread_mutex_unlock (&colod.lock);
  return r;
}

static json_t *
handle_request (json_t *req, bool *subscribe, char *err, size_t errlen)
{
  const char *cmd = NULL;
  json_t *args = NULL, *r = NULL;

  if (json_unpack (req, "{s:s,s?o}", "execute", &cmd, "arguments",
                   &args) == -1) {
    snprintf (err, errlen, "a request is an object with \"execute\" (a "
              "string) and optional \"arguments\" (an object)");
    return NULL;
  }
  if (strcmp (cmd, "query-status") == 0) {
    pthread_mutex_lock (&colod.lock);
    r = status_json ();
    pthread_mutex_unlock (&colod.lock);
  }
  else if (strcmp (cmd, "checkpoint") == 0)
    return cmd_checkpoint (args, err, errlen);
  else if (strcmp (cmd, "promote") == 0)
    return cmd_promote (args, err, errlen);
  else if (strcmp (cmd, "metrics") == 0) {
    char *text = colod_metrics_render (NULL);
    r = text ? json_pack ("{s:s,s:s}", "content-type",
                          "text/plain; version=0.0.4", "text", text) : NULL;
    free (text);
  }
  else if (strcmp (cmd, "subscribe-events") == 0) {
    *subscribe = true;
    r = json_object ();
  }
  else if (strcmp (cmd, "qmp_capabilities") == 0)
    r = json_object ();
  else {
    snprintf (err, errlen, "unknown command '%.64s': the commands are "
              "query-status, checkpoint, promote, metrics, subscribe-events",
              cmd);
    return NULL;
  }
  if (r == NULL)
    snprintf (err, errlen, "%s: out of memory", cmd);
  return r;
}

/* A client thread ends. */
static void
client_done (int fd)
{
  colod_events_unsubscribe (fd);
  close (fd);
  pthread_mutex_lock (&colod.lock);
  ctl.nclients--;
  pthread_cond_broadcast (&colod.cond);
  pthread_mutex_unlock (&colod.lock);
}

/* One client, in its own (detached) thread: a line in, a line out. */
static void *
client_thread (void *arg)
{
  int fd = (intptr_t) arg;
  char buf[CONTROL_MAX_LINE + 1];
  size_t len = 0;
  json_t *greeting = json_pack ("{s:{s:{s:s,s:i}}}", "QMP", "version",
                                "package", "fleece-colod " PACKAGE_VERSION,
                                "protocol", 1);

  colod_send_line (fd, greeting);
  json_decref (greeting);
  for (;;) {
    char *nl;
    ssize_t r = recv (fd, buf + len, CONTROL_MAX_LINE - len, 0);
    if (r == -1 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    len += r;
    while ((nl = memchr (buf, '\n', len)) != NULL) {
      char err[1024] = "";
      json_error_t je;
      bool subscribe = false;
      json_t *req = json_loadb (buf, nl - buf, 0, &je), *ret = NULL, *reply;
      json_t *id = req ? json_object_get (req, "id") : NULL;

      if (req == NULL)
        snprintf (err, sizeof err, "not JSON: %s", je.text);
      else
        ret = handle_request (req, &subscribe, err, sizeof err);
      reply = ret ? json_pack ("{s:o}", "return", ret)
        : json_pack ("{s:{s:s,s:s}}", "error", "class", "GenericError",
                     "desc", err);
      if (reply && id)
        json_object_set (reply, "id", id);
      /* A subscriber's socket is also written by whichever thread
       * raises an event (events.c, under colod.lock): the reply takes
       * the lock too, so that a line is never cut by another's bytes.
       * colod_send_line does not block.
       */
      pthread_mutex_lock (&colod.lock);
      colod_send_line (fd, reply);
      pthread_mutex_unlock (&colod.lock);
      json_decref (reply);
      json_decref (req);
      if (subscribe && !colod_events_subscribe (fd)) {
        client_done (fd);
        return NULL;
      }
      len -= nl + 1 - buf;
      memmove (buf, nl + 1, len);
    }
    if (len == CONTROL_MAX_LINE) {
      json_t *e = json_pack ("{s:{s:s,s:s}}", "error", "class",
                             "GenericError", "desc", "request line too long");
      colod_send_line (fd, e);
      json_decref (e);
      break;
    }
  }
  client_done (fd);
  return NULL;
}

/* Only this daemon's user and root may use its control socket, as the
 * plugin's (server/control.c): the socket's mode (0600) says the same,
 * but a directory or socket made wider by mistake must not let another
 * user promote or checkpoint.  A refused client is told why, then
 * closed.
 */
static bool
peer_allowed (int fd)
{
  struct ucred cred;
  socklen_t len = sizeof cred;
  char msg[128];
  json_t *e;

  if (getsockopt (fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == -1)
    snprintf (msg, sizeof msg, "getsockopt: SO_PEERCRED: %s",
              strerror (errno));
  else if (cred.uid != 0 && cred.uid != geteuid ())
    snprintf (msg, sizeof msg, "permission denied: uid %u may not use "
              "this control socket", (unsigned) cred.uid);
  else
    return true;
  colod_warn ("control socket: refusing a client: %s", msg);
  e = json_pack ("{s:{s:s,s:s}}", "error", "class", "GenericError",
                 "desc", msg);
  colod_send_line (fd, e);
  json_decref (e);
  close (fd);
  return false;
}

static void *
control_thread (void *arg)
{
  (void) arg;
  for (;;) {
    struct pollfd p[2] = { { ctl.fd, POLLIN, 0 }, { ctl.wake[0], POLLIN, 0 } };
    pthread_t t;
    pthread_attr_t attr;
    int fd;

    if (poll (p, 2, -1) == -1 && errno != EINTR)
      break;
    if (p[1].revents)
      break;
    if (!(p[0].revents & POLLIN))
      continue;
    fd = accept4 (ctl.fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd == -1)
      continue;
    if (!peer_allowed (fd))
      continue;
    pthread_attr_init (&attr);
    pthread_attr_setdetachstate (&attr, PTHREAD_CREATE_DETACHED);
    pthread_mutex_lock (&colod.lock);
    ctl.nclients++;
    pthread_mutex_unlock (&colod.lock);
    if (pthread_create (&t, &attr, client_thread, (void *) (intptr_t) fd))
      client_done (fd);
    pthread_attr_destroy (&attr);
  }
  return NULL;
}

int
colod_control_start (const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct stat sb;

  if (strlen (path) >= sizeof sun.sun_path) {
    colod_err ("control socket %s: the path is too long", path);
    return -1;
  }
  strcpy (sun.sun_path, path);
  /* A socket left by a dead daemon is replaced; a live one refused. */
  if (lstat (path, &sb) == 0) {
    int probe;
    if (!S_ISSOCK (sb.st_mode)) {
      colod_err ("control socket %s: exists and is not a socket", path);
      return -1;
    }
    probe = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0 &&
        connect (probe, (struct sockaddr *) &sun, sizeof sun) == 0) {
      close (probe);
      colod_err ("control socket %s: another fleece-colod is running "
                 "with this state directory", path);
      return -1;
    }
    if (probe >= 0)
      close (probe);
    unlink (path);
  }
  ctl.fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (ctl.fd == -1 ||
      bind (ctl.fd, (struct sockaddr *) &sun, sizeof sun) == -1 ||
      chmod (path, 0600) == -1 || listen (ctl.fd, 16) == -1 ||
      pipe2 (ctl.wake, O_CLOEXEC) == -1) {
    colod_err ("control socket %s: %s", path, strerror (errno));
    return -1;
  }
  ctl.path = strdup (path);
  if (pthread_create (&ctl.thread, NULL, control_thread, NULL) != 0) {
    colod_err ("control socket %s: pthread_create failed", path);
    return -1;
  }
  ctl.running = true;
  return 0;
}

void
colod_control_stop (void)
{
  int64_t deadline = monotonic_ms () + 2000;
  int i;

  if (ctl.running) {
    char c = 0;
    if (write (ctl.wake[1], &c, 1) != 1)
      colod_err ("control socket: cannot wake its thread");
    pthread_join (ctl.thread, NULL);
    ctl.running = false;
  }
  /* Clients still connected (an `events' subscriber stays until the
   * daemon goes, a checkpoint waits for its epoch): disconnect them and
   * give their threads up to 2 s to end, so that none is alive at exit.
   */
  pthread_mutex_lock (&colod.lock);
  colod.stop = 1;
  colod_events_shutdown_all ();
  while (ctl.nclients > 0 && monotonic_ms () < deadline)
    colod_wait_ms (50);
  pthread_mutex_unlock (&colod.lock);
  if (ctl.fd >= 0) {
    close (ctl.fd);
    unlink (ctl.path);
  }
  for (i = 0; i < 2; i++)
    if (ctl.wake[i] >= 0) {
      close (ctl.wake[i]);
      ctl.wake[i] = -1;
    }
  free (ctl.path);
}

/* ---- client subcommands (lib/ctl-client.c) ---- */

/* A client of this daemon's control socket, or NULL (said why). */
static struct ctlc *
client_open (void)
{
  char err[1024];
  struct ctlc *c = ctlc_connect (colod.opt.control, 10000, err, sizeof err);

  if (c == NULL)
    fprintf (stderr, "fleece-colod: %s (is the daemon running with "
             "--state %s?)\n", err, colod.opt.state_dir);
  return c;
}

int
colod_ctl_client (const char *cmd, json_t *args, bool human)
{
  char err[1024];
  struct ctlc *c = client_open ();
  json_t *r;

  if (c == NULL) {
    json_decref (args);
    return COLOD_EXIT_ERROR;
  }
  r = ctlc_execute (c, cmd, args, err, sizeof err);
  ctlc_close (c);
  if (r == NULL) {
    fprintf (stderr, "fleece-colod: %s\n", err);
    return COLOD_EXIT_ERROR;
  }
  if (strcmp (cmd, "metrics") == 0 && json_is_string (json_object_get (r,
                                                                   "text")))
    fputs (json_string_value (json_object_get (r, "text")), stdout);
  else if (human && json_is_object (r)) {
    const char *k;
    json_t *v;
    json_object_foreach (r, k, v) {
      char *s = json_dumps (v, JSON_ENCODE_ANY | JSON_COMPACT);
      if (json_is_string (v))
        printf ("%s: %s\n", k, json_string_value (v));
      else
        printf ("%s: %s\n", k, s ? s : "");
      free (s);
    }
  }
  else {
    char *s = json_dumps (r, JSON_ENCODE_ANY | JSON_COMPACT);
    printf ("%s\n", s ? s : "");
    free (s);
  }
  json_decref (r);
  return 0;
}

/* events: subscribe and print every event line, as it came, until the
 * daemon goes (which is the normal end: exit 0).
 */
int
colod_ctl_events (void)
{
  char err[1024], *line;
  struct ctlc *c = client_open ();
  json_t *ev;
  int r = -1;

  if (c == NULL)
    return COLOD_EXIT_ERROR;
  setvbuf (stdout, NULL, _IOLBF, 0);
  if (ctlc_subscribe (c, err, sizeof err) == 0) {
    while ((r = ctlc_next_event (c, -1, &ev, &line, err, sizeof err)) == 1) {
      printf ("%s\n", line);
      json_decref (ev);
      free (line);
    }
    if (ctlc_closed (c))
      r = 0;
  }
  ctlc_close (c);
  if (r == -1) {
    fprintf (stderr, "fleece-colod: %s\n", err);
    return COLOD_EXIT_ERROR;
  }
  return 0;
}
