/* fleece-colod: the wire protocol's encoder and decoder.
 *
 * Size.  Over 1000 lines because each of the eleven message types is
 * checked, decoded and encoded here, with the checks shared by the
 * decoder and the encoder; kept in one file so that the fuzzer
 * (tests/fuzz/fuzz-colo-wire.c) and a reader see every rule a frame
 * must pass in one place.
 *
 * A frame is a 40-byte header (include/fleece-colo-wire.h) and a payload
 * whose layout depends on its type.  The header carries two xxh64
 * checksums: one of its own first 32 bytes, one of the payload.  Frames
 * are numbered from 1 by their sender, separately on each connection and
 * in each direction, and the receiver wants exactly the next number: a
 * lost, repeated or reordered frame is a protocol error, not something to
 * recover from; the connection is dropped and the epoch resent.
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
 *
 * Deliberately not here: the order of messages (EXTENT only inside an
 * epoch, counts matching EPOCH_BEGIN) and an extent's data checksum.  The
 * first is the daemon's state machine; the second is checked by the
 * journal (colo_wire_extent_verify), because a bad extent is not a broken
 * connection: the epoch is refused and sent again.
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

#define HDR COLO_WIRE_HEADER_SIZE
#define STR_MAX (sizeof (struct colo_wire_string) + COLO_WIRE_MAX_STRING)
#define HELLO_MAX (sizeof (struct colo_wire_hello) + \
                   COLO_WIRE_MAX_HISTORY * sizeof (struct colo_wire_generation))
#define FIXED_MAX HELLO_MAX     /* largest payload but EXTENT's data */
#define FIRST_ALLOC (64 * 1024)
#define DATA_ALIGN 4096
#define DATA_ALIGN_PAD (DATA_ALIGN - sizeof (struct colo_wire_extent))

/* Payload bounds of each type, checked from the header alone. */
struct type_info {
  const char *name;
  uint32_t min, max;
};

static const struct type_info types[COLO_MSG_TYPE_MAX + 1] = {
  [COLO_MSG_HELLO] = { "HELLO", sizeof (struct colo_wire_hello), HELLO_MAX },
  [COLO_MSG_HELLO_REPLY] = {
    "HELLO_REPLY", sizeof (struct colo_wire_hello_reply) + 2,
    sizeof (struct colo_wire_hello_reply) + STR_MAX },
  [COLO_MSG_EPOCH_BEGIN] = {
    "EPOCH_BEGIN", sizeof (struct colo_wire_epoch_begin),
    sizeof (struct colo_wire_epoch_begin) },
  [COLO_MSG_EXTENT] = {
    "EXTENT", sizeof (struct colo_wire_extent),
    sizeof (struct colo_wire_extent) + COLO_WIRE_MAX_EXTENT },
  [COLO_MSG_EPOCH_END] = {
    "EPOCH_END", sizeof (struct colo_wire_epoch_end),
    sizeof (struct colo_wire_epoch_end) },
  [COLO_MSG_EPOCH_DURABLE] = {
    "EPOCH_DURABLE", sizeof (struct colo_wire_epoch_durable),
    sizeof (struct colo_wire_epoch_durable) },
  [COLO_MSG_EPOCH_REFUSED] = {
    "EPOCH_REFUSED", sizeof (struct colo_wire_epoch_refused) + 2,
    sizeof (struct colo_wire_epoch_refused) + STR_MAX },
  [COLO_MSG_HEARTBEAT] = {
    "HEARTBEAT", sizeof (struct colo_wire_heartbeat),
    sizeof (struct colo_wire_heartbeat) },
  [COLO_MSG_HEARTBEAT_REPLY] = {
    "HEARTBEAT_REPLY", sizeof (struct colo_wire_heartbeat_reply),
    sizeof (struct colo_wire_heartbeat_reply) },
  [COLO_MSG_ERROR] = {
    "ERROR", sizeof (struct colo_wire_error_msg) + 2,
    sizeof (struct colo_wire_error_msg) + STR_MAX },
  [COLO_MSG_DIVERGED] = {
    "DIVERGED", sizeof (struct colo_wire_diverged),
    sizeof (struct colo_wire_diverged) + COLO_WIRE_MAX_EXTENT },
};

