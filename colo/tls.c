/* fleece-colod's transport: TCP, TLS 1.3 through GnuTLS, and plaintext
 * only when asked for (see tls.h for the API, docs/replication.md
 * "Transport and security" for the operator's view).
 *
 * Files.  The transport is one private struct colo_conn (tls-internal.h)
 * whose invariants (non-blocking sockets, deadlines, the first bytes
 * recorded to explain a failed handshake) every part relies on:
 *   tls.c            errors, addresses, sockets (listen, accept,
 *                    connect) and moving bytes;
 *   tls-creds.c      the credentials (X.509, PSK, priority string):
 *                    struct colo_tls;
 *   tls-handshake.c  establishing a connection (greeting, TLS
 *                    handshake) and saying why it failed.
 *
 * Design.  Sockets are non-blocking for their whole life and every wait
 * is a poll with a deadline, so nothing here blocks longer than the
 * connect timeout (per address tried), the handshake timeout (from
 * accept or connect to the end of the greeting) or the connection's I/O
 * timeout (no byte moved).  The server side is shaped like nbdkit's
 * server/crypto.c, the client side like libnbd's lib/crypto.c: every
 * GnuTLS failure carries gnutls_strerror, the handshake is retried while
 * the error is not fatal, the priority string is configurable.
 *
 * Deliberately ignored: session resumption (GNUTLS_NO_TICKETS: two
 * long-lived connections per pair), SNI beyond sending the host name,
 * OCSP, and rehandshakes (TLS 1.3 has none).
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <gnutls/gnutls.h>
#include <gnutls/crypto.h>
#include <gnutls/x509.h>

#include "deadline.h"
#include "monotonic.h"
#include "tls.h"
#include "tls-internal.h"

/* Each thread its own (colo_tls_last_error). */
static __thread char last_error[1024];
/* Set by colo_tls_set_log before any connection is made, then only
 * read, by any thread.
 */
static void (*log_fn) (const char *fmt, va_list ap);

const char *
colo_tls_last_error (void)
{
  return last_error[0] ? last_error : "unknown error";
}

void
colo_tls_set_log (void (*fn) (const char *fmt, va_list ap))
{
  log_fn = fn;
}

int
tls_error (int err, const char *fmt, ...)
{
  va_list ap;

  errno = err;
  va_start (ap, fmt);
  vsnprintf (last_error, sizeof last_error, fmt, ap);
  va_end (ap);
  errno = err;
  return -1;
}

void
tls_debug (const char *fmt, ...)
{
  va_list ap;
  int saved = errno;

  if (log_fn) {
    va_start (ap, fmt);
    log_fn (fmt, ap);
    va_end (ap);
  }
  errno = saved;
}

/* ---- Addresses ---- */

int
colo_parse_address (const char *addr, char **host, char **port)
{
  const char *colon, *p;
  char *h = NULL;
  unsigned long n;
  char *end;

  *host = *port = NULL;
  if (addr[0] == '[') {
    const char *close = strchr (addr, ']');
    if (close == NULL || close[1] != ':')
      return tls_error (EINVAL, "%s: expected [IPV6-ADDRESS]:PORT", addr);
    h = strndup (addr + 1, close - addr - 1);
    colon = close + 1;
  }
  else {
    colon = strrchr (addr, ':');
    if (colon == NULL)
      return tls_error (EINVAL, "%s: expected ADDRESS:PORT", addr);
    if (memchr (addr, ':', colon - addr))
      return tls_error (EINVAL, "%s: write an IPv6 address in brackets: "
                        "[ADDRESS]:PORT", addr);
    if (colon > addr)
      h = strndup (addr, colon - addr);
  }
  if ((addr[0] == '[' || colon > addr) && h == NULL)
    return tls_error (errno, "strndup: %m");
  p = colon + 1;
  errno = 0;
  n = strtoul (p, &end, 10);
  if (*p < '0' || *p > '9' || *end || errno || n > 65535) {
    free (h);
    return tls_error (EINVAL, "%s: the port must be a number from 0 to "
                      "65535", addr);
  }
  *port = strdup (p);
  if (*port == NULL) {
    free (h);
    return tls_error (errno, "strdup: %m");
  }
  *host = h;
  return 0;
}

