/* fleece-colod: the wire protocol's decoder (wire.c's note describes
 * frames and their rules): payloads, then the stream.
 *
 * The decoder is a small state machine (HEADER, PAYLOAD, READY, FAILED)
 * fed with pieces of the stream of any size, from one byte to many
 * frames.  It checks what it can as early as it can: the magic from the
 * first byte and the version from the sixth, so that a peer speaking
 * something else is told at once instead of waiting for 40 bytes that may
 * never come; the header checksum, the type and the length (within the
 * bounds of that type) before allocating anything for the payload; and
 * the payload's checksum and structure once it is whole.  The payload
 * buffer grows as bytes arrive, so a peer that announces 64 MiB and sends
 * nothing costs nothing, and is kept for the next frame, so that a stream
 * of large EXTENTs is not one malloc each.  An error is final.
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

/* ---- Decoding payloads ---- */

static int
check_length (const struct type_info *t, size_t len,
              struct colo_wire_error *err)
{
  if (len >= t->min && len <= t->max)
    return 0;
  if (t->min == t->max)
    return PROTO (err, "%s: payload of %zu bytes, expected %" PRIu32,
                  t->name, len, t->min);
  return PROTO (err, "%s: payload of %zu bytes, expected %" PRIu32
                " to %" PRIu32, t->name, len, t->min, t->max);
}

/* The string that ends a payload, at offset off (the type's minimum
 * length guarantees that its length field is there).
 */
static int
get_string (const char *type, const uint8_t *p, size_t len, size_t off,
            char *out, struct colo_wire_error *err)
{
  struct colo_wire_string s;
  size_t n, i;

  memcpy (&s, p + off, sizeof s);
  n = le16toh (s.length);
  off += sizeof s;
  if (n > COLO_WIRE_MAX_STRING)
    return PROTO (err, "%s: string of %zu bytes is longer than the "
                  "maximum %d", type, n, COLO_WIRE_MAX_STRING);
  if (n > len - off)
    return PROTO (err, "%s: string of %zu bytes runs past the end of the "
                  "payload (%zu bytes left)", type, n, len - off);
  if (n < len - off)
    return PROTO (err, "%s: %zu bytes after the string", type,
                  len - off - n);
  for (i = 0; i < n; i++)
    if (!wire_is_printable (p[off + i]))
      return PROTO (err, "%s: unprintable byte 0x%02x at position %zu "
                    "of the string", type, p[off + i], i);
  memcpy (out, p + off, n);
  out[n] = '\0';
  return 0;
}

static int
decode_hello (const struct type_info *t, const uint8_t *p, size_t len,
              struct colo_msg_hello *h, struct colo_wire_error *err)
{
  struct colo_wire_generation g;
  struct colo_wire_disks d;
  size_t want;
  uint32_t i;

  wire_get_fields (t, p, h);
  if (h->history_count > COLO_WIRE_MAX_HISTORY)
    return PROTO (err, "HELLO: history of %" PRIu32 " generations, more "
                  "than the maximum %d", h->history_count,
                  COLO_WIRE_MAX_HISTORY);
  want = t->fixed + (size_t) h->history_count * sizeof g + sizeof d;
  if (len < want)
    return PROTO (err, "HELLO: payload of %zu bytes, expected at least %zu "
                  "for a history of %" PRIu32 " generations", len, want,
                  h->history_count);
  for (i = 0; i < h->history_count; i++) {
    memcpy (&g, p + t->fixed + i * sizeof g, sizeof g);
    memcpy (h->history[i].id, g.generation_id, sizeof g.generation_id);
    h->history[i].start_epoch = le64toh (g.start_epoch);
  }
  memcpy (&d, p + want - sizeof d, sizeof d);
  h->disk_count = le32toh (d.disk_count);
  if (h->disk_count > COLO_WIRE_MAX_DISKS || d.reserved != 0)
    return PROTO (err, "HELLO: %" PRIu32 " disks (at most %d), reserved %"
                  PRIu32, h->disk_count, COLO_WIRE_MAX_DISKS,
                  le32toh (d.reserved));
  if (len != want + (size_t) h->disk_count * 8)
    return PROTO (err, "HELLO: payload of %zu bytes, expected %zu for a "
                  "history of %" PRIu32 " generations and %" PRIu32
                  " disks", len, want + (size_t) h->disk_count * 8,
                  h->history_count, h->disk_count);
  for (i = 0; i < h->disk_count; i++) {
    uint64_t v;
    memcpy (&v, p + want + i * 8, 8);
    h->disk_sizes[i] = le64toh (v);
  }
  return wire_check_hello (h, err);
}