_Static_assert (COLO_WIRE_MAX_PAYLOAD >= HELLO_MAX &&
                COLO_WIRE_MAX_PAYLOAD >=
                sizeof (struct colo_wire_extent) + COLO_WIRE_MAX_EXTENT,
                "COLO_WIRE_MAX_PAYLOAD too small for a message");

static const struct type_info *
type_info (unsigned type)
{
  if (type == 0 || type > COLO_MSG_TYPE_MAX)
    return NULL;
  return &types[type];
}

const char *
colo_msg_type_name (unsigned type)
{
  const struct type_info *t = type_info (type);

  return t ? t->name : "unknown";
}

static int set_error (struct colo_wire_error *err, uint32_t code,
                      const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

/* Returns -1 so that callers can "return set_error (...)".  %m works. */
static int
set_error (struct colo_wire_error *err, uint32_t code, const char *fmt, ...)
{
  struct colo_wire_error dummy;
  int saved = errno;
  va_list ap;

  if (err == NULL)
    err = &dummy;
  err->code = code;
  va_start (ap, fmt);
  vsnprintf (err->msg, sizeof err->msg, fmt, ap);
  va_end (ap);
  errno = saved;
  return -1;
}

#define PROTO(err, ...) set_error ((err), COLO_ERROR_PROTOCOL, __VA_ARGS__)

static bool
is_printable (uint8_t c)
{
  return c >= 0x20 && c != 0x7f;
}

static bool
is_zero (const uint8_t *p, size_t n)
{
  size_t i;

  for (i = 0; i < n; i++)
    if (p[i])
      return false;
  return true;
}

static bool
valid_cluster (uint32_t c)
{
  return c >= COLO_WIRE_MIN_CLUSTER && c <= COLO_WIRE_MAX_EXTENT &&
    (c & (c - 1)) == 0;
}

/* ---- Checks shared by the decoder and the encoder ---- */

static int
check_string (const char *type, const char *s, struct colo_wire_error *err)
{
  size_t n = strnlen (s, COLO_WIRE_MAX_STRING + 1);
  size_t i;

  if (n > COLO_WIRE_MAX_STRING)
    return PROTO (err, "%s: string longer than the maximum %d bytes",
                  type, COLO_WIRE_MAX_STRING);
  for (i = 0; i < n; i++)
    if (!is_printable (s[i]))
      return PROTO (err, "%s: unprintable byte 0x%02x at position %zu "
                    "of the string", type, (uint8_t) s[i], i);
  return 0;
}

static int
check_hello (const struct colo_msg_hello *h, struct colo_wire_error *err)
{
  uint32_t i;

  if (h->role != COLO_ROLE_PRIMARY && h->role != COLO_ROLE_SECONDARY)
    return PROTO (err, "HELLO: role %u is neither primary (1) "
                  "nor secondary (2)", h->role);
  if (h->max_version < 1)
    return PROTO (err, "HELLO: max_version is 0");
  if (h->channel != COLO_CHANNEL_DATA && h->channel != COLO_CHANNEL_HEARTBEAT)
    return PROTO (err, "HELLO: channel %" PRIu32 " is neither data (1) "
                  "nor heartbeat (2)", h->channel);
  if (h->cluster_size != 0 && !valid_cluster (h->cluster_size))
    return PROTO (err, "HELLO: cluster size %" PRIu32 " is not a power "
                  "of two from %d to %u", h->cluster_size,
                  COLO_WIRE_MIN_CLUSTER, COLO_WIRE_MAX_EXTENT);
  if (h->last_applied > h->last_committed)
    return PROTO (err, "HELLO: last applied epoch %" PRIu64 " is after "
                  "the last committed epoch %" PRIu64,
                  h->last_applied, h->last_committed);
  if (h->history_count > COLO_WIRE_MAX_HISTORY)
    return PROTO (err, "HELLO: history of %" PRIu32 " generations, more "
                  "than the maximum %d", h->history_count,
                  COLO_WIRE_MAX_HISTORY);
  if (h->history_count == 0) {
    if (!is_zero (h->generation_id, sizeof h->generation_id))
      return PROTO (err, "HELLO: a generation id without a history");
    return 0;
  }
  if (memcmp (h->history[h->history_count - 1].id, h->generation_id,
              sizeof h->generation_id) != 0)
    return PROTO (err, "HELLO: the current generation is not the last "
                  "one of the history");
  for (i = 1; i < h->history_count; i++)
    if (h->history[i].start_epoch < h->history[i - 1].start_epoch)
      return PROTO (err, "HELLO: generation %" PRIu32 " starts at epoch %"
                    PRIu64 ", before generation %" PRIu32 " (epoch %"
                    PRIu64 ")", i, h->history[i].start_epoch, i - 1,
                    h->history[i - 1].start_epoch);
  return 0;
}

static int
check_epoch_begin (const struct colo_msg_epoch_begin *b,
                   struct colo_wire_error *err)
{
  if (b->epoch == 0)
    return PROTO (err, "EPOCH_BEGIN: epoch 0");
  if (!valid_cluster (b->cluster_size))
    return PROTO (err, "EPOCH_BEGIN: cluster size %" PRIu32 " is not a "
                  "power of two from %d to %u", b->cluster_size,
                  COLO_WIRE_MIN_CLUSTER, COLO_WIRE_MAX_EXTENT);
  if (b->flags & ~COLO_EPOCH_FULL)
    return PROTO (err, "EPOCH_BEGIN: unknown flags 0x%" PRIx32, b->flags);
  if (b->total_bytes < b->extent_count ||
      (b->extent_count <= UINT64_MAX / COLO_WIRE_MAX_EXTENT &&
       b->total_bytes > b->extent_count * COLO_WIRE_MAX_EXTENT))
    return PROTO (err, "EPOCH_BEGIN: %" PRIu64 " bytes cannot be %" PRIu64
                  " extents of 1 to %u bytes", b->total_bytes,
                  b->extent_count, COLO_WIRE_MAX_EXTENT);
  return 0;
}

static int
check_extent (const struct colo_msg_extent *x, struct colo_wire_error *err)
{
  if (x->flags != COLO_EXTENT_DATA && x->flags != COLO_EXTENT_ZERO)
    return PROTO (err, "EXTENT: flags 0x%" PRIx32 " are neither DATA (1) "
                  "nor ZERO (2)", x->flags);
  if (x->length == 0 || x->length > COLO_WIRE_MAX_EXTENT)
    return PROTO (err, "EXTENT: length %" PRIu32 " is not from 1 to %u",
                  x->length, COLO_WIRE_MAX_EXTENT);
  if (x->offset > UINT64_MAX - x->length)
    return PROTO (err, "EXTENT: offset %" PRIu64 " + length %" PRIu32
                  " overflows", x->offset, x->length);
  if (x->flags == COLO_EXTENT_ZERO && x->checksum != 0)
    return PROTO (err, "EXTENT: ZERO extent with checksum 0x%016" PRIx64
                  ", not 0", x->checksum);
  if ((x->flags == COLO_EXTENT_DATA) != (x->data != NULL))
    return PROTO (err, "EXTENT: %s extent %s data",
                  x->data ? "ZERO" : "DATA", x->data ? "with" : "without");
  return 0;
}

static int
check_diverged (const struct colo_msg_diverged *d,
                struct colo_wire_error *err)
{
  uint64_t nbits;

  if (!valid_cluster (d->cluster_size))
    return PROTO (err, "DIVERGED: cluster size %" PRIu32 " is not a "
                  "power of two from %d to %u", d->cluster_size,
                  COLO_WIRE_MIN_CLUSTER, COLO_WIRE_MAX_EXTENT);
  nbits = d->disk_size / d->cluster_size +
    (d->disk_size % d->cluster_size != 0);
  if (d->bit_count != 0 && d->bit_count != nbits)
    return PROTO (err, "DIVERGED: %" PRIu64 " bits for a disk of %" PRIu64
                  " clusters", d->bit_count, nbits);
  if (d->bit_count > (uint64_t) COLO_WIRE_MAX_EXTENT * 8)
    return PROTO (err, "DIVERGED: %" PRIu64 " bits, more than one frame "
                  "holds", d->bit_count);
  if ((d->bit_count != 0) != (d->bits != NULL))
    return PROTO (err, "DIVERGED: %s bits", d->bits ? "unexpected" :
                  "missing");
  return 0;
}

static int
check_epoch (const char *type, uint64_t epoch, struct colo_wire_error *err)
{
  if (epoch == 0)
    return PROTO (err, "%s: epoch 0", type);
  return 0;
}

int
colo_msg_check (const struct colo_msg *m, struct colo_wire_error *err)
{
  switch (m->type) {
  case COLO_MSG_HELLO:
    return check_hello (&m->hello, err);
  case COLO_MSG_HELLO_REPLY:
    if (m->hello_reply.status > COLO_HELLO_STATUS_MAX)
      return PROTO (err, "HELLO_REPLY: unknown status %" PRIu32,
                    m->hello_reply.status);
    return check_string ("HELLO_REPLY", m->hello_reply.reason, err);
  case COLO_MSG_EPOCH_BEGIN:
    return check_epoch_begin (&m->epoch_begin, err);
  case COLO_MSG_EXTENT:
    return check_extent (&m->extent, err);
  case COLO_MSG_EPOCH_END:
    return check_epoch ("EPOCH_END", m->epoch_end.epoch, err);
  case COLO_MSG_EPOCH_DURABLE:
    return check_epoch ("EPOCH_DURABLE", m->epoch_durable.epoch, err);
  case COLO_MSG_EPOCH_REFUSED:
    if (check_epoch ("EPOCH_REFUSED", m->epoch_refused.epoch, err) == -1)
      return -1;
    if (m->epoch_refused.reason == 0 ||
        m->epoch_refused.reason > COLO_REFUSE_REASON_MAX)
      return PROTO (err, "EPOCH_REFUSED: unknown reason %" PRIu32,
                    m->epoch_refused.reason);
    return check_string ("EPOCH_REFUSED", m->epoch_refused.message, err);
  case COLO_MSG_HEARTBEAT:
    return 0;
  case COLO_MSG_HEARTBEAT_REPLY:
    if (m->heartbeat_reply.last_applied > m->heartbeat_reply.last_committed)
      return PROTO (err, "HEARTBEAT_REPLY: last applied epoch %" PRIu64
                    " is after the last committed epoch %" PRIu64,
                    m->heartbeat_reply.last_applied,
                    m->heartbeat_reply.last_committed);
    return 0;
  case COLO_MSG_ERROR:
    if (m->error.code == 0 || m->error.code > COLO_ERROR_CODE_MAX)
      return PROTO (err, "ERROR: unknown code %" PRIu32, m->error.code);
    return check_string ("ERROR", m->error.message, err);
  case COLO_MSG_DIVERGED:
    return check_diverged (&m->diverged, err);
  default:
    return PROTO (err, "unknown message type %u (this is protocol "
                  "version %d)", m->type, COLO_WIRE_VERSION);
  }
}

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
    if (!is_printable (p[off + i]))
      return PROTO (err, "%s: unprintable byte 0x%02x at position %zu "
                    "of the string", type, p[off + i], i);
  memcpy (out, p + off, n);
  out[n] = '\0';
  return 0;
}

