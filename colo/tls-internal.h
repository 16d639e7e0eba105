/* fleece-colod's transport, inside: what tls.c, tls-creds.c and
 * tls-handshake.c share (tls.c's note says which file does what).  Not
 * for the transport's users, who see tls.h only.
 */

#ifndef FLEECE_COLO_TLS_INTERNAL_H
#define FLEECE_COLO_TLS_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <gnutls/gnutls.h>

#include "tls.h"
#include "vector.h"

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
DEFINE_VECTOR_TYPE (psk_list, struct psk_entry)

struct colo_tls {
  /* Set by colo_tls_new, then constant (read by any thread). */
  enum colo_tls_role role;
  enum colo_tls_mode mode;
  char *ca_file;                /* X.509: for messages */
  char *psk_file;               /* PSK: for messages */
  char *psk_username;           /* PSK client */
  psk_list psk;                 /* PSK server: the users */
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

/* tls.c */

/* Record the message (read by colo_tls_last_error); returns -1 with
 * errno = err.  %m is err.
 */
extern int tls_error (int err, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
/* A debug message to colo_tls_set_log's function, if any. */
extern void tls_debug (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));
/* Move bytes before the deadline, or while no more than timeout_ms pass
 * without one moving; during the handshake (handshaking) a failure is
 * recorded as the handshake's.  tls_conn_recv: 1 to len bytes, 0 at EOF,
 * -1; tls_conn_recv_all: 1, 0 at EOF before the first byte, -1;
 * tls_conn_send_all: 0 or -1.
 */
extern ssize_t tls_conn_recv (struct colo_conn *conn, void *buf, size_t len,
                              int64_t deadline, int timeout_ms,
                              bool handshaking);
extern int tls_conn_recv_all (struct colo_conn *conn, void *buf, size_t len,
                              int64_t deadline, int timeout_ms,
                              bool handshaking);
extern int tls_conn_send_all (struct colo_conn *conn, const void *buf,
                              size_t len, int64_t deadline, int timeout_ms,
                              bool handshaking);

/* tls-handshake.c */

/* The greeting (insecure) or the TLS handshake and the greeting, on a
 * connected socket, within the handshake timeout: 0 or -1.
 */
extern int tls_conn_establish (struct colo_conn *conn);
/* Record "<step> with <peer> failed: <reason>"; returns -1. */
extern int tls_fail_step (struct colo_conn *conn, int err,
                          const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));
/* Record why the handshake failed with GnuTLS error err; returns -1. */
extern int tls_handshake_failed (struct colo_conn *conn, int err);

#endif /* FLEECE_COLO_TLS_INTERNAL_H */