static int
decode_extent (const struct type_info *t, const uint8_t *p, size_t len,
               struct colo_msg_extent *x, struct colo_wire_error *err)
{
  size_t data_len = len - t->fixed;

  wire_get_fields (t, p, x);
  x->data = COLO_EXTENT_KIND (x->flags) == COLO_EXTENT_DATA
    ? p + t->fixed : NULL;
  if (wire_check_extent (x, err) == -1)
    return -1;
  if (COLO_EXTENT_KIND (x->flags) == COLO_EXTENT_ZERO && data_len != 0)
    return PROTO (err, "EXTENT: ZERO extent of %" PRIu32 " bytes carries "
                  "%zu bytes of data", x->length, data_len);
  if (COLO_EXTENT_KIND (x->flags) == COLO_EXTENT_DATA &&
      data_len != x->length)
    return PROTO (err, "EXTENT: DATA extent of %" PRIu32 " bytes carries "
                  "%zu bytes of data", x->length, data_len);
  return 0;
}

/* The types whose payload is only fixed fields, and strings. */
static int
decode_simple (const struct type_info *t, const uint8_t *p, size_t len,
               struct colo_msg *m, struct colo_wire_error *err)
{
  wire_get_fields (t, p, &m->hello);     /* the union's start */
  if (t->tail == TAIL_STRING)
    return get_string (t->name, p, len, t->fixed,
                       (char *) &m->hello + t->string, err);
  return 0;
}

static int
decode_diverged (const struct type_info *t, const uint8_t *p, size_t len,
                 struct colo_msg_diverged *d, struct colo_wire_error *err)
{
  size_t data_len = len - t->fixed;

  wire_get_fields (t, p, d);
  d->bits = d->bit_count ? p + t->fixed : NULL;
  if (wire_check_diverged (d, err) == -1)
    return -1;
  if (data_len != d->bit_count / 8 + (d->bit_count % 8 != 0))
    return PROTO (err, "DIVERGED: %" PRIu64 " bits in %zu bytes",
                  d->bit_count, data_len);
  return 0;
}

int
colo_msg_decode (unsigned type, const void *payload, size_t len,
                 struct colo_msg *m, struct colo_wire_error *err)
{
  const struct type_info *t = wire_type_info (type);

  if (t == NULL)
    return PROTO (err, "unknown message type %u (this is protocol "
                  "version %d)", type, COLO_WIRE_VERSION);
  if (check_length (t, len, err) == -1)
    return -1;
  m->type = type;
  switch (type) {
  case COLO_MSG_HELLO:
    return decode_hello (t, payload, len, &m->hello, err);
  case COLO_MSG_EXTENT:
    return decode_extent (t, payload, len, &m->extent, err);
  case COLO_MSG_DIVERGED:
    return decode_diverged (t, payload, len, &m->diverged, err);
  default:
    if (decode_simple (t, payload, len, m, err) == -1)
      return -1;
    return colo_msg_check (m, err);
  }
}

/* ---- Decoding the stream ---- */

enum dec_state { DEC_HEADER, DEC_PAYLOAD, DEC_READY, DEC_FAILED };

struct colo_wire_decoder {
  enum dec_state state;
  uint64_t last_sequence;       /* of the last valid frame; 0: none */
  struct colo_wire_error error; /* once FAILED */

