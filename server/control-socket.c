/* The control service's socket: a line server for control.c's commands
 * (docs/control-protocol.md).
 *
 * Service.  One thread runs a poll() loop over a self-pipe, the listening
 * socket and at most CTL_MAX_CLIENTS clients, all non-blocking, so that
 * nothing one client does can stall another:
 *   - Input goes to a buffer of CTL_MAX_LINE + 1 bytes.  A line that does
 *     not fit is answered with one error and the rest of it is discarded
 *     as it arrives: a line of megabytes costs no memory.
 *   - Replies and events go to a per-client output buffer, written as the
 *     socket accepts them.  While more than CTL_OUT_HIGH bytes wait, the
 *     client's next requests wait too (a client that pipelines without
 *     reading slows only itself).  Events cannot wait: a client whose
 *     buffer would grow beyond CTL_OUT_MAX is dropped.
 *   - Commands run on the service thread.  The slowest is snapshot
 *     creation, which waits for the live writes in flight: other clients
 *     wait that long, never longer.  A group hold (group.c) outlives its
 *     command: the loop's poll is bounded by its deadline, and reaping
 *     the client that prepared it releases it.
 *   - While a group holds the writes, most of the hold is this thread
 *     and the coordinator waiting for a CPU (docs/design.md): the thread
 *     is named fleece-ctl, so that top -H and perf sched show it, and
 *     asks for a short scheduler slice (slice.h), so that it preempts a
 *     writer when a request wakes it.
 *
 * Events.  The engine calls ctl_event with its locks held, from an I/O
 * thread.  It copies the event into one allocation, appends it to a
 * queue bounded by CTL_MAX_EVENTS (beyond that events are dropped and
 * counted, never waited for: the service then logs a warning and sends
 * EVENTS_DROPPED, with the count of each kind, after the events it
 * delivers) and writes a byte to the self-pipe; the
 * service thread formats the event, has the program log it (struct
 * ctl_info's log_event) and sends it to every client.  Events are not
 * kept for clients that connect later: the log keeps them.
 *
 * Lifetime.  ctl_open runs before nbdkit forks: it creates the socket,
 * the self-pipe and registers the listener, but starts no thread (threads
 * do not survive fork).  ctl_start starts the service thread with every
 * signal blocked, so signals go to nbdkit's threads.  ctl_close
 * unregisters the listener, stops the thread through the self-pipe, joins
 * it, and unlinks the socket only if it is still the one it created.
 */


#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "control-internal.h"
#include "slice.h"

#define CTL_IN_SIZE    (CTL_MAX_LINE + 1)
#define CTL_OUT_HIGH   (1024 * 1024)     /* stop reading requests above */
#define CTL_OUT_MAX    (8 * 1024 * 1024) /* drop the client above */
#define CTL_MAX_EVENTS 1024              /* queued, not yet delivered */
#define CTL_ACCEPT_PAUSE_NS (100 * 1000 * 1000)

/* An event from the engine, strings in the same allocation. */
struct ctl_event {
  struct ctl_event *next;
  struct timespec ts;
  const char *key;              /* "snapshot" or "group": a literal */
  const char *event, *snapshot, *reason;
  char strings[];
};

/* A connected client.  Only the service thread touches it. */
struct ctl_client {
  int fd;
  uint64_t since_ns;            /* connected, or its last request */
  bool requested;               /* it has sent a complete request */
  bool subscribed;              /* subscribe-events: kept however idle */
  bool eof;                     /* the client shut down its side */
  bool dead;                    /* close at the end of this round */
  bool discarding;              /* skipping the rest of a too-long line */
  char *out;                    /* bytes [outoff, outlen) wait to be sent */
  size_t outoff, outlen, outcap;
  size_t inlen;
  char in[CTL_IN_SIZE];
};

/* ---- Clients ---- */

/* The command that runs is subscribe-events: keep its client. */
void
ctl_subscribe_current (struct ctl *ctl)
{
  if (ctl->current)
    ctl->current->subscribed = true;
}

static size_t
pending (const struct ctl_client *c)
{
  return c->outlen - c->outoff;
}

