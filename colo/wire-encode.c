/* fleece-colod: the wire protocol's encoder (wire.c's note describes
 * frames and their rules).
 *
 * Encoding checks each message with the decoder's own rules first
 * (colo_msg_check), so that nothing leaves that the peer would refuse,
 * and the encoding is canonical: a frame that decodes re-encodes to the
 * same bytes (tests/fuzz/fuzz-colo-wire.c checks it).
 */

#include <config.h>

#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"
#include "wire-internal.h"

/* ---- Encoding ---- */

void
colo_wire_encoder_init (struct colo_wire_encoder *enc)
{
  enc->sequence = 0;
}

static size_t
put_string (uint8_t *p, const char *s)
{
  struct colo_wire_string w;
  size_t n = strlen (s);

  w.length = htole16 (n);
  memcpy (p, &w, sizeof w);
  memcpy (p + sizeof w, s, n);
  return sizeof w + n;
}

void
wire_put_extent (uint8_t *p, const struct colo_msg_extent *x)
{
  wire_put_fields (wire_type_info (COLO_MSG_EXTENT), p, x);
}

/* The payload of m, without an EXTENT's data: at most FIXED_MAX bytes. */
static size_t
put_payload (uint8_t *p, const struct colo_msg *m)
{
  const struct type_info *t = wire_type_info (m->type);
  const struct colo_msg_hello *h = &m->hello;
  struct colo_wire_generation g;
  struct colo_wire_disks d;
  size_t off;
  uint32_t i;

  wire_put_fields (t, p, &m->hello);    /* the union's start */
  if (t->tail == TAIL_STRING)
    return t->fixed + put_string (p + t->fixed,
                                  (const char *) &m->hello + t->string);
  if (m->type != COLO_MSG_HELLO)
    return t->fixed;            /* EXTENT's data and DIVERGED's bits
                                   are sent as they are */
  for (i = 0; i < h->history_count; i++) {
    memcpy (g.generation_id, h->history[i].id, sizeof g.generation_id);
    g.start_epoch = htole64 (h->history[i].start_epoch);
    memcpy (p + t->fixed + i * sizeof g, &g, sizeof g);
  }
  off = t->fixed + h->history_count * sizeof g;
  d.disk_count = htole32 (h->disk_count);
  d.reserved = 0;
  memcpy (p + off, &d, sizeof d);
  off += sizeof d;
  for (i = 0; i < h->disk_count; i++) {
    uint64_t v = htole64 (h->disk_sizes[i]);
    memcpy (p + off, &v, 8);
    off += 8;
  }
  return off;
}

static void
put_header (uint8_t *p, uint16_t type, uint32_t length, uint64_t sequence,
            uint64_t payload_checksum)
{
  struct colo_wire_header h = {
    .version = htole16 (COLO_WIRE_VERSION),
    .type = htole16 (type),
    .length = htole32 (length),
    .flags = 0,
    .sequence = htole64 (sequence),
    .payload_checksum = htole64 (payload_checksum),
  };

  memcpy (h.magic, COLO_WIRE_MAGIC, sizeof h.magic);
  h.header_checksum =
    htole64 (XXH64 (&h, offsetof (struct colo_wire_header, header_checksum),
                    0));
  memcpy (p, &h, sizeof h);
}

/* Checks m and lays out its frame: header and fixed part in out (at
 * least HDR + FIXED_MAX bytes), an EXTENT's data in *data.  Takes the
 * next sequence number.
 */
static int
prepare (struct colo_wire_encoder *enc, const struct colo_msg *m,
         uint8_t *out, size_t *out_len, const void **data, size_t *data_len,
         struct colo_wire_error *err)
{
  XXH64_state_t st;
  size_t n;

  if (colo_msg_check (m, err) == -1)
    return -1;
  n = put_payload (out + HDR, m);
  assert (n <= FIXED_MAX);
  *data = NULL;
  *data_len = 0;
  if (m->type == COLO_MSG_EXTENT &&
      COLO_EXTENT_KIND (m->extent.flags) == COLO_EXTENT_DATA) {
    *data = m->extent.data;
    *data_len = m->extent.length;
  }
  if (m->type == COLO_MSG_DIVERGED && m->diverged.bit_count) {
    *data = m->diverged.bits;
    *data_len = m->diverged.bit_count / 8 + (m->diverged.bit_count % 8 != 0);
  }
  XXH64_reset (&st, 0);
  XXH64_update (&st, out + HDR, n);
  if (*data_len)
    XXH64_update (&st, *data, *data_len);
  put_header (out, m->type, n + *data_len, ++enc->sequence,
              XXH64_digest (&st));
  *out_len = HDR + n;
  return 0;
}

int
colo_wire_send (struct colo_wire_encoder *enc, const struct colo_msg *m,
                colo_wire_write_fn write_fn, void *opaque,
                struct colo_wire_error *err)
{
  uint8_t frame[HDR + FIXED_MAX];
  const void *data;
  size_t len, data_len;

  if (prepare (enc, m, frame, &len, &data, &data_len, err) == -1)
    return -1;
  if (write_fn (opaque, frame, len) == -1 ||
      (data_len && write_fn (opaque, data, data_len) == -1))
    return wire_set_error (err, 0, "write: %s frame %" PRIu64 ": %m",
                           colo_msg_type_name (m->type), enc->sequence);
  return 0;
}

int
colo_wire_encode (struct colo_wire_encoder *enc, const struct colo_msg *m,
                  colo_wire_buf *buf, struct colo_wire_error *err)
{
  uint8_t frame[HDR + FIXED_MAX];
  const void *data;
  size_t len, data_len, need;

  if (colo_msg_check (m, err) == -1)
    return -1;
  need = HDR + FIXED_MAX;
  if (m->type == COLO_MSG_EXTENT)
    need += m->extent.length;
  if (m->type == COLO_MSG_DIVERGED)
    need += m->diverged.bit_count / 8 + 1;
  if (colo_wire_buf_reserve (buf, need) == -1)
    return wire_set_error (err, COLO_ERROR_INTERNAL,
                           "out of memory encoding a %s frame",
                           colo_msg_type_name (m->type));
  if (prepare (enc, m, frame, &len, &data, &data_len, err) == -1)
    return -1;
  memcpy (buf->ptr + buf->len, frame, len);
  if (data_len)
    memcpy (buf->ptr + buf->len + len, data, data_len);
  buf->len += len + data_len;
  return 0;
}

int
colo_wire_send_error (struct colo_wire_encoder *enc,
                      const struct colo_wire_error *e,
                      colo_wire_write_fn write_fn, void *opaque)
{
  struct colo_msg m = { .type = COLO_MSG_ERROR };
  size_t i;

  if (e->code == 0)
    return 0;
  m.error.code = e->code <= COLO_ERROR_CODE_MAX ? e->code
    : COLO_ERROR_INTERNAL;
  for (i = 0; i < sizeof e->msg && i < COLO_WIRE_MAX_STRING && e->msg[i];
       i++)
    m.error.message[i] = wire_is_printable (e->msg[i]) ? e->msg[i] : '?';
  m.error.message[i] = '\0';
  return colo_wire_send (enc, &m, write_fn, opaque, NULL);
}