  /* The frame being received: in HEADER, have counts header bytes; in
   * PAYLOAD and READY, payload bytes.
   */
  uint8_t header[HDR];
  size_t have;
  struct colo_wire_frame frame;
  uint64_t payload_checksum;

  /* The payload; grows as bytes come, up to the largest frame seen.  It
   * starts DATA_ALIGN_PAD bytes into a DATA_ALIGN-aligned allocation
   * (mem), so that an EXTENT's data is aligned as O_DIRECT wants it (the
   * secondary's journal writes it so).
   */
  uint8_t *mem, *buf;
  size_t cap;

  struct colo_msg msg;          /* in READY */
};

struct colo_wire_decoder *
colo_wire_decoder_new (void)
{
  struct colo_wire_decoder *dec = calloc (1, sizeof *dec);

  if (dec)
    dec->frame.header = dec->header;
  return dec;
}

void
colo_wire_decoder_free (struct colo_wire_decoder *dec)
{
  if (dec) {
    free (dec->mem);
    free (dec);
  }
}

static int dec_fail (struct colo_wire_decoder *dec,
                     struct colo_wire_error *err, uint32_t code,
                     const char *fmt, ...)
  __attribute__ ((format (printf, 4, 5)));

static int
dec_fail (struct colo_wire_decoder *dec, struct colo_wire_error *err,
          uint32_t code, const char *fmt, ...)
{
  va_list ap;
  int saved = errno;

  dec->state = DEC_FAILED;
  dec->error.code = code;
  va_start (ap, fmt);
  vsnprintf (dec->error.msg, sizeof dec->error.msg, fmt, ap);
  va_end (ap);
  if (err)
    *err = dec->error;
  errno = saved;
  return -1;
}

static int
dec_failed (struct colo_wire_decoder *dec, struct colo_wire_error *err)
{
  if (err)
    *err = dec->error;
  return -1;
}

/* The magic from the first byte, the version from the sixth. */
static int
check_early (struct colo_wire_decoder *dec, size_t before,
             struct colo_wire_error *err)
{
  uint16_t version;
  size_t n = dec->have < 4 ? dec->have : 4, i;

  for (i = before; i < n; i++)
    if (dec->header[i] != (uint8_t) COLO_WIRE_MAGIC[i])
      return dec_fail (dec, err, COLO_ERROR_PROTOCOL,
                       "bad magic: byte %zu is 0x%02x, expected \"%s\" "
                       "(not a fleece-colod peer?)", i, dec->header[i],
                       COLO_WIRE_MAGIC);
  if (before < 6 && dec->have >= 6) {
    memcpy (&version, dec->header + offsetof (struct colo_wire_header,
                                              version), sizeof version);
    version = le16toh (version);
    if (version != COLO_WIRE_VERSION)
      return dec_fail (dec, err, COLO_ERROR_VERSION,
                       "peer speaks protocol version %u, this is "
                       "version %d", version, COLO_WIRE_VERSION);
  }
  return 0;
}

