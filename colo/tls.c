/* fleece-colod's transport: TCP, TLS 1.3 through GnuTLS, and plaintext
 * only when asked for (see tls.h for the API, docs/replication.md
 * "Transport and security" for the operator's view).
 *
 * Size.  Over 1000 lines because a transport is credentials, sockets,
 * the handshake and its diagnosis, and the byte mover around one
 * private struct colo_conn whose invariants (non-blocking sockets,
 * deadlines, the first bytes recorded to explain a failed handshake)
 * every section relies on.  The seams, if it grows: the credentials
 * ("Credentials", ~360 lines) and the handshake's diagnosis ("Why a
 * handshake failed") would each make a file behind a private header.
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
 * Establishing a connection, after TCP:
 *   TLS       client hello ... handshake ... server sends GREETING_SERVER
 *             (encrypted), client checks it.
 *   insecure  client sends GREETING_CLIENT, server checks it and answers
 *             GREETING_SERVER, client checks it.
 * The TLS greeting exists for TLS 1.3's sake: there the client's
 * handshake ends before the server has verified the client's
 * certificate, so a client refused by the server would only learn it at
 * its first read.  Waiting for the greeting makes colo_connect fail
 * instead, with the server's alert.  The insecure greeting lets each
 * side recognise a TLS peer.  Mismatches are recognised from the first
 * bytes, never by timeout:
 *   - a TLS server peeks at the first byte before the handshake: a TLS
 *     client hello starts with 0x16; anything else is refused with a TLS
 *     protocol_version alert, which an insecure client recognises;
 *   - an insecure server sees 0x16 where GREETING_CLIENT should be and
 *     answers GREETING_SERVER, which a TLS client finds among the first
 *     bytes it received (tls_pull records them).
 * A side whose handshake fails (other than by timeout) shuts its side
 * down and drains the peer's bytes for a moment before closing
 * (linger_close), so that its alert or greeting is not lost to a TCP
 * reset before the peer reads it.
 *
 * Authentication.  X.509: the secondary presents server-cert.pem and
 * requires a client certificate, verified against ca-cert.pem; the
 * primary presents client-cert.pem and verifies the secondary's against
 * ca-cert.pem and, unless told not to, the host name or IP address it
 * connected to (gnutls_session_set_verify_cert).  PSK: both sides read
 * psktool's "username:hexkey" file; the server looks users up itself
 * (psk_server_key) so that an unknown user is named in the error.  Only
 * TLS 1.3 is accepted, whatever the priority string says.
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

#include "tls.h"

#define GREETING_SIZE    8
static const char GREETING_CLIENT[GREETING_SIZE] = "FLCOLOC\001";
static const char GREETING_SERVER[GREETING_SIZE] = "FLCOLOS\001";

/* TLS record types seen as a first byte: handshake (a client hello) and
 * alert.
 */
#define TLS_RECORD_HANDSHAKE  0x16
#define TLS_RECORD_ALERT      0x15

/* How long a refusing side waits for its peer to read the refusal. */
#define LINGER_MS        500

#define ADDR_STR_MAX     96     /* "[" host "]:" port */

enum colo_tls_mode { MODE_X509, MODE_PSK, MODE_INSECURE };

struct psk_entry {
  char *user;
  gnutls_datum_t key;           /* raw bytes */
};

struct colo_tls {
  /* Set by colo_tls_new, then constant (read by any thread). */
  enum colo_tls_role role;
  enum colo_tls_mode mode;
  char *ca_file;                /* X.509: for messages */
  char *psk_file;               /* PSK: for messages */
  char *psk_username;           /* PSK client */
  struct psk_entry *psk;        /* PSK server: the users */
  size_t npsk;
  gnutls_certificate_credentials_t x509;
  gnutls_psk_server_credentials_t psk_server;
  gnutls_psk_client_credentials_t psk_client;
  gnutls_priority_t priority;
  bool verify_hostname;
  int connect_timeout_ms;
  int handshake_timeout_ms;
};

struct colo_listener {
  /* Set by colo_listen, then constant. */
  struct colo_tls *tls;
  int fd;
  char address[ADDR_STR_MAX];
};

struct colo_conn {
  /* Set while connecting, then constant. */
  struct colo_tls *tls;
  int fd;
  gnutls_session_t session;     /* NULL: insecure */
  char peer[ADDR_STR_MAX];      /* numeric address:port */
  char *name;                   /* as the operator wrote it, or peer */
  char *identity;
  char *hostname;               /* client: the host connected to */
  gnutls_typed_vdata_st vdata[2]; /* what the peer's certificate must
                                     match; GnuTLS keeps a pointer */
  /* Written during the handshake only (one thread): its diagnosis. */
  unsigned char first[GREETING_SIZE]; /* first bytes received */
  size_t nfirst;
  bool recording;
  char refusal[256];            /* why psk_server_key refused */
  char psk_user[100];           /* PSK server: the user the peer named */
  int failed_errno;             /* why colo_accept_handshake failed */
  /* Set by colo_conn_set_timeout and colo_conn_set_deadline before the
   * I/O calls use them.
   */
  int timeout_ms;
  int64_t deadline;             /* monotonic ms; -1: none */
  int deadline_ms;              /* what it was set to, for messages */
};

static __thread char last_error[1024];
static void (*log_fn) (const char *msg);

const char *
colo_tls_last_error (void)
{
  return last_error[0] ? last_error : "unknown error";
}

void
colo_tls_set_log (void (*fn) (const char *msg))
{
  log_fn = fn;
}

static int set_error (int err, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* Record the message; returns -1 with errno = err.  %m is err. */
static int
set_error (int err, const char *fmt, ...)
{
  va_list ap;

  errno = err;
  va_start (ap, fmt);
  vsnprintf (last_error, sizeof last_error, fmt, ap);
  va_end (ap);
  errno = err;
  return -1;
}

static void debug (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));

static void
debug (const char *fmt, ...)
{
  char msg[512];
  va_list ap;
  int saved = errno;

  if (!log_fn)
    return;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  log_fn (msg);
  errno = saved;
}

/* ---- Time and waiting ---- */

