/* libfleececlient: the control socket client (ctl-client.h).
 *
 * The protocol is docs/control-protocol.md: the server greets, then
 * answers each {"execute":...} line with one line carrying "return" or
 * "error", and may put event lines ({"event":...}) between replies at any
 * time.  A client sends one request at a time, so the next line that is
 * not an event is the reply to the request just sent.  Events met while
 * waiting are dropped, unless the client subscribed (ctlc_subscribe):
 * then they are queued, in order, for ctlc_next_event, so that an event
 * that comes just before the subscription's reply is not lost.
 *
 * The connection is one stream socket in both cases: the server's own
 * (ctlc_connect), or one end of a socketpair whose other end is a child
 * command's stdin and stdout (ctlc_spawn, for ssh and fleecectl relay).
 * A socket, not pipes, so that one file descriptor carries both
 * directions and MSG_NOSIGNAL keeps a dead peer from raising SIGPIPE.
 *
 * Every wait is bounded by the client's timeout, so that a wedged server
 * never hangs a caller; lines are bounded by CTLC_MAX_LINE.
 *
 * ctlc_relay is the other end of ctlc_spawn over ssh: a byte copy in
 * both directions that never parses what it carries.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "deadline.h"
#include "monotonic.h"
#include "vector.h"
#include "ctl-client.h"
#include "messages.h"

#define CTLC_MAX_LINE (64 * 1024 * 1024)  /* longest line accepted */
#define CTLC_REAP_MS  5000                /* a child's time to exit */

extern char **environ;

struct ctlc_event {
  json_t *event;
  char *text;
};
DEFINE_VECTOR_TYPE (ctlc_event_vector, struct ctlc_event);

struct ctlc {
  /* Set when the client is made, then constant. */
  int fd;
  char *name;                   /* the path or the command's name */
  int64_t timeout_ms;           /* -1: none */
  /* The spawned command until it is reaped, then (or else) -1. */
  pid_t pid;
  /* The state of the conversation.  One thread at a time uses a client. */
  const char *label;            /* what messages call the command */
  unsigned next_id;
  bool keep_events;             /* subscribed: queue events */
  bool closed;                  /* the server closed its end */
  ctlc_event_vector events;     /* queued, from index events_head */
  size_t events_head;
  char *buf;                    /* received, not yet returned */
  size_t len, cap;
};

/* ---- the child of ctlc_spawn ---- */

/* Wait at most ms for the child; returns true once it is reaped, with
 * its status in *status.
 */
static bool
reap_within (struct ctlc *c, int ms, int *status)
{
  int64_t deadline = monotonic_ms () + ms;
  struct timespec pause = { 0, 10 * 1000 * 1000 };
  pid_t r;

  for (;;) {
    r = waitpid (c->pid, status, WNOHANG);
    if (r == c->pid || (r == -1 && errno != EINTR)) {
      c->pid = -1;
      return r != -1;
    }
    if (monotonic_ms () >= deadline)
      return false;
    nanosleep (&pause, NULL);
  }
}

/* After the connection closed: how the child ended, as " (...)" for a
 * message, or "" if it was not spawned or has not exited yet.
 */
static void
child_end (struct ctlc *c, char *buf, size_t n)
{
  int status;

  *buf = '\0';
  if (c->pid <= 0 || !reap_within (c, 1000, &status))
    return;
  if (WIFEXITED (status))
    snprintf (buf, n, " (the command exited with status %d)",
              WEXITSTATUS (status));
  else if (WIFSIGNALED (status))
    snprintf (buf, n, " (the command was killed by signal %d)",
              WTERMSIG (status));
}

/* ---- lines ---- */

/* Read one line (without its newline) into *line, malloc'ed.  Returns
 * 1, 0 on timeout, -1 on error (what names the request in messages).
 */
