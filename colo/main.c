/* fleece-colod: the command line, the log, the control socket and the
 * pieces both roles share (colod.h).
 *
 * The daemons (primary, secondary) run in the foreground and log to
 * stderr.  Each has a control socket, STATE_DIR/control.sock unless
 * --control says otherwise, speaking the plugin's QMP-shaped JSON lines
 * (docs/control-protocol.md): a greeting, then {"execute":CMD} requests
 * with the commands query-status, checkpoint (primary), promote
 * (secondary) and subscribe-events.  The other subcommands (status,
 * checkpoint, promote, events) are clients of that socket.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "colod.h"
#include "source.h"

struct colod colod = {
  .lock = PTHREAD_MUTEX_INITIALIZER,
  .cond = PTHREAD_COND_INITIALIZER,
};

/* ---- time, log, events ---- */

int64_t
colod_now_ms (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t
colod_wall_us (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_REALTIME, &ts);
  return ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t
colod_wall_ms (void)
{
  return colod_wall_us () / 1000;
}

void
colod_wait_ms (int ms)
{
  struct timespec ts;

  clock_gettime (CLOCK_REALTIME, &ts);
  ts.tv_sec += ms / 1000;
  ts.tv_nsec += (ms % 1000) * 1000000L;
  if (ts.tv_nsec >= 1000000000) {
    ts.tv_sec++;
    ts.tv_nsec -= 1000000000;
  }
  pthread_cond_timedwait (&colod.cond, &colod.lock, &ts);
}

void
colod_sleep_ms (int ms)
{
  while (ms > 0 && !colod.stop) {
    int n = ms < 50 ? ms : 50;
    struct timespec ts = { 0, n * 1000000L };
    nanosleep (&ts, NULL);
    ms -= n;
  }
}

static void
vlog (const char *fmt, va_list ap)
{
  char line[2048];
  struct timespec ts;
  struct tm tm;

  clock_gettime (CLOCK_REALTIME, &ts);
  localtime_r (&ts.tv_sec, &tm);
  vsnprintf (line, sizeof line, fmt, ap);
  fprintf (stderr, "%02d:%02d:%02d.%03ld fleece-colod: %s: %s\n",
           tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
           colod.opt.role ? colod.opt.role : "-", line);
}

void
colod_log (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vlog (fmt, ap);
  va_end (ap);
}

void
colod_debug (const char *fmt, ...)
{
  va_list ap;

  if (!colod.opt.verbose)
    return;
  va_start (ap, fmt);
  vlog (fmt, ap);
  va_end (ap);
}

void
colod_hex (const uint8_t *id, size_t n, char *out)
{
  size_t i;

  for (i = 0; i < n; i++)
    sprintf (out + 2 * i, "%02x", id[i]);
  out[2 * n] = '\0';
}

const char *
colod_failover_name (enum colod_failover f)
{
  switch (f) {
  case FAILOVER_NONE: return "none";
  case FAILOVER_REQUIRE: return "require";
  case FAILOVER_ACTIVE: return "active";
  case FAILOVER_COMPLETED: return "completed";
  }
  return "unknown";
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

/* ---- the control socket ---- */

#define CONTROL_MAX_CLIENTS 16
#define CONTROL_MAX_LINE    4096

static struct {
  int fd;
  char *path;
  pthread_t thread;
  bool running;
  int wake[2];
  /* Under colod.lock: clients subscribed to events, and how many client
   * threads are alive (colod_control_stop waits for them).
   */
  int subscribers[CONTROL_MAX_CLIENTS];
  unsigned nclients;
} ctl = { .fd = -1 };

static void
send_line (int fd, json_t *v)
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

void
colod_event (const char *name, json_t *data)
{
  int64_t now = colod_wall_ms ();
  json_t *ev = json_pack ("{s:s,s:o,s:{s:I,s:I}}", "event", name,
                          "data", data ? data : json_object (),
                          "timestamp", "seconds", (json_int_t) (now / 1000),
                          "microseconds", (json_int_t) (now % 1000 * 1000));
  char *s;
  size_t i;

  if (ev == NULL)
    return;
  s = json_dumps (json_object_get (ev, "data"), JSON_COMPACT);
  colod_log ("event %s %s", name, s ? s : "");
  free (s);
  pthread_mutex_lock (&colod.lock);
  for (i = 0; i < CONTROL_MAX_CLIENTS; i++)
    if (ctl.subscribers[i] > 0)
      send_line (ctl.subscribers[i], ev);
  pthread_mutex_unlock (&colod.lock);
  json_decref (ev);
}

static json_t *
status_json (void)
{
  struct colod_status *st = &colod.st;
  char vol[33], gen[33], id[33];
  json_t *hist = json_array (), *o;
  int64_t now = colod_now_ms (), wall = colod_wall_ms ();
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
  int64_t deadline = colod_now_ms () + 600000;
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
         !colod.stop && colod_now_ms () < deadline)
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
  int64_t deadline = colod_now_ms () + 600000;

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
           colod.promote_requested && colod_now_ms () < deadline)
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
  else if (strcmp (cmd, "subscribe-events") == 0) {
    *subscribe = true;
    r = json_object ();
  }
  else if (strcmp (cmd, "qmp_capabilities") == 0)
    r = json_object ();
  else {
    snprintf (err, errlen, "unknown command '%.64s': the commands are "
              "query-status, checkpoint, promote, subscribe-events", cmd);
    return NULL;
  }
  if (r == NULL)
    snprintf (err, errlen, "%s: out of memory", cmd);
  return r;
}

