/* The metrics' HTTP endpoint (metrics-listen=ADDR:PORT in the plugin,
 * --metrics-listen in fleece-colod), served by libmicrohttpd.
 *
 * Lifetime, as the control service's: metrics_http_open binds and
 * listens (in the plugin, in .get_ready, before nbdkit forks, so that a
 * bad address or a port in use stops nbdkit at once) but starts no
 * thread; metrics_http_start hands the socket to libmicrohttpd, whose
 * one internal thread (started with every signal blocked, so signals go
 * to the program's own threads) serves GET /metrics; metrics_http_close
 * stops it.  Each scrape renders the metrics afresh through the
 * caller's function, in that thread.  At most METRICS_HTTP_MAX_CONN
 * connections at once, each closed after METRICS_HTTP_TIMEOUT_S idle:
 * a scraper that misbehaves costs a socket, never the server.  Only
 * GET and HEAD of /metrics are answered (200); another path is 404,
 * another method 405.  No TLS and no authentication: the default
 * address is 127.0.0.1, and a wider one is the operator's choice.
 */

#include <config.h>

#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>

#include <microhttpd.h>

#include "internal.h"
#include "fleece-metrics.h"

#define METRICS_HTTP_MAX_CONN  16
#define METRICS_HTTP_TIMEOUT_S 10
#define METRICS_CONTENT_TYPE   "text/plain; version=0.0.4; charset=utf-8"

struct metrics_http {
  /* Set by metrics_http_open, then constant. */
  int fd;                       /* libmicrohttpd's once started */
  metrics_render_fn render;
  void *opaque;
  char address[128];
  /* Set by metrics_http_start. */
  struct MHD_Daemon *daemon;
};

/* Split ADDR:PORT, [ADDR]:PORT or PORT (address 127.0.0.1). */
static int
split_listen (const char *spec, char *host, size_t hlen, const char **port)
{
  const char *colon = strrchr (spec, ':');
  size_t n;

  if (colon == NULL) {
    snprintf (host, hlen, "127.0.0.1");
    *port = spec;
    return 0;
  }
  *port = colon + 1;
  n = colon - spec;
  if (n >= 2 && spec[0] == '[' && spec[n - 1] == ']') {
    spec++;
    n -= 2;
  }
  if (n == 0 || n >= hlen)
    return -1;
  memcpy (host, spec, n);
  host[n] = '\0';
  return 0;
}