static int64_t
now_ms (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The deadline timeout_ms from now; -1 (none) for a negative timeout. */
static int64_t
deadline_after (int timeout_ms)
{
  return timeout_ms < 0 ? -1 : now_ms () + timeout_ms;
}

/* Wait until fd is ready for events or the deadline passes: 1 ready
 * (or in error: the next call says which), 0 timed out, -1 error.
 */
static int
wait_fd (int fd, short events, int64_t deadline)
{
  struct pollfd pfd = { .fd = fd, .events = events };
  int r, ms;

  for (;;) {
    if (deadline < 0)
      ms = -1;
    else {
      int64_t left = deadline - now_ms ();
      ms = left <= 0 ? 0 : left > INT_MAX ? INT_MAX : (int) left;
    }
    r = poll (&pfd, 1, ms);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1)
      return -1;
    if (r == 0 && ms != 0)
      continue;                 /* woke early: check the time again */
    return r;
  }
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
      return set_error (EINVAL, "%s: expected [IPV6-ADDRESS]:PORT", addr);
    h = strndup (addr + 1, close - addr - 1);
    colon = close + 1;
  }
  else {
    colon = strrchr (addr, ':');
    if (colon == NULL)
      return set_error (EINVAL, "%s: expected ADDRESS:PORT", addr);
    if (memchr (addr, ':', colon - addr))
      return set_error (EINVAL, "%s: write an IPv6 address in brackets: "
                        "[ADDRESS]:PORT", addr);
    if (colon > addr)
      h = strndup (addr, colon - addr);
  }
  if ((addr[0] == '[' || colon > addr) && h == NULL)
    return set_error (errno, "strndup: %m");
  p = colon + 1;
  errno = 0;
  n = strtoul (p, &end, 10);
  if (*p < '0' || *p > '9' || *end || errno || n > 65535) {
    free (h);
    return set_error (EINVAL, "%s: the port must be a number from 0 to "
                      "65535", addr);
  }
  *port = strdup (p);
  if (*port == NULL) {
    free (h);
    return set_error (errno, "strdup: %m");
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

static bool
is_ip_literal (const char *host)
{
  unsigned char buf[sizeof (struct in6_addr)];

  return inet_pton (AF_INET, host, buf) == 1 ||
    inet_pton (AF_INET6, host, buf) == 1;
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
    return set_error (EINVAL, "%s: the address to connect to has no host",
                      addr);
  }
  r = getaddrinfo (host, port, &hints, res);
  free (host);
  free (port);
  if (r != 0)
    return set_error (r == EAI_SYSTEM ? errno : EHOSTUNREACH,
                      "%s: cannot resolve the address: %s", addr,
                      r == EAI_SYSTEM ? strerror (errno) : gai_strerror (r));
  return 0;
}

/* ---- Credentials ---- */

static char *
path_in (const char *dir, const char *file)
{
  char *path;

  if (asprintf (&path, "%s/%s", dir, file) == -1) {
    set_error (errno, "asprintf: %m");
    return NULL;
  }
  return path;
}

/* An unreadable file gets the system's reason rather than GnuTLS's. */
static int
check_readable (const char *path, const char *purpose)
{
  if (access (path, R_OK) == -1)
    return set_error (errno, "%s: %m (%s)", path, purpose);
  return 0;
}

static int
load_x509 (struct colo_tls *tls, const char *dir)
{
  const bool server = tls->role == COLO_TLS_SERVER;
  char *cert = NULL, *key = NULL, *crl = NULL;
  int err, r = -1;

  tls->ca_file = path_in (dir, "ca-cert.pem");
  cert = path_in (dir, server ? "server-cert.pem" : "client-cert.pem");
  key = path_in (dir, server ? "server-key.pem" : "client-key.pem");
  crl = path_in (dir, "ca-crl.pem");
  if (!tls->ca_file || !cert || !key || !crl)
    goto out;
  if (check_readable (tls->ca_file, "the CA that signs both sides' "
                      "certificates") == -1 ||
      check_readable (cert, server ? "the secondary's certificate" :
                      "the primary's certificate") == -1 ||
      check_readable (key, "its private key") == -1)
    goto out;

  err = gnutls_certificate_allocate_credentials (&tls->x509);
  if (err < 0) {
    set_error (ENOMEM, "gnutls_certificate_allocate_credentials: %s",
               gnutls_strerror (err));
    goto out;
  }
  err = gnutls_certificate_set_x509_trust_file (tls->x509, tls->ca_file,
                                                GNUTLS_X509_FMT_PEM);
  if (err <= 0) {
    set_error (EINVAL, "%s: %s", tls->ca_file,
               err == 0 ? "no certificate in the file" :
               gnutls_strerror (err));
    goto out;
  }
  if (access (crl, R_OK) == 0) {
    err = gnutls_certificate_set_x509_crl_file (tls->x509, crl,
                                                GNUTLS_X509_FMT_PEM);
    if (err < 0) {
      set_error (EINVAL, "%s: %s", crl, gnutls_strerror (err));
      goto out;
    }
  }
  err = gnutls_certificate_set_x509_key_file (tls->x509, cert, key,
                                              GNUTLS_X509_FMT_PEM);
  if (err < 0) {
    set_error (EINVAL, "%s, %s: %s", cert, key, gnutls_strerror (err));
    goto out;
  }
  r = 0;
 out:
  free (cert);
  free (key);
  free (crl);
  return r;
}

/* Parse one "username:hexkey" line into e. */
static int
parse_psk_line (const char *file, unsigned lineno, char *line,
                struct psk_entry *e)
{
  char *colon = strchr (line, ':');
  gnutls_datum_t hex;
  int err;

  if (colon == NULL || colon == line || colon[1] == '\0')
    return set_error (EINVAL, "%s:%u: expected username:hexkey (psktool "
                      "writes this format)", file, lineno);
  *colon = '\0';
  hex.data = (unsigned char *) colon + 1;
  hex.size = strlen (colon + 1);
  err = gnutls_hex_decode2 (&hex, &e->key);
  if (err < 0)
    return set_error (EINVAL, "%s:%u: the key of user %s is not "
                      "hexadecimal: %s", file, lineno, line,
                      gnutls_strerror (err));
  e->user = strdup (line);
  if (e->user == NULL) {
    gnutls_free (e->key.data);
    return set_error (errno, "strdup: %m");
  }
  return 0;
}