static void
unsubscribe (int fd)
{
  size_t i;

  pthread_mutex_lock (&colod.lock);
  for (i = 0; i < CONTROL_MAX_CLIENTS; i++)
    if (ctl.subscribers[i] == fd)
      ctl.subscribers[i] = 0;
  pthread_mutex_unlock (&colod.lock);
}

static bool
subscribe_fd (int fd)
{
  size_t i;
  bool ok = false;

  pthread_mutex_lock (&colod.lock);
  for (i = 0; i < CONTROL_MAX_CLIENTS && !ok; i++)
    if (ctl.subscribers[i] == 0) {
      ctl.subscribers[i] = fd;
      ok = true;
    }
  pthread_mutex_unlock (&colod.lock);
  return ok;
}

/* A client thread ends. */
static void
client_done (int fd)
{
  unsubscribe (fd);
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

  send_line (fd, greeting);
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
      send_line (fd, reply);
      json_decref (reply);
      json_decref (req);
      if (subscribe && !subscribe_fd (fd)) {
        client_done (fd);
        return NULL;
      }
      len -= nl + 1 - buf;
      memmove (buf, nl + 1, len);
    }
    if (len == CONTROL_MAX_LINE) {
      json_t *e = json_pack ("{s:{s:s,s:s}}", "error", "class",
                             "GenericError", "desc", "request line too long");
      send_line (fd, e);
      json_decref (e);
      break;
    }
  }
  client_done (fd);
  return NULL;
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
    colod_log ("control socket %s: the path is too long", path);
    return -1;
  }
  strcpy (sun.sun_path, path);
  /* A socket left by a dead daemon is replaced; a live one refused. */
  if (lstat (path, &sb) == 0) {
    int probe;
    if (!S_ISSOCK (sb.st_mode)) {
      colod_log ("control socket %s: exists and is not a socket", path);
      return -1;
    }
    probe = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0 &&
        connect (probe, (struct sockaddr *) &sun, sizeof sun) == 0) {
      close (probe);
      colod_log ("control socket %s: another fleece-colod is running "
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
    colod_log ("control socket %s: %s", path, strerror (errno));
    return -1;
  }
  ctl.path = strdup (path);
  if (pthread_create (&ctl.thread, NULL, control_thread, NULL) != 0) {
    colod_log ("control socket %s: pthread_create failed", path);
    return -1;
  }
  ctl.running = true;
  return 0;
}