static int
parse_header (struct colo_wire_decoder *dec, struct colo_wire_error *err)
{
  struct colo_wire_header h;
  const struct type_info *t;
  uint64_t sum, expected = dec->last_sequence + 1;
  struct colo_wire_error e;

  memcpy (&h, dec->header, sizeof h);
  sum = XXH64 (dec->header, offsetof (struct colo_wire_header,
                                      header_checksum), 0);
  if (le64toh (h.header_checksum) != sum)
    return dec_fail (dec, err, COLO_ERROR_PROTOCOL,
                     "header checksum mismatch: received 0x%016" PRIx64
                     ", computed 0x%016" PRIx64 " (frame %" PRIu64 ")",
                     le64toh (h.header_checksum), sum, expected);
  if (h.flags != 0)
    return dec_fail (dec, err, COLO_ERROR_PROTOCOL,
                     "unknown frame flags 0x%" PRIx32 " (frame %" PRIu64 ")",
                     le32toh (h.flags), expected);
  dec->frame.type = le16toh (h.type);
  dec->frame.length = le32toh (h.length);
  dec->frame.sequence = le64toh (h.sequence);
  dec->payload_checksum = le64toh (h.payload_checksum);
  t = wire_type_info (dec->frame.type);
  if (t == NULL)
    return dec_fail (dec, err, COLO_ERROR_PROTOCOL,
                     "unknown message type %u (this is protocol "
                     "version %d)", dec->frame.type, COLO_WIRE_VERSION);
  if (dec->frame.length > COLO_WIRE_MAX_PAYLOAD)
    return dec_fail (dec, err, COLO_ERROR_PROTOCOL,
                     "%s: payload length %" PRIu32 " is over the maximum %u",
                     t->name, dec->frame.length, COLO_WIRE_MAX_PAYLOAD);
  if (check_length (t, dec->frame.length, &e) == -1)
    return dec_fail (dec, err, e.code, "%s", e.msg);
  if (dec->frame.sequence != expected)
    return dec_fail (dec, err, COLO_ERROR_PROTOCOL,
                     "%s: sequence number %" PRIu64 " %s (expected %"
                     PRIu64 ")", t->name, dec->frame.sequence,
                     dec->frame.sequence < expected
                     ? "replays an earlier frame" : "skips frames",
                     expected);
  dec->last_sequence = expected;
  return 0;
}

/* The payload is whole: check it and decode the message. */
static int
complete (struct colo_wire_decoder *dec, struct colo_wire_error *err)
{
  uint64_t sum = XXH64 (dec->buf, dec->frame.length, 0);
  struct colo_wire_error e;

  if (sum != dec->payload_checksum)
    return dec_fail (dec, err, COLO_ERROR_PROTOCOL,
                     "%s: payload checksum mismatch: received 0x%016" PRIx64
                     ", computed 0x%016" PRIx64 " (frame %" PRIu64 ")",
                     colo_msg_type_name (dec->frame.type),
                     dec->payload_checksum, sum, dec->frame.sequence);
  if (colo_msg_decode (dec->frame.type, dec->buf, dec->frame.length,
                       &dec->msg, &e) == -1)
    return dec_fail (dec, err, e.code, "%s", e.msg);
  dec->frame.payload = dec->buf;
  dec->state = DEC_READY;
  return 1;
}

int
colo_wire_decoder_buffer (struct colo_wire_decoder *dec, void **buf,
                          size_t *len, struct colo_wire_error *err)
{
  switch (dec->state) {
  case DEC_FAILED:
    return dec_failed (dec, err);
  case DEC_READY:               /* the caller is done with the message */
    dec->state = DEC_HEADER;
    dec->have = 0;
    /* fallthrough */
  case DEC_HEADER:
    *buf = dec->header + dec->have;
    *len = HDR - dec->have;
    return 0;
  case DEC_PAYLOAD:
    break;
  }
  if (dec->have == dec->cap) {
    size_t cap = dec->cap ? dec->cap * 2 : FIRST_ALLOC;
    uint8_t *p;

    if (cap > dec->frame.length)
      cap = dec->frame.length;
    if (posix_memalign ((void **) &p, DATA_ALIGN, DATA_ALIGN_PAD + cap) != 0)
      return dec_fail (dec, err, COLO_ERROR_INTERNAL,
                       "out of memory for a %" PRIu32 "-byte %s payload",
                       dec->frame.length,
                       colo_msg_type_name (dec->frame.type));
    if (dec->have)
      memcpy (p + DATA_ALIGN_PAD, dec->buf, dec->have);
    free (dec->mem);
    dec->mem = p;
    dec->buf = p + DATA_ALIGN_PAD;
    dec->cap = cap;
  }
  *buf = dec->buf + dec->have;
  *len = (dec->cap < dec->frame.length ? dec->cap : dec->frame.length)
    - dec->have;
  return 0;
}

int
colo_wire_decoder_commit (struct colo_wire_decoder *dec, size_t n,
                          struct colo_wire_error *err)
{
  size_t before = dec->have;

