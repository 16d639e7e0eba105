/* fleece-colod's transport: the credentials of one side (struct
 * colo_tls), loaded and checked by colo_tls_new so that a missing or
 * unreadable file is reported at start, not at the first connection.
 * tls.c's note describes the transport as a whole.
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
 */

#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/crypto.h>
#include <gnutls/x509.h>

#include "tls.h"
#include "tls-internal.h"

static char *
path_in (const char *dir, const char *file)
{
  char *path;

  if (asprintf (&path, "%s/%s", dir, file) == -1) {
    tls_error (errno, "asprintf: %m");
    return NULL;
  }
  return path;
}

/* An unreadable file gets the system's reason rather than GnuTLS's. */
static int
check_readable (const char *path, const char *purpose)
{
  if (access (path, R_OK) == -1)
    return tls_error (errno, "%s: %m (%s)", path, purpose);
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
    tls_error (ENOMEM, "gnutls_certificate_allocate_credentials: %s",
               gnutls_strerror (err));
    goto out;
  }
  err = gnutls_certificate_set_x509_trust_file (tls->x509, tls->ca_file,
                                                GNUTLS_X509_FMT_PEM);
  if (err <= 0) {
    tls_error (EINVAL, "%s: %s", tls->ca_file,
               err == 0 ? "no certificate in the file" :
               gnutls_strerror (err));
    goto out;
  }
  if (access (crl, R_OK) == 0) {
    err = gnutls_certificate_set_x509_crl_file (tls->x509, crl,
                                                GNUTLS_X509_FMT_PEM);
    if (err < 0) {
      tls_error (EINVAL, "%s: %s", crl, gnutls_strerror (err));
      goto out;
    }
  }
  err = gnutls_certificate_set_x509_key_file (tls->x509, cert, key,
                                              GNUTLS_X509_FMT_PEM);
  if (err < 0) {
    tls_error (EINVAL, "%s, %s: %s", cert, key, gnutls_strerror (err));
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
    return tls_error (EINVAL, "%s:%u: expected username:hexkey (psktool "
                      "writes this format)", file, lineno);
  *colon = '\0';
  hex.data = (unsigned char *) colon + 1;
  hex.size = strlen (colon + 1);
  err = gnutls_hex_decode2 (&hex, &e->key);
  if (err < 0)
    return tls_error (EINVAL, "%s:%u: the key of user %s is not "
                      "hexadecimal: %s", file, lineno, line,
                      gnutls_strerror (err));
  e->user = strdup (line);
  if (e->user == NULL) {
    gnutls_free (e->key.data);
    return tls_error (errno, "strdup: %m");
  }
  return 0;
}

static void
free_psk (struct colo_tls *tls)
{
  size_t i;

  for (i = 0; i < tls->psk.len; i++) {
    free (tls->psk.ptr[i].user);
    gnutls_memset (tls->psk.ptr[i].key.data, 0, tls->psk.ptr[i].key.size);
    gnutls_free (tls->psk.ptr[i].key.data);
  }
  psk_list_reset (&tls->psk);
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
    return tls_error (errno, "%s: %m (the pre-shared keys)", file);
  while ((len = getline (&line, &size, fp)) != -1) {
    lineno++;
    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
      line[--len] = '\0';
    if (len == 0)
      continue;
    if (psk_list_reserve (&tls->psk, 1) == -1) {
      tls_error (errno, "%s: line %u: %m", file, lineno);
      goto out;
    }
    if (parse_psk_line (file, lineno, line,
                        &tls->psk.ptr[tls->psk.len]) == -1)
      goto out;
    tls->psk.len++;
  }
  if (ferror (fp)) {
    tls_error (errno, "%s: read: %m", file);
    goto out;
  }
  if (tls->psk.len == 0) {
    tls_error (EINVAL, "%s: no keys in the file (make one with: psktool "
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

  for (i = 0; i < tls->psk.len; i++)
    if (strcmp (tls->psk.ptr[i].user, user) == 0)
      return &tls->psk.ptr[i];
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
      return tls_error (ENOMEM, "gnutls_psk_allocate_server_credentials: "
                        "%s", gnutls_strerror (err));
    gnutls_psk_set_server_credentials_function2 (tls->psk_server,
                                                 psk_server_key);
    return 0;
  }

  if (cfg->psk_username == NULL && tls->psk.len > 1)
    return tls_error (EINVAL, "%s has several users: choose one with "
                      "--tls-username", cfg->psk_file);
  e = cfg->psk_username ? find_psk (tls, cfg->psk_username) : &tls->psk.ptr[0];
  if (e == NULL)
    return tls_error (EINVAL, "%s: no key for user %s", cfg->psk_file,
                      cfg->psk_username);
  tls->psk_username = strdup (e->user);
  if (tls->psk_username == NULL)
    return tls_error (errno, "strdup: %m");
  err = gnutls_psk_allocate_client_credentials (&tls->psk_client);
  if (err < 0)
    return tls_error (ENOMEM, "gnutls_psk_allocate_client_credentials: %s",
                      gnutls_strerror (err));
  err = gnutls_psk_set_client_credentials (tls->psk_client, e->user,
                                           &e->key, GNUTLS_PSK_KEY_RAW);
  if (err < 0)
    return tls_error (EINVAL, "gnutls_psk_set_client_credentials: %s",
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
    return tls_error (errno, "asprintf: %m");
  err = gnutls_priority_init (&tls->priority, prio, &errpos);
  if (err < 0)
    tls_error (EINVAL, "TLS priority \"%s\": %s%s%s", prio,
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
    return tls_error (EINVAL, "no TLS credentials: give --tls-certificates "
                      "DIR or --tls-psk FILE (plaintext needs --insecure)");
  if (n > 1)
    return tls_error (EINVAL, "--tls-certificates, --tls-psk and "
                      "--insecure exclude each other");
  if (cfg->psk_username && !cfg->psk_file)
    return tls_error (EINVAL, "--tls-username needs --tls-psk");
  if (cfg->connect_timeout_ms < 0 || cfg->handshake_timeout_ms < 0)
    return tls_error (EINVAL, "timeouts must be positive");
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
    tls_error (errno, "calloc: %m");
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
      r = tls_error (errno, "strdup: %m");
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