void
colod_control_stop (void)
{
  int64_t deadline = colod_now_ms () + 2000;
  size_t i;

  if (ctl.running) {
    char c = 0;
    if (write (ctl.wake[1], &c, 1) != 1)
      colod_log ("control socket: cannot wake its thread");
    pthread_join (ctl.thread, NULL);
    ctl.running = false;
  }
  /* Clients still connected (an `events' subscriber stays until the
   * daemon goes, a checkpoint waits for its epoch): disconnect them and
   * give their threads up to 2 s to end, so that none is alive at exit.
   */
  pthread_mutex_lock (&colod.lock);
  colod.stop = 1;
  for (i = 0; i < CONTROL_MAX_CLIENTS; i++)
    if (ctl.subscribers[i] > 0)
      shutdown (ctl.subscribers[i], SHUT_RDWR);
  while (ctl.nclients > 0 && colod_now_ms () < deadline)
    colod_wait_ms (50);
  pthread_mutex_unlock (&colod.lock);
  if (ctl.fd >= 0) {
    close (ctl.fd);
    unlink (ctl.path);
  }
  free (ctl.path);
}

/* ---- peer connections ---- */

struct colod_conn *
colod_conn_wrap (struct colo_conn *c)
{
  struct colod_conn *pc = calloc (1, sizeof *pc);

  if (pc == NULL || (pc->dec = colo_wire_decoder_new ()) == NULL) {
    free (pc);
    colo_close (c);
    return NULL;
  }
  pc->conn = c;
  colo_wire_encoder_init (&pc->enc);
  return pc;
}

void
colod_conn_close (struct colod_conn *c)
{
  if (c) {
    colo_close (c->conn);
    colo_wire_decoder_free (c->dec);
    free (c);
  }
}

void
colod_conn_abort (struct colod_conn *c)
{
  if (c)
    shutdown (colo_conn_fd (c->conn), SHUT_RDWR);
}

static int
write_fn (void *opaque, const void *buf, size_t len)
{
  return colo_send_all (opaque, buf, len);
}

static ssize_t
read_fn (void *opaque, void *buf, size_t len)
{
  return colo_recv_some (opaque, buf, len);
}

int
colod_send (struct colod_conn *c, const struct colo_msg *m, char *err,
            size_t errlen)
{
  struct colo_wire_error we;

  if (colo_wire_send (&c->enc, m, write_fn, c->conn, &we) == -1) {
    snprintf (err, errlen, "%s: sending %s: %s", colo_conn_peer (c->conn),
              colo_msg_type_name (m->type),
              errno == 0 ? we.msg : colo_tls_last_error ());
    return -1;
  }
  return 0;
}

int
colod_recv (struct colod_conn *c, const struct colo_msg **m, char *err,
            size_t errlen)
{
  struct colo_wire_error we;
  int r = colo_wire_recv (c->dec, read_fn, c->conn, m, &we);

  if (r == 0) {
    snprintf (err, errlen, "%s: the peer closed the connection",
              colo_conn_peer (c->conn));
    return 0;
  }
  if (r == -1) {
    const char *tls = colo_tls_last_error ();
    snprintf (err, errlen, "%s: %s%s%s", colo_conn_peer (c->conn), we.msg,
              tls && *tls && we.code == 0 ? ": " : "",
              tls && we.code == 0 ? tls : "");
    if (we.code)
      colod_send_error (c, we.code, we.msg);
    return -1;
  }
  if ((*m)->type == COLO_MSG_ERROR) {
    snprintf (err, errlen, "%s: the peer reports an error: %s",
              colo_conn_peer (c->conn), (*m)->error.message);
    return -1;
  }
  return 1;
}

