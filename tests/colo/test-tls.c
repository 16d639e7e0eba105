/* The transport (colo/tls.c) over loopback: mutual X.509, PSK and
 * --insecure connections that work and carry data both ways at once, and
 * every kind of peer that must be refused, each with its message, within
 * the handshake timeout.
 *
 * Credentials are made at run time by tests/make-pki.sh (certtool,
 * psktool) in a temporary directory, plus:
 *   distrust/  the test client's certificate, but another CA as
 *              ca-cert.pem: the client does not trust the server
 *   badname/   a server certificate from the test CA for
 *              elsewhere.example only (no 127.0.0.1)
 *   noclient/  ca-cert.pem alone
 *   purpose/   certificates from the test CA for the wrong role: a
 *              server certificate only for TLS clients and a client
 *              certificate only for TLS servers
 *   bob.psk    user bob, unknown to the server
 * Servers run in a thread on 127.0.0.1, port 0; the client is main.
 */

#undef NDEBUG
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <gnutls/gnutls.h>

#include "monotonic.h"
#include "tap.h"
#include "tls.h"

#define DATA_SIZE  (4u << 20)   /* bytes each way in the round trips */
#define HS_MS      3000         /* handshake timeout of the tests */

static char tmp[] = "/tmp/fleece-test-tls.XXXXXX";
static char pki[256], other[256], distrust[256], badname[256],
  noclient[256], purpose[256], keys[256], wrong_keys[256], bob_keys[256];

