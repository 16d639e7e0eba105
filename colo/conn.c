/* fleece-colod: a connection to the peer, the transport (tls.c) with
 * the framing (wire.c) on top: whole messages in and out, and every
 * failure as one sentence that names the peer.  A protocol error found
 * in what the peer sent is told to it (ERROR) before the caller drops
 * the connection, so that both logs say why.
 *
 * One thread sends and one receives on a connection at a time (the
 * encoder and the decoder are not shared); colod_conn_abort is the only
 * call another thread may make, to wake them.
 */

#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "conn.h"

struct colod_conn *
colod_conn_wrap (struct colo_conn *c)
{
  struct colod_conn *pc = calloc (1, sizeof *pc);

  if (pc == NULL || (pc->dec = colo_wire_decoder_new ()) == NULL) {
    free (pc);
    colo_close (c);
    return NULL;
  }
  pc->conn = c;
  colo_wire_encoder_init (&pc->enc);
  return pc;
}

void
colod_conn_close (struct colod_conn *c)
{
  if (c) {
    colo_close (c->conn);
    colo_wire_decoder_free (c->dec);
    free (c);
  }
}

void
colod_conn_abort (struct colod_conn *c)
{
  if (c)
    shutdown (colo_conn_fd (c->conn), SHUT_RDWR);
}

static int
write_fn (void *opaque, const void *buf, size_t len)
{
  return colo_send_all (opaque, buf, len);
}

static ssize_t
read_fn (void *opaque, void *buf, size_t len)
{
  return colo_recv_some (opaque, buf, len);
}

int
colod_send (struct colod_conn *c, const struct colo_msg *m, char *err,
            size_t errlen)
{
  struct colo_wire_error we;

  if (colo_wire_send (&c->enc, m, write_fn, c->conn, &we) == -1) {
    snprintf (err, errlen, "%s: sending %s: %s", colo_conn_peer (c->conn),
              colo_msg_type_name (m->type),
              errno == 0 ? we.msg : colo_tls_last_error ());
    return -1;
  }
  return 0;
}

int
colod_recv (struct colod_conn *c, const struct colo_msg **m, char *err,
            size_t errlen)
{
  struct colo_wire_error we;
  int r = colo_wire_recv (c->dec, read_fn, c->conn, m, &we);

  if (r == 0) {
    snprintf (err, errlen, "%s: the peer closed the connection",
              colo_conn_peer (c->conn));
    return 0;
  }
  if (r == -1) {
    const char *tls = colo_tls_last_error ();
    snprintf (err, errlen, "%s: %s%s%s", colo_conn_peer (c->conn), we.msg,
              tls && *tls && we.code == 0 ? ": " : "",
              tls && we.code == 0 ? tls : "");
    if (we.code)
      colod_send_error (c, we.code, we.msg);
    return -1;
  }
  if ((*m)->type == COLO_MSG_ERROR) {
    snprintf (err, errlen, "%s: the peer reports an error: %s",
              colo_conn_peer (c->conn), (*m)->error.message);
    return -1;
  }
  return 1;
}

void
colod_send_error (struct colod_conn *c, uint32_t code, const char *msg)
{
  struct colo_msg m = { .type = COLO_MSG_ERROR };
  char err[256];

  m.error.code = code;
  snprintf (m.error.message, sizeof m.error.message, "%s", msg);
  colo_conn_set_timeout (c->conn, 1000);
  colod_send (c, &m, err, sizeof err);
}