/* Write what the socket accepts now. */
static void
client_flush (struct ctl_client *c)
{
  while (pending (c) > 0) {
    ssize_t n = send (c->fd, c->out + c->outoff, pending (c),
                      MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n == -1) {
      if (errno == EINTR)
        continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        fl_debug ("control: send to client: %m: dropping the client");
        c->dead = true;
      }
      return;
    }
    c->outoff += n;
  }
  c->outoff = c->outlen = 0;
}

/* Queue line and a newline, then write what the socket accepts. */
static void
client_send (struct ctl_client *c, const char *line)
{
  size_t len = strlen (line);

  if (c->dead)
    return;
  if (pending (c) + len + 1 > CTL_OUT_MAX) {
    fl_debug ("control: client does not read its replies and events "
              "(%zu bytes pending): dropping it", pending (c));
    c->dead = true;
    return;
  }
  if (c->outlen + len + 1 > c->outcap) {
    size_t cap = c->outcap ? c->outcap : 4096;
    char *p;

    if (c->outoff > 0) {
      memmove (c->out, c->out + c->outoff, pending (c));
      c->outlen -= c->outoff;
      c->outoff = 0;
    }
    while (cap < c->outlen + len + 1)
      cap *= 2;
    p = cap == c->outcap ? c->out : realloc (c->out, cap);
    if (p == NULL) {
      fl_debug ("control: out of memory for a client's output: dropping it");
      c->dead = true;
      return;
    }
    c->out = p;
    c->outcap = cap;
  }
  memcpy (c->out + c->outlen, line, len);
  c->out[c->outlen + len] = '\n';
  c->outlen += len + 1;
  client_flush (c);
}

static void
client_send_error (struct ctl_client *c, const char *desc)
{
  char *line = ctl_make_reply (NULL, "GenericError", desc, NULL);

  client_send (c, line ? line : "{\"error\":{\"class\":\"GenericError\","
               "\"desc\":\"out of memory\"}}");
  free (line);
}

static bool
is_blank (const char *p, size_t len)
{
  size_t i;

  for (i = 0; i < len; i++)
    if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r')
      return false;
  return true;
}

static void
client_request (struct ctl *ctl, struct ctl_client *c, const char *line,
                size_t len)
{
  char *reply;

  if (is_blank (line, len))
    return;
  c->requested = true;
  c->since_ns = monotonic_ns ();
  ctl->current = c;
  reply = ctl_handle_line (ctl, line, len);
  ctl->current = NULL;
  if (reply == NULL) {
    client_send_error (c, "out of memory");
    return;
  }
  client_send (c, reply);
  free (reply);
}

/* Handle the complete lines in c->in while the client reads its replies;
 * deal with a line that is too long, and with end of input.
 */
static void
client_process (struct ctl *ctl, struct ctl_client *c)
{
  size_t start = 0;
  bool partial = false;         /* no newline in what is left */
  char *nl;

  while (!c->dead && pending (c) < CTL_OUT_HIGH) {
    nl = memchr (c->in + start, '\n', c->inlen - start);
    if (nl == NULL) {
      partial = true;
      break;
    }
    if (!c->discarding)
      client_request (ctl, c, c->in + start, nl - (c->in + start));
    c->discarding = false;
    start = nl - c->in + 1;
  }
  c->inlen -= start;
  memmove (c->in, c->in + start, c->inlen);
  if (!partial || c->dead)
    return;
  if (c->discarding)
    c->inlen = 0;
  else if (c->inlen > CTL_MAX_LINE) {
    char msg[64];
    snprintf (msg, sizeof msg, "request line too long: more than %d bytes",
              CTL_MAX_LINE);
    client_send_error (c, msg);
    c->discarding = true;
    c->inlen = 0;
  }
  else if (c->eof && c->inlen > 0) {
    /* The last line had no newline: answer it all the same. */
    client_request (ctl, c, c->in, c->inlen);
    c->inlen = 0;
  }
}