void
colod_send_error (struct colod_conn *c, uint32_t code, const char *msg)
{
  struct colo_msg m = { .type = COLO_MSG_ERROR };
  char err[256];

  m.error.code = code;
  snprintf (m.error.message, sizeof m.error.message, "%s", msg);
  colo_conn_set_timeout (c->conn, 1000);
  colod_send (c, &m, err, sizeof err);
}

/* ---- generation histories ---- */

static int
find_gen (const struct colo_generation *h, uint32_t n, const uint8_t *id)
{
  uint32_t i;

  for (i = 0; i < n; i++)
    if (memcmp (h[i].id, id, 16) == 0)
      return i;
  return -1;
}

enum colod_relation
colod_relate (const struct colo_generation *ours, uint32_t nours,
              const struct colo_generation *theirs, uint32_t ntheirs,
              uint64_t *fork)
{
  int i;

  *fork = 0;
  if (nours == 0 || ntheirs == 0)
    return REL_UNRELATED;
  if (memcmp (ours[nours - 1].id, theirs[ntheirs - 1].id, 16) == 0)
    return REL_SAME;
  i = find_gen (theirs, ntheirs, ours[nours - 1].id);
  if (i >= 0) {
    *fork = theirs[i + 1].start_epoch;
    return REL_BEHIND;
  }
  i = find_gen (ours, nours, theirs[ntheirs - 1].id);
  if (i >= 0) {
    *fork = ours[i + 1].start_epoch;
    return REL_AHEAD;
  }
  for (i = nours - 1; i >= 0; i--)
    if (find_gen (theirs, ntheirs, ours[i].id) >= 0)
      return REL_DIVERGED;
  return REL_UNRELATED;
}

uint32_t
colod_history_from_journal (const struct journal_state *js,
                            struct colo_generation *out)
{
  uint32_t i;

  for (i = 0; i < js->history_len; i++) {
    memcpy (out[i].id, js->history[i].id, 16);
    out[i].start_epoch = js->history[i].first_epoch;
  }
  return js->history_len;
}

struct colo_msg_hello *
colod_hello_init (struct colo_msg *m, uint16_t role, uint32_t channel)
{
  memset (m, 0, sizeof *m);
  m->type = COLO_MSG_HELLO;
  m->hello.role = role;
  m->hello.max_version = COLO_WIRE_VERSION;
  m->hello.channel = channel;
  return &m->hello;
}

const char *
colod_relation_name (enum colod_relation r)
{
  switch (r) {
  case REL_SAME: return "same generation";
  case REL_BEHIND: return "behind";
  case REL_AHEAD: return "ahead";
  case REL_DIVERGED: return "diverged";
  case REL_UNRELATED: return "unrelated";
  }
  return "unknown";
}

/* ---- client subcommands ---- */