static void
free_psk (struct colo_tls *tls)
{
  size_t i;

  for (i = 0; i < tls->npsk; i++) {
    free (tls->psk[i].user);
    gnutls_memset (tls->psk[i].key.data, 0, tls->psk[i].key.size);
    gnutls_free (tls->psk[i].key.data);
  }
  free (tls->psk);
  tls->psk = NULL;
  tls->npsk = 0;
}

/* Read every user of the PSK file into tls->psk. */
static int
read_psk_file (struct colo_tls *tls, const char *file)
{
  FILE *fp;
  char *line = NULL;
  size_t size = 0;
  ssize_t len;
  unsigned lineno = 0;
  int r = -1;

  fp = fopen (file, "re");
  if (fp == NULL)
    return set_error (errno, "%s: %m (the pre-shared keys)", file);
  while ((len = getline (&line, &size, fp)) != -1) {
    struct psk_entry *p;

    lineno++;
    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
      line[--len] = '\0';
    if (len == 0)
      continue;
    p = realloc (tls->psk, (tls->npsk + 1) * sizeof *p);
    if (p == NULL) {
      set_error (errno, "realloc: %m");
      goto out;
    }
    tls->psk = p;
    if (parse_psk_line (file, lineno, line, &tls->psk[tls->npsk]) == -1)
      goto out;
    tls->npsk++;
  }
  if (ferror (fp)) {
    set_error (errno, "%s: read: %m", file);
    goto out;
  }
  if (tls->npsk == 0) {
    set_error (EINVAL, "%s: no keys in the file (make one with: psktool "
               "-u USER -p %s)", file, file);
    goto out;
  }
  r = 0;
 out:
  if (line)
    gnutls_memset (line, 0, size);
  free (line);
  fclose (fp);
  return r;
}

static const struct psk_entry *
find_psk (const struct colo_tls *tls, const char *user)
{
  size_t i;

  for (i = 0; i < tls->npsk; i++)
    if (strcmp (tls->psk[i].user, user) == 0)
      return &tls->psk[i];
  return NULL;
}

/* GnuTLS asks the server for a user's key.  An unknown user gets a
 * random key, so that the client cannot tell it from a wrong key (no
 * probing for user names), and is named in the server's error.
 */
static int
psk_server_key (gnutls_session_t session, const gnutls_datum_t *username,
                gnutls_datum_t *key)
{
  struct colo_conn *conn = gnutls_session_get_ptr (session);
  const struct psk_entry *e = NULL;
  unsigned size = 32;

  if (username->size < sizeof conn->psk_user &&
      !memchr (username->data, 0, username->size)) {
    memcpy (conn->psk_user, username->data, username->size);
    conn->psk_user[username->size] = '\0';
    e = find_psk (conn->tls, conn->psk_user);
  }
  else
    snprintf (conn->psk_user, sizeof conn->psk_user, "(%u bytes)",
              username->size);
  if (e == NULL)
    snprintf (conn->refusal, sizeof conn->refusal,
              "the peer's PSK user '%s' is not in %s", conn->psk_user,
              conn->tls->psk_file);
  else
    size = e->key.size;
  key->data = gnutls_malloc (size);
  if (key->data == NULL)
    return -1;
  key->size = size;
  if (e)
    memcpy (key->data, e->key.data, size);
  else if (gnutls_rnd (GNUTLS_RND_KEY, key->data, size) < 0) {
    gnutls_free (key->data);
    key->data = NULL;
    return -1;
  }
  return 0;
}

static int
load_psk (struct colo_tls *tls, const struct colo_tls_config *cfg)
{
  const struct psk_entry *e;
  int err;

  if (read_psk_file (tls, cfg->psk_file) == -1)
    return -1;
  if (tls->role == COLO_TLS_SERVER) {
    err = gnutls_psk_allocate_server_credentials (&tls->psk_server);
    if (err < 0)
      return set_error (ENOMEM, "gnutls_psk_allocate_server_credentials: "
                        "%s", gnutls_strerror (err));
    gnutls_psk_set_server_credentials_function2 (tls->psk_server,
                                                 psk_server_key);
    return 0;
  }

  if (cfg->psk_username == NULL && tls->npsk > 1)
    return set_error (EINVAL, "%s has several users: choose one with "
                      "--tls-username", cfg->psk_file);
  e = cfg->psk_username ? find_psk (tls, cfg->psk_username) : &tls->psk[0];
  if (e == NULL)
    return set_error (EINVAL, "%s: no key for user %s", cfg->psk_file,
                      cfg->psk_username);
  tls->psk_username = strdup (e->user);
  if (tls->psk_username == NULL)
    return set_error (errno, "strdup: %m");
  err = gnutls_psk_allocate_client_credentials (&tls->psk_client);
  if (err < 0)
    return set_error (ENOMEM, "gnutls_psk_allocate_client_credentials: %s",
                      gnutls_strerror (err));
  err = gnutls_psk_set_client_credentials (tls->psk_client, e->user,
                                           &e->key, GNUTLS_PSK_KEY_RAW);
  if (err < 0)
    return set_error (EINVAL, "gnutls_psk_set_client_credentials: %s",
                      gnutls_strerror (err));
  free_psk (tls);               /* GnuTLS has its copy */
  return 0;
}

static int
load_priority (struct colo_tls *tls, const struct colo_tls_config *cfg)
{
  const char *base = cfg->priority ? cfg->priority : COLO_TLS_PRIORITY;
  const char *errpos = NULL;
  char *prio;
  int err;

  if (asprintf (&prio, "%s%s%s", base, tls->mode == MODE_PSK ? ":" : "",
                tls->mode == MODE_PSK ? COLO_TLS_PSK_KX : "") == -1)
    return set_error (errno, "asprintf: %m");
  err = gnutls_priority_init (&tls->priority, prio, &errpos);
  if (err < 0)
    set_error (EINVAL, "TLS priority \"%s\": %s%s%s", prio,
               gnutls_strerror (err), errpos ? " at: " : "",
               errpos ? errpos : "");
  free (prio);
  return err < 0 ? -1 : 0;
}