static int
decode_hello (const uint8_t *p, size_t len, struct colo_msg_hello *h,
              struct colo_wire_error *err)
{
  struct colo_wire_hello w;
  struct colo_wire_generation g;
  size_t want;
  uint32_t i;

  memcpy (&w, p, sizeof w);
  h->channel = le32toh (w.channel);
  h->history_count = le32toh (w.history_count);
  if (h->history_count > COLO_WIRE_MAX_HISTORY)
    return PROTO (err, "HELLO: history of %" PRIu32 " generations, more "
                  "than the maximum %d", h->history_count,
                  COLO_WIRE_MAX_HISTORY);
  want = sizeof w + (size_t) h->history_count * sizeof g;
  if (len != want)
    return PROTO (err, "HELLO: payload of %zu bytes, expected %zu for a "
                  "history of %" PRIu32 " generations", len, want,
                  h->history_count);
  h->role = le16toh (w.role);
  h->max_version = le16toh (w.max_version);
  memcpy (h->volume_id, w.volume_id, sizeof h->volume_id);
  memcpy (h->generation_id, w.generation_id, sizeof h->generation_id);
  h->last_committed = le64toh (w.last_committed);
  h->last_applied = le64toh (w.last_applied);
  h->disk_size = le64toh (w.disk_size);
  h->cluster_size = le32toh (w.cluster_size);
  for (i = 0; i < h->history_count; i++) {
    memcpy (&g, p + sizeof w + i * sizeof g, sizeof g);
    memcpy (h->history[i].id, g.generation_id, sizeof g.generation_id);
    h->history[i].start_epoch = le64toh (g.start_epoch);
  }
  return check_hello (h, err);
}

