/* fleece-colod's transport: establishing a connection on a connected
 * socket, and saying why it failed (tls.c's note describes the
 * transport as a whole, tls-creds.c what is verified).
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
 *
 * A failure names the step and the peer, and, where the first bytes or
 * GnuTLS tell, the likely cause (a peer without TLS, an unknown CA, a
 * wrong host name, an unknown PSK user) rather than only the error code.
 */

#include <config.h>

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <gnutls/gnutls.h>
#include <gnutls/crypto.h>
#include <gnutls/x509.h>

#include "deadline.h"
#include "monotonic.h"
#include "tls.h"
#include "tls-internal.h"

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
  int64_t deadline =
    ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : monotonic_ms () + ms;

  return wait_fd_until (conn->fd, POLLIN, deadline);
}

/* ---- Why a handshake failed ---- */

/* Record "<step> with <peer> failed: <reason>"; returns -1. */
int
tls_fail_step (struct colo_conn *conn, int err, const char *fmt, ...)
{
  char reason[768];
  va_list ap;

  errno = err;
  va_start (ap, fmt);
  vsnprintf (reason, sizeof reason, fmt, ap);
  va_end (ap);
  return tls_error (err, "%s with %s failed: %s",
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
  tls_fail_step (conn, EACCES, "the peer's certificate %s [GnuTLS: %s]", why,
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
int
tls_handshake_failed (struct colo_conn *conn, int err)
{
  gnutls_session_t s = conn->session;
  const bool psk = conn->tls->mode == MODE_PSK;

  if (err != GNUTLS_E_FATAL_ALERT_RECEIVED &&
      err != GNUTLS_E_PREMATURE_TERMINATION && err != GNUTLS_E_PUSH_ERROR &&
      err != GNUTLS_E_PULL_ERROR)
    gnutls_alert_send_appropriate (s, err);  /* best effort */

  if (conn->refusal[0])
    return tls_fail_step (conn, EACCES, "%s", conn->refusal);
  if (peer_is_insecure (conn))
    return tls_fail_step (conn, EPROTO, "the peer does not use TLS: it runs "
                          "with --insecure (both sides must, or neither)");
  switch (err) {
  case GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR:
    return cert_failed (conn);
  case GNUTLS_E_FATAL_ALERT_RECEIVED: {
    gnutls_alert_description_t a = gnutls_alert_get (s);
    char buf[256];
    const char *hint = alert_hint (conn, a, buf, sizeof buf);
    return tls_fail_step (conn, EACCES, "the peer refused the connection with "
                          "TLS alert '%s'%s%s", gnutls_alert_get_name (a),
                          hint ? ": " : "", hint ? hint : "");
  }
  case GNUTLS_E_NO_CERTIFICATE_FOUND:
  case GNUTLS_E_CERTIFICATE_REQUIRED:
    return tls_fail_step (conn, EACCES, "the peer sent no certificate, and one "
                          "is required (%s)", gnutls_strerror (err));
  case GNUTLS_E_PREMATURE_TERMINATION:
  case GNUTLS_E_PULL_ERROR:
  case GNUTLS_E_PUSH_ERROR:
    return tls_fail_step (conn, ECONNRESET, "the peer closed the connection "
                          "(%s): see its log for why", gnutls_strerror (err));
  case GNUTLS_E_UNEXPECTED_PACKET_LENGTH:
  case GNUTLS_E_UNSUPPORTED_VERSION_PACKET:
  case GNUTLS_E_UNEXPECTED_PACKET:
    return tls_fail_step (conn, EPROTO, "the peer does not speak TLS 1.3 (%s)",
                          gnutls_strerror (err));
  case GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER:
  case GNUTLS_E_DECRYPTION_FAILED:
  case GNUTLS_E_ERROR_IN_FINISHED_PACKET:
  case GNUTLS_E_MAC_VERIFY_FAILED:
    if (psk && conn->tls->role == COLO_TLS_SERVER && conn->psk_user[0])
      return tls_fail_step (conn, EACCES, "the peer's key for PSK user '%s' "
                            "differs from the one in %s (%s)", conn->psk_user,
                            conn->tls->psk_file, gnutls_strerror (err));
    if (psk)
      return tls_fail_step (conn, EACCES, "the peer does not accept PSK user "
                            "'%s' with this key (%s)", conn->tls->psk_username,
                            gnutls_strerror (err));
    break;
  case GNUTLS_E_INSUFFICIENT_CREDENTIALS:
  case GNUTLS_E_NO_CIPHER_SUITES:
  case GNUTLS_E_NO_COMMON_KEY_SHARE:
  case GNUTLS_E_UNKNOWN_PK_ALGORITHM:
    return tls_fail_step (conn, EACCES, "no common TLS 1.3 parameters: do both "
                          "sides use the same kind of credentials (X.509 or "
                          "PSK)? (%s)", gnutls_strerror (err));
  default:
    break;
  }
  return tls_fail_step (conn, EPROTO, "%s (GnuTLS error %d)",
                        gnutls_strerror (err), err);
}
/* ---- Establishing a connection ---- */

static bool
is_ip_literal (const char *host)
{
  unsigned char buf[sizeof (struct in6_addr)];

  return inet_pton (AF_INET, host, buf) == 1 ||
    inet_pton (AF_INET6, host, buf) == 1;
}

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
      tls_conn_send_all (conn, GREETING_CLIENT, GREETING_SIZE, deadline, ms,
                         true) == -1)
    return -1;
  /* Piecewise: a TLS alert is shorter than a greeting. */
  while (got < GREETING_SIZE) {
    ssize_t r = tls_conn_recv (conn, g + got, GREETING_SIZE - got, deadline, ms,
                               true);
    if (r == -1)
      return -1;
    if (r == 0 || g[0] == TLS_RECORD_HANDSHAKE || g[0] == TLS_RECORD_ALERT)
      break;
    got += r;
  }
  if (got == 0 && g[0] != TLS_RECORD_HANDSHAKE && g[0] != TLS_RECORD_ALERT)
    return tls_fail_step (conn, ECONNRESET, "the peer closed the connection "
                          "before its greeting");
  if (server && g[0] == TLS_RECORD_HANDSHAKE) {
    /* Tell the TLS client what it is talking to (tls_pull sees it). */
    send (conn->fd, GREETING_SERVER, GREETING_SIZE, MSG_NOSIGNAL);
    return tls_fail_step (conn, EPROTO, "the peer started a TLS handshake, but "
                          "this side runs with --insecure (both sides must, or "
                          "neither)");
  }
  if (!server && (g[0] == TLS_RECORD_ALERT || g[0] == TLS_RECORD_HANDSHAKE))
    return tls_fail_step (conn, EPROTO, "the peer requires TLS, but this side "
                          "runs with --insecure (both sides must, or neither)");
  if (got < GREETING_SIZE ||
      memcmp (g, server ? GREETING_CLIENT : GREETING_SERVER,
              GREETING_SIZE) != 0)
    return tls_fail_step (conn, EPROTO, "the peer is not fleece-colod, or "
                          "another version of it (%s)",
                          got < GREETING_SIZE ?
                          "it closed the connection during the greeting" :
                          "unexpected greeting");
  if (server &&
      tls_conn_send_all (conn, GREETING_SERVER, GREETING_SIZE, deadline, ms,
                         true) == -1)
    return -1;
  conn->identity = strdup ("insecure");
  if (conn->identity == NULL)
    return tls_error (errno, "strdup: %m");
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
    w = wait_fd_until (conn->fd, POLLIN, deadline);
    if (w == 0)
      return tls_fail_step (conn, ETIMEDOUT, "no TLS client hello within %d ms",
                            conn->tls->handshake_timeout_ms);
    r = w == -1 ? -1 : recv (conn->fd, b, sizeof b, MSG_PEEK);
    if (r > 0)
      break;
    if (r == 0)
      return tls_fail_step (conn, ECONNRESET, "the peer closed the connection "
                            "before its TLS client hello");
    if (errno != EINTR && errno != EAGAIN)
      return tls_fail_step (conn, errno, "receive from the peer: %m");
  }
  if (b[0] == TLS_RECORD_HANDSHAKE)
    return 0;
  send (conn->fd, alert, sizeof alert, MSG_NOSIGNAL);
  if (memcmp (b, GREETING_CLIENT, r) == 0)
    return tls_fail_step (conn, EPROTO, "the peer does not use TLS: it runs "
                          "with --insecure (both sides must, or neither)");
  return tls_fail_step (conn, EPROTO, "the peer does not speak TLS (its first "
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
      return tls_error (EIO, "gnutls_server_name_set: %s",
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
    return tls_error (EIO, "gnutls_credentials_set: %s",
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
    return tls_error (ENOMEM, "gnutls_init: %s", gnutls_strerror (err));
  }
  gnutls_session_set_ptr (conn->session, conn);
  err = gnutls_priority_set (conn->session, conn->tls->priority);
  if (err < 0)
    return tls_error (EIO, "gnutls_priority_set: %s", gnutls_strerror (err));
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
    return tls_fail_step (conn, EPROTO, "%s was negotiated, but TLS 1.3 "
                          "is required (check --tls-priority on both sides)",
                          gnutls_protocol_get_name (v));
  }
  if (conn->tls->mode == MODE_X509) {
    conn->identity = peer_dn (s);
    if (conn->identity == NULL) {
      gnutls_alert_send (s, GNUTLS_AL_FATAL, GNUTLS_A_CERTIFICATE_REQUIRED);
      return tls_fail_step (conn, EACCES, "the peer sent no certificate, and "
                            "one is required");
    }
  }
  else {
    const char *user = conn->tls->role == COLO_TLS_SERVER ?
      gnutls_psk_server_get_username (s) : conn->tls->psk_username;
    r = asprintf (&conn->identity, "psk:%s", user ? user : "?");
    if (r == -1) {
      conn->identity = NULL;
      return tls_error (errno, "asprintf: %m");
    }
  }
  desc = gnutls_session_get_desc (s);
  tls_debug ("TLS with %s: %s, peer %s", conn->name, desc ? desc : "?",
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
        return tls_handshake_failed (conn, err);
      continue;
    }
    w = wait_fd_until (conn->fd, gnutls_record_get_direction (conn->session) ?
                     POLLOUT : POLLIN, deadline);
    if (w == 0)
      return tls_fail_step (conn, ETIMEDOUT, "no answer within %d ms", ms);
    if (w == -1)
      return tls_fail_step (conn, errno, "poll: %m");
  }
  conn->recording = false;
  if (check_session (conn) == -1)
    return -1;
  if (server)
    return tls_conn_send_all (conn, GREETING_SERVER, GREETING_SIZE,
                              deadline, ms, true);
  err = tls_conn_recv_all (conn, g, GREETING_SIZE, deadline, ms, true);
  if (err == 0)
    return tls_fail_step (conn, ECONNRESET, "the peer closed the connection "
                          "after the handshake: see its log for why");
  if (err == -1)
    return -1;
  if (memcmp (g, GREETING_SERVER, GREETING_SIZE) != 0)
    return tls_fail_step (conn, EPROTO, "the peer is not fleece-colod, or "
                          "another version of it (unexpected greeting)");
  return 0;
}

int
tls_conn_establish (struct colo_conn *conn)
{
  int64_t deadline = monotonic_ms () + conn->tls->handshake_timeout_ms;

  if (conn->tls->mode == MODE_INSECURE)
    return plain_greeting (conn, deadline);
  if (conn->tls->role == COLO_TLS_SERVER &&
      check_client_hello (conn, deadline) == -1)
    return -1;
  if (session_new (conn) == -1)
    return -1;
  return tls_handshake (conn, deadline);
}
