/* fleece-colod: the wire protocol's messages and their rules.
 *
 * Files.  Each of the eleven message types is checked and laid out here
 * (wire.c: colo_msg_check; the type table, with each type's payload
 * bounds and its fixed fields, their offsets and sizes; an extent's
 * checksum and the epoch digest), encoded in wire-encode.c and decoded
 * in wire-decode.c.  The checks and the layout are shared by the
 * decoder and the encoder, so that the fuzzer (tests/fuzz/
 * fuzz-colo-wire.c) and a reader find every rule a frame must pass, and
 * every field's place, in this file.
 *
 * A frame is a 40-byte header (include/fleece-colo-wire.h) and a payload
 * whose layout depends on its type.  The header carries two xxh64
 * checksums: one of its own first 32 bytes, one of the payload.  Frames
 * are numbered from 1 by their sender, separately on each connection and
 * in each direction, and the receiver wants exactly the next number: a
 * lost, repeated or reordered frame is a protocol error, not something to
 * recover from; the connection is dropped and the epoch resent.
 *
 * The decoder (wire-decode.c) is a state machine fed with pieces of
 * the stream of any size; an error is final.
 *
 * Deliberately not here: the order of messages (EXTENT only inside an
 * epoch, counts matching EPOCH_BEGIN) and an extent's data checksum.  The
 * first is the daemon's state machine; the second is checked by the
 * journal (colo_wire_extent_verify), because a bad extent is not a broken
 * connection: the epoch is refused and sent again.
 *
 * The encoder (wire-encode.c) checks each message with these rules
 * first, and its encoding is canonical.
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

/* A field of struct colo_wire_T and struct colo_msg_T; naming the
 * array's length 1 - 2 * (sizes differ) stops the build if they differ.
 */