static int
decode_extent (const uint8_t *p, size_t len, struct colo_msg_extent *x,
               struct colo_wire_error *err)
{
  struct colo_wire_extent w;
  size_t data_len = len - sizeof w;

  memcpy (&w, p, sizeof w);
  x->offset = le64toh (w.offset);
  x->length = le32toh (w.length);
  x->flags = le32toh (w.flags);
  x->checksum = le64toh (w.checksum);
  x->data = x->flags == COLO_EXTENT_DATA ? p + sizeof w : NULL;
  if (check_extent (x, err) == -1)
    return -1;
  if (x->flags == COLO_EXTENT_ZERO && data_len != 0)
    return PROTO (err, "EXTENT: ZERO extent of %" PRIu32 " bytes carries "
                  "%zu bytes of data", x->length, data_len);
  if (x->flags == COLO_EXTENT_DATA && data_len != x->length)
    return PROTO (err, "EXTENT: DATA extent of %" PRIu32 " bytes carries "
                  "%zu bytes of data", x->length, data_len);
  return 0;
}

/* The types whose payload is only fixed fields, and strings. */
static int
decode_simple (unsigned type, const uint8_t *p, size_t len,
               struct colo_msg *m, struct colo_wire_error *err)
{
  const char *name = types[type].name;

  switch (type) {
  case COLO_MSG_HELLO_REPLY: {
    struct colo_wire_hello_reply w;
    memcpy (&w, p, sizeof w);
    m->hello_reply.status = le32toh (w.status);
    return get_string (name, p, len, sizeof w, m->hello_reply.reason, err);
  }
  case COLO_MSG_EPOCH_BEGIN: {
    struct colo_wire_epoch_begin w;
    memcpy (&w, p, sizeof w);
    m->epoch_begin.epoch = le64toh (w.epoch);
    memcpy (m->epoch_begin.generation_id, w.generation_id,
            sizeof w.generation_id);
    m->epoch_begin.cluster_size = le32toh (w.cluster_size);
    m->epoch_begin.flags = le32toh (w.flags);
    m->epoch_begin.extent_count = le64toh (w.extent_count);
    m->epoch_begin.total_bytes = le64toh (w.total_bytes);
    return 0;
  }
  case COLO_MSG_EPOCH_END: {
    struct colo_wire_epoch_end w;
    memcpy (&w, p, sizeof w);
    m->epoch_end.epoch = le64toh (w.epoch);
    m->epoch_end.extent_count = le64toh (w.extent_count);
    m->epoch_end.digest = le64toh (w.digest);
    return 0;
  }
  case COLO_MSG_EPOCH_DURABLE: {
    struct colo_wire_epoch_durable w;
    memcpy (&w, p, sizeof w);
    m->epoch_durable.epoch = le64toh (w.epoch);
    return 0;
  }
  case COLO_MSG_EPOCH_REFUSED: {
    struct colo_wire_epoch_refused w;
    memcpy (&w, p, sizeof w);
    m->epoch_refused.epoch = le64toh (w.epoch);
    m->epoch_refused.reason = le32toh (w.reason);
    return get_string (name, p, len, sizeof w, m->epoch_refused.message,
                       err);
  }
  case COLO_MSG_HEARTBEAT: {
    struct colo_wire_heartbeat w;
    memcpy (&w, p, sizeof w);
    m->heartbeat.monotonic_ms = le64toh (w.monotonic_ms);
    m->heartbeat.last_committed = le64toh (w.last_committed);
    return 0;
  }
  case COLO_MSG_HEARTBEAT_REPLY: {
    struct colo_wire_heartbeat_reply w;
    memcpy (&w, p, sizeof w);
    m->heartbeat_reply.echo_ms = le64toh (w.echo_ms);
    m->heartbeat_reply.monotonic_ms = le64toh (w.monotonic_ms);
    m->heartbeat_reply.last_committed = le64toh (w.last_committed);
    m->heartbeat_reply.last_applied = le64toh (w.last_applied);
    return 0;
  }
  case COLO_MSG_ERROR: {
    struct colo_wire_error_msg w;
    memcpy (&w, p, sizeof w);
    m->error.code = le32toh (w.code);
    return get_string (name, p, len, sizeof w, m->error.message, err);
  }
  default:
    abort ();
  }
}