static int
check_config (const struct colo_tls_config *cfg)
{
  int n = !!cfg->certificates + !!cfg->psk_file + !!cfg->insecure;

  if (n == 0)
    return set_error (EINVAL, "no TLS credentials: give --tls-certificates "
                      "DIR or --tls-psk FILE (plaintext needs --insecure)");
  if (n > 1)
    return set_error (EINVAL, "--tls-certificates, --tls-psk and "
                      "--insecure exclude each other");
  if (cfg->psk_username && !cfg->psk_file)
    return set_error (EINVAL, "--tls-username needs --tls-psk");
  if (cfg->connect_timeout_ms < 0 || cfg->handshake_timeout_ms < 0)
    return set_error (EINVAL, "timeouts must be positive");
  return 0;
}

struct colo_tls *
colo_tls_new (const struct colo_tls_config *cfg)
{
  struct colo_tls *tls;
  int r = 0;

  if (check_config (cfg) == -1)
    return NULL;
  tls = calloc (1, sizeof *tls);
  if (tls == NULL) {
    set_error (errno, "calloc: %m");
    return NULL;
  }
  tls->role = cfg->role;
  tls->mode = cfg->certificates ? MODE_X509 :
    cfg->psk_file ? MODE_PSK : MODE_INSECURE;
  tls->verify_hostname = !cfg->no_verify_hostname;
  tls->connect_timeout_ms = cfg->connect_timeout_ms ?
    cfg->connect_timeout_ms : COLO_TLS_CONNECT_TIMEOUT_MS;
  tls->handshake_timeout_ms = cfg->handshake_timeout_ms ?
    cfg->handshake_timeout_ms : COLO_TLS_HANDSHAKE_TIMEOUT_MS;
  if (tls->mode == MODE_PSK) {
    tls->psk_file = strdup (cfg->psk_file);
    if (tls->psk_file == NULL)
      r = set_error (errno, "strdup: %m");
  }
  if (r == 0 && tls->mode == MODE_X509)
    r = load_x509 (tls, cfg->certificates);
  else if (r == 0 && tls->mode == MODE_PSK)
    r = load_psk (tls, cfg);
  if (r == 0 && tls->mode != MODE_INSECURE)
    r = load_priority (tls, cfg);
  if (r == -1) {
    int saved = errno;
    colo_tls_free (tls);
    errno = saved;
    return NULL;
  }
  return tls;
}

void
colo_tls_free (struct colo_tls *tls)
{
  if (tls == NULL)
    return;
  if (tls->x509)
    gnutls_certificate_free_credentials (tls->x509);
  if (tls->psk_server)
    gnutls_psk_free_server_credentials (tls->psk_server);
  if (tls->psk_client)
    gnutls_psk_free_client_credentials (tls->psk_client);
  if (tls->priority)
    gnutls_priority_deinit (tls->priority);
  free_psk (tls);
  free (tls->ca_file);
  free (tls->psk_file);
  free (tls->psk_username);
  free (tls);
}

/* ---- Sockets ---- */