/* "127.0.0.1:7000" or "[::1]:7000". */
static void
format_address (const struct sockaddr *sa, socklen_t len, char *buf,
                size_t size)
{
  char host[64], serv[8];      /* IPv6 with a scope, port */

  if (getnameinfo (sa, len, host, sizeof host, serv, sizeof serv,
                   NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    snprintf (buf, size, "(unknown address)");
  else if (sa->sa_family == AF_INET6)
    snprintf (buf, size, "[%s]:%s", host, serv);
  else
    snprintf (buf, size, "%s:%s", host, serv);
}


static int
resolve (const char *addr, bool passive, struct addrinfo **res)
{
  struct addrinfo hints = {
    .ai_family = AF_UNSPEC,
    .ai_socktype = SOCK_STREAM,
    .ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : AI_ADDRCONFIG),
  };
  char *host, *port;
  int r;

  if (colo_parse_address (addr, &host, &port) == -1)
    return -1;
  if (host == NULL && !passive) {
    free (port);
    return tls_error (EINVAL, "%s: the address to connect to has no host",
                      addr);
  }
  r = getaddrinfo (host, port, &hints, res);
  free (host);
  free (port);
  if (r != 0)
    return tls_error (r == EAI_SYSTEM ? errno : EHOSTUNREACH,
                      "%s: cannot resolve the address: %s", addr,
                      r == EAI_SYSTEM ? strerror (errno) : gai_strerror (r));
  return 0;
}
/* ---- Sockets ---- */

static int
set_socket_options (int fd)
{
  int one = 1;

  if (setsockopt (fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == -1)
    return tls_error (errno, "setsockopt TCP_NODELAY: %m");
  return 0;
}

/* Give up on a peer without losing what was just sent to it (our alert
 * or greeting) to a reset, which unread bytes on our side would cause:
 * end our side, read and drop until the peer closes, briefly.
 */
static void
linger_close (int fd)
{
  int64_t deadline = monotonic_ms () + LINGER_MS;
  char buf[4096];

  shutdown (fd, SHUT_WR);
  while (wait_fd_until (fd, POLLIN, deadline) == 1) {
    ssize_t r = recv (fd, buf, sizeof buf, 0);
    if (r == 0 || (r == -1 && errno != EINTR && errno != EAGAIN))
      break;
  }
  close (fd);
}

struct colo_listener *
colo_listen (struct colo_tls *tls, const char *addr)
{
  struct addrinfo *res, *ai;
  struct colo_listener *l;
  struct sockaddr_storage ss;
  socklen_t sslen = sizeof ss;
  int fd = -1, one = 1, saved = 0;

  if (resolve (addr, true, &res) == -1)
    return NULL;
  for (ai = res; ai; ai = ai->ai_next) {
    fd = socket (ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK |
                 SOCK_CLOEXEC, ai->ai_protocol);
    if (fd == -1) {
      saved = errno;
      continue;
    }
    setsockopt (fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* The longest backlog: a burst of hostile connections must not push
     * the primary's into SYN retransmissions.
     */
    if (bind (fd, ai->ai_addr, ai->ai_addrlen) == 0 &&
        listen (fd, SOMAXCONN) == 0)
      break;
    saved = errno;
    close (fd);
    fd = -1;
  }
  freeaddrinfo (res);
  if (fd == -1) {
    tls_error (saved, "listen on %s: %m", addr);
    return NULL;
  }
  l = calloc (1, sizeof *l);
  if (l == NULL) {
    tls_error (errno, "calloc: %m");
    close (fd);
    return NULL;
  }
  l->tls = tls;
  l->fd = fd;
  if (getsockname (fd, (struct sockaddr *) &ss, &sslen) == 0)
    format_address ((struct sockaddr *) &ss, sslen, l->address,
                    sizeof l->address);
  tls_debug ("listening on %s", l->address);
  return l;
}

const char *
colo_listener_address (const struct colo_listener *l)
{
  return l->address;
}

int
colo_listener_fd (const struct colo_listener *l)
{
  return l->fd;
}

void
colo_listener_close (struct colo_listener *l)
{
  if (l == NULL)
    return;
  close (l->fd);
  free (l);
}

static struct colo_conn *
conn_new (struct colo_tls *tls, int fd, const char *name)
{
  struct colo_conn *conn = calloc (1, sizeof *conn);
  struct sockaddr_storage ss;
  socklen_t sslen = sizeof ss;

  if (conn == NULL) {
    tls_error (errno, "calloc: %m");
    return NULL;
  }
  conn->tls = tls;
  conn->fd = fd;
  conn->timeout_ms = -1;
  conn->deadline = -1;
  if (getpeername (fd, (struct sockaddr *) &ss, &sslen) == 0)
    format_address ((struct sockaddr *) &ss, sslen, conn->peer,
                    sizeof conn->peer);
  else
    snprintf (conn->peer, sizeof conn->peer, "(unknown peer)");
  conn->name = strdup (name ? name : conn->peer);
  if (conn->name == NULL) {
    tls_error (errno, "strdup: %m");
    free (conn);
    return NULL;
  }
  return conn;
}

/* Free everything but the socket. */
static void
conn_free (struct colo_conn *conn)
{
  if (conn->session)
    gnutls_deinit (conn->session);
  free (conn->name);
  free (conn->identity);
  free (conn->hostname);
  free (conn);
}

struct colo_conn *
colo_accept_socket (struct colo_listener *l)
{
  struct colo_conn *conn;
  int fd;

  do
    fd = accept4 (l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  while (fd == -1 && errno == EINTR);
  if (fd == -1) {
    tls_error (errno, "accept on %s: %m", l->address);
    return NULL;
  }
  conn = conn_new (l->tls, fd, NULL);
  if (conn == NULL) {
    close (fd);
    return NULL;
  }
  if (set_socket_options (fd) == -1) {
    colo_close (conn);
    return NULL;
  }
  return conn;
}

int
colo_accept_handshake (struct colo_conn *conn)
{
  if (tls_conn_establish (conn) == -1) {
    conn->failed_errno = errno;
    return -1;
  }
  return 0;
}

void
colo_discard (struct colo_conn *conn)
{
  int saved = errno;

  /* No close_notify: there is no session to end.  A peer given up
   * before its handshake or that timed out is not waited for; one that
   * was refused lingers, so that it reads why.
   */
  if (conn->failed_errno == 0 || conn->failed_errno == ETIMEDOUT)
    close (conn->fd);
  else
    linger_close (conn->fd);
  conn_free (conn);
  errno = saved;
}

struct colo_conn *
colo_accept (struct colo_listener *l, int timeout_ms)
{
  struct colo_conn *conn;
  int r;

  r = wait_fd_until (l->fd, POLLIN, deadline_after (timeout_ms));
  if (r == 0) {
    tls_error (ETIMEDOUT, "accept on %s: no peer within %d ms", l->address,
               timeout_ms);
    return NULL;
  }
  if (r == -1) {
    tls_error (errno, "accept on %s: poll: %m", l->address);
    return NULL;
  }
  conn = colo_accept_socket (l);
  if (conn == NULL)
    return NULL;
  if (colo_accept_handshake (conn) == -1) {
    colo_discard (conn);
    return NULL;
  }
  return conn;
}

/* Connect to one address within the connect timeout: the socket or -1. */
static int
connect_one (const struct addrinfo *ai, int timeout_ms, char *why,
             size_t whysize)
{
  int fd, err = 0;
  socklen_t len = sizeof err;

  fd = socket (ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK |
               SOCK_CLOEXEC, ai->ai_protocol);
  if (fd == -1) {
    snprintf (why, whysize, "socket: %s", strerror (errno));
    return -1;
  }
  if (connect (fd, ai->ai_addr, ai->ai_addrlen) == 0)
    return fd;
  if (errno != EINPROGRESS)
    err = errno;
  else {
    int r = wait_fd_until (fd, POLLOUT, deadline_after (timeout_ms));
    if (r == 0)
      err = ETIMEDOUT;
    else if (r == -1 ||
             getsockopt (fd, SOL_SOCKET, SO_ERROR, &err, &len) == -1)
      err = errno;
  }
  if (err == 0)
    return fd;
  if (err == ETIMEDOUT)
    snprintf (why, whysize, "timed out after %d ms", timeout_ms);
  else
    snprintf (why, whysize, "%s", strerror (err));
  close (fd);
  errno = err;
  return -1;
}

struct colo_conn *
colo_connect (struct colo_tls *tls, const char *addr)
{
  struct addrinfo *res, *ai;
  struct colo_conn *conn;
  char why[256] = "", tried[ADDR_STR_MAX] = "";
  char *port = NULL;
  int fd = -1, err = ECONNREFUSED;

  if (resolve (addr, false, &res) == -1)
    return NULL;
  for (ai = res; ai && fd == -1; ai = ai->ai_next) {
    format_address (ai->ai_addr, ai->ai_addrlen, tried, sizeof tried);
    fd = connect_one (ai, tls->connect_timeout_ms, why, sizeof why);
    if (fd == -1)
      err = errno;
  }
  freeaddrinfo (res);
  if (fd == -1) {
    if (strcmp (tried, addr) == 0)
      tls_error (err, "connect to %s: %s", addr, why);
    else
      tls_error (err, "connect to %s (%s): %s", addr, tried, why);
    return NULL;
  }
  conn = conn_new (tls, fd, addr);
  if (conn == NULL || colo_parse_address (addr, &conn->hostname, &port) == -1
      || set_socket_options (fd) == -1 || tls_conn_establish (conn) == -1) {
    err = errno;
    if (conn)
      conn_free (conn);
    if (err == ETIMEDOUT)
      close (fd);
    else
      linger_close (fd);
    free (port);
    errno = err;
    return NULL;
  }
  free (port);
  return conn;
}
/* ---- Moving bytes ---- */

#define WOULD_BLOCK  (-2)
#define RETRY        (-3)

/* recv_once and send_once return bytes (0 at EOF), WOULD_BLOCK, RETRY,
 * or -1 with *gerr a GnuTLS error (TLS) or 0 and errno set (plaintext):
 * the outcome of a plain recv or send, or of a GnuTLS record call.
 */
static ssize_t
sys_outcome (ssize_t r)
{
  if (r == -1 && (errno == EAGAIN || errno == EWOULDBLOCK))
    return WOULD_BLOCK;
  return r == -1 && errno == EINTR ? RETRY : r;
}

static ssize_t
tls_outcome (ssize_t r, int *gerr)
{
  if (r >= 0)
    return r;
  if (r == GNUTLS_E_AGAIN)
    return WOULD_BLOCK;
  if (r == GNUTLS_E_INTERRUPTED || !gnutls_error_is_fatal (r))
    return RETRY;
  *gerr = r;
  return -1;
}

static ssize_t
recv_once (struct colo_conn *conn, void *buf, size_t len, int *gerr)
{
  *gerr = 0;
  if (conn->session == NULL)
    return sys_outcome (recv (conn->fd, buf, len, 0));
  return tls_outcome (gnutls_record_recv (conn->session, buf, len), gerr);
}

static ssize_t
send_once (struct colo_conn *conn, const void *buf, size_t len, int *gerr)
{
  *gerr = 0;
  if (conn->session == NULL)
    return sys_outcome (send (conn->fd, buf, len, MSG_NOSIGNAL));
  return tls_outcome (gnutls_record_send (conn->session, buf, len), gerr);
}

/* Record an I/O failure: during the handshake as its failure, after it
 * as "<what> <peer>: <reason>".  Returns -1.
 */
static int
io_failed (struct colo_conn *conn, bool handshaking, const char *what,
           int gerr, int err)
{
  if (handshaking && gerr)
    return tls_handshake_failed (conn, gerr);
  if (handshaking)
    return tls_fail_step (conn, err, "%s the peer: %s", what, strerror (err));
  switch (gerr) {
  case 0:
    return tls_error (err, "%s %s: %s", what, conn->name, strerror (err));
  case GNUTLS_E_PREMATURE_TERMINATION:
    return tls_error (ECONNRESET, "%s %s: the peer closed the connection "
                      "without TLS close_notify", what, conn->name);
  case GNUTLS_E_FATAL_ALERT_RECEIVED:
    return tls_error (ECONNRESET, "%s %s: the peer sent TLS alert '%s'",
                      what, conn->name,
                      gnutls_alert_get_name (gnutls_alert_get
                                             (conn->session)));
  default:
    return tls_error (EIO, "%s %s: %s", what, conn->name,
                      gnutls_strerror (gerr));
  }
}

static int
io_timed_out (struct colo_conn *conn, bool handshaking, const char *what,
              int timeout_ms)
{
  if (handshaking)
    return tls_fail_step (conn, ETIMEDOUT, "no answer within %d ms",
                          conn->tls->handshake_timeout_ms);
  if (conn->deadline >= 0)
    return tls_error (ETIMEDOUT, "%s %s: not done within the %d ms "
                      "allowed", what, conn->name, conn->deadline_ms);
  return tls_error (ETIMEDOUT, "%s %s: nothing for %d ms", what, conn->name,
                    timeout_ms);
}

/* Receive 1 to len bytes before the deadline: the count, 0 at EOF, -1. */
ssize_t
tls_conn_recv (struct colo_conn *conn, void *buf, size_t len, int64_t deadline,
               int timeout_ms, bool handshaking)
{
  for (;;) {
    int gerr, w;
    ssize_t r = recv_once (conn, buf, len, &gerr);

    if (r >= 0)
      return r;
    if (r == -1)
      return io_failed (conn, handshaking, "receive from", gerr, errno);
    if (r == RETRY)
      continue;
    w = wait_fd_until (conn->fd, POLLIN, deadline);
    if (w == 0)
      return io_timed_out (conn, handshaking, "receive from", timeout_ms);
    if (w == -1)
      return io_failed (conn, handshaking, "receive from", 0, errno);
  }
}

/* Receive exactly len bytes, each within timeout_ms of the previous one
 * (or all before deadline if it is not -1): 1, 0 at EOF before the first
 * byte, -1.
 */
int
tls_conn_recv_all (struct colo_conn *conn, void *buf, size_t len,
                   int64_t deadline, int timeout_ms, bool handshaking)
{
  char *p = buf;
  size_t got = 0;

  while (got < len) {
    int64_t d = deadline >= 0 ? deadline : deadline_after (timeout_ms);
    ssize_t r = tls_conn_recv (conn, p + got, len - got, d, timeout_ms,
                               handshaking);
    if (r == -1)
      return -1;
    if (r == 0 && got == 0)
      return 0;
    if (r == 0) {
      if (handshaking)
        return tls_fail_step (conn, ECONNRESET, "the peer closed the "
                              "connection");
      return tls_error (ECONNRESET, "receive from %s: the peer closed the "
                        "connection after %zu of %zu bytes", conn->name,
                        got, len);
    }
    got += r;
  }
  return 1;
}

int
tls_conn_send_all (struct colo_conn *conn, const void *buf, size_t len,
                   int64_t deadline, int timeout_ms, bool handshaking)
{
  const char *p = buf;
  int64_t d = deadline >= 0 ? deadline : deadline_after (timeout_ms);

  while (len > 0) {
    int gerr, w;
    ssize_t r = send_once (conn, p, len, &gerr);

    if (r > 0) {
      p += r;
      len -= r;
      d = deadline >= 0 ? deadline : deadline_after (timeout_ms);
      continue;
    }
    if (r == -1 || r == 0)
      return io_failed (conn, handshaking, "send to", gerr,
                        r == 0 ? EPIPE : errno);
    if (r == RETRY)
      continue;
    w = wait_fd_until (conn->fd, POLLOUT, d);
    if (w == 0)
      return io_timed_out (conn, handshaking, "send to", timeout_ms);
    if (w == -1)
      return io_failed (conn, handshaking, "send to", 0, errno);
  }
  return 0;
}

void
colo_conn_set_timeout (struct colo_conn *conn, int timeout_ms)
{
  conn->timeout_ms = timeout_ms < 0 ? -1 : timeout_ms;
}

void
colo_conn_set_deadline (struct colo_conn *conn, int timeout_ms)
{
  conn->deadline = deadline_after (timeout_ms);
  conn->deadline_ms = timeout_ms;
}

int
colo_send_all (struct colo_conn *conn, const void *buf, size_t len)
{
  return tls_conn_send_all (conn, buf, len, conn->deadline, conn->timeout_ms,
                            false);
}

ssize_t
colo_recv_some (struct colo_conn *conn, void *buf, size_t len)
{
  if (len == 0)
    return tls_error (EINVAL, "receive from %s: zero-length buffer",
                      conn->name);
  return tls_conn_recv (conn, buf, len, conn->deadline >= 0 ? conn->deadline
                        : deadline_after (conn->timeout_ms), conn->timeout_ms,
                        false);
}

int
colo_recv_all (struct colo_conn *conn, void *buf, size_t len)
{
  return tls_conn_recv_all (conn, buf, len, conn->deadline, conn->timeout_ms,
                            false);
}

int
colo_conn_fd (const struct colo_conn *conn)
{
  return conn->fd;
}

bool
colo_conn_pending (const struct colo_conn *conn)
{
  return conn->session && gnutls_record_check_pending (conn->session) > 0;
}

const char *
colo_conn_peer (const struct colo_conn *conn)
{
  return conn->peer;
}

const char *
colo_conn_identity (const struct colo_conn *conn)
{
  return conn->identity;
}

void
colo_close (struct colo_conn *conn)
{
  if (conn == NULL)
    return;
  if (conn->session)
    gnutls_bye (conn->session, GNUTLS_SHUT_WR);  /* no wait, best effort */
  close (conn->fd);
  conn_free (conn);
}