static int
decode_diverged (const uint8_t *p, size_t len, struct colo_msg_diverged *d,
                 struct colo_wire_error *err)
{
  struct colo_wire_diverged w;
  size_t data_len = len - sizeof w;

  memcpy (&w, p, sizeof w);
  if (w.reserved != 0)
    return PROTO (err, "DIVERGED: reserved field is 0x%" PRIx32 ", not 0",
                  le32toh (w.reserved));
  d->base_epoch = le64toh (w.base_epoch);
  d->disk_size = le64toh (w.disk_size);
  d->cluster_size = le32toh (w.cluster_size);
  d->bit_count = le64toh (w.bit_count);
  d->bits = d->bit_count ? p + sizeof w : NULL;
  if (check_diverged (d, err) == -1)
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
  const struct type_info *t = type_info (type);

  if (t == NULL)
    return PROTO (err, "unknown message type %u (this is protocol "
                  "version %d)", type, COLO_WIRE_VERSION);
  if (check_length (t, len, err) == -1)
    return -1;
  m->type = type;
  switch (type) {
  case COLO_MSG_HELLO:
    return decode_hello (payload, len, &m->hello, err);
  case COLO_MSG_EXTENT:
    return decode_extent (payload, len, &m->extent, err);
  case COLO_MSG_DIVERGED:
    return decode_diverged (payload, len, &m->diverged, err);
  default:
    if (decode_simple (type, payload, len, m, err) == -1)
      return -1;
    return colo_msg_check (m, err);
  }
}

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