#define FIELD(T, f)                                                     \
  { offsetof (struct colo_wire_##T, f), offsetof (struct colo_msg_##T, f), \
    sizeof (((struct colo_wire_##T *) 0)->f) *                          \
    sizeof (char [1 - 2 * (sizeof (((struct colo_wire_##T *) 0)->f) !=  \
                           sizeof (((struct colo_msg_##T *) 0)->f))]) }
#define FIELDS(a) a, sizeof a / sizeof a[0]

static const struct wire_field hello[] = {
  FIELD (hello, role), FIELD (hello, max_version), FIELD (hello, channel),
  FIELD (hello, volume_id), FIELD (hello, generation_id),
  FIELD (hello, last_committed), FIELD (hello, last_applied),
  FIELD (hello, disk_size), FIELD (hello, cluster_size),
  FIELD (hello, history_count),
};
static const struct wire_field hello_reply[] = { FIELD (hello_reply, status) };
static const struct wire_field epoch_begin[] = {
  FIELD (epoch_begin, epoch), FIELD (epoch_begin, generation_id),
  FIELD (epoch_begin, cluster_size), FIELD (epoch_begin, flags),
  FIELD (epoch_begin, extent_count), FIELD (epoch_begin, total_bytes),
};
static const struct wire_field extent[] = {
  FIELD (extent, offset), FIELD (extent, length), FIELD (extent, flags),
  FIELD (extent, checksum),
};
static const struct wire_field epoch_end[] = {
  FIELD (epoch_end, epoch), FIELD (epoch_end, extent_count),
  FIELD (epoch_end, digest),
};
static const struct wire_field epoch_durable[] = {
  FIELD (epoch_durable, epoch),
};
static const struct wire_field epoch_refused[] = {
  FIELD (epoch_refused, epoch), FIELD (epoch_refused, reason),
};
static const struct wire_field heartbeat[] = {
  FIELD (heartbeat, monotonic_ms), FIELD (heartbeat, last_committed),
};
static const struct wire_field heartbeat_reply[] = {
  FIELD (heartbeat_reply, echo_ms), FIELD (heartbeat_reply, monotonic_ms),
  FIELD (heartbeat_reply, last_committed),
  FIELD (heartbeat_reply, last_applied),
};
static const struct wire_field error_fields[] = {
  { offsetof (struct colo_wire_error_msg, code),
    offsetof (struct colo_msg_error, code), 4 },
};
static const struct wire_field diverged[] = {
  FIELD (diverged, base_epoch), FIELD (diverged, disk_size),
  FIELD (diverged, cluster_size), FIELD (diverged, disk),
  FIELD (diverged, bit_count),
};

/* A type whose payload is its fixed fields only, then a string, or
 * then what its own code reads and writes (up to max bytes).
 */
#define ONLY(N, T) \
  { #N, sizeof (struct colo_wire_##T), sizeof (struct colo_wire_##T), \
    sizeof (struct colo_wire_##T), FIELDS (T), TAIL_NONE, 0 }
#define WITH_STRING(N, T, wt, s) \
  { #N, sizeof (struct colo_wire_##wt) + 2, \
    sizeof (struct colo_wire_##wt) + STR_MAX, sizeof (struct colo_wire_##wt), \
    FIELDS (T), TAIL_STRING, offsetof (struct colo_msg_##T, s) }
#define WITH_OTHER(N, T, max) \
  { #N, sizeof (struct colo_wire_##T), max, sizeof (struct colo_wire_##T), \
    FIELDS (T), TAIL_OTHER, 0 }

static const struct type_info types[COLO_MSG_TYPE_MAX + 1] = {
  [COLO_MSG_HELLO] = WITH_OTHER (HELLO, hello, HELLO_MAX),
  [COLO_MSG_HELLO_REPLY] = WITH_STRING (HELLO_REPLY, hello_reply,
                                        hello_reply, reason),
  [COLO_MSG_EPOCH_BEGIN] = ONLY (EPOCH_BEGIN, epoch_begin),
  [COLO_MSG_EXTENT] = WITH_OTHER (EXTENT, extent, sizeof (struct
                                                          colo_wire_extent)
                                  + COLO_WIRE_MAX_EXTENT),
  [COLO_MSG_EPOCH_END] = ONLY (EPOCH_END, epoch_end),
  [COLO_MSG_EPOCH_DURABLE] = ONLY (EPOCH_DURABLE, epoch_durable),
  [COLO_MSG_EPOCH_REFUSED] = WITH_STRING (EPOCH_REFUSED, epoch_refused,
                                          epoch_refused, message),
  [COLO_MSG_HEARTBEAT] = ONLY (HEARTBEAT, heartbeat),
  [COLO_MSG_HEARTBEAT_REPLY] = ONLY (HEARTBEAT_REPLY, heartbeat_reply),
  [COLO_MSG_ERROR] = {
    "ERROR", sizeof (struct colo_wire_error_msg) + 2,
    sizeof (struct colo_wire_error_msg) + STR_MAX,
    sizeof (struct colo_wire_error_msg), FIELDS (error_fields), TAIL_STRING,
    offsetof (struct colo_msg_error, message) },
  [COLO_MSG_DIVERGED] = WITH_OTHER (DIVERGED, diverged,
                                    sizeof (struct colo_wire_diverged) +
                                    COLO_WIRE_MAX_EXTENT),
};

_Static_assert (COLO_WIRE_MAX_PAYLOAD >= HELLO_MAX &&
                COLO_WIRE_MAX_PAYLOAD >=
                sizeof (struct colo_wire_extent) + COLO_WIRE_MAX_EXTENT,
                "COLO_WIRE_MAX_PAYLOAD too small for a message");

const struct type_info *
wire_type_info (unsigned type)
{
  if (type == 0 || type > COLO_MSG_TYPE_MAX)
    return NULL;
  return &types[type];
}

const char *
colo_msg_type_name (unsigned type)
{
  const struct type_info *t = wire_type_info (type);

  return t ? t->name : "unknown";
}

/* A field's value in the message: a host number of size bytes. */
static uint64_t
load_host (const void *from, unsigned size)
{
  uint16_t u16;
  uint32_t u32;
  uint64_t u64;

  switch (size) {
  case 2: memcpy (&u16, from, 2); return u16;
  case 4: memcpy (&u32, from, 4); return u32;
  default: memcpy (&u64, from, 8); return u64;
  }
}

static void
store_host (void *to, unsigned size, uint64_t v)
{
  uint16_t u16 = v;
  uint32_t u32 = v;

  switch (size) {
  case 2: memcpy (to, &u16, 2); break;
  case 4: memcpy (to, &u32, 4); break;
  default: memcpy (to, &v, 8);
  }
}

void
wire_get_fields (const struct type_info *t, const uint8_t *p, void *body)
{
  unsigned i, k;

  for (i = 0; i < t->nfields; i++) {
    const struct wire_field *f = &t->fields[i];
    uint64_t v = 0;

    if (f->size == 16) {
      memcpy ((char *) body + f->msg, p + f->wire, 16);
      continue;
    }
    for (k = f->size; k > 0; k--)     /* little-endian */
      v = v << 8 | p[f->wire + k - 1];
    store_host ((char *) body + f->msg, f->size, v);
  }
}

void
wire_put_fields (const struct type_info *t, uint8_t *p, const void *body)
{
  unsigned i, k;

  memset (p, 0, t->fixed);
  for (i = 0; i < t->nfields; i++) {
    const struct wire_field *f = &t->fields[i];
    uint64_t v;

    if (f->size == 16) {
      memcpy (p + f->wire, (const char *) body + f->msg, 16);
      continue;
    }
    v = load_host ((const char *) body + f->msg, f->size);
    for (k = 0; k < f->size; k++, v >>= 8)
      p[f->wire + k] = v;
  }
}

int
wire_set_error (struct colo_wire_error *err, uint32_t code, const char *fmt,
                ...)
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

bool
wire_is_printable (uint8_t c)
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
    if (!wire_is_printable (s[i]))
      return PROTO (err, "%s: unprintable byte 0x%02x at position %zu "
                    "of the string", type, (uint8_t) s[i], i);
  return 0;
}

int
wire_check_hello (const struct colo_msg_hello *h, struct colo_wire_error *err)
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
  if (h->disk_count > COLO_WIRE_MAX_DISKS)
    return PROTO (err, "HELLO: %" PRIu32 " disks, more than the maximum %d",
                  h->disk_count, COLO_WIRE_MAX_DISKS);
  if (h->disk_count > 0 && h->disk_sizes[0] != h->disk_size)
    return PROTO (err, "HELLO: disk 0 of %" PRIu64 " bytes, not the disk "
                  "size %" PRIu64, h->disk_sizes[0], h->disk_size);
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

int
wire_check_extent (const struct colo_msg_extent *x, struct colo_wire_error *err)
{
  uint32_t kind = COLO_EXTENT_KIND (x->flags);

  if (kind != COLO_EXTENT_DATA && kind != COLO_EXTENT_ZERO)
    return PROTO (err, "EXTENT: flags 0x%" PRIx32 " are neither DATA (1) "
                  "nor ZERO (2)", x->flags);
  if (COLO_EXTENT_DISK (x->flags) >= COLO_WIRE_MAX_DISKS)
    return PROTO (err, "EXTENT: disk %" PRIu32 " (at most %d disks)",
                  COLO_EXTENT_DISK (x->flags), COLO_WIRE_MAX_DISKS);
  if (x->length == 0 || x->length > COLO_WIRE_MAX_EXTENT)
    return PROTO (err, "EXTENT: length %" PRIu32 " is not from 1 to %u",
                  x->length, COLO_WIRE_MAX_EXTENT);
  if (x->offset > UINT64_MAX - x->length)
    return PROTO (err, "EXTENT: offset %" PRIu64 " + length %" PRIu32
                  " overflows", x->offset, x->length);
  if (kind == COLO_EXTENT_ZERO && x->checksum != 0)
    return PROTO (err, "EXTENT: ZERO extent with checksum 0x%016" PRIx64
                  ", not 0", x->checksum);
  if ((kind == COLO_EXTENT_DATA) != (x->data != NULL))
    return PROTO (err, "EXTENT: %s extent %s data",
                  x->data ? "ZERO" : "DATA", x->data ? "with" : "without");
  return 0;
}

int
wire_check_diverged (const struct colo_msg_diverged *d,
                     struct colo_wire_error *err)
{
  uint64_t nbits;

  if (!valid_cluster (d->cluster_size))
    return PROTO (err, "DIVERGED: cluster size %" PRIu32 " is not a "
                  "power of two from %d to %u", d->cluster_size,
                  COLO_WIRE_MIN_CLUSTER, COLO_WIRE_MAX_EXTENT);
  if (d->disk >= COLO_WIRE_MAX_DISKS)
    return PROTO (err, "DIVERGED: disk %" PRIu32 " is not from 0 to %d",
                  d->disk, COLO_WIRE_MAX_DISKS - 1);
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
    return wire_check_hello (&m->hello, err);
  case COLO_MSG_HELLO_REPLY:
    if (m->hello_reply.status > COLO_HELLO_STATUS_MAX)
      return PROTO (err, "HELLO_REPLY: unknown status %" PRIu32,
                    m->hello_reply.status);
    return check_string ("HELLO_REPLY", m->hello_reply.reason, err);
  case COLO_MSG_EPOCH_BEGIN:
    return check_epoch_begin (&m->epoch_begin, err);
  case COLO_MSG_EXTENT:
    return wire_check_extent (&m->extent, err);
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
    return wire_check_diverged (&m->diverged, err);
  default:
    return PROTO (err, "unknown message type %u (this is protocol "
                  "version %d)", m->type, COLO_WIRE_VERSION);
  }
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

  if (COLO_EXTENT_KIND (x->flags) != COLO_EXTENT_DATA)
    return 0;
  sum = XXH64 (x->data, x->length, 0);
  if (sum != x->checksum)
    return wire_set_error (err, 0, "extent at offset %" PRIu64 " (%" PRIu32
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

  wire_put_extent (w, x);
  XXH64_update (&d->state, w, sizeof w);
  d->count++;
}

uint64_t
colo_wire_digest_final (const struct colo_wire_digest *d)
{
  return XXH64_digest (&d->state);
}