static int
read_line (struct ctlc *c, int64_t deadline, const char *what, char **line,
           char *err, size_t errlen)
{
  char *nl, end[128];
  ssize_t n;
  int r;

  while ((nl = c->len ? memchr (c->buf, '\n', c->len) : NULL) == NULL) {
    if (c->len == c->cap) {
      char *p;
      if (c->cap >= CTLC_MAX_LINE)
        return seterr (err, errlen, "control socket %s: %s: a line longer "
                       "than %d bytes", c->name, what, CTLC_MAX_LINE);
      p = realloc (c->buf, c->cap ? c->cap * 2 : 65536);
      if (p == NULL)
        return seterr (err, errlen, "control socket %s: %s: realloc: %m",
                       c->name, what);
      c->buf = p;
      c->cap = c->cap ? c->cap * 2 : 65536;
    }
    r = wait_fd_until (c->fd, POLLIN, deadline);
    if (r == -1)
      return seterr (err, errlen, "control socket %s: %s: poll: %m",
                     c->name, what);
    if (r == 0)
      return 0;
    n = recv (c->fd, c->buf + c->len, c->cap - c->len, 0);
    if (n == -1 && errno != EINTR && errno != EAGAIN)
      return seterr (err, errlen, "control socket %s: %s: read: %m",
                     c->name, what);
    if (n == 0) {
      c->closed = true;
      child_end (c, end, sizeof end);
      return seterr (err, errlen, "control socket %s: %s: the server "
                     "closed the connection%s", c->name, what, end);
    }
    if (n > 0)
      c->len += n;
  }
  *line = strndup (c->buf, nl - c->buf);
  if (*line == NULL)
    return seterr (err, errlen, "control socket %s: %s: strndup: %m",
                   c->name, what);
  c->len -= nl - c->buf + 1;
  memmove (c->buf, nl + 1, c->len);
  return 1;
}

/* The next line, parsed as a JSON object.  Returns 1, 0 on timeout (with
 * the message in err, for callers to whom it is an error), -1.
 */
static int
read_object (struct ctlc *c, int64_t deadline, const char *what,
             json_t **v, char **text, char *err, size_t errlen)
{
  json_error_t jerr;
  char *line;
  int r;

  r = read_line (c, deadline, what, &line, err, errlen);
  if (r == 0 && c->timeout_ms % 1000 == 0)
    seterr (err, errlen, "control socket %s: %s: no reply within %" PRId64
            " s", c->name, what, c->timeout_ms / 1000);
  else if (r == 0)
    seterr (err, errlen, "control socket %s: %s: no reply within %" PRId64
            " ms", c->name, what, c->timeout_ms);
  if (r <= 0)
    return r;
  *v = json_loads (line, 0, &jerr);
  if (*v == NULL || !json_is_object (*v)) {
    seterr (err, errlen, "control socket %s: %s: malformed reply: %s",
            c->name, what, *v ? "not a JSON object" : jerr.text);
    json_decref (*v);
    free (line);
    return -1;
  }
  if (text)
    *text = line;
  else
    free (line);
  return 1;
}

static int
queue_event (struct ctlc *c, json_t *ev, char *text, char *err,
             size_t errlen)
{
  struct ctlc_event e = { .event = ev, .text = text };

  if (ctlc_event_vector_append (&c->events, e) == -1) {
    json_decref (ev);
    free (text);
    return seterr (err, errlen, "control socket %s: queueing an event: %m",
                   c->name);
  }
  return 0;
}

/* The next line that is not an event, within the client's timeout. */
static json_t *
read_reply (struct ctlc *c, const char *what, char **text, char *err,
            size_t errlen)
{
  int64_t deadline = deadline_after (c->timeout_ms);
  char *line;
  json_t *v;

  for (;;) {
    if (read_object (c, deadline, what, &v, &line, err, errlen) <= 0)
      return NULL;
    if (json_object_get (v, "event") == NULL)
      break;
    if (c->keep_events) {
      if (queue_event (c, v, line, err, errlen) == -1)
        return NULL;
    }
    else {
      json_decref (v);
      free (line);
    }
  }
  if (text)
    *text = line;
  else
    free (line);
  return v;
}

static int
send_all (struct ctlc *c, const char *what, const char *p, size_t len,
          char *err, size_t errlen)
{
  ssize_t n;

  while (len > 0) {
    n = send (c->fd, p, len, MSG_NOSIGNAL);
    if (n == -1 && errno == EINTR)
      continue;
    if (n == -1)
      return seterr (err, errlen, "control socket %s: %s: write: %m",
                     c->name, what);
    p += n;
    len -= n;
  }
  return 0;
}