static size_t
put_hello (uint8_t *p, const struct colo_msg_hello *h)
{
  struct colo_wire_hello w = {
    .role = htole16 (h->role),
    .max_version = htole16 (h->max_version),
    .channel = htole32 (h->channel),
    .last_committed = htole64 (h->last_committed),
    .last_applied = htole64 (h->last_applied),
    .disk_size = htole64 (h->disk_size),
    .cluster_size = htole32 (h->cluster_size),
    .history_count = htole32 (h->history_count),
  };
  struct colo_wire_generation g;
  uint32_t i;

  memcpy (w.volume_id, h->volume_id, sizeof w.volume_id);
  memcpy (w.generation_id, h->generation_id, sizeof w.generation_id);
  memcpy (p, &w, sizeof w);
  for (i = 0; i < h->history_count; i++) {
    memcpy (g.generation_id, h->history[i].id, sizeof g.generation_id);
    g.start_epoch = htole64 (h->history[i].start_epoch);
    memcpy (p + sizeof w + i * sizeof g, &g, sizeof g);
  }
  return sizeof w + h->history_count * sizeof g;
}

static void
put_extent (uint8_t *p, const struct colo_msg_extent *x)
{
  struct colo_wire_extent w = {
    .offset = htole64 (x->offset),
    .length = htole32 (x->length),
    .flags = htole32 (x->flags),
    .checksum = htole64 (x->checksum),
  };

  memcpy (p, &w, sizeof w);
}