  switch (dec->state) {
  case DEC_FAILED:
    return dec_failed (dec, err);
  case DEC_READY:
    assert (n == 0);
    return 1;
  case DEC_HEADER:
    assert (n <= HDR - dec->have);
    dec->have += n;
    if (check_early (dec, before, err) == -1)
      return -1;
    if (dec->have < HDR)
      return 0;
    if (parse_header (dec, err) == -1)
      return -1;
    dec->state = DEC_PAYLOAD;
    dec->have = 0;
    assert (dec->frame.length > 0); /* every type's minimum */
    return 0;
  case DEC_PAYLOAD:
    assert (n <= dec->frame.length - dec->have && dec->have + n <= dec->cap);
    dec->have += n;
    if (dec->have < dec->frame.length)
      return 0;
    return complete (dec, err);
  }
  abort ();
}

int
colo_wire_decoder_feed (struct colo_wire_decoder *dec, const void *data,
                        size_t len, size_t *used,
                        struct colo_wire_error *err)
{
  const uint8_t *p = data;
  size_t done = 0, n;
  void *b;
  int r;

  do {
    if (colo_wire_decoder_buffer (dec, &b, &n, err) == -1) {
      r = -1;
      break;
    }
    if (n > len - done)
      n = len - done;
    if (n)
      memcpy (b, p + done, n);
    done += n;
    r = colo_wire_decoder_commit (dec, n, err);
  } while (r == 0 && done < len);
  if (used)
    *used = done;
  return r;
}

int
colo_wire_recv (struct colo_wire_decoder *dec, colo_wire_read_fn read_fn,
                void *opaque, const struct colo_msg **msg,
                struct colo_wire_error *err)
{
  void *b;
  size_t n;
  ssize_t r;
  int ret;

  for (;;) {
    if (colo_wire_decoder_buffer (dec, &b, &n, err) == -1)
      return -1;
    do
      r = read_fn (opaque, b, n);
    while (r == -1 && errno == EINTR);
    if (r == -1)
      return dec_fail (dec, err, 0, "read: %m");
    if (r == 0)
      return colo_wire_decoder_eof (dec, err);
    assert ((size_t) r <= n);
    ret = colo_wire_decoder_commit (dec, r, err);
    if (ret == 1)
      *msg = &dec->msg;
    if (ret != 0)
      return ret;
  }
}

const struct colo_msg *
colo_wire_decoder_msg (const struct colo_wire_decoder *dec)
{
  return dec->state == DEC_READY ? &dec->msg : NULL;
}

const struct colo_wire_frame *
colo_wire_decoder_frame (const struct colo_wire_decoder *dec)
{
  return dec->state == DEC_READY ? &dec->frame : NULL;
}

int
colo_wire_decoder_swap_buffer (struct colo_wire_decoder *dec, void **mem,
                               size_t *cap)
{
  uint8_t *m = *mem;
  size_t c = *cap;

  if (dec->state != DEC_READY)
    return -1;
  *mem = dec->mem;
  *cap = dec->cap;
  dec->mem = m;
  dec->buf = m ? m + DATA_ALIGN_PAD : NULL;
  dec->cap = m ? c : 0;
  return 0;
}

void
colo_wire_buffer_free (void *mem)
{
  free (mem);
}

int
colo_wire_decoder_eof (struct colo_wire_decoder *dec,
                       struct colo_wire_error *err)
{
  switch (dec->state) {
  case DEC_FAILED:
    return dec_failed (dec, err);
  case DEC_READY:
    return 0;
  case DEC_HEADER:
    if (dec->have == 0)
      return 0;
    return dec_fail (dec, err, 0, "connection closed in the middle of a "
                     "frame: %zu of %d header bytes received",
                     dec->have, HDR);
  case DEC_PAYLOAD:
    return dec_fail (dec, err, 0, "connection closed in the middle of a "
                     "frame: %zu of %" PRIu32 " payload bytes of %s frame %"
                     PRIu64 " received", dec->have, dec->frame.length,
                     colo_msg_type_name (dec->frame.type),
                     dec->frame.sequence);
  }
  abort ();
}