static void
client_read (struct ctl *ctl, struct ctl_client *c)
{
  ssize_t n;

  if (c->eof || c->inlen == CTL_IN_SIZE)
    return;
  n = recv (c->fd, c->in + c->inlen, CTL_IN_SIZE - c->inlen, 0);
  if (n == -1) {
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      fl_debug ("control: recv from client: %m: dropping the client");
      c->dead = true;
    }
    return;
  }
  if (n == 0)
    c->eof = true;
  c->inlen += n;
  client_process (ctl, c);
}

static void
client_free (struct ctl_client *c)
{
  close (c->fd);
  free (c->out);
  free (c);
}

/* Refuse a connection with one error line (the socket is new: its
 * buffer has room) and close it.
 */
static void
refuse (int fd, const char *desc)
{
  char *line = ctl_make_reply (NULL, "GenericError", desc, NULL);

  fl_debug ("control: refusing a client: %s", desc);
  if (line) {
    size_t len = strlen (line);
    line[len] = '\n';           /* overwrites the terminating NUL */
    if (send (fd, line, len + 1, MSG_NOSIGNAL | MSG_DONTWAIT) == -1)
      fl_debug ("control: send to a refused client: %m");
    free (line);
  }
  close (fd);
}

/* ---- Idle clients ----
 *
 * A client that is not subscribed may be idle (no complete request) for
 * CTL_NEW_TIMEOUT_MS after it connects and CTL_IDLE_TIMEOUT_MS after each
 * request; then it is told why and closed.  And when CTL_MAX_CLIENTS are
 * connected, a new client takes the place of the one idle longest (at
 * least CTL_EVICT_IDLE_MS), so that forgotten or hostile connections
 * never lock fleecectl and fleece-colod out: a new client is answered at
 * once, not after a timeout.  Subscribers (fleecectl events) are never
 * closed for being idle.
 */

static void reap_clients (struct ctl *ctl);

static uint64_t
idle_limit_ns (const struct ctl_client *c)
{
  int ms = fleece_debug.ctl_idle_timeout_ms;

  if (ms <= 0)
    ms = c->requested ? CTL_IDLE_TIMEOUT_MS : CTL_NEW_TIMEOUT_MS;
  return (uint64_t) ms * 1000000;
}

/* Tell c why it goes (idle too long, or evicted to make room for a new
 * client), and close it at the end of this round.
 */
static void
client_drop_idle (struct ctl_client *c, uint64_t now, bool evicted)
{
  char msg[160];
  int n;

  n = snprintf (msg, sizeof msg, "closing the connection: %s for %" PRIu64
                " ms", c->requested ? "idle" : "no complete request",
                (now - c->since_ns) / 1000000);
  if (evicted && n > 0 && (size_t) n < sizeof msg)
    snprintf (msg + n, sizeof msg - n, ", and a new client needs its "
              "place (the limit is %d clients)", CTL_MAX_CLIENTS);
  fl_debug ("control: %s", msg);
  client_send_error (c, msg);
  c->dead = true;
}

/* Drop the clients idle too long; the milliseconds until the next one
 * is (for poll), or -1.
 */
static int
expire_clients (struct ctl *ctl)
{
  uint64_t now = monotonic_ns (), next = UINT64_MAX;
  size_t i;

  for (i = 0; i < ctl->nclients; i++) {
    struct ctl_client *c = ctl->clients[i];
    uint64_t end = c->since_ns + idle_limit_ns (c);

    if (c->subscribed || c->dead)
      continue;
    if (now >= end)
      client_drop_idle (c, now, false);
    else if (end < next)
      next = end;
  }
  reap_clients (ctl);
  if (next == UINT64_MAX)
    return -1;
  return (next - now) / 1000000 + 1;
}

/* All places taken: free the one of the client idle longest. */
static bool
evict_idle (struct ctl *ctl)
{
  uint64_t now = monotonic_ns ();
  struct ctl_client *v = NULL;
  size_t i;

  for (i = 0; i < ctl->nclients; i++) {
    struct ctl_client *c = ctl->clients[i];
    if (!c->subscribed && !c->dead &&
        now - c->since_ns >= (uint64_t) CTL_EVICT_IDLE_MS * 1000000 &&
        (v == NULL || c->since_ns < v->since_ns))
      v = c;
  }
  if (v == NULL)
    return false;
  client_drop_idle (v, now, true);
  reap_clients (ctl);
  return true;
}