/* Stores a fixed-size wire struct and returns its size. */
#define PUT(p, ...) ({                                  \
      __typeof__ (__VA_ARGS__) put_w_ = __VA_ARGS__;    \
      memcpy ((p), &put_w_, sizeof put_w_);             \
      sizeof put_w_;                                    \
    })

/* The payload of m, without an EXTENT's data: at most FIXED_MAX bytes. */
static size_t
put_payload (uint8_t *p, const struct colo_msg *m)
{
  size_t n;

  switch (m->type) {
  case COLO_MSG_HELLO:
    return put_hello (p, &m->hello);
  case COLO_MSG_HELLO_REPLY:
    n = PUT (p, (struct colo_wire_hello_reply) {
        .status = htole32 (m->hello_reply.status) });
    return n + put_string (p + n, m->hello_reply.reason);
  case COLO_MSG_EPOCH_BEGIN: {
    struct colo_wire_epoch_begin w = {
      .epoch = htole64 (m->epoch_begin.epoch),
      .cluster_size = htole32 (m->epoch_begin.cluster_size),
      .flags = htole32 (m->epoch_begin.flags),
      .extent_count = htole64 (m->epoch_begin.extent_count),
      .total_bytes = htole64 (m->epoch_begin.total_bytes),
    };
    memcpy (w.generation_id, m->epoch_begin.generation_id,
            sizeof w.generation_id);
    return PUT (p, w);
  }
  case COLO_MSG_EXTENT:
    put_extent (p, &m->extent);
    return sizeof (struct colo_wire_extent);
  case COLO_MSG_EPOCH_END:
    return PUT (p, (struct colo_wire_epoch_end) {
        .epoch = htole64 (m->epoch_end.epoch),
        .extent_count = htole64 (m->epoch_end.extent_count),
        .digest = htole64 (m->epoch_end.digest) });
  case COLO_MSG_EPOCH_DURABLE:
    return PUT (p, (struct colo_wire_epoch_durable) {
        .epoch = htole64 (m->epoch_durable.epoch) });
  case COLO_MSG_EPOCH_REFUSED:
    n = PUT (p, (struct colo_wire_epoch_refused) {
        .epoch = htole64 (m->epoch_refused.epoch),
        .reason = htole32 (m->epoch_refused.reason) });
    return n + put_string (p + n, m->epoch_refused.message);
  case COLO_MSG_HEARTBEAT:
    return PUT (p, (struct colo_wire_heartbeat) {
        .monotonic_ms = htole64 (m->heartbeat.monotonic_ms),
        .last_committed = htole64 (m->heartbeat.last_committed) });
  case COLO_MSG_HEARTBEAT_REPLY:
    return PUT (p, (struct colo_wire_heartbeat_reply) {
        .echo_ms = htole64 (m->heartbeat_reply.echo_ms),
        .monotonic_ms = htole64 (m->heartbeat_reply.monotonic_ms),
        .last_committed = htole64 (m->heartbeat_reply.last_committed),
        .last_applied = htole64 (m->heartbeat_reply.last_applied) });
  case COLO_MSG_ERROR:
    n = PUT (p, (struct colo_wire_error_msg) {
        .code = htole32 (m->error.code) });
    return n + put_string (p + n, m->error.message);
  case COLO_MSG_DIVERGED:
    return PUT (p, (struct colo_wire_diverged) {
        .base_epoch = htole64 (m->diverged.base_epoch),
        .disk_size = htole64 (m->diverged.disk_size),
        .cluster_size = htole32 (m->diverged.cluster_size),
        .bit_count = htole64 (m->diverged.bit_count) });
  default:
    abort ();                   /* colo_msg_check lets no other through */
  }
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
  if (m->type == COLO_MSG_EXTENT && m->extent.flags == COLO_EXTENT_DATA) {
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
    return set_error (err, 0, "write: %s frame %" PRIu64 ": %m",
                      colo_msg_type_name (m->type), enc->sequence);
  return 0;
}

int
colo_wire_encode (struct colo_wire_encoder *enc, const struct colo_msg *m,
                  struct colo_wire_buf *buf, struct colo_wire_error *err)
{
  uint8_t frame[HDR + FIXED_MAX];
  const void *data;
  size_t len, data_len, need;

  if (colo_msg_check (m, err) == -1)
    return -1;
  need = buf->len + HDR + FIXED_MAX;
  if (m->type == COLO_MSG_EXTENT)
    need += m->extent.length;
  if (m->type == COLO_MSG_DIVERGED)
    need += m->diverged.bit_count / 8 + 1;
  if (need > buf->cap) {
    size_t cap = buf->cap ? buf->cap : 4096;
    uint8_t *p;

    while (cap < need)
      cap *= 2;
    p = realloc (buf->data, cap);
    if (p == NULL)
      return set_error (err, COLO_ERROR_INTERNAL,
                        "out of memory encoding a %s frame",
                        colo_msg_type_name (m->type));
    buf->data = p;
    buf->cap = cap;
  }
  if (prepare (enc, m, frame, &len, &data, &data_len, err) == -1)
    return -1;
  memcpy (buf->data + buf->len, frame, len);
  if (data_len)
    memcpy (buf->data + buf->len + len, data, data_len);
  buf->len += len + data_len;
  return 0;
}

void
colo_wire_buf_free (struct colo_wire_buf *buf)
{
  free (buf->data);
  buf->data = NULL;
  buf->len = buf->cap = 0;
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
    m.error.message[i] = is_printable (e->msg[i]) ? e->msg[i] : '?';
  m.error.message[i] = '\0';
  return colo_wire_send (enc, &m, write_fn, opaque, NULL);
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
  t = type_info (dec->frame.type);
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

/* ---- Extents and epochs ---- */

uint64_t
colo_wire_checksum (const void *data, size_t len)
{
  return XXH64 (data, len, 0);
}

int
colo_wire_extent_verify (const struct colo_msg_extent *x,
                         struct colo_wire_error *err)
{
  uint64_t sum;

  if (x->flags != COLO_EXTENT_DATA)
    return 0;
  sum = XXH64 (x->data, x->length, 0);
  if (sum != x->checksum)
    return set_error (err, 0, "extent at offset %" PRIu64 " (%" PRIu32
                      " bytes): checksum 0x%016" PRIx64 " received, the "
                      "data hashes to 0x%016" PRIx64, x->offset, x->length,
                      x->checksum, sum);
  return 0;
}

void
colo_wire_digest_init (struct colo_wire_digest *d)
{
  XXH64_reset (&d->state, 0);
  d->count = 0;
}

void
colo_wire_digest_add (struct colo_wire_digest *d,
                      const struct colo_msg_extent *x)
{
  uint8_t w[sizeof (struct colo_wire_extent)];

  put_extent (w, x);
  XXH64_update (&d->state, w, sizeof w);
  d->count++;
}

uint64_t
colo_wire_digest_final (const struct colo_wire_digest *d)
{
  return XXH64_digest (&d->state);
}