/* The line and its newline in one send: sent apart, the server may wake
 * for the line, find no newline and sleep again until the newline comes,
 * a second wake-up on the path of every request (a group's commit among
 * them, while writers are held).
 */
int
ctlc_send_line (struct ctlc *c, const char *line, char *err, size_t errlen)
{
  const char *what = c->label ? c->label : "request";
  size_t len = strlen (line);
  char *buf = malloc (len + 1);
  int r;

  if (buf == NULL)
    return seterr (err, errlen, "control socket %s: %s: malloc: %m",
                   c->name, what);
  memcpy (buf, line, len);
  buf[len] = '\n';
  r = send_all (c, what, buf, len + 1, err, errlen);
  free (buf);
  return r;
}

json_t *
ctlc_reply (struct ctlc *c, char **text, char *err, size_t errlen)
{
  return read_reply (c, c->label ? c->label : "request", text, err,
                     errlen);
}

/* ---- opening and closing ---- */

static struct ctlc *
client_new (const char *name, int64_t timeout_ms, char *err,
            size_t errlen)
{
  struct ctlc *c = calloc (1, sizeof *c);

  if (c == NULL || (c->name = strdup (name)) == NULL) {
    free (c);
    seterr (err, errlen, "control socket %s: calloc: %m", name);
    return NULL;
  }
  c->fd = -1;
  c->pid = -1;
  c->timeout_ms = timeout_ms;
  c->next_id = 1;
  return c;
}

/* Read the greeting; a server that refuses us says why instead. */
static int
greeting (struct ctlc *c, char *err, size_t errlen)
{
  const char *desc;
  json_t *g;
  int r = 0;

  g = read_reply (c, "greeting", NULL, err, errlen);
  if (g == NULL)
    return -1;
  if (json_unpack (g, "{s:{s:s}}", "error", "desc", &desc) == 0)
    r = seterr (err, errlen, "control socket %s: %s", c->name, desc);
  else if (json_object_get (g, "QMP") == NULL)
    r = seterr (err, errlen, "control socket %s: not a Fleece control "
                "socket (unexpected greeting)", c->name);
  json_decref (g);
  return r;
}

/* A connected stream socket to path, or -1 with the reason in err. */
static int
connect_unix (const char *path, char *err, size_t errlen)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd;

  if (strlen (path) >= sizeof sun.sun_path)
    return seterr (err, errlen, "control socket %s: connect: the path is "
                   "longer than %zu bytes", path, sizeof sun.sun_path - 1);
  strcpy (sun.sun_path, path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd == -1)
    return seterr (err, errlen, "control socket %s: socket: %m", path);
  if (connect (fd, (struct sockaddr *) &sun, sizeof sun) == -1) {
    seterr (err, errlen, "control socket %s: connect: %m", path);
    close (fd);
    return -1;
  }
  return fd;
}

struct ctlc *
ctlc_connect (const char *path, int64_t timeout_ms, char *err,
              size_t errlen)
{
  struct ctlc *c = client_new (path, timeout_ms, err, errlen);

  if (c == NULL)
    return NULL;
  c->fd = connect_unix (path, err, errlen);
  if (c->fd == -1 || greeting (c, err, errlen) == -1) {
    ctlc_close (c);
    return NULL;
  }
  return c;
}

/* Start argv with fd as its stdin and stdout.  The child starts with
 * SIGPIPE at its default and no signal blocked, whatever the caller set
 * for itself (fleece-colod ignores SIGPIPE, and its threads may block
 * signals).  Returns 0, or an errno value.
 */
static int
spawn_child (int fd, char *const argv[], pid_t *pid)
{
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  sigset_t none, pipe;
  int e;

  sigemptyset (&none);
  sigemptyset (&pipe);
  sigaddset (&pipe, SIGPIPE);
  e = posix_spawn_file_actions_init (&fa);
  if (e != 0)
    return e;
  e = posix_spawnattr_init (&attr);
  if (e != 0)
    goto out_fa;
  if ((e = posix_spawn_file_actions_adddup2 (&fa, fd, 0)) == 0 &&
      (e = posix_spawn_file_actions_adddup2 (&fa, fd, 1)) == 0 &&
      (e = posix_spawnattr_setsigdefault (&attr, &pipe)) == 0 &&
      (e = posix_spawnattr_setsigmask (&attr, &none)) == 0 &&
      (e = posix_spawnattr_setflags (&attr, POSIX_SPAWN_SETSIGDEF |
                                     POSIX_SPAWN_SETSIGMASK)) == 0)
    e = posix_spawnp (pid, argv[0], &fa, &attr, argv, environ);
  posix_spawnattr_destroy (&attr);
 out_fa:
  posix_spawn_file_actions_destroy (&fa);
  return e;
}