/* May this connection become a client?  If not, says why in msg. */
static bool
client_allowed (struct ctl *ctl, int fd, char *msg, size_t size)
{
  struct ucred cred;
  socklen_t len = sizeof cred;

  if (getsockopt (fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == -1) {
    snprintf (msg, size, "getsockopt: SO_PEERCRED: %s", strerror (errno));
    return false;
  }
  if (cred.uid != 0 && cred.uid != geteuid ()) {
    snprintf (msg, size, "permission denied: uid %u may not use this "
              "control socket", (unsigned) cred.uid);
    return false;
  }
  if (ctl->nclients >= CTL_MAX_CLIENTS && !evict_idle (ctl)) {
    snprintf (msg, size, "too many clients: the limit is %d",
              CTL_MAX_CLIENTS);
    return false;
  }
  return true;
}

static void
add_client (struct ctl *ctl, int fd)
{
  struct ctl_client *c;
  char msg[128];

  if (!client_allowed (ctl, fd, msg, sizeof msg)) {
    refuse (fd, msg);
    return;
  }
  c = calloc (1, sizeof *c);
  if (c == NULL) {
    refuse (fd, "out of memory");
    return;
  }
  c->fd = fd;
  c->since_ns = monotonic_ns ();
  ctl->clients[ctl->nclients++] = c;
  client_send (c, ctl->greeting);
}

static void
accept_clients (struct ctl *ctl)
{
  int fd;

  for (;;) {
    fd = accept4 (ctl->listen_fd, NULL, NULL,
                  SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd == -1) {
      if (errno == EINTR || errno == ECONNABORTED)
        continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        /* EMFILE and friends: stop polling the socket for a while
         * rather than spin on it.
         */
        fl_debug ("control: accept: %s: %m", ctl->path);
        ctl->accept_paused_until = monotonic_ns () + CTL_ACCEPT_PAUSE_NS;
      }
      return;
    }
    add_client (ctl, fd);
  }
}

/* Close the clients that are dead or done. */
static void
reap_clients (struct ctl *ctl)
{
  size_t i = 0;

  while (i < ctl->nclients) {
    struct ctl_client *c = ctl->clients[i];
    if (c->eof && c->inlen == 0 && pending (c) == 0)
      c->dead = true;
    if (c->dead) {
      ctl_group_client_gone (ctl, c);
      client_free (c);
      ctl->clients[i] = ctl->clients[--ctl->nclients];
    }
    else
      i++;
  }
}

/* ---- Events ---- */

static void
wake (struct ctl *ctl)
{
  /* A full pipe means the service is already woken. */
  if (write (ctl->wake_wr, "x", 1) == -1 && errno != EAGAIN)
    fl_debug ("control: write to the self-pipe: %m");
}

static size_t
max_events (void)
{
  return fleece_debug.ctl_max_events > 0
    ? (size_t) fleece_debug.ctl_max_events : CTL_MAX_EVENTS;
}

/* Count a dropped event; ev_lock held.  Event names come from the
 * engine and the group code as string literals.
 */
static void
count_dropped (struct ctl *ctl, const char *event)
{
  size_t i, n = sizeof ctl->dropped_kind / sizeof ctl->dropped_kind[0];

  ctl->events_dropped++;
  for (i = 0; i < n; i++) {
    if (ctl->dropped_kind[i].event == NULL)
      ctl->dropped_kind[i].event = event;
    if (strcmp (ctl->dropped_kind[i].event, event) == 0) {
      ctl->dropped_kind[i].n++;
      return;
    }
  }
}

/* Queue an event: called by the engine's listener with engine locks
 * held, so it only copies and queues.
 */