static int
set_socket_options (int fd)
{
  int one = 1;

  if (setsockopt (fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == -1)
    return set_error (errno, "setsockopt TCP_NODELAY: %m");
  return 0;
}

/* Give up on a peer without losing what was just sent to it (our alert
 * or greeting) to a reset, which unread bytes on our side would cause:
 * end our side, read and drop until the peer closes, briefly.
 */
static void
linger_close (int fd)
{
  int64_t deadline = now_ms () + LINGER_MS;
  char buf[4096];

  shutdown (fd, SHUT_WR);
  while (wait_fd (fd, POLLIN, deadline) == 1) {
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
    set_error (saved, "listen on %s: %m", addr);
    return NULL;
  }
  l = calloc (1, sizeof *l);
  if (l == NULL) {
    set_error (errno, "calloc: %m");
    close (fd);
    return NULL;
  }
  l->tls = tls;
  l->fd = fd;
  if (getsockname (fd, (struct sockaddr *) &ss, &sslen) == 0)
    format_address ((struct sockaddr *) &ss, sslen, l->address,
                    sizeof l->address);
  debug ("listening on %s", l->address);
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
    set_error (errno, "calloc: %m");
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
    set_error (errno, "strdup: %m");
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

static int handshake (struct colo_conn *conn);

struct colo_conn *
colo_accept_socket (struct colo_listener *l)
{
  struct colo_conn *conn;
  int fd;

  do
    fd = accept4 (l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  while (fd == -1 && errno == EINTR);
  if (fd == -1) {
    set_error (errno, "accept on %s: %m", l->address);
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
  if (handshake (conn) == -1) {
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

  r = wait_fd (l->fd, POLLIN, deadline_after (timeout_ms));
  if (r == 0) {
    set_error (ETIMEDOUT, "accept on %s: no peer within %d ms", l->address,
               timeout_ms);
    return NULL;
  }
  if (r == -1) {
    set_error (errno, "accept on %s: poll: %m", l->address);
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
    int r = wait_fd (fd, POLLOUT, deadline_after (timeout_ms));
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
      set_error (err, "connect to %s: %s", addr, why);
    else
      set_error (err, "connect to %s (%s): %s", addr, tried, why);
    return NULL;
  }
  conn = conn_new (tls, fd, addr);
  if (conn == NULL || colo_parse_address (addr, &conn->hostname, &port) == -1
      || set_socket_options (fd) == -1 || handshake (conn) == -1) {
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

/* ---- GnuTLS transport: the socket, recording the first bytes ---- */

static ssize_t
tls_pull (gnutls_transport_ptr_t ptr, void *buf, size_t len)
{
  struct colo_conn *conn = ptr;
  ssize_t r = recv (conn->fd, buf, len, 0);

  if (r == -1) {
    gnutls_transport_set_errno (conn->session, errno);
    return -1;
  }
  if (conn->recording && conn->nfirst < sizeof conn->first) {
    size_t n = sizeof conn->first - conn->nfirst;
    if (n > (size_t) r)
      n = r;
    memcpy (conn->first + conn->nfirst, buf, n);
    conn->nfirst += n;
  }
  return r;
}

static ssize_t
tls_push (gnutls_transport_ptr_t ptr, const void *buf, size_t len)
{
  struct colo_conn *conn = ptr;
  ssize_t r = send (conn->fd, buf, len, MSG_NOSIGNAL);

  if (r == -1)
    gnutls_transport_set_errno (conn->session, errno);
  return r;
}

static int
tls_pull_timeout (gnutls_transport_ptr_t ptr, unsigned ms)
{
  struct colo_conn *conn = ptr;
  int64_t deadline = ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : now_ms () + ms;

  return wait_fd (conn->fd, POLLIN, deadline);
}

/* ---- Why a handshake failed ---- */

static int fail_step (struct colo_conn *conn, int err, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

/* Record "<step> with <peer> failed: <reason>"; returns -1. */
static int
fail_step (struct colo_conn *conn, int err, const char *fmt, ...)
{
  char reason[768];
  va_list ap;

  errno = err;
  va_start (ap, fmt);
  vsnprintf (reason, sizeof reason, fmt, ap);
  va_end (ap);
  return set_error (err, "%s with %s failed: %s",
                    conn->tls->mode == MODE_INSECURE ?
                    "plaintext (--insecure) connection" : "TLS handshake",
                    conn->name, reason);
}

/* True if the peer answered with the insecure server's greeting. */
static bool
peer_is_insecure (const struct colo_conn *conn)
{
  return conn->nfirst > 0 &&
    memcmp (conn->first, GREETING_SERVER, conn->nfirst) == 0;
}

static int
cert_failed (struct colo_conn *conn)
{
  unsigned status = gnutls_session_get_verify_cert_status (conn->session);
  gnutls_datum_t text = { .data = NULL };
  const char *what;
  char why[256];

  if (status & GNUTLS_CERT_SIGNER_NOT_FOUND)
    snprintf (why, sizeof why, "is not signed by a trusted CA (%s)",
              conn->tls->ca_file);
  else if (status & GNUTLS_CERT_UNEXPECTED_OWNER)
    snprintf (why, sizeof why, "is not issued to %s "
              "(--tls-no-verify-hostname skips this check)",
              conn->hostname);
  else {
    what = status & GNUTLS_CERT_EXPIRED ? "has expired" :
      status & GNUTLS_CERT_NOT_ACTIVATED ? "is not valid yet (check "
      "both clocks)" :
      status & GNUTLS_CERT_REVOKED ? "is revoked (ca-crl.pem)" :
      status & GNUTLS_CERT_PURPOSE_MISMATCH ? (conn->tls->role ==
      COLO_TLS_SERVER ? "is not for TLS clients (tls_www_client), so "
      "the primary cannot use it" : "is not for TLS servers "
      "(tls_www_server), so the secondary cannot use it") :
      "was not accepted";
    snprintf (why, sizeof why, "%s", what);
  }
  gnutls_certificate_verification_status_print (status, GNUTLS_CRT_X509,
                                                &text, 0);
  fail_step (conn, EACCES, "the peer's certificate %s [GnuTLS: %s]", why,
             text.data ? (const char *) text.data : "?");
  gnutls_free (text.data);
  return -1;
}

/* What the peer's alert most likely means, in buf; or NULL. */
static const char *
alert_hint (const struct colo_conn *conn, gnutls_alert_description_t a,
            char *buf, size_t size)
{
  switch (a) {
  case GNUTLS_A_BAD_CERTIFICATE:
  case GNUTLS_A_UNKNOWN_CA:
  case GNUTLS_A_CERTIFICATE_UNKNOWN:
  case GNUTLS_A_UNSUPPORTED_CERTIFICATE:
  case GNUTLS_A_CERTIFICATE_EXPIRED:
  case GNUTLS_A_CERTIFICATE_REVOKED:
  case GNUTLS_A_ACCESS_DENIED:
    return "the peer does not accept this side's certificate (its log "
      "says why: not signed by the CA in its ca-cert.pem, expired, or not "
      "for this side's role)";
  case GNUTLS_A_CERTIFICATE_REQUIRED:
    return "the peer requires a certificate from this side";
  case GNUTLS_A_UNKNOWN_PSK_IDENTITY:
  case GNUTLS_A_ILLEGAL_PARAMETER:
  case GNUTLS_A_DECRYPT_ERROR:
  case GNUTLS_A_BAD_RECORD_MAC:
    if (conn->tls->mode != MODE_PSK)
      return NULL;
    snprintf (buf, size, "the peer does not accept PSK user '%s' with "
              "this key (the user is not in the peer's file, or its key "
              "there differs)", conn->tls->psk_username);
    return buf;
  case GNUTLS_A_HANDSHAKE_FAILURE:
  case GNUTLS_A_INSUFFICIENT_SECURITY:
  case GNUTLS_A_PROTOCOL_VERSION:
    return "no common TLS 1.3 parameters: do both sides use the same kind "
      "of credentials (X.509 or PSK)?";
  default:
    return NULL;
  }
}

/* Record why the handshake (or the greeting that ends it) failed with
 * GnuTLS error err; returns -1.
 */
static int
handshake_failed (struct colo_conn *conn, int err)
{
  gnutls_session_t s = conn->session;
  const bool psk = conn->tls->mode == MODE_PSK;

  if (err != GNUTLS_E_FATAL_ALERT_RECEIVED &&
      err != GNUTLS_E_PREMATURE_TERMINATION && err != GNUTLS_E_PUSH_ERROR &&
      err != GNUTLS_E_PULL_ERROR)
    gnutls_alert_send_appropriate (s, err);  /* best effort */

  if (conn->refusal[0])
    return fail_step (conn, EACCES, "%s", conn->refusal);
  if (peer_is_insecure (conn))
    return fail_step (conn, EPROTO, "the peer does not use TLS: it runs "
                      "with --insecure (both sides must, or neither)");
  switch (err) {
  case GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR:
    return cert_failed (conn);
  case GNUTLS_E_FATAL_ALERT_RECEIVED: {
    gnutls_alert_description_t a = gnutls_alert_get (s);
    char buf[256];
    const char *hint = alert_hint (conn, a, buf, sizeof buf);
    return fail_step (conn, EACCES, "the peer refused the connection with "
                      "TLS alert '%s'%s%s", gnutls_alert_get_name (a),
                      hint ? ": " : "", hint ? hint : "");
  }
  case GNUTLS_E_NO_CERTIFICATE_FOUND:
  case GNUTLS_E_CERTIFICATE_REQUIRED:
    return fail_step (conn, EACCES, "the peer sent no certificate, and one "
                      "is required (%s)", gnutls_strerror (err));
  case GNUTLS_E_PREMATURE_TERMINATION:
  case GNUTLS_E_PULL_ERROR:
  case GNUTLS_E_PUSH_ERROR:
    return fail_step (conn, ECONNRESET, "the peer closed the connection "
                      "(%s): see its log for why", gnutls_strerror (err));
  case GNUTLS_E_UNEXPECTED_PACKET_LENGTH:
  case GNUTLS_E_UNSUPPORTED_VERSION_PACKET:
  case GNUTLS_E_UNEXPECTED_PACKET:
    return fail_step (conn, EPROTO, "the peer does not speak TLS 1.3 (%s)",
                      gnutls_strerror (err));
  case GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER:
  case GNUTLS_E_DECRYPTION_FAILED:
  case GNUTLS_E_ERROR_IN_FINISHED_PACKET:
  case GNUTLS_E_MAC_VERIFY_FAILED:
    if (psk && conn->tls->role == COLO_TLS_SERVER && conn->psk_user[0])
      return fail_step (conn, EACCES, "the peer's key for PSK user '%s' "
                        "differs from the one in %s (%s)", conn->psk_user,
                        conn->tls->psk_file, gnutls_strerror (err));
    if (psk)
      return fail_step (conn, EACCES, "the peer does not accept PSK user "
                        "'%s' with this key (%s)", conn->tls->psk_username,
                        gnutls_strerror (err));
    break;
  case GNUTLS_E_INSUFFICIENT_CREDENTIALS:
  case GNUTLS_E_NO_CIPHER_SUITES:
  case GNUTLS_E_NO_COMMON_KEY_SHARE:
  case GNUTLS_E_UNKNOWN_PK_ALGORITHM:
    return fail_step (conn, EACCES, "no common TLS 1.3 parameters: do both "
                      "sides use the same kind of credentials (X.509 or "
                      "PSK)? (%s)", gnutls_strerror (err));
  default:
    break;
  }
  return fail_step (conn, EPROTO, "%s (GnuTLS error %d)",
                    gnutls_strerror (err), err);
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
    return handshake_failed (conn, gerr);
  if (handshaking)
    return fail_step (conn, err, "%s the peer: %s", what, strerror (err));
  switch (gerr) {
  case 0:
    return set_error (err, "%s %s: %s", what, conn->name, strerror (err));
  case GNUTLS_E_PREMATURE_TERMINATION:
    return set_error (ECONNRESET, "%s %s: the peer closed the connection "
                      "without TLS close_notify", what, conn->name);
  case GNUTLS_E_FATAL_ALERT_RECEIVED:
    return set_error (ECONNRESET, "%s %s: the peer sent TLS alert '%s'",
                      what, conn->name,
                      gnutls_alert_get_name (gnutls_alert_get
                                             (conn->session)));
  default:
    return set_error (EIO, "%s %s: %s", what, conn->name,
                      gnutls_strerror (gerr));
  }
}

static int
io_timed_out (struct colo_conn *conn, bool handshaking, const char *what,
              int timeout_ms)
{
  if (handshaking)
    return fail_step (conn, ETIMEDOUT, "no answer within %d ms",
                      conn->tls->handshake_timeout_ms);
  if (conn->deadline >= 0)
    return set_error (ETIMEDOUT, "%s %s: not done within the %d ms "
                      "allowed", what, conn->name, conn->deadline_ms);
  return set_error (ETIMEDOUT, "%s %s: nothing for %d ms", what, conn->name,
                    timeout_ms);
}

/* Receive 1 to len bytes before the deadline: the count, 0 at EOF, -1. */
static ssize_t
conn_recv (struct colo_conn *conn, void *buf, size_t len, int64_t deadline,
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
    w = wait_fd (conn->fd, POLLIN, deadline);
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
static int
conn_recv_all (struct colo_conn *conn, void *buf, size_t len,
               int64_t deadline, int timeout_ms, bool handshaking)
{
  char *p = buf;
  size_t got = 0;

  while (got < len) {
    int64_t d = deadline >= 0 ? deadline : deadline_after (timeout_ms);
    ssize_t r = conn_recv (conn, p + got, len - got, d, timeout_ms,
                           handshaking);
    if (r == -1)
      return -1;
    if (r == 0 && got == 0)
      return 0;
    if (r == 0) {
      if (handshaking)
        return fail_step (conn, ECONNRESET, "the peer closed the "
                          "connection");
      return set_error (ECONNRESET, "receive from %s: the peer closed the "
                        "connection after %zu of %zu bytes", conn->name,
                        got, len);
    }
    got += r;
  }
  return 1;
}

static int
conn_send_all (struct colo_conn *conn, const void *buf, size_t len,
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
    w = wait_fd (conn->fd, POLLOUT, d);
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
  return conn_send_all (conn, buf, len, conn->deadline, conn->timeout_ms,
                        false);
}

ssize_t
colo_recv_some (struct colo_conn *conn, void *buf, size_t len)
{
  if (len == 0)
    return set_error (EINVAL, "receive from %s: zero-length buffer",
                      conn->name);
  return conn_recv (conn, buf, len, conn->deadline >= 0 ? conn->deadline
                    : deadline_after (conn->timeout_ms), conn->timeout_ms,
                    false);
}

int
colo_recv_all (struct colo_conn *conn, void *buf, size_t len)
{
  return conn_recv_all (conn, buf, len, conn->deadline, conn->timeout_ms,
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

/* ---- Establishing a connection ---- */

/* Insecure: the client speaks first, so that the server can recognise a
 * TLS client hello; each side recognises a TLS peer by its first byte.
 */
static int
plain_greeting (struct colo_conn *conn, int64_t deadline)
{
  const bool server = conn->tls->role == COLO_TLS_SERVER;
  const int ms = conn->tls->handshake_timeout_ms;
  unsigned char g[GREETING_SIZE] = { 0 };
  size_t got = 0;

  if (!server &&
      conn_send_all (conn, GREETING_CLIENT, GREETING_SIZE, deadline, ms,
                     true) == -1)
    return -1;
  /* Piecewise: a TLS alert is shorter than a greeting. */
  while (got < GREETING_SIZE) {
    ssize_t r = conn_recv (conn, g + got, GREETING_SIZE - got, deadline, ms,
                           true);
    if (r == -1)
      return -1;
    if (r == 0 || g[0] == TLS_RECORD_HANDSHAKE || g[0] == TLS_RECORD_ALERT)
      break;
    got += r;
  }
  if (got == 0 && g[0] != TLS_RECORD_HANDSHAKE && g[0] != TLS_RECORD_ALERT)
    return fail_step (conn, ECONNRESET, "the peer closed the connection "
                      "before its greeting");
  if (server && g[0] == TLS_RECORD_HANDSHAKE) {
    /* Tell the TLS client what it is talking to (tls_pull sees it). */
    send (conn->fd, GREETING_SERVER, GREETING_SIZE, MSG_NOSIGNAL);
    return fail_step (conn, EPROTO, "the peer started a TLS handshake, but "
                      "this side runs with --insecure (both sides must, or "
                      "neither)");
  }
  if (!server && (g[0] == TLS_RECORD_ALERT || g[0] == TLS_RECORD_HANDSHAKE))
    return fail_step (conn, EPROTO, "the peer requires TLS, but this side "
                      "runs with --insecure (both sides must, or neither)");
  if (got < GREETING_SIZE ||
      memcmp (g, server ? GREETING_CLIENT : GREETING_SERVER,
              GREETING_SIZE) != 0)
    return fail_step (conn, EPROTO, "the peer is not fleece-colod, or "
                      "another version of it (%s)",
                      got < GREETING_SIZE ? "it closed the connection during "
                      "the greeting" : "unexpected greeting");
  if (server &&
      conn_send_all (conn, GREETING_SERVER, GREETING_SIZE, deadline, ms,
                     true) == -1)
    return -1;
  conn->identity = strdup ("insecure");
  if (conn->identity == NULL)
    return set_error (errno, "strdup: %m");
  return 0;
}

/* TLS server: refuse a peer whose first byte is not a TLS handshake
 * record at once, with a TLS alert that an insecure client recognises,
 * rather than letting GnuTLS wait for a client hello.
 */
static int
check_client_hello (struct colo_conn *conn, int64_t deadline)
{
  /* Record header (alert, TLS 1.2 version), level fatal, protocol_version */
  static const unsigned char alert[] = {
    TLS_RECORD_ALERT, 3, 3, 0, 2, 2, GNUTLS_A_PROTOCOL_VERSION
  };
  unsigned char b[GREETING_SIZE];
  ssize_t r;
  int w;

  for (;;) {
    w = wait_fd (conn->fd, POLLIN, deadline);
    if (w == 0)
      return fail_step (conn, ETIMEDOUT, "no TLS client hello within %d ms",
                        conn->tls->handshake_timeout_ms);
    r = w == -1 ? -1 : recv (conn->fd, b, sizeof b, MSG_PEEK);
    if (r > 0)
      break;
    if (r == 0)
      return fail_step (conn, ECONNRESET, "the peer closed the connection "
                        "before its TLS client hello");
    if (errno != EINTR && errno != EAGAIN)
      return fail_step (conn, errno, "receive from the peer: %m");
  }
  if (b[0] == TLS_RECORD_HANDSHAKE)
    return 0;
  send (conn->fd, alert, sizeof alert, MSG_NOSIGNAL);
  if (memcmp (b, GREETING_CLIENT, r) == 0)
    return fail_step (conn, EPROTO, "the peer does not use TLS: it runs "
                      "with --insecure (both sides must, or neither)");
  return fail_step (conn, EPROTO, "the peer does not speak TLS (its first "
                    "byte is 0x%02x, not a TLS client hello)", b[0]);
}

/* X.509: what the peer's certificate must be: signed by the CA (always
 * checked), for the peer's role, and on the client for the host name or
 * IP address connected to.
 */
static int
set_verification (struct colo_conn *conn)
{
  gnutls_session_t s = conn->session;
  const bool server = conn->tls->role == COLO_TLS_SERVER;
  const char *host = conn->hostname;
  unsigned n = 0;
  int err;

  conn->vdata[n].type = GNUTLS_DT_KEY_PURPOSE_OID;
  conn->vdata[n].data = (unsigned char *)
    (server ? GNUTLS_KP_TLS_WWW_CLIENT : GNUTLS_KP_TLS_WWW_SERVER);
  conn->vdata[n++].size = 0;
  if (!server && host && conn->tls->verify_hostname) {
    conn->vdata[n].type = GNUTLS_DT_DNS_HOSTNAME;  /* or a textual IP */
    conn->vdata[n].data = (unsigned char *) host;
    conn->vdata[n++].size = 0;
  }
  gnutls_session_set_verify_cert2 (s, conn->vdata, n, 0);
  if (server) {
    gnutls_certificate_server_set_request (s, GNUTLS_CERT_REQUIRE);
    /* Without the list of acceptable CAs, a client with a certificate
     * from another CA sends it anyway, and is told why it is refused,
     * rather than sending none.
     */
    gnutls_certificate_send_x509_rdn_sequence (s, 1);
  }
  else if (host && !is_ip_literal (host)) {
    err = gnutls_server_name_set (s, GNUTLS_NAME_DNS, host, strlen (host));
    if (err < 0)
      return set_error (EIO, "gnutls_server_name_set: %s",
                        gnutls_strerror (err));
  }
  return 0;
}

static int
session_credentials (struct colo_conn *conn)
{
  struct colo_tls *tls = conn->tls;
  gnutls_session_t s = conn->session;
  const bool server = tls->role == COLO_TLS_SERVER;
  int err;

  if (tls->mode == MODE_PSK)
    err = gnutls_credentials_set (s, GNUTLS_CRD_PSK,
                                  server ? (void *) tls->psk_server :
                                  (void *) tls->psk_client);
  else
    err = gnutls_credentials_set (s, GNUTLS_CRD_CERTIFICATE, tls->x509);
  if (err < 0)
    return set_error (EIO, "gnutls_credentials_set: %s",
                      gnutls_strerror (err));
  if (tls->mode != MODE_X509)
    return 0;
  return set_verification (conn);
}

static int
session_new (struct colo_conn *conn)
{
  const bool server = conn->tls->role == COLO_TLS_SERVER;
  int err;

  err = gnutls_init (&conn->session,
                     (server ? GNUTLS_SERVER : GNUTLS_CLIENT) |
                     GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL | GNUTLS_NO_TICKETS);
  if (err < 0) {
    conn->session = NULL;
    return set_error (ENOMEM, "gnutls_init: %s", gnutls_strerror (err));
  }
  gnutls_session_set_ptr (conn->session, conn);
  err = gnutls_priority_set (conn->session, conn->tls->priority);
  if (err < 0)
    return set_error (EIO, "gnutls_priority_set: %s", gnutls_strerror (err));
  if (session_credentials (conn) == -1)
    return -1;
  gnutls_transport_set_ptr (conn->session, conn);
  gnutls_transport_set_push_function (conn->session, tls_push);
  gnutls_transport_set_pull_function (conn->session, tls_pull);
  gnutls_transport_set_pull_timeout_function (conn->session,
                                              tls_pull_timeout);
  gnutls_handshake_set_timeout (conn->session,
                                conn->tls->handshake_timeout_ms);
  return 0;
}

/* The subject DN of the peer's certificate, or NULL. */
static char *
peer_dn (gnutls_session_t s)
{
  unsigned n = 0;
  const gnutls_datum_t *certs = gnutls_certificate_get_peers (s, &n);
  gnutls_x509_crt_t crt;
  gnutls_datum_t dn = { .data = NULL };
  char *r = NULL;

  if (certs == NULL || n == 0 || gnutls_x509_crt_init (&crt) < 0)
    return NULL;
  if (gnutls_x509_crt_import (crt, &certs[0], GNUTLS_X509_FMT_DER) == 0 &&
      gnutls_x509_crt_get_dn3 (crt, &dn, 0) == 0)
    r = strndup ((const char *) dn.data, dn.size);
  gnutls_free (dn.data);
  gnutls_x509_crt_deinit (crt);
  return r;
}

/* After the handshake: TLS 1.3 only, and who the peer is. */
static int
check_session (struct colo_conn *conn)
{
  gnutls_session_t s = conn->session;
  gnutls_protocol_t v = gnutls_protocol_get_version (s);
  char *desc;
  int r;

  if (v != GNUTLS_TLS1_3) {
    gnutls_alert_send (s, GNUTLS_AL_FATAL, GNUTLS_A_PROTOCOL_VERSION);
    return fail_step (conn, EPROTO, "%s was negotiated, but TLS 1.3 "
                      "is required (check --tls-priority on both sides)",
                      gnutls_protocol_get_name (v));
  }
  if (conn->tls->mode == MODE_X509) {
    conn->identity = peer_dn (s);
    if (conn->identity == NULL) {
      gnutls_alert_send (s, GNUTLS_AL_FATAL, GNUTLS_A_CERTIFICATE_REQUIRED);
      return fail_step (conn, EACCES, "the peer sent no certificate, and "
                        "one is required");
    }
  }
  else {
    const char *user = conn->tls->role == COLO_TLS_SERVER ?
      gnutls_psk_server_get_username (s) : conn->tls->psk_username;
    r = asprintf (&conn->identity, "psk:%s", user ? user : "?");
    if (r == -1) {
      conn->identity = NULL;
      return set_error (errno, "asprintf: %m");
    }
  }
  desc = gnutls_session_get_desc (s);
  debug ("TLS with %s: %s, peer %s", conn->name, desc ? desc : "?",
         conn->identity);
  gnutls_free (desc);
  return 0;
}

/* TLS: the handshake, retried while not fatal, then the server's
 * greeting (see the comment at the top).
 */
static int
tls_handshake (struct colo_conn *conn, int64_t deadline)
{
  const bool server = conn->tls->role == COLO_TLS_SERVER;
  const int ms = conn->tls->handshake_timeout_ms;
  unsigned char g[GREETING_SIZE];
  int err, w;

  conn->recording = true;
  for (;;) {
    err = gnutls_handshake (conn->session);
    if (err == 0)
      break;
    if (err != GNUTLS_E_AGAIN && err != GNUTLS_E_INTERRUPTED) {
      if (gnutls_error_is_fatal (err))
        return handshake_failed (conn, err);
      continue;
    }
    w = wait_fd (conn->fd, gnutls_record_get_direction (conn->session) ?
                 POLLOUT : POLLIN, deadline);
    if (w == 0)
      return fail_step (conn, ETIMEDOUT, "no answer within %d ms", ms);
    if (w == -1)
      return fail_step (conn, errno, "poll: %m");
  }
  conn->recording = false;
  if (check_session (conn) == -1)
    return -1;
  if (server)
    return conn_send_all (conn, GREETING_SERVER, GREETING_SIZE, deadline, ms,
                          true);
  err = conn_recv_all (conn, g, GREETING_SIZE, deadline, ms, true);
  if (err == 0)
    return fail_step (conn, ECONNRESET, "the peer closed the connection "
                      "after the handshake: see its log for why");
  if (err == -1)
    return -1;
  if (memcmp (g, GREETING_SERVER, GREETING_SIZE) != 0)
    return fail_step (conn, EPROTO, "the peer is not fleece-colod, or "
                      "another version of it (unexpected greeting)");
  return 0;
}

static int
handshake (struct colo_conn *conn)
{
  int64_t deadline = now_ms () + conn->tls->handshake_timeout_ms;

  if (conn->tls->mode == MODE_INSECURE)
    return plain_greeting (conn, deadline);
  if (conn->tls->role == COLO_TLS_SERVER &&
      check_client_hello (conn, deadline) == -1)
    return -1;
  if (session_new (conn) == -1)
    return -1;
  return tls_handshake (conn, deadline);
}