struct ctlc *
ctlc_spawn (const char *name, char *const argv[], int64_t timeout_ms,
            char *err, size_t errlen)
{
  struct ctlc *c = client_new (name, timeout_ms, err, errlen);
  int sv[2], e;

  if (c == NULL)
    return NULL;
  if (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == -1) {
    seterr (err, errlen, "control socket %s: socketpair: %m", name);
    goto fail;
  }
  c->fd = sv[0];
  e = spawn_child (sv[1], argv, &c->pid);
  if (e != 0)
    c->pid = -1;
  close (sv[1]);
  if (e != 0) {
    errno = e;
    seterr (err, errlen, "control socket %s: %s: %m", name, argv[0]);
    goto fail;
  }
  if (greeting (c, err, errlen) == -1)
    goto fail;
  return c;
 fail:
  ctlc_close (c);
  return NULL;
}

void
ctlc_close (struct ctlc *c)
{
  int status;
  size_t i;

  if (c == NULL)
    return;
  if (c->fd >= 0)
    close (c->fd);
  /* The command sees its stdin end and should exit; one that does not
   * is killed, so that closing never hangs.
   */
  if (c->pid > 0 && !reap_within (c, CTLC_REAP_MS, &status)) {
    kill (c->pid, SIGKILL);
    while (waitpid (c->pid, &status, 0) == -1 && errno == EINTR)
      ;
  }
  for (i = c->events_head; i < c->events.len; i++) {
    json_decref (c->events.ptr[i].event);
    free (c->events.ptr[i].text);
  }
  ctlc_event_vector_reset (&c->events);
  free (c->buf);
  free (c->name);
  free (c);
}

bool
ctlc_closed (const struct ctlc *c)
{
  return c->closed;
}

void
ctlc_set_label (struct ctlc *c, const char *label)
{
  c->label = label;
}

/* ---- requests and events ---- */

json_t *
ctlc_execute (struct ctlc *c, const char *cmd, json_t *args, char *err,
              size_t errlen)
{
  const char *what = c->label ? c->label : cmd, *desc;
  char *line = NULL;
  json_t *req, *reply, *ret;
  int r;

  req = json_pack ("{s:s,s:o*,s:I}", "execute", cmd, "arguments", args,
                   "id", (json_int_t) c->next_id++);
  if (req)
    line = json_dumps (req, JSON_COMPACT);
  json_decref (req);
  if (line == NULL) {
    seterr (err, errlen, "%s: the request cannot be made (arguments not "
            "valid UTF-8, or out of memory)", what);
    return NULL;
  }
  r = send_all (c, what, line, strlen (line), err, errlen);
  free (line);
  if (r == -1 || send_all (c, what, "\n", 1, err, errlen) == -1)
    return NULL;
  reply = read_reply (c, what, NULL, err, errlen);
  if (reply == NULL)
    return NULL;
  if (json_unpack (reply, "{s:{s:s}}", "error", "desc", &desc) == 0) {
    seterr (err, errlen, "%s: %s", what, desc);
    json_decref (reply);
    return NULL;
  }
  ret = json_object_get (reply, "return");
  if (ret == NULL) {
    seterr (err, errlen, "control socket %s: %s: malformed reply: neither "
            "\"return\" nor \"error\"", c->name, what);
    json_decref (reply);
    return NULL;
  }
  json_incref (ret);
  json_decref (reply);
  return ret;
}

int
ctlc_subscribe (struct ctlc *c, char *err, size_t errlen)
{
  json_t *r;

  c->keep_events = true;
  r = ctlc_execute (c, "subscribe-events", NULL, err, errlen);
  if (r == NULL)
    return -1;
  json_decref (r);
  return 0;
}