void
ctl_queue_event (struct ctl *ctl, const char *event, const char *key,
                 const char *snapshot, const char *reason)
{
  size_t le, ls, lr;
  struct ctl_event *ev;

  snapshot = snapshot ? snapshot : "";
  reason = reason ? reason : "";
  le = strlen (event) + 1;
  ls = strlen (snapshot) + 1;
  lr = strlen (reason) + 1;
  ev = malloc (sizeof *ev + le + ls + lr);
  if (ev == NULL) {
    pthread_mutex_lock (&ctl->ev_lock);
    count_dropped (ctl, event);
    pthread_mutex_unlock (&ctl->ev_lock);
    wake (ctl);
    return;
  }
  ev->next = NULL;
  ev->key = key;
  clock_gettime (CLOCK_REALTIME, &ev->ts);
  ev->event = memcpy (ev->strings, event, le);
  ev->snapshot = memcpy (ev->strings + le, snapshot, ls);
  ev->reason = memcpy (ev->strings + le + ls, reason, lr);
  pthread_mutex_lock (&ctl->ev_lock);
  if (ctl->nevents >= max_events ()) {
    count_dropped (ctl, event);
    free (ev);
  }
  else {
    *ctl->ev_tail = ev;
    ctl->ev_tail = &ev->next;
    ctl->nevents++;
  }
  pthread_mutex_unlock (&ctl->ev_lock);
  wake (ctl);
}

static void
ctl_event (void *opaque, const char *event, const char *snapshot,
           const char *reason)
{
  ctl_queue_event (opaque, event, "snapshot", snapshot, reason);
}

/* An event's line: its name, data (consumed) and time; NULL if out of
 * memory.
 */
static char *
event_json (const char *event, json_t *data, const struct timespec *ts)
{
  if (data == NULL)
    return NULL;
  return ctl_dump (json_pack ("{s:s,s:o,s:{s:I,s:I}}",
                              "event", event,
                              "data", data,
                              "timestamp",
                              "seconds", (json_int_t) ts->tv_sec,
                              "microseconds",
                              (json_int_t) (ts->tv_nsec / 1000)));
}

static char *
event_line (const struct ctl_event *ev)
{
  json_t *data = json_pack ("{s:o}", "reason", ctl_str (ev->reason));

  /* Events about the store as a whole name no snapshot. */
  if (data && ev->snapshot[0] &&
      json_object_set_new (data, ev->key, ctl_str (ev->snapshot)) == -1) {
    json_decref (data);
    data = NULL;
  }
  return event_json (ev->event, data, &ev->ts);
}

/* Send line to every client. */
static void
send_all (struct ctl *ctl, const char *line)
{
  size_t i;

  for (i = 0; line && i < ctl->nclients; i++)
    client_send (ctl->clients[i], line);
}

/* Events were dropped (kinds: the first ones dropped, each with its
 * count): say so in the log and to every client, after the events that
 * were delivered.
 */
static void
send_dropped (struct ctl *ctl, uint64_t dropped,
              const struct ctl_dropped *kinds, size_t nkinds)
{
  json_t *counts = json_object ();
  struct timespec ts;
  char reason[512], list[256] = "";
  char *line;
  size_t i, k = 0;

  for (i = 0; i < nkinds && kinds[i].event; i++) {
    if (counts)
      json_object_set_new (counts, kinds[i].event,
                           json_integer (kinds[i].n));
    if (k < sizeof list)
      k += snprintf (list + k, sizeof list - k, "%s%s %" PRIu64,
                     k ? ", " : "", kinds[i].event, kinds[i].n);
  }
  snprintf (reason, sizeof reason, "%" PRIu64 " events were dropped (%s): "
            "more than %zu waited for the control service, which was busy; "
            "list the snapshots and bitmaps again to learn their state",
            dropped, list, max_events ());
  fl_warn ("control socket %s: %s", ctl->path, reason);
  if (ctl->log_event)
    ctl->log_event ("EVENTS_DROPPED", "", reason);
  if (counts == NULL)
    return;
  clock_gettime (CLOCK_REALTIME, &ts);
  line = event_json ("EVENTS_DROPPED",
                     json_pack ("{s:I,s:o,s:s}", "count", (json_int_t) dropped,
                                "events", counts, "reason", reason), &ts);
  send_all (ctl, line);
  free (line);
}