/* A small deterministic generator for data and chunk sizes. */
static uint64_t
xorshift (uint64_t *s)
{
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

static bool
contains (const char *s, const char *what)
{
  if (strstr (s, what))
    return true;
  diag ("expected \"%s\" in: %s", what, s);
  return false;
}

static void
make_credentials (void)
{
  const char *src = getenv ("abs_top_srcdir");
  char cmd[4096];

  if (mkdtemp (tmp) == NULL)
    bail_out ("mkdtemp: %s", strerror (errno));
  if (src == NULL)
    src = FLEECE_TOP_SRCDIR;
  snprintf (cmd, sizeof cmd,
    "set -e; cd '%s'; bash '%s/tests/make-pki.sh' pki; "
    "mkdir distrust badname noclient; "
    "cp pki-other/other-ca-cert.pem distrust/ca-cert.pem; "
    "cp pki/client-cert.pem pki/client-key.pem distrust/; "
    "cp pki/ca-cert.pem badname/; cp pki/ca-cert.pem noclient/; "
    "certtool --generate-privkey --key-type=ecdsa --curve=secp256r1 "
    "  --outfile badname/server-key.pem 2>/dev/null; "
    "printf '%%s\\n' 'cn = elsewhere.example' "
    "  'dns_name = elsewhere.example' tls_www_server encryption_key "
    "  signing_key 'expiration_days = 2' >badname/server.info; "
    "certtool --generate-certificate --load-ca-certificate pki/ca-cert.pem "
    "  --load-ca-privkey pki/ca-key.pem --load-privkey "
    "  badname/server-key.pem --template badname/server.info "
    "  --outfile badname/server-cert.pem 2>/dev/null; "
    "mkdir purpose; cp pki/ca-cert.pem purpose/; "
    "for w in server client; do "
    "  certtool --generate-privkey --key-type=ecdsa --curve=secp256r1 "
    "    --outfile purpose/$w-key.pem 2>/dev/null; "
    "  if [ $w = server ]; then p=tls_www_client; else p=tls_www_server; fi; "
    "  printf '%%s\n' \"cn = wrong $w\" 'dns_name = localhost' "
    "    'ip_address = 127.0.0.1' $p encryption_key signing_key "
    "    'expiration_days = 2' >purpose/$w.info; "
    "  certtool --generate-certificate --load-ca-certificate "
    "    pki/ca-cert.pem --load-ca-privkey pki/ca-key.pem --load-privkey "
    "    purpose/$w-key.pem --template purpose/$w.info "
    "    --outfile purpose/$w-cert.pem 2>/dev/null; "
    "done; "
    "psktool -u bob -p bob.psk >/dev/null",
    tmp, src);
  if (system (cmd) != 0)
    bail_out ("making credentials failed: %s", cmd);
  snprintf (pki, sizeof pki, "%s/pki", tmp);
  snprintf (other, sizeof other, "%s/pki-other", tmp);
  snprintf (distrust, sizeof distrust, "%s/distrust", tmp);
  snprintf (badname, sizeof badname, "%s/badname", tmp);
  snprintf (noclient, sizeof noclient, "%s/noclient", tmp);
  snprintf (purpose, sizeof purpose, "%s/purpose", tmp);
  snprintf (keys, sizeof keys, "%s/pki/keys.psk", tmp);
  snprintf (wrong_keys, sizeof wrong_keys, "%s/pki/wrong-keys.psk", tmp);
  snprintf (bob_keys, sizeof bob_keys, "%s/bob.psk", tmp);
}

static void
remove_credentials (void)
{
  char cmd[512];

  snprintf (cmd, sizeof cmd, "rm -rf '%s'", tmp);
  if (system (cmd) != 0)
    diag ("could not remove %s", tmp);
}

/* ---- A server in a thread ---- */

enum action {
  ECHO,                         /* send back what arrives, until EOF */
  CLOSE,                        /* close at once */
};

struct server {
  struct colo_tls *tls;
  struct colo_listener *l;
  enum action action;
  pthread_t thread;
  /* Results, read after the join. */
  bool accepted;
  char identity[256];
  char error[1024];
  int saved_errno;
};

static void *
server_main (void *arg)
{
  struct server *s = arg;
  struct colo_conn *conn = colo_accept (s->l, 10000);
  uint64_t seed = 88172645463325252ull;
  size_t bufsize = 300000;
  char *buf;

  if (conn == NULL) {
    s->saved_errno = errno;
    snprintf (s->error, sizeof s->error, "%s", colo_tls_last_error ());
    return NULL;
  }
  s->accepted = true;
  snprintf (s->identity, sizeof s->identity, "%s", colo_conn_identity (conn));
  buf = malloc (bufsize);
  assert (buf);
  while (s->action == ECHO) {
    ssize_t r = colo_recv_some (conn, buf, 1 + xorshift (&seed) % bufsize);
    if (r <= 0 || colo_send_all (conn, buf, r) == -1)
      break;
  }
  free (buf);
  colo_close (conn);
  return NULL;
}

static struct server *
server_start (const struct colo_tls_config *cfg, enum action action)
{
  struct server *s = calloc (1, sizeof *s);

  assert (s);
  s->action = action;
  s->tls = colo_tls_new (cfg);
  if (s->tls == NULL)
    bail_out ("server credentials: %s", colo_tls_last_error ());
  s->l = colo_listen (s->tls, "127.0.0.1:0");
  if (s->l == NULL)
    bail_out ("listen: %s", colo_tls_last_error ());
  if (pthread_create (&s->thread, NULL, server_main, s) != 0)
    bail_out ("pthread_create failed");
  return s;
}

/* The port, as "127.0.0.1:PORT" or "HOST:PORT". */
static void
server_address (const struct server *s, const char *host, char *buf,
                size_t size)
{
  const char *a = colo_listener_address (s->l);

  snprintf (buf, size, "%s%s", host, strrchr (a, ':'));
}

/* Join; the server's view of its peer goes to identity if not NULL. */
static void
server_join (struct server *s, char *identity, size_t size)
{
  pthread_join (s->thread, NULL);
  if (identity)
    snprintf (identity, size, "%s", s->identity);
  colo_listener_close (s->l);
  colo_tls_free (s->tls);
  free (s);
}

/* ---- The client side ---- */

struct client {
  struct colo_tls *tls;
  struct colo_conn *conn;
  char error[1024];
  int saved_errno;
  int64_t ms;                   /* how long the connect took */
};

/* Connect to s (or to host instead of 127.0.0.1); true if connected. */
static bool
client_connect (struct client *c, const struct colo_tls_config *cfg,
                const struct server *s, const char *host)
{
  char addr[128];
  int64_t t0 = monotonic_ms ();

  memset (c, 0, sizeof *c);
  server_address (s, host ? host : "127.0.0.1", addr, sizeof addr);
  c->tls = colo_tls_new (cfg);
  if (c->tls == NULL)
    bail_out ("client credentials: %s", colo_tls_last_error ());
  c->conn = colo_connect (c->tls, addr);
  c->ms = monotonic_ms () - t0;
  if (c->conn == NULL) {
    c->saved_errno = errno;
    snprintf (c->error, sizeof c->error, "%s", colo_tls_last_error ());
  }
  return c->conn != NULL;
}

static void
client_close (struct client *c)
{
  colo_close (c->conn);
  colo_tls_free (c->tls);
}

/* certificates = pki, set by main. */
static struct colo_tls_config x509_server = {
  .role = COLO_TLS_SERVER, .handshake_timeout_ms = HS_MS,
};
static struct colo_tls_config x509_client = {
  .role = COLO_TLS_CLIENT, .handshake_timeout_ms = HS_MS,
};

/* ---- Data both ways at once ---- */

struct sender {
  struct colo_conn *conn;
  const unsigned char *data;
  int r;
};

static void *
sender_main (void *arg)
{
  struct sender *snd = arg;
  uint64_t seed = 0x9e3779b97f4a7c15ull;
  size_t off = 0;

  while (off < DATA_SIZE && snd->r == 0) {
    size_t n = 1 + xorshift (&seed) % 200000;
    if (n > DATA_SIZE - off)
      n = DATA_SIZE - off;
    snd->r = colo_send_all (snd->conn, snd->data + off, n);
    off += n;
  }
  return NULL;
}

/* Send DATA_SIZE random bytes in random chunks from one thread while
 * this one receives the echo in random chunks; true if it matches.
 */
static bool
round_trip (struct colo_conn *conn)
{
  unsigned char *out = malloc (DATA_SIZE), *in = malloc (DATA_SIZE);
  struct sender snd = { .conn = conn, .data = out };
  uint64_t seed = 0x2545f4914f6cdd1dull;
  pthread_t t;
  size_t i, got = 0;
  bool ok = true;

  assert (out && in);
  for (i = 0; i < DATA_SIZE; i += 8) {
    uint64_t v = xorshift (&seed);
    memcpy (out + i, &v, 8);
  }
  colo_conn_set_timeout (conn, 10000);
  assert (pthread_create (&t, NULL, sender_main, &snd) == 0);
  while (got < DATA_SIZE) {
    size_t n = 1 + xorshift (&seed) % 150000;
    if (n > DATA_SIZE - got)
      n = DATA_SIZE - got;
    if (n % 2) {
      ssize_t r = colo_recv_some (conn, in + got, n);
      if (r <= 0) {
        diag ("recv_some: %zd: %s", r, colo_tls_last_error ());
        ok = false;
        break;
      }
      got += r;
    }
    else {
      if (colo_recv_all (conn, in + got, n) != 1) {
        diag ("recv_all: %s", colo_tls_last_error ());
        ok = false;
        break;
      }
      got += n;
    }
  }
  pthread_join (t, NULL);
  if (snd.r != 0) {
    diag ("send_all failed");
    ok = false;
  }
  ok = ok && memcmp (in, out, DATA_SIZE) == 0;
  free (in);
  free (out);
  return ok;
}

/* ---- Cases ---- */

static void
test_addresses (void)
{
  char *h, *p;

  ok (colo_parse_address ("127.0.0.1:7000", &h, &p) == 0 &&
      strcmp (h, "127.0.0.1") == 0 && strcmp (p, "7000") == 0,
      "parse ADDR:PORT");
  free (h);
  free (p);
  ok (colo_parse_address ("[::1]:0", &h, &p) == 0 &&
      strcmp (h, "::1") == 0 && strcmp (p, "0") == 0,
      "parse [IPV6]:PORT");
  free (h);
  free (p);
  ok (colo_parse_address (":7000", &h, &p) == 0 && h == NULL &&
      strcmp (p, "7000") == 0, "parse :PORT (any address)");
  free (p);
  ok (colo_parse_address ("::1:7000", &h, &p) == -1 &&
      contains (colo_tls_last_error (), "brackets"),
      "an IPv6 address without brackets is refused");
  ok (colo_parse_address ("host:70000", &h, &p) == -1 &&
      colo_parse_address ("host", &h, &p) == -1 &&
      colo_parse_address ("host:", &h, &p) == -1 &&
      colo_parse_address ("[::1]7000", &h, &p) == -1,
      "bad ports and missing ports are refused");
}

static void
test_config_errors (void)
{
  struct colo_tls_config cfg = { .role = COLO_TLS_CLIENT };

  ok (colo_tls_new (&cfg) == NULL &&
      contains (colo_tls_last_error (), "--insecure"),
      "no credentials and no --insecure: refused");
  cfg.certificates = pki;
  cfg.insecure = true;
  ok (colo_tls_new (&cfg) == NULL &&
      contains (colo_tls_last_error (), "exclude"),
      "certificates and --insecure together: refused");
  cfg.insecure = false;
  cfg.certificates = noclient;
  ok (colo_tls_new (&cfg) == NULL &&
      contains (colo_tls_last_error (), "noclient/client-cert.pem: No such "
                "file"),
      "a missing client certificate is named at load time");
  cfg.certificates = NULL;
  cfg.psk_file = keys;
  cfg.psk_username = "carol";
  ok (colo_tls_new (&cfg) == NULL &&
      contains (colo_tls_last_error (), "no key for user carol"),
      "a PSK user missing from the file is named at load time");
  cfg.psk_username = NULL;
  cfg.priority = "NORMAL:+NO-SUCH-THING";
  ok (colo_tls_new (&cfg) == NULL &&
      contains (colo_tls_last_error (), "NO-SUCH-THING"),
      "a bad priority string is reported at load time");
}

static void
test_x509_ok (void)
{
  struct server *s = server_start (&x509_server, ECHO);
  struct client c;
  char id[256];

  ok (client_connect (&c, &x509_client, s, NULL),
      "X.509: mutual authentication succeeds");
  if (c.conn == NULL)
    diag ("%s", c.error);
  else {
    ok (contains (colo_conn_identity (c.conn), "CN=localhost"),
        "X.509: the client sees the server's certificate");
    ok (strncmp (colo_conn_peer (c.conn), "127.0.0.1:", 10) == 0,
        "X.509: the peer is named by its address");
    ok (round_trip (c.conn), "X.509: %u MiB each way at once, random "
        "chunks, arrive intact", DATA_SIZE >> 20);
  }
  client_close (&c);
  server_join (s, id, sizeof id);
  ok (contains (id, "CN=alice"),
      "X.509: the server sees the client's certificate (%s)", id);
}

static void
refused (const char *what, const struct colo_tls_config *scfg,
         const struct colo_tls_config *ccfg, const char *host,
         const char *client_says, const char *server_says)
{
  struct server *s = server_start (scfg, ECHO);
  struct client c;
  bool connected = client_connect (&c, ccfg, s, host);

  if (connected)
    client_close (&c);
  else
    colo_tls_free (c.tls);
  pthread_join (s->thread, NULL);
  ok (!connected && contains (c.error, client_says),
      "%s: the client is refused (%s)", what, c.error);
  ok (!s->accepted && contains (s->error, server_says),
      "%s: the server refuses (%s)", what, s->error);
  ok (c.ms < HS_MS, "%s: within the handshake timeout (%lld ms)", what,
      (long long) c.ms);
  colo_listener_close (s->l);
  colo_tls_free (s->tls);
  free (s);
}

static void
test_x509_refused (void)
{
  struct colo_tls_config c = x509_client;
  struct colo_tls_config sv = x509_server;

  c.certificates = other;
  refused ("client certificate from another CA", &x509_server, &c, NULL,
           "the peer does not accept this side's certificate",
           "the peer's certificate is not signed by a trusted CA");
  c.certificates = distrust;
  refused ("server certificate from a CA the client does not trust",
           &x509_server, &c, NULL,
           "the peer's certificate is not signed by a trusted CA (",
           "TLS alert");
  c.certificates = pki;
  sv.certificates = badname;
  refused ("server certificate for another name", &sv, &c, NULL,
           "is not issued to 127.0.0.1", "TLS alert");
  c.certificates = purpose;
  refused ("client certificate not for TLS clients", &x509_server, &c,
           NULL, "TLS alert", "is not for TLS clients (tls_www_client)");
  sv.certificates = purpose;
  refused ("server certificate not for TLS servers", &sv, &x509_client,
           NULL, "is not for TLS servers (tls_www_server)", "TLS alert");
  /* Priorities that let TLS 1.2 through are still refused. */
  c.certificates = pki;
  sv.certificates = pki;
  sv.priority = "NORMAL";
  c.priority = "NORMAL:-VERS-ALL:+VERS-TLS1.2";
  refused ("TLS 1.2 negotiated", &sv, &c, NULL,
           "TLS1.2 was negotiated, but TLS 1.3 is required",
           "TLS1.2 was negotiated, but TLS 1.3 is required");
}

static void
test_x509_names (void)
{
  struct colo_tls_config sv = x509_server, c = x509_client;
  struct server *s;
  struct client cl;

  sv.certificates = badname;
  c.no_verify_hostname = true;
  s = server_start (&sv, CLOSE);
  ok (client_connect (&cl, &c, s, NULL) &&
      contains (colo_conn_identity (cl.conn), "elsewhere.example"),
      "--tls-no-verify-hostname: a certificate for another name is "
      "accepted (still verified against the CA)");
  if (cl.conn == NULL)
    diag ("%s", cl.error);
  client_close (&cl);
  server_join (s, NULL, 0);

  s = server_start (&x509_server, CLOSE);
  ok (client_connect (&cl, &x509_client, s, "localhost"),
      "connecting by name (localhost) checks the name and succeeds");
  if (cl.conn == NULL)
    diag ("%s", cl.error);
  client_close (&cl);
  server_join (s, NULL, 0);
}

/* A GnuTLS client with no certificate at all (colo_tls_new would refuse
 * to make one): the server must refuse it.
 */
static void
test_no_client_certificate (void)
{
  struct server *s = server_start (&x509_server, ECHO);
  const char *a = colo_listener_address (s->l);
  struct sockaddr_in sin = { .sin_family = AF_INET };
  gnutls_certificate_credentials_t cred;
  gnutls_session_t session;
  char ca[300], buf[8];
  int fd, r;

  snprintf (ca, sizeof ca, "%s/ca-cert.pem", pki);
  sin.sin_port = htons (atoi (strrchr (a, ':') + 1));
  sin.sin_addr.s_addr = htonl (INADDR_LOOPBACK);
  fd = socket (AF_INET, SOCK_STREAM, 0);
  assert (fd >= 0 && connect (fd, (struct sockaddr *) &sin, sizeof sin) == 0);
  assert (gnutls_certificate_allocate_credentials (&cred) == 0);
  assert (gnutls_certificate_set_x509_trust_file (cred, ca,
                                                  GNUTLS_X509_FMT_PEM) > 0);
  assert (gnutls_init (&session, GNUTLS_CLIENT) == 0);
  assert (gnutls_priority_set_direct (session, COLO_TLS_PRIORITY,
                                      NULL) == 0);
  assert (gnutls_credentials_set (session, GNUTLS_CRD_CERTIFICATE,
                                  cred) == 0);
  gnutls_transport_set_int (session, fd);
  gnutls_handshake_set_timeout (session, HS_MS);
  do
    r = gnutls_handshake (session);
  while (r < 0 && !gnutls_error_is_fatal (r));
  if (r == 0)
    r = gnutls_record_recv (session, buf, sizeof buf);
  ok (r < 0, "a client without a certificate gets an error (%s)",
      r < 0 ? gnutls_strerror (r) : "none");
  gnutls_deinit (session);
  gnutls_certificate_free_credentials (cred);
  close (fd);
  pthread_join (s->thread, NULL);
  ok (!s->accepted && contains (s->error, "sent no certificate"),
      "the server refuses a client without a certificate (%s)", s->error);
  colo_listener_close (s->l);
  colo_tls_free (s->tls);
  free (s);
}

static void
test_psk (void)
{
  struct colo_tls_config sv = { .role = COLO_TLS_SERVER, .psk_file = keys,
                                .handshake_timeout_ms = HS_MS };
  struct colo_tls_config c = { .role = COLO_TLS_CLIENT, .psk_file = keys,
                               .handshake_timeout_ms = HS_MS };
  struct server *s = server_start (&sv, ECHO);
  struct client cl;
  char id[256];

  ok (client_connect (&cl, &c, s, NULL), "PSK: the right key succeeds");
  if (cl.conn == NULL)
    diag ("%s", cl.error);
  else
    ok (round_trip (cl.conn), "PSK: %u MiB each way arrive intact",
        DATA_SIZE >> 20);
  client_close (&cl);
  server_join (s, id, sizeof id);
  ok (strcmp (id, "psk:alice") == 0, "PSK: the server sees user alice (%s)",
      id);

  c.psk_file = wrong_keys;
  refused ("PSK: a wrong key", &sv, &c, NULL,
           "the peer does not accept PSK user 'alice' with this key",
           "the peer's key for PSK user 'alice' differs from the one in");
  c.psk_file = bob_keys;
  refused ("PSK: an unknown user", &sv, &c, NULL,
           "the peer does not accept PSK user 'bob' with this key",
           "the peer's PSK user 'bob' is not in");
  c.psk_file = keys;
  refused ("PSK client, X.509 server", &x509_server, &c, NULL,
           "same kind of credentials", "same kind of credentials");
  refused ("X.509 client, PSK server", &sv, &x509_client, NULL,
           "same kind of credentials", "same kind of credentials");
}

static void
test_insecure (void)
{
  struct colo_tls_config sv = { .role = COLO_TLS_SERVER, .insecure = true,
                                .handshake_timeout_ms = HS_MS };
  struct colo_tls_config c = { .role = COLO_TLS_CLIENT, .insecure = true,
                               .handshake_timeout_ms = HS_MS };
  struct server *s = server_start (&sv, ECHO);
  struct client cl;

  ok (client_connect (&cl, &c, s, NULL) &&
      strcmp (colo_conn_identity (cl.conn), "insecure") == 0,
      "insecure to insecure: connects");
  if (cl.conn)
    ok (round_trip (cl.conn), "insecure: %u MiB each way arrive intact",
        DATA_SIZE >> 20);
  client_close (&cl);
  server_join (s, NULL, 0);

  refused ("plaintext client, TLS server", &x509_server, &c, NULL,
           "the peer requires TLS, but this side runs with --insecure",
           "the peer does not use TLS: it runs with --insecure");
  refused ("TLS client, plaintext server", &sv, &x509_client, NULL,
           "the peer does not use TLS: it runs with --insecure",
           "the peer started a TLS handshake, but this side runs with "
           "--insecure");
}

static void
test_timeouts (void)
{
  struct colo_tls_config c = x509_client;
  struct sockaddr_in sin = { .sin_family = AF_INET };
  socklen_t len = sizeof sin;
  struct colo_tls *tls;
  struct colo_conn *conn;
  struct server *s;
  struct client cl;
  char addr[64], buf[16];
  int64_t t0;
  int fd;

  /* A TCP listener that never answers. */
  sin.sin_addr.s_addr = htonl (INADDR_LOOPBACK);
  fd = socket (AF_INET, SOCK_STREAM, 0);
  assert (fd >= 0 && bind (fd, (struct sockaddr *) &sin, sizeof sin) == 0);
  assert (listen (fd, 4) == 0);
  assert (getsockname (fd, (struct sockaddr *) &sin, &len) == 0);
  snprintf (addr, sizeof addr, "127.0.0.1:%d", ntohs (sin.sin_port));
  c.handshake_timeout_ms = 300;
  tls = colo_tls_new (&c);
  assert (tls);
  t0 = monotonic_ms ();
  conn = colo_connect (tls, addr);
  t0 = monotonic_ms () - t0;
  ok (conn == NULL && errno == ETIMEDOUT &&
      contains (colo_tls_last_error (), "no answer within 300 ms") &&
      t0 >= 250 && t0 < 2000,
      "a silent peer: the handshake times out (%lld ms)", (long long) t0);
  close (fd);

  /* Nobody on the port now. */
  conn = colo_connect (tls, addr);
  ok (conn == NULL && errno == ECONNREFUSED &&
      contains (colo_tls_last_error (), "connect to 127.0.0.1:") &&
      contains (colo_tls_last_error (), "Connection refused"),
      "nobody listening: connection refused (%s)", colo_tls_last_error ());
  colo_tls_free (tls);

  /* I/O timeout, then a clean close. */
  s = server_start (&x509_server, CLOSE);
  if (client_connect (&cl, &x509_client, s, NULL)) {
    ssize_t r;
    colo_conn_set_timeout (cl.conn, 200);
    r = colo_recv_some (cl.conn, buf, sizeof buf);
    ok (r == 0, "the server's close is a clean end of stream (%zd)", r);
  }
  else
    ok (false, "connect: %s", cl.error);
  client_close (&cl);
  server_join (s, NULL, 0);

  s = server_start (&x509_server, ECHO);
  if (client_connect (&cl, &x509_client, s, NULL)) {
    ssize_t r;
    colo_conn_set_timeout (cl.conn, 200);
    t0 = monotonic_ms ();
    r = colo_recv_some (cl.conn, buf, sizeof buf);
    t0 = monotonic_ms () - t0;
    ok (r == -1 && errno == ETIMEDOUT &&
        contains (colo_tls_last_error (), "nothing for 200 ms") &&
        t0 >= 150 && t0 < 2000,
        "receive times out when nothing arrives (%lld ms)", (long long) t0);
  }
  else
    ok (false, "connect: %s", cl.error);
  client_close (&cl);
  server_join (s, NULL, 0);
}

/* A byte every 100 ms on conn, count times. */
struct trickle {
  struct colo_conn *conn;
  int count;
};

static void *
trickle_main (void *arg)
{
  struct trickle *t = arg;
  int i;

  for (i = 0; i < t->count; i++) {
    struct timespec ts = { 0, 100 * 1000 * 1000 };
    if (colo_send_all (t->conn, "x", 1) == -1)
      break;
    nanosleep (&ts, NULL);
  }
  return NULL;
}

/* The server's accept in two steps (the secondary hands the second to a
 * thread per connection), and a deadline that bytes trickling in cannot
 * put off.
 */
static void
test_split_accept_and_deadline (void)
{
  struct colo_tls_config sv = x509_server;
  struct sockaddr_in sin = { .sin_family = AF_INET };
  struct colo_listener *l;
  struct colo_tls *tls;
  struct colo_conn *conn;
  struct server *s;
  struct client cl;
  struct trickle t;
  pthread_t th;
  char buf[100];
  int64_t t0;
  int fd, r;

  sv.handshake_timeout_ms = 300;
  tls = colo_tls_new (&sv);
  assert (tls);
  l = colo_listen (tls, "127.0.0.1:0");
  assert (l);
  conn = colo_accept_socket (l);
  ok (conn == NULL && errno == EAGAIN,
      "colo_accept_socket without a peer: EAGAIN, at once");
  sin.sin_addr.s_addr = htonl (INADDR_LOOPBACK);
  sin.sin_port = htons (atoi (strrchr (colo_listener_address (l), ':') + 1));
  fd = socket (AF_INET, SOCK_STREAM, 0);
  assert (fd >= 0 && connect (fd, (struct sockaddr *) &sin, sizeof sin) == 0);
  t0 = monotonic_ms ();
  do
    conn = colo_accept_socket (l);
  while (conn == NULL && errno == EAGAIN && monotonic_ms () - t0 < 2000);
  ok (conn != NULL, "colo_accept_socket takes a silent peer at once");
  if (conn) {
    t0 = monotonic_ms ();
    r = colo_accept_handshake (conn);
    t0 = monotonic_ms () - t0;
    ok (r == -1 && errno == ETIMEDOUT &&
        contains (colo_tls_last_error (), "no TLS client hello within "
                  "300 ms") && t0 >= 250 && t0 < 2000,
        "then colo_accept_handshake times out (%lld ms): %s",
        (long long) t0, colo_tls_last_error ());
    colo_discard (conn);
  }
  close (fd);
  colo_listener_close (l);
  colo_tls_free (tls);

  /* One byte every 100 ms, echoed: a 200 ms timeout never fires, a
   * 300 ms deadline does.
   */
  s = server_start (&x509_server, ECHO);
  if (client_connect (&cl, &x509_client, s, NULL)) {
    t.conn = cl.conn;
    t.count = 20;
    assert (pthread_create (&th, NULL, trickle_main, &t) == 0);
    colo_conn_set_timeout (cl.conn, 200);
    colo_conn_set_deadline (cl.conn, 300);
    t0 = monotonic_ms ();
    r = colo_recv_all (cl.conn, buf, sizeof buf);
    t0 = monotonic_ms () - t0;
    ok (r == -1 && errno == ETIMEDOUT &&
        contains (colo_tls_last_error (), "not done within the 300 ms "
                  "allowed") && t0 >= 250 && t0 < 1500,
        "a deadline ends a trickle (%lld ms): %s", (long long) t0,
        colo_tls_last_error ());
    colo_conn_set_deadline (cl.conn, -1);
    r = colo_recv_all (cl.conn, buf, 2);
    ok (r == 1, "cleared, the connection goes on");
    pthread_join (th, NULL);
  }
  else
    ok (false, "connect: %s", cl.error);
  client_close (&cl);
  server_join (s, NULL, 0);
}

static void
test_ipv6 (void)
{
  struct colo_tls_config sv = { .role = COLO_TLS_SERVER, .insecure = true };
  struct colo_tls *tls = colo_tls_new (&sv);
  struct colo_listener *l;

  assert (tls);
  l = colo_listen (tls, "[::1]:0");
  if (l == NULL)
    diag ("no IPv6 loopback here, not tested: %s", colo_tls_last_error ());
  else
    ok (strncmp (colo_listener_address (l), "[::1]:", 6) == 0,
        "listen on [::1]:0 gives %s", colo_listener_address (l));
  colo_listener_close (l);
  colo_tls_free (tls);
}

/* The transport's debug messages, as colo_tls_set_log passes them:
 * formatted here, one a line (the server's and the client's threads
 * both log).
 */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char logged[8192];

static void
collect (const char *fmt, va_list ap)
{
  size_t n;

  pthread_mutex_lock (&log_lock);
  n = strlen (logged);
  if (n + 2 < sizeof logged) {
    vsnprintf (logged + n, sizeof logged - n - 1, fmt, ap);
    strcat (logged, "\n");
  }
  pthread_mutex_unlock (&log_lock);
}

static void
test_debug_log (void)
{
  colo_tls_set_log (collect);
  test_x509_ok ();
  colo_tls_set_log (NULL);
  ok (contains (logged, "listening on 127.0.0.1:"),
      "debug log: the listener's address, formatted");
  ok (contains (logged, "TLS with 127.0.0.1:"),
      "debug log: the negotiated session and the peer");
}

int
main (void)
{
  int64_t t0 = monotonic_ms ();

  make_credentials ();
  x509_server.certificates = pki;
  x509_client.certificates = pki;

  test_addresses ();
  test_config_errors ();
  test_debug_log ();            /* test_x509_ok, logging */
  test_x509_refused ();
  test_x509_names ();
  test_no_client_certificate ();
  test_psk ();
  test_insecure ();
  test_timeouts ();
  test_split_accept_and_deadline ();
  test_ipv6 ();

  remove_credentials ();
  diag ("total %lld ms", (long long) (monotonic_ms () - t0));
  return done ();
}