int
ctlc_next_event (struct ctlc *c, int64_t deadline_ms, json_t **event,
                 char **text, char *err, size_t errlen)
{
  char *line;
  json_t *v;
  int r;

  if (c->events_head < c->events.len) {
    struct ctlc_event *e = &c->events.ptr[c->events_head++];
    *event = e->event;
    if (text)
      *text = e->text;
    else
      free (e->text);
    if (c->events_head == c->events.len)
      c->events.len = c->events_head = 0;
    return 1;
  }
  for (;;) {
    r = read_object (c, deadline_ms, "events", &v, &line, err, errlen);
    if (r <= 0)
      return r;
    if (json_object_get (v, "event"))
      break;
    json_decref (v);            /* not an event: a stray reply */
    free (line);
  }
  *event = v;
  if (text)
    *text = line;
  else
    free (line);
  return 1;
}

/* ---- relay ---- */

/* One direction of the relay: bytes read from `from', not yet written
 * to `to'.
 */
struct relay_dir {
  int from, to;
  char buf[65536];
  size_t off, len;
  bool eof;
};

/* Move what can move without blocking on the socket.  Returns 1 while
 * the direction is open, 0 once it ended, -1 on error.
 */
static int
relay_step (struct relay_dir *d, const struct pollfd *in,
            const struct pollfd *out, int sock, const char *path,
            char *err, size_t errlen)
{
  ssize_t n;

  if (d->len == 0 && !d->eof &&
      (in->revents & (POLLIN | POLLHUP | POLLERR))) {
    n = d->from == sock ? recv (sock, d->buf, sizeof d->buf, MSG_DONTWAIT)
      : read (d->from, d->buf, sizeof d->buf);
    if (n == -1 && errno != EINTR && errno != EAGAIN)
      return seterr (err, errlen, "relay %s: read from %s: %m", path,
                     d->from == sock ? "the socket" : "stdin");
    if (n == 0)
      d->eof = true;
    if (n > 0) {
      d->off = 0;
      d->len = n;
    }
  }
  else if (d->len > 0 && (out->revents & (POLLOUT | POLLHUP | POLLERR))) {
    n = d->to == sock
      ? send (sock, d->buf + d->off, d->len, MSG_DONTWAIT | MSG_NOSIGNAL)
      : write (d->to, d->buf + d->off, d->len);
    if (n == -1 && (errno == EPIPE || errno == ECONNRESET)) {
      /* The reader is gone: stdout's (the client went away), or the
       * server's (it closed; the other direction reads its end).
       */
      d->len = 0;
      d->eof = true;
      return 0;
    }
    if (n == -1 && errno != EINTR && errno != EAGAIN)
      return seterr (err, errlen, "relay %s: write to %s: %m", path,
                     d->to == sock ? "the socket" : "stdout");
    if (n > 0) {
      d->off += n;
      d->len -= n;
    }
  }
  return !(d->eof && d->len == 0);
}

int
ctlc_relay (const char *path, int in_fd, int out_fd, char *err,
            size_t errlen)
{
  struct relay_dir up = { .from = in_fd }, down = { .to = out_fd };
  bool up_open = true;
  int sock, r = -1;

  sock = connect_unix (path, err, errlen);
  if (sock == -1)
    return -1;
  up.to = down.from = sock;
  for (;;) {
    struct pollfd p[4] = {
      { .fd = up_open && up.len == 0 && !up.eof ? in_fd : -1,
        .events = POLLIN },
      { .fd = up_open && up.len > 0 ? sock : -1, .events = POLLOUT },
      { .fd = down.len == 0 && !down.eof ? sock : -1, .events = POLLIN },
      { .fd = down.len > 0 ? out_fd : -1, .events = POLLOUT },
    };
    int s;

    if (poll (p, 4, -1) == -1) {
      if (errno == EINTR)
        continue;
      seterr (err, errlen, "relay %s: poll: %m", path);
      break;
    }
    if (up_open) {
      s = relay_step (&up, &p[0], &p[1], sock, path, err, errlen);
      if (s == -1)
        break;
      if (s == 0) {
        /* stdin ended: the server answers what it has, then closes. */
        up_open = false;
        shutdown (sock, SHUT_WR);
      }
    }
    s = relay_step (&down, &p[2], &p[3], sock, path, err, errlen);
    if (s == -1)
      break;
    if (s == 0) {
      r = 0;
      break;
    }
  }
  close (sock);
  return r;
}
