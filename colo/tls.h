/* fleece-colod's transport: TCP connections, over TLS 1.3 (GnuTLS) with
 * mutual X.509 authentication or a pre-shared key, or in plaintext only
 * when the operator explicitly asks for it (insecure).
 *
 * The secondary listens (role COLO_TLS_SERVER) and the primary connects
 * (COLO_TLS_CLIENT); each pair uses two connections, data and heartbeat,
 * both made here.  docs/replication.md "Transport and security" is the
 * operator's view: options, credential layout, what is verified and the
 * error messages.
 *
 * Errors: every function that can fail returns -1 or NULL, sets errno
 * (ETIMEDOUT for a timeout, ECONNREFUSED, ECONNRESET for a peer that
 * closed, EACCES for a peer refused by authentication or refusing us,
 * EPROTO for a peer speaking something else, EINVAL for a bad address or
 * configuration, EIO otherwise) and records one message naming the peer
 * and the step in a thread-local buffer read with colo_tls_last_error().
 * Nothing here prints.
 *
 * Thread safety: a struct colo_tls (credentials) and a listener may be
 * used by several threads at once.  A connection may be used by one
 * sending thread (colo_send_all) and one receiving thread
 * (colo_recv_some, colo_recv_all) at the same time, as GnuTLS allows;
 * colo_close is called once, when neither is running.
 */

#ifndef FLEECE_COLO_TLS_H
#define FLEECE_COLO_TLS_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#define COLO_TLS_CONNECT_TIMEOUT_MS    10000
#define COLO_TLS_HANDSHAKE_TIMEOUT_MS  10000
/* TLS 1.3 only; with a PSK, COLO_TLS_PSK_KX is appended to it. */
#define COLO_TLS_PRIORITY              "NORMAL:-VERS-ALL:+VERS-TLS1.3"
#define COLO_TLS_PSK_KX                "+ECDHE-PSK:+DHE-PSK"

enum colo_tls_role {
  COLO_TLS_SERVER,              /* the secondary: listens, accepts */
  COLO_TLS_CLIENT,              /* the primary: connects */
};

/* Exactly one of certificates, psk_file and insecure is set. */
struct colo_tls_config {
  enum colo_tls_role role;
  const char *certificates;     /* --tls-certificates DIR: X.509 */
  const char *psk_file;         /* --tls-psk FILE: username:hexkey lines */
  const char *psk_username;     /* --tls-username (client); NULL: the
                                   only user of psk_file */
  bool insecure;                /* --insecure: plaintext TCP */
  bool no_verify_hostname;      /* --tls-no-verify-hostname (client) */
  const char *priority;         /* --tls-priority; NULL: COLO_TLS_PRIORITY */
  int connect_timeout_ms;       /* 0: COLO_TLS_CONNECT_TIMEOUT_MS */
  int handshake_timeout_ms;     /* 0: COLO_TLS_HANDSHAKE_TIMEOUT_MS */
};

struct colo_tls;                /* credentials and settings of one side */
struct colo_listener;
struct colo_conn;

/* The message of the last failure in this thread. */
extern const char *colo_tls_last_error (void);

/* Debug messages (the negotiated cipher, the peer's identity) go to fn
 * as a format and its arguments, for the caller's log to format (as a
 * vprintf would), or nowhere if it is NULL (the default).
 */
extern void colo_tls_set_log (void (*fn) (const char *fmt, va_list ap));

/* Split "HOST:PORT", "[IPV6]:PORT" or ":PORT" (for listening: any
 * address, the first getaddrinfo gives, 0.0.0.0 on Linux) into *host
 * (NULL for ":PORT") and *port, both malloc'd.
 */
extern int colo_parse_address (const char *addr, char **host, char **port);

/* Load and check the credentials of one side: a missing or unreadable
 * file is reported here, not at the first connection.
 */
extern struct colo_tls *colo_tls_new (const struct colo_tls_config *cfg);
extern void colo_tls_free (struct colo_tls *tls);

/* Listen on addr (port 0: any free port, see colo_listener_address).
 * tls must outlive the listener.
 */
extern struct colo_listener *colo_listen (struct colo_tls *tls,
                                          const char *addr);
/* The bound address, numeric, e.g. "127.0.0.1:41234" or "[::1]:7000". */
extern const char *colo_listener_address (const struct colo_listener *l);
/* For the caller's own poll: readable when a peer is waiting. */
extern int colo_listener_fd (const struct colo_listener *l);
/* Wait up to timeout_ms (-1: forever) for a peer, then do the TLS
 * handshake (bounded by the handshake timeout) and the greeting.  A
 * peer that fails them is disconnected and reported: NULL, and the
 * caller goes on listening.
 */
extern struct colo_conn *colo_accept (struct colo_listener *l,
                                      int timeout_ms);
/* colo_accept in two steps, for a server that must not wait on one
 * peer while others connect: colo_accept_socket takes a waiting peer
 * without waiting (NULL with errno EAGAIN if there is none) and returns
 * the connection before any byte is exchanged; colo_accept_handshake
 * runs the handshake and the greeting on it (bounded by the handshake
 * timeout), and may run on another thread.  A connection whose
 * handshake failed, or that is given up before it, is ended with
 * colo_discard, never colo_close.
 */
extern struct colo_conn *colo_accept_socket (struct colo_listener *l);
extern int colo_accept_handshake (struct colo_conn *conn);
extern void colo_discard (struct colo_conn *conn);
extern void colo_listener_close (struct colo_listener *l);

/* Connect to addr (every address it resolves to, in turn, each bounded
 * by the connect timeout), then the handshake and the greeting.  tls
 * must outlive the connection.
 */
extern struct colo_conn *colo_connect (struct colo_tls *tls,
                                       const char *addr);

/* Timeout of the calls below: a call fails with ETIMEDOUT when no byte
 * moved for timeout_ms (-1, the default: wait forever).
 */
extern void colo_conn_set_timeout (struct colo_conn *conn, int timeout_ms);
/* A deadline for the calls below, timeout_ms from now (-1: none, the
 * default): until it is cleared, they fail with ETIMEDOUT when it
 * passes, however the bytes trickle; it replaces the timeout above
 * while it is set.
 */
extern void colo_conn_set_deadline (struct colo_conn *conn, int timeout_ms);
/* Send all len bytes: 0, or -1. */
extern int colo_send_all (struct colo_conn *conn, const void *buf,
                          size_t len);
/* Receive 1 to len bytes: their count, 0 if the peer closed the
 * connection cleanly, or -1.
 */
extern ssize_t colo_recv_some (struct colo_conn *conn, void *buf,
                               size_t len);
/* Receive exactly len bytes: 1, 0 if the peer closed the connection
 * cleanly before the first byte, or -1 (a close after it is an error).
 */
extern int colo_recv_all (struct colo_conn *conn, void *buf, size_t len);
/* For the caller's own poll: but poll only if colo_conn_pending is
 * false, as TLS may hold bytes already read from the socket.
 */
extern int colo_conn_fd (const struct colo_conn *conn);
extern bool colo_conn_pending (const struct colo_conn *conn);
/* The peer's numeric address, "127.0.0.1:7000", as in error messages. */
extern const char *colo_conn_peer (const struct colo_conn *conn);
/* Who the peer proved to be: its certificate's DN, "psk:USER", or
 * "insecure".
 */
extern const char *colo_conn_identity (const struct colo_conn *conn);
/* Close (sending TLS close_notify if it can without waiting) and free. */
extern void colo_close (struct colo_conn *conn);

#endif /* FLEECE_COLO_TLS_H */
