/* fleece-colod: a connection to the peer (conn.c). */

#ifndef COLO_CONN_H
#define COLO_CONN_H

#include <stddef.h>
#include <stdint.h>

#include "tls.h"
#include "wire.h"

/* A connection to the peer: the TLS conn with its encoder and decoder.
 * Set by colod_conn_wrap, then constant; enc and dec are the state of
 * the one thread that sends and receives on it (not locked).  Any other
 * thread may only colod_conn_abort it (a shutdown of the socket); its
 * own thread closes it.
 */
struct colod_conn {
  struct colo_conn *conn;
  struct colo_wire_encoder enc;
  struct colo_wire_decoder *dec;
};

/* Wrap c (closed on failure: NULL). */
extern struct colod_conn *colod_conn_wrap (struct colo_conn *c);
extern void colod_conn_close (struct colod_conn *c);
/* Wake a thread blocked on the connection (shutdown of the socket). */
extern void colod_conn_abort (struct colod_conn *c);
extern int colod_send (struct colod_conn *c, const struct colo_msg *m,
                       char *err, size_t errlen);
/* 1 with *m, 0 if the peer closed, -1 with err (an ERROR frame from the
 * peer is reported as -1 with its message).
 */
extern int colod_recv (struct colod_conn *c, const struct colo_msg **m,
                       char *err, size_t errlen);
/* Tell the peer why we drop it (ERROR), best effort. */
extern void colod_send_error (struct colod_conn *c, uint32_t code,
                              const char *msg);

#endif /* COLO_CONN_H */