/* Empty the self-pipe, send the queued events to every client.  Returns
 * true when ctl_close asks the service to stop.
 */
static bool
service_wake (struct ctl *ctl)
{
  char buf[64];
  struct ctl_event *ev, *next;
  struct ctl_dropped kinds[sizeof ctl->dropped_kind /
                           sizeof ctl->dropped_kind[0]];
  uint64_t dropped;
  bool stop;

  while (read (ctl->wake_rd, buf, sizeof buf) > 0)
    ;
  pthread_mutex_lock (&ctl->ev_lock);
  ev = ctl->ev_head;
  ctl->ev_head = NULL;
  ctl->ev_tail = &ctl->ev_head;
  ctl->nevents = 0;
  dropped = ctl->events_dropped;
  ctl->events_dropped = 0;
  memcpy (kinds, ctl->dropped_kind, sizeof kinds);
  memset (ctl->dropped_kind, 0, sizeof ctl->dropped_kind);
  stop = ctl->stopping;
  pthread_mutex_unlock (&ctl->ev_lock);
  for (; ev; ev = next) {
    char *line = event_line (ev);
    next = ev->next;
    if (ctl->log_event)
      ctl->log_event (ev->event, ev->snapshot, ev->reason);
    send_all (ctl, line);
    free (line);
    free (ev);
  }
  if (dropped)
    send_dropped (ctl, dropped, kinds, sizeof kinds / sizeof kinds[0]);
  return stop;
}

/* ---- The service thread ---- */

static nfds_t
setup_poll (struct ctl *ctl, struct pollfd *pfd, int *timeout)
{
  size_t i;

  pfd[0] = (struct pollfd) { .fd = ctl->wake_rd, .events = POLLIN };
  pfd[1] = (struct pollfd) { .fd = ctl->listen_fd, .events = POLLIN };
  *timeout = -1;
  if (ctl->accept_paused_until) {
    uint64_t now = monotonic_ns ();
    if (now < ctl->accept_paused_until) {
      pfd[1].fd = -1;
      *timeout = (ctl->accept_paused_until - now) / 1000000 + 1;
    }
    else
      ctl->accept_paused_until = 0;
  }
  for (i = 0; i < ctl->nclients; i++) {
    struct ctl_client *c = ctl->clients[i];
    short events = 0;
    if (!c->eof && c->inlen < CTL_IN_SIZE && pending (c) < CTL_OUT_HIGH)
      events |= POLLIN;
    if (pending (c) > 0)
      events |= POLLOUT;
    pfd[2 + i] = (struct pollfd) { .fd = c->fd, .events = events };
  }
  return 2 + ctl->nclients;
}

static void
client_poll (struct ctl *ctl, struct ctl_client *c, short revents)
{
  if (revents & POLLNVAL) {
    c->dead = true;
    return;
  }
  if (revents & (POLLOUT | POLLERR)) {
    client_flush (c);
    if (pending (c) < CTL_OUT_HIGH)
      client_process (ctl, c);
  }
  if (revents & (POLLIN | POLLHUP | POLLERR))
    client_read (ctl, c);
}

static void *
service (void *arg)
{
  struct ctl *ctl = arg;
  struct pollfd pfd[2 + CTL_MAX_CLIENTS];
  nfds_t n, i;
  int timeout;

  slice_set (SLICE_GROUP_NS);
  for (;;) {
    int idle = expire_clients (ctl), group = ctl_group_tick (ctl);

    n = setup_poll (ctl, pfd, &timeout);
    if (idle >= 0 && (timeout < 0 || idle < timeout))
      timeout = idle;
    if (group >= 0 && (timeout < 0 || group < timeout))
      timeout = group;
    if (poll (pfd, n, timeout) == -1) {
      if (errno == EINTR || errno == ENOMEM || errno == EAGAIN)
        continue;
      fl_debug ("control: poll: %m: the control service stops");
      break;
    }
    if (pfd[0].revents && service_wake (ctl))
      break;
    for (i = 2; i < n; i++)
      if (pfd[i].revents)
        client_poll (ctl, ctl->clients[i - 2], pfd[i].revents);
    reap_clients (ctl);
    if (pfd[1].revents)
      accept_clients (ctl);
  }
  return NULL;
}