static int
bind_listen (struct metrics_http *h, const char *spec)
{
  struct addrinfo hints = { .ai_family = AF_UNSPEC,
                            .ai_socktype = SOCK_STREAM,
                            .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
  struct addrinfo *ai;
  char host[NI_MAXHOST], num[64], serv[16];
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  const char *port;
  int one = 1, r;

  if (split_listen (spec, host, sizeof host, &port) == -1 || !*port)
    return fl_error (EINVAL, "metrics-listen=%s: expected ADDR:PORT or "
                     "PORT", spec);
  r = getaddrinfo (host, port, &hints, &ai);
  if (r != 0)
    return fl_error (EINVAL, "metrics-listen=%s: getaddrinfo: %s", spec,
                     gai_strerror (r));
  h->fd = socket (ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (h->fd == -1 ||
      setsockopt (h->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == -1 ||
      bind (h->fd, ai->ai_addr, ai->ai_addrlen) == -1 ||
      listen (h->fd, METRICS_HTTP_MAX_CONN) == -1) {
    int err = errno;
    freeaddrinfo (ai);
    return fl_error (err, "metrics-listen=%s: socket, bind or listen: %m",
                     spec);
  }
  freeaddrinfo (ai);
  /* The address as bound (the port chosen for port 0), for the log. */
  if (getsockname (h->fd, (struct sockaddr *) &ss, &len) == 0 &&
      getnameinfo ((struct sockaddr *) &ss, len, num, sizeof num, serv,
                   sizeof serv, NI_NUMERICHOST | NI_NUMERICSERV) == 0)
    snprintf (h->address, sizeof h->address, "%s%s%s:%s",
              strchr (num, ':') ? "[" : "", num,
              strchr (num, ':') ? "]" : "", serv);
  else
    snprintf (h->address, sizeof h->address, "%.100s", spec);
  return 0;
}

struct metrics_http *
metrics_http_open (const char *spec, metrics_render_fn render,
                   void *opaque)
{
  struct metrics_http *h = calloc (1, sizeof *h);

  if (h == NULL) {
    fl_error (ENOMEM, "metrics-listen=%s: out of memory", spec);
    return NULL;
  }
  h->fd = -1;
  h->render = render;
  h->opaque = opaque;
  if (bind_listen (h, spec) == -1) {
    if (h->fd >= 0)
      close (h->fd);
    free (h);
    return NULL;
  }
  return h;
}

static enum MHD_Result
reply (struct MHD_Connection *conn, unsigned status, char *body,
       const char *type)
{
  struct MHD_Response *resp =
    MHD_create_response_from_buffer_with_free_callback (strlen (body), body,
                                                        free);
  enum MHD_Result r;

  if (resp == NULL) {
    free (body);
    return MHD_NO;
  }
  MHD_add_response_header (resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
  if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
    MHD_add_response_header (resp, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
  r = MHD_queue_response (conn, status, resp);
  MHD_destroy_response (resp);
  return r;
}

static enum MHD_Result
handle (void *cls, struct MHD_Connection *conn, const char *url,
        const char *method, const char *version, const char *upload_data,
        size_t *upload_data_size, void **con_cls)
{
  static int first_call;
  struct metrics_http *h = cls;
  char *body;

  (void) version;
  (void) upload_data;
  /* The first call only has the headers: answer once all has come. */
  if (*con_cls == NULL) {
    *con_cls = &first_call;
    return MHD_YES;
  }
  if (*upload_data_size != 0) {
    *upload_data_size = 0;      /* a body is read and ignored */
    return MHD_YES;
  }
  if (strcmp (method, "GET") != 0 && strcmp (method, "HEAD") != 0)
    return reply (conn, MHD_HTTP_METHOD_NOT_ALLOWED,
                  strdup ("only GET and HEAD\n"), "text/plain");
  if (strcmp (url, "/metrics") != 0)
    return reply (conn, MHD_HTTP_NOT_FOUND,
                  strdup ("not found: the metrics are at /metrics\n"),
                  "text/plain");
  body = h->render (h->opaque);
  if (body == NULL)
    return reply (conn, MHD_HTTP_INTERNAL_SERVER_ERROR,
                  strdup ("the metrics could not be rendered\n"),
                  "text/plain");
  return reply (conn, MHD_HTTP_OK, body, METRICS_CONTENT_TYPE);
}

int
metrics_http_start (struct metrics_http *h)
{
  sigset_t all, old;

  if (h->daemon)
    return fl_error (EINVAL, "metrics endpoint %s: already started",
                     h->address);
  sigfillset (&all);
  pthread_sigmask (SIG_SETMASK, &all, &old);
  h->daemon = MHD_start_daemon (MHD_USE_AUTO_INTERNAL_THREAD, 0, NULL, NULL,
                                handle, h,
                                MHD_OPTION_LISTEN_SOCKET, h->fd,
                                MHD_OPTION_CONNECTION_LIMIT,
                                (unsigned) METRICS_HTTP_MAX_CONN,
                                MHD_OPTION_CONNECTION_TIMEOUT,
                                (unsigned) METRICS_HTTP_TIMEOUT_S,
                                MHD_OPTION_END);
  pthread_sigmask (SIG_SETMASK, &old, NULL);
  if (h->daemon == NULL)
    return fl_error (EIO, "MHD_start_daemon: metrics endpoint %s failed to "
                     "start", h->address);
  return 0;
}

const char *
metrics_http_address (const struct metrics_http *h)
{
  return h->address;
}

void
metrics_http_close (struct metrics_http *h)
{
  if (h == NULL)
    return;
  if (h->daemon)
    MHD_stop_daemon (h->daemon);  /* closes the listening socket */
  else if (h->fd >= 0)
    close (h->fd);
  free (h);
}