static int
client (const char *cmd, json_t *args, bool human)
{
  char path[PATH_MAX], err[1024];
  struct colo_ctl *c;
  json_t *r;

  snprintf (path, sizeof path, "%s", colod.opt.control);
  c = colo_ctl_open (path, 10000, err, sizeof err);
  if (c == NULL) {
    fprintf (stderr, "fleece-colod: %s (is the daemon running with "
             "--state %s?)\n", err, colod.opt.state_dir);
    json_decref (args);
    return COLOD_EXIT_ERROR;
  }
  r = colo_ctl_execute (c, cmd, args, err, sizeof err);
  colo_ctl_close (c);
  if (r == NULL) {
    fprintf (stderr, "fleece-colod: %s\n", err);
    return COLOD_EXIT_ERROR;
  }
  if (human && json_is_object (r)) {
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

/* events: subscribe and print every event line until the daemon goes. */
static int
events_client (void)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  const char *req = "{\"execute\":\"subscribe-events\"}\n";
  char buf[65536];
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ssize_t r;

  snprintf (sun.sun_path, sizeof sun.sun_path, "%s", colod.opt.control);
  if (fd == -1 || connect (fd, (struct sockaddr *) &sun, sizeof sun) == -1 ||
      write (fd, req, strlen (req)) != (ssize_t) strlen (req)) {
    fprintf (stderr, "fleece-colod: control socket %s: %s\n",
             colod.opt.control, strerror (errno));
    return COLOD_EXIT_ERROR;
  }
  setvbuf (stdout, NULL, _IOLBF, 0);
  while ((r = read (fd, buf, sizeof buf)) > 0) {
    char *p = buf, *nl;
    while ((nl = memchr (p, '\n', buf + r - p)) != NULL) {
      if (strncmp (p, "{\"event\"", 8) == 0)
        fwrite (p, 1, nl + 1 - p, stdout);
      p = nl + 1;
    }
  }
  close (fd);
  return 0;
}

/* ---- the command line ---- */

static void
usage (FILE *f)
{
  fprintf (f,
"usage:\n"
"  fleece-colod secondary --listen ADDR:PORT --disk PATH --state DIR TLS\n"
"                [--hb-interval MS] [--hb-timeout MS] [--auto-failover]\n"
"                [--on-promote CMD] [--promote-store PATH]\n"
"                [--discard-diverged] [--handshake-timeout MS]\n"
"                [--control PATH] [-v]\n"
"  fleece-colod primary --fleece SOCKET --nbd URI --peer ADDR:PORT\n"
"                --state DIR TLS [--interval MS] [--hb-interval MS]\n"
"                [--hb-timeout MS] [--handshake-timeout MS]\n"
"                [--max-extent BYTES] [--control PATH] [-v]\n"
"  fleece-colod demote --fleece SOCKET --nbd URI --state DIR\n"
"  fleece-colod status --state DIR [--json]\n"
"  fleece-colod checkpoint --state DIR [--no-wait]\n"
"  fleece-colod promote --state DIR [--force]\n"
"  fleece-colod events --state DIR\n"
"TLS is one of: --tls-certificates DIR | --tls-psk FILE [--tls-username U]\n"
"  | --insecure; with --tls-no-verify-hostname, --tls-priority STRING.\n"
"  fleece-colod --help | --version\n"
"See fleece-colod(1).\n");
}

/* A usage error: say what is wrong and where to read more, exit 2. */
static int __attribute__ ((format (printf, 1, 2)))
usage_error (const char *fmt, ...)
{
  va_list ap;

  fprintf (stderr, "fleece-colod: ");
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fprintf (stderr, "\nTry 'fleece-colod --help' for more information.\n");
  return COLOD_EXIT_USAGE;
}

static int
parse_ms (const char *opt, const char *s, int min, int *out)
{
  char *end;
  long v;

  errno = 0;
  v = strtol (s, &end, 10);
  if (errno || *end || end == s || v < min || v > 86400000) {
    fprintf (stderr, "fleece-colod: %s: '%s' is not a number of "
             "milliseconds from %d to 86400000\n", opt, s, min);
    return -1;
  }
  *out = v;
  return 0;
}

enum {
  OPT_LISTEN = 256, OPT_DISK, OPT_STATE, OPT_FLEECE, OPT_NBD, OPT_PEER,
  OPT_INTERVAL, OPT_HB_INTERVAL, OPT_HB_TIMEOUT, OPT_AUTO_FAILOVER,
  OPT_ON_PROMOTE, OPT_PROMOTE_STORE, OPT_DISCARD, OPT_CONTROL, OPT_MAX_EXTENT,
  OPT_TLS_CERTS, OPT_TLS_PSK, OPT_TLS_USER, OPT_INSECURE, OPT_NO_VERIFY,
  OPT_PRIORITY, OPT_JSON, OPT_NO_WAIT, OPT_FORCE, OPT_DEBUG,
  OPT_HANDSHAKE_TIMEOUT,
};

static const struct option long_options[] = {
  { "listen", required_argument, NULL, OPT_LISTEN },
  { "disk", required_argument, NULL, OPT_DISK },
  { "state", required_argument, NULL, OPT_STATE },
  { "fleece", required_argument, NULL, OPT_FLEECE },
  { "nbd", required_argument, NULL, OPT_NBD },
  { "peer", required_argument, NULL, OPT_PEER },
  { "interval", required_argument, NULL, OPT_INTERVAL },
  { "hb-interval", required_argument, NULL, OPT_HB_INTERVAL },
  { "hb-timeout", required_argument, NULL, OPT_HB_TIMEOUT },
  { "handshake-timeout", required_argument, NULL, OPT_HANDSHAKE_TIMEOUT },
  { "auto-failover", no_argument, NULL, OPT_AUTO_FAILOVER },
  { "on-promote", required_argument, NULL, OPT_ON_PROMOTE },
  { "promote-store", required_argument, NULL, OPT_PROMOTE_STORE },
  { "discard-diverged", no_argument, NULL, OPT_DISCARD },
  { "control", required_argument, NULL, OPT_CONTROL },
  { "max-extent", required_argument, NULL, OPT_MAX_EXTENT },
  { "tls-certificates", required_argument, NULL, OPT_TLS_CERTS },
  { "tls-psk", required_argument, NULL, OPT_TLS_PSK },
  { "tls-username", required_argument, NULL, OPT_TLS_USER },
  { "insecure", no_argument, NULL, OPT_INSECURE },
  { "tls-no-verify-hostname", no_argument, NULL, OPT_NO_VERIFY },
  { "tls-priority", required_argument, NULL, OPT_PRIORITY },
  { "json", no_argument, NULL, OPT_JSON },
  { "no-wait", no_argument, NULL, OPT_NO_WAIT },
  { "force", no_argument, NULL, OPT_FORCE },
  { "debug", required_argument, NULL, OPT_DEBUG },
  { "verbose", no_argument, NULL, 'v' },
  { "help", no_argument, NULL, 'h' },
  { "version", no_argument, NULL, 'V' },
  { NULL, 0, NULL, 0 },
};

/* --debug NAME=VALUE: fault injection for the tests. */
static int
parse_debug (const char *s)
{
  unsigned long long v;

  if (sscanf (s, "corrupt-epoch=%llu", &v) == 1)
    colod.opt.debug_corrupt_epoch = v;
  else if (sscanf (s, "extent-delay-ms=%llu", &v) == 1 && v < 60000)
    colod.opt.debug_extent_delay_ms = v;
  else {
    fprintf (stderr, "fleece-colod: --debug %s: the flags are "
             "corrupt-epoch=N, extent-delay-ms=N\n", s);
    return -1;
  }
  return 0;
}

static int
parse_options (int argc, char *argv[], bool *json, bool *no_wait,
               bool *force)
{
  struct colod_options *o = &colod.opt;
  int c, tls_modes = 0;

  o->interval_ms = COLOD_DEFAULT_INTERVAL_MS;
  o->hb_interval_ms = COLOD_DEFAULT_HB_INTERVAL_MS;
  o->hb_timeout_ms = COLOD_DEFAULT_HB_TIMEOUT_MS;
  o->tls.handshake_timeout_ms = COLOD_DEFAULT_HANDSHAKE_TIMEOUT_MS;
  o->max_extent = COLOD_DEFAULT_MAX_EXTENT;
  while ((c = getopt_long (argc, argv, "vhV", long_options, NULL)) != -1) {
    switch (c) {
    case OPT_LISTEN: o->listen = optarg; break;
    case OPT_DISK: o->disk = optarg; break;
    case OPT_STATE: o->state_dir = optarg; break;
    case OPT_FLEECE: o->fleece_socket = optarg; break;
    case OPT_NBD: o->nbd_uri = optarg; break;
    case OPT_PEER: o->peer = optarg; break;
    case OPT_INTERVAL:
      if (parse_ms ("--interval", optarg, 0, &o->interval_ms) == -1)
        return -1;
      break;
    case OPT_HB_INTERVAL:
      if (parse_ms ("--hb-interval", optarg, 10, &o->hb_interval_ms) == -1)
        return -1;
      break;
    case OPT_HB_TIMEOUT:
      if (parse_ms ("--hb-timeout", optarg, 50, &o->hb_timeout_ms) == -1)
        return -1;
      break;
    case OPT_HANDSHAKE_TIMEOUT:
      if (parse_ms ("--handshake-timeout", optarg, 100,
                    &o->tls.handshake_timeout_ms) == -1)
        return -1;
      break;
    case OPT_AUTO_FAILOVER: o->auto_failover = true; break;
    case OPT_ON_PROMOTE: o->on_promote = optarg; break;
    case OPT_PROMOTE_STORE: o->promote_store = optarg; break;
    case OPT_DISCARD: o->discard_diverged = true; break;
    case OPT_CONTROL: o->control = optarg; break;
    case OPT_MAX_EXTENT: {
      char *end;
      unsigned long v = strtoul (optarg, &end, 0);
      if (*end || v < 4096 || v > COLO_WIRE_MAX_EXTENT || (v & (v - 1))) {
        fprintf (stderr, "fleece-colod: --max-extent: '%s' is not a power "
                 "of two from 4096 to %u\n", optarg, COLO_WIRE_MAX_EXTENT);
        return -1;
      }
      o->max_extent = v;
      break;
    }
    case OPT_TLS_CERTS: o->tls.certificates = optarg; tls_modes++; break;
    case OPT_TLS_PSK: o->tls.psk_file = optarg; tls_modes++; break;
    case OPT_TLS_USER: o->tls.psk_username = optarg; break;
    case OPT_INSECURE: o->tls.insecure = true; tls_modes++; break;
    case OPT_NO_VERIFY: o->tls.no_verify_hostname = true; break;
    case OPT_PRIORITY: o->tls.priority = optarg; break;
    case OPT_JSON: *json = true; break;
    case OPT_NO_WAIT: *no_wait = true; break;
    case OPT_FORCE: *force = true; break;
    case OPT_DEBUG:
      if (parse_debug (optarg) == -1)
        return -1;
      break;
    case 'v': o->verbose = true; break;
    case 'h': usage (stdout); exit (0);
    case 'V': printf ("fleece-colod %s\n", PACKAGE_VERSION); exit (0);
    default:                    /* getopt said what */
      fprintf (stderr, "Try 'fleece-colod --help' for more "
               "information.\n");
      return -1;
    }
  }
  if (optind != argc) {
    fprintf (stderr, "fleece-colod: unexpected argument '%s'\n",
             argv[optind]);
    return -1;
  }
  if (o->state_dir == NULL) {
    fprintf (stderr, "fleece-colod %s: --state DIR is required\n", o->role);
    return -1;
  }
  if ((strcmp (o->role, "primary") == 0 ||
       strcmp (o->role, "secondary") == 0) && tls_modes != 1) {
    fprintf (stderr, "fleece-colod %s: give exactly one of "
             "--tls-certificates DIR, --tls-psk FILE and --insecure (the "
             "last one only on a network you trust: it sends the disk in "
             "the clear)\n", o->role);
    return -1;
  }
  if (o->hb_timeout_ms <= o->hb_interval_ms) {
    fprintf (stderr, "fleece-colod: --hb-timeout (%d ms) must be longer "
             "than --hb-interval (%d ms)\n", o->hb_timeout_ms,
             o->hb_interval_ms);
    return -1;
  }
  return 0;
}

static void
on_signal (int sig)
{
  (void) sig;
  colod.stop = 1;
}

static bool
known_role (const char *role)
{
  static const char *const roles[] = {
    "secondary", "primary", "demote", "status", "checkpoint", "promote",
    "events", NULL
  };
  size_t i;

  for (i = 0; roles[i]; i++)
    if (strcmp (role, roles[i]) == 0)
      return true;
  return false;
}

static int
require (const char *what, const char *value)
{
  if (value == NULL) {
    fprintf (stderr, "fleece-colod %s: %s is required\n", colod.opt.role,
             what);
    return -1;
  }
  return 0;
}

int
main (int argc, char *argv[])
{
  bool json = false, no_wait = false, force = false;
  char ctlpath[PATH_MAX];
  struct sigaction sa = { .sa_handler = on_signal };
  int r;

  argv[0] = (char *) "fleece-colod";    /* for getopt's messages */
  if (argc < 2)
    return usage_error ("no subcommand given");
  if (argv[1][0] == '-') {
    if (strcmp (argv[1], "--help") == 0 || strcmp (argv[1], "-h") == 0) {
      usage (stdout);
      return 0;
    }
    if (strcmp (argv[1], "--version") == 0 || strcmp (argv[1], "-V") == 0) {
      printf ("fleece-colod %s\n", PACKAGE_VERSION);
      return 0;
    }
    return usage_error ("expected a subcommand before '%s'", argv[1]);
  }
  colod.opt.role = argv[1];
  if (!known_role (colod.opt.role))
    return usage_error ("unknown subcommand '%s'", colod.opt.role);
  optind = 2;
  if (parse_options (argc, argv, &json, &no_wait, &force) == -1)
    return COLOD_EXIT_USAGE;
  if (colod.opt.control == NULL) {
    snprintf (ctlpath, sizeof ctlpath, "%s/control.sock",
              colod.opt.state_dir);
    colod.opt.control = ctlpath;
  }
  if (strcmp (colod.opt.role, "status") == 0)
    return client ("query-status", NULL, !json);
  if (strcmp (colod.opt.role, "checkpoint") == 0)
    return client ("checkpoint", no_wait ? json_pack ("{s:b}", "wait", 0)
                   : NULL, false);
  if (strcmp (colod.opt.role, "promote") == 0)
    return client ("promote", force ? json_pack ("{s:b}", "force", 1)
                   : NULL, false);
  if (strcmp (colod.opt.role, "events") == 0)
    return events_client ();

  sigaction (SIGTERM, &sa, NULL);
  sigaction (SIGINT, &sa, NULL);
  signal (SIGPIPE, SIG_IGN);
  colod.st.role = colod.opt.role;
  colod.st.connection = "disconnected";
  colod.st.rtt_us = -1;
  if (strcmp (colod.opt.role, "demote") == 0) {
    if (require ("--fleece SOCKET", colod.opt.fleece_socket) == -1 ||
        require ("--nbd URI", colod.opt.nbd_uri) == -1)
      return COLOD_EXIT_USAGE;
    return colod_demote ();
  }
  if (strcmp (colod.opt.role, "primary") == 0) {
    if (require ("--fleece SOCKET", colod.opt.fleece_socket) == -1 ||
        require ("--nbd URI", colod.opt.nbd_uri) == -1 ||
        require ("--peer ADDR:PORT", colod.opt.peer) == -1)
      return COLOD_EXIT_USAGE;
    colod.opt.tls.role = COLO_TLS_CLIENT;
    r = colod_run_primary ();
  }
  else if (strcmp (colod.opt.role, "secondary") == 0) {
    if (require ("--listen ADDR:PORT", colod.opt.listen) == -1 ||
        require ("--disk PATH", colod.opt.disk) == -1)
      return COLOD_EXIT_USAGE;
    colod.opt.tls.role = COLO_TLS_SERVER;
    r = colod_run_secondary ();
  }
  else
    abort ();                   /* known_role */
  colod_control_stop ();
  return r;
}