/* ---- Open, start, close ---- */

/* A socket at path: replace it if no server answers, else refuse. */
static int
remove_stale (const char *path, const struct sockaddr_un *sun)
{
  struct stat st;
  int fd, r, err;

  if (lstat (path, &st) == -1)
    return errno == ENOENT ? 0
      : fl_error (errno, "control socket %s: %m", path);
  if (!S_ISSOCK (st.st_mode))
    return fl_error (EEXIST, "control socket %s exists and is not a socket",
                     path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd == -1)
    return fl_error (errno, "socket: %m");
  r = connect (fd, (const struct sockaddr *) sun, sizeof *sun);
  err = errno;
  close (fd);
  if (r == 0 || err == EAGAIN)
    return fl_error (EADDRINUSE, "control socket %s is in use by another "
                     "server", path);
  if (err == ENOENT)
    return 0;
  if (err != ECONNREFUSED)
    return fl_error (err, "connect: control socket %s: %m", path);
  fl_debug ("control: replacing stale socket %s", path);
  if (unlink (path) == -1 && errno != ENOENT)
    return fl_error (errno, "unlink: stale control socket %s: %m", path);
  return 0;
}

static int
socket_address (const char *path, struct sockaddr_un *sun)
{
  size_t len = strlen (path);

  if (len == 0)
    return fl_error (EINVAL, "control socket path is empty");
  if (len >= sizeof sun->sun_path)
    return fl_error (ENAMETOOLONG, "control socket %s: the path is %zu "
                     "bytes long, the limit is %zu", path, len,
                     sizeof sun->sun_path - 1);
  memset (sun, 0, sizeof *sun);
  sun->sun_family = AF_UNIX;
  memcpy (sun->sun_path, path, len);
  return 0;
}

/* Create the socket, mode 0600 from the start (umask), listening. */
static int
bind_socket (struct ctl *ctl)
{
  struct sockaddr_un sun;
  struct stat st;
  mode_t old_umask;
  int fd, r, err;

  if (socket_address (ctl->path, &sun) == -1 ||
      remove_stale (ctl->path, &sun) == -1)
    return -1;
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd == -1)
    return fl_error (errno, "socket: %m");
  old_umask = umask (0177);
  r = bind (fd, (struct sockaddr *) &sun, sizeof sun);
  err = errno;
  umask (old_umask);
  if (r == -1) {
    fl_error (err, "bind: control socket %s: %m", ctl->path);
    goto out_close;
  }
  if (chmod (ctl->path, 0600) == -1 || stat (ctl->path, &st) == -1) {
    fl_error (errno, "chmod: control socket %s: %m", ctl->path);
    goto out_unlink;
  }
  if (listen (fd, SOMAXCONN) == -1) {
    fl_error (errno, "listen: control socket %s: %m", ctl->path);
    goto out_unlink;
  }
  ctl->dev = st.st_dev;
  ctl->ino = st.st_ino;
  ctl->listen_fd = fd;
  return 0;

 out_unlink:
  unlink (ctl->path);
 out_close:
  close (fd);
  return -1;
}

static char *
make_greeting (void)
{
  int major = 0, minor = 0, micro = 0;

  sscanf (PACKAGE_VERSION, "%d.%d.%d", &major, &minor, &micro);
  return ctl_dump (json_pack ("{s:{s:{s:{s:i,s:i,s:i},s:s},s:[]}}",
                              "QMP", "version", "fleece",
                              "major", major, "minor", minor, "micro", micro,
                              "package", PACKAGE_NAME " " PACKAGE_VERSION,
                              "capabilities"));
}

static void
ctl_free (struct ctl *ctl)
{
  if (ctl->wake_rd >= 0)
    close (ctl->wake_rd);
  if (ctl->wake_wr >= 0)
    close (ctl->wake_wr);
  free (ctl->greeting);
  free (ctl->on_cbw_error);
  free (ctl->path);
  free (ctl);
}

struct ctl *
ctl_open (struct fleece *fl, const char *path, const struct ctl_info *info)
{
  struct ctl *ctl = calloc (1, sizeof *ctl);
  int pipefd[2];

  if (ctl == NULL) {
    fl_error (ENOMEM, "control socket %s: out of memory", path);
    return NULL;
  }
  ctl->fl = fl;
  ctl->listen_fd = ctl->wake_rd = ctl->wake_wr = -1;
  ctl->opened_ns = monotonic_ns ();
  ctl->ev_tail = &ctl->ev_head;
  ctl->persistent = info && info->persistent;
  ctl->log_event = info ? info->log_event : NULL;
  ctl->path = strdup (path);
  ctl->greeting = make_greeting ();
  if (info && info->on_cbw_error)
    ctl->on_cbw_error = strdup (info->on_cbw_error);
  if (ctl->path == NULL || ctl->greeting == NULL ||
      (info && info->on_cbw_error && ctl->on_cbw_error == NULL)) {
    fl_error (ENOMEM, "control socket %s: out of memory", path);
    goto out_free;
  }
  if (pipe2 (pipefd, O_NONBLOCK | O_CLOEXEC) == -1) {
    fl_error (errno, "pipe2: control socket %s: %m", path);
    goto out_free;
  }
  ctl->wake_rd = pipefd[0];
  ctl->wake_wr = pipefd[1];
  if (bind_socket (ctl) == -1)
    goto out_free;
  pthread_mutex_init (&ctl->ev_lock, NULL);
  fleece_set_event_listener (fl, ctl_event, ctl);
  fl_debug ("control: listening on %s", path);
  return ctl;

 out_free:
  ctl_free (ctl);
  return NULL;
}

int
ctl_start (struct ctl *ctl)
{
  sigset_t all, old;
  int err;

  if (ctl->started)
    return fl_error (EINVAL, "control socket %s: the service is already "
                     "started", ctl->path);
  sigfillset (&all);
  pthread_sigmask (SIG_SETMASK, &all, &old);
  err = pthread_create (&ctl->thread, NULL, service, ctl);
  pthread_sigmask (SIG_SETMASK, &old, NULL);
  if (err)
    return fl_error (err, "pthread_create: control service %s: %m",
                     ctl->path);
  /* A name of its own, so that top -H, perf sched and ps -L show the
   * service thread apart from nbdkit's: its wake-up latency is most of
   * a group's hold (docs/design.md).  A failure only loses the name.
   */
  pthread_setname_np (ctl->thread, "fleece-ctl");
  ctl->started = true;
  return 0;
}

/* Unlink the socket unless another server has replaced it meanwhile. */
static void
unlink_socket (struct ctl *ctl)
{
  struct stat st;

  if (stat (ctl->path, &st) == 0 && st.st_dev == ctl->dev &&
      st.st_ino == ctl->ino && unlink (ctl->path) == -1)
    fl_debug ("control: unlink: %s: %m", ctl->path);
}

void
ctl_close (struct ctl *ctl)
{
  struct ctl_event *ev, *next;
  size_t i;

  if (ctl == NULL)
    return;
  /* After this no listener call is in flight. */
  fleece_set_event_listener (ctl->fl, NULL, NULL);
  if (ctl->started) {
    pthread_mutex_lock (&ctl->ev_lock);
    ctl->stopping = true;
    pthread_mutex_unlock (&ctl->ev_lock);
    wake (ctl);
    pthread_join (ctl->thread, NULL);
  }
  ctl_group_close (ctl);
  for (i = 0; i < ctl->nclients; i++)
    client_free (ctl->clients[i]);
  for (ev = ctl->ev_head; ev; ev = next) {
    next = ev->next;
    free (ev);
  }
  close (ctl->listen_fd);
  unlink_socket (ctl);
  pthread_mutex_destroy (&ctl->ev_lock);
  fl_debug ("control: closed %s", ctl->path);
  ctl_free (ctl);
}
