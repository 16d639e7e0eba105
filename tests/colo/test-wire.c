/* Unit test of the wire protocol (colo/wire.c).
 *
 * Every message type makes a round trip: through a buffer, in one piece
 * and in pieces of random sizes (1 byte to everything, through both the
 * copying and the zero-copy decoder calls), and over a socketpair with a
 * writer thread cutting its writes at random and the reader reading
 * random amounts.  The frames are compared with a model: the messages as
 * they were before encoding.  Then each way a frame can be wrong is
 * built by hand, independently of the encoder, with correct checksums
 * unless a checksum is what is wrong, and must be refused with the right
 * error code and message.
 *
 * "test-wire --write-corpus DIR" writes the fuzzer's seed corpus
 * (tests/fuzz/colo-wire-corpus) instead.  TEST_WIRE_SEED=N repeats a
 * run (the seed is printed).
 *
 * Size.  Over 1000 lines on purpose: most of it is the hand-built bad
 * frames, one case each, written independently of the encoder so that
 * an encoder bug cannot hide a decoder bug; they share the frame
 * builders and the model of this file.
 */

#undef NDEBUG

#include <config.h>

#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "tap.h"
#include "wire.h"

#define HDR COLO_WIRE_HEADER_SIZE

/* ---- Random numbers (xorshift64*), one state per thread. ---- */

static __thread uint64_t rng = 0x9e3779b97f4a7c15;

static uint64_t
rnd (void)
{
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  return rng * 0x2545f4914f6cdd1d;
}

static uint64_t
rnd_below (uint64_t n)
{
  return n ? rnd () % n : 0;
}

/* A piece size: often tiny, sometimes anything up to left. */
static size_t
rnd_chunk (size_t left)
{
  size_t n;

  switch (rnd_below (4)) {
  case 0: n = 1; break;
  case 1: n = 1 + rnd_below (16); break;
  case 2: n = 1 + rnd_below (HDR * 2); break;
  default: n = 1 + rnd_below (left); break;
  }
  return n < left ? n : left;
}

static void
rnd_bytes (void *p, size_t n)
{
  uint8_t *b = p;
  size_t i;

  for (i = 0; i < n; i++)
    b[i] = rnd ();
}

static void
rnd_string (char *s, size_t max)
{
  size_t n = rnd_below (8) == 0 ? max : rnd_below (max < 64 ? max : 64);
  size_t i;

  for (i = 0; i < n; i++) {
    uint8_t c = 0x20 + rnd_below (0xe0);
    s[i] = c == 0x7f ? '~' : c;         /* UTF-8 bytes are fine too */
  }
  s[n] = '\0';
}

/* ---- Random valid messages: the model. ---- */

static uint32_t
rnd_cluster (void)
{
  return COLO_WIRE_MIN_CLUSTER << rnd_below (12);
}

static void
rnd_hello (struct colo_msg_hello *h)
{
  uint64_t epoch = 0;
  uint32_t i;

  h->role = 1 + rnd_below (2);
  h->max_version = 1 + rnd_below (3);
  h->channel = 1 + rnd_below (2);
  rnd_bytes (h->volume_id, 16);
  h->last_committed = rnd_below (1000000);
  h->last_applied = rnd_below (h->last_committed + 1);
  h->disk_size = rnd ();
  h->cluster_size = rnd_below (4) ? rnd_cluster () : 0;
  h->history_count = rnd_below (10) == 0 ? COLO_WIRE_MAX_HISTORY
    : rnd_below (9);
  for (i = 0; i < h->history_count; i++) {
    rnd_bytes (h->history[i].id, 16);
    epoch += rnd_below (3) ? rnd_below (100) : 0;
    h->history[i].start_epoch = epoch;
  }
  memset (h->generation_id, 0, 16);
  if (h->history_count)
    memcpy (h->generation_id, h->history[h->history_count - 1].id, 16);
  h->disk_count = rnd_below (COLO_WIRE_MAX_DISKS + 1);
  for (i = 0; i < h->disk_count; i++)
    h->disk_sizes[i] = i == 0 ? h->disk_size : rnd ();
}

/* A DIVERGED of 1 to max_bits clusters, or one where nothing diverged
 * (bit_count 0, on a disk of any size); the bitmap goes to *data (freed
 * by the caller).  The bits past the last cluster are 0.
 */
static void
rnd_diverged (struct colo_msg_diverged *d, uint8_t **data, uint64_t max_bits)
{
  uint64_t nbytes, i;

  d->base_epoch = rnd_below (1000000);
  d->cluster_size = rnd_cluster ();
  d->disk = rnd_below (COLO_WIRE_MAX_DISKS);
  *data = NULL;
  d->bits = NULL;
  if (rnd_below (4) == 0) {
    d->disk_size = rnd_below (2) ? rnd () : 0;
    d->bit_count = 0;
    return;
  }
  d->bit_count = 1 + rnd_below (max_bits);
  d->disk_size = (d->bit_count - 1) * d->cluster_size +
    (rnd_below (2) ? d->cluster_size : 1 + rnd_below (d->cluster_size));
  nbytes = (d->bit_count + 7) / 8;
  *data = calloc (1, nbytes);
  assert (*data);
  if (rnd_below (2))
    rnd_bytes (*data, nbytes);
  else                          /* a few clusters */
    for (i = rnd_below (8); i > 0; i--) {
      uint64_t b = rnd_below (d->bit_count);
      (*data)[b / 8] |= 1 << (b % 8);
    }
  if (d->bit_count % 8)
    (*data)[nbytes - 1] &= (1 << (d->bit_count % 8)) - 1;
  d->bits = *data;
}

/* data: where an EXTENT's data or a DIVERGED's bitmap goes (freed by
 * the caller).
 */
static void
rnd_msg (unsigned type, struct colo_msg *m, uint8_t **data)
{
  memset (m, 0, sizeof *m);
  m->type = type;
  *data = NULL;
  switch (type) {
  case COLO_MSG_HELLO:
    rnd_hello (&m->hello);
    break;
  case COLO_MSG_HELLO_REPLY:
    m->hello_reply.status = rnd_below (COLO_HELLO_STATUS_MAX + 1);
    rnd_string (m->hello_reply.reason, COLO_WIRE_MAX_STRING);
    break;
  case COLO_MSG_EPOCH_BEGIN:
    m->epoch_begin.epoch = 1 + rnd_below (1000000);
    rnd_bytes (m->epoch_begin.generation_id, 16);
    m->epoch_begin.cluster_size = rnd_cluster ();
    m->epoch_begin.flags = rnd_below (2) ? COLO_EPOCH_FULL : 0;
    m->epoch_begin.extent_count = rnd_below (100000);
    m->epoch_begin.total_bytes = m->epoch_begin.extent_count *
      (1 + rnd_below (m->epoch_begin.cluster_size));
    break;
  case COLO_MSG_EXTENT:
    m->extent.length = rnd_below (4) ? 1 + rnd_below (200000) : 65536;
    m->extent.offset = rnd_below (1ull << 40);
    if (rnd_below (3)) {
      *data = malloc (m->extent.length);
      assert (*data);
      rnd_bytes (*data, m->extent.length);
      m->extent.flags = COLO_EXTENT_DATA;
      m->extent.data = *data;
      m->extent.checksum = colo_wire_checksum (*data, m->extent.length);
    }
    else
      m->extent.flags = COLO_EXTENT_ZERO;
    break;
  case COLO_MSG_EPOCH_END:
    m->epoch_end.epoch = 1 + rnd_below (1000000);
    m->epoch_end.extent_count = rnd_below (100000);
    m->epoch_end.digest = rnd ();
    break;
  case COLO_MSG_EPOCH_DURABLE:
    m->epoch_durable.epoch = 1 + rnd ();
    break;
  case COLO_MSG_EPOCH_REFUSED:
    m->epoch_refused.epoch = 1 + rnd_below (1000000);
    m->epoch_refused.reason = 1 + rnd_below (COLO_REFUSE_REASON_MAX);
    rnd_string (m->epoch_refused.message, COLO_WIRE_MAX_STRING);
    break;
  case COLO_MSG_HEARTBEAT:
    m->heartbeat.monotonic_ms = rnd ();
    m->heartbeat.last_committed = rnd ();
    break;
  case COLO_MSG_HEARTBEAT_REPLY:
    m->heartbeat_reply.echo_ms = rnd ();
    m->heartbeat_reply.monotonic_ms = rnd ();
    m->heartbeat_reply.last_committed = rnd_below (1000000);
    m->heartbeat_reply.last_applied =
      rnd_below (m->heartbeat_reply.last_committed + 1);
    break;
  case COLO_MSG_ERROR:
    m->error.code = 1 + rnd_below (COLO_ERROR_CODE_MAX);
    rnd_string (m->error.message, COLO_WIRE_MAX_STRING);
    break;
  case COLO_MSG_DIVERGED:
    rnd_diverged (&m->diverged, data, rnd_below (4) ? 64 : 100000);
    break;
  default:
    abort ();
  }
}

#define SAME(f) (a->f == b->f)
#define SAME_BYTES(f) (memcmp (a->f, b->f, sizeof a->f) == 0)

static bool
hello_equal (const struct colo_msg_hello *a, const struct colo_msg_hello *b)
{
  uint32_t i;

  if (!(SAME (role) && SAME (max_version) && SAME (channel) &&
        SAME_BYTES (volume_id) && SAME_BYTES (generation_id) &&
        SAME (last_committed) && SAME (last_applied) && SAME (disk_size) &&
        SAME (cluster_size) && SAME (history_count)))
    return false;
  for (i = 0; i < a->history_count; i++)
    if (memcmp (&a->history[i], &b->history[i], sizeof a->history[i]))
      return false;
  if (!SAME (disk_count))
    return false;
  for (i = 0; i < a->disk_count; i++)
    if (a->disk_sizes[i] != b->disk_sizes[i])
      return false;
  return true;
}

static bool
msg_equal (const struct colo_msg *a, const struct colo_msg *b)
{
  if (a->type != b->type)
    return false;
  switch (a->type) {
  case COLO_MSG_HELLO:
    return hello_equal (&a->hello, &b->hello);
  case COLO_MSG_HELLO_REPLY:
    return SAME (hello_reply.status) &&
      strcmp (a->hello_reply.reason, b->hello_reply.reason) == 0;
  case COLO_MSG_EPOCH_BEGIN:
    return SAME (epoch_begin.epoch) &&
      SAME_BYTES (epoch_begin.generation_id) &&
      SAME (epoch_begin.cluster_size) && SAME (epoch_begin.flags) &&
      SAME (epoch_begin.extent_count) && SAME (epoch_begin.total_bytes);
  case COLO_MSG_EXTENT:
    return SAME (extent.offset) && SAME (extent.length) &&
      SAME (extent.flags) && SAME (extent.checksum) &&
      (a->extent.data == NULL) == (b->extent.data == NULL) &&
      (a->extent.data == NULL ||
       memcmp (a->extent.data, b->extent.data, a->extent.length) == 0);
  case COLO_MSG_EPOCH_END:
    return SAME (epoch_end.epoch) && SAME (epoch_end.extent_count) &&
      SAME (epoch_end.digest);
  case COLO_MSG_EPOCH_DURABLE:
    return SAME (epoch_durable.epoch);
  case COLO_MSG_EPOCH_REFUSED:
    return SAME (epoch_refused.epoch) && SAME (epoch_refused.reason) &&
      strcmp (a->epoch_refused.message, b->epoch_refused.message) == 0;
  case COLO_MSG_HEARTBEAT:
    return SAME (heartbeat.monotonic_ms) && SAME (heartbeat.last_committed);
  case COLO_MSG_HEARTBEAT_REPLY:
    return SAME (heartbeat_reply.echo_ms) &&
      SAME (heartbeat_reply.monotonic_ms) &&
      SAME (heartbeat_reply.last_committed) &&
      SAME (heartbeat_reply.last_applied);
  case COLO_MSG_ERROR:
    return SAME (error.code) &&
      strcmp (a->error.message, b->error.message) == 0;
  case COLO_MSG_DIVERGED:
    return SAME (diverged.base_epoch) && SAME (diverged.disk_size) &&
      SAME (diverged.cluster_size) && SAME (diverged.disk) &&
      SAME (diverged.bit_count) &&
      (a->diverged.bits == NULL) == (b->diverged.bits == NULL) &&
      (a->diverged.bits == NULL ||
       memcmp (a->diverged.bits, b->diverged.bits,
               (a->diverged.bit_count + 7) / 8) == 0);
  }
  return false;
}

/* A stream of n random messages (all types), encoded into buf. */
struct stream {
  size_t n;
  struct colo_msg *msgs;
  uint8_t **data;
  colo_wire_buf buf;
};

static void
stream_make (struct stream *s, size_t n)
{
  struct colo_wire_encoder enc;
  struct colo_wire_error err;
  size_t i;

  colo_wire_encoder_init (&enc);
  memset (s, 0, sizeof *s);
  s->n = n;
  s->msgs = calloc (n, sizeof *s->msgs);
  s->data = calloc (n, sizeof *s->data);
  assert (s->msgs && s->data);
  for (i = 0; i < n; i++) {
    rnd_msg (i < COLO_MSG_TYPE_MAX ? i + 1 : 1 + rnd_below (COLO_MSG_TYPE_MAX),
             &s->msgs[i], &s->data[i]);
    if (colo_wire_encode (&enc, &s->msgs[i], &s->buf, &err) == -1)
      bail_out ("encoding message %zu (%s): %s", i,
                colo_msg_type_name (s->msgs[i].type), err.msg);
  }
}

static void
stream_free (struct stream *s)
{
  size_t i;

  for (i = 0; i < s->n; i++)
    free (s->data[i]);
  free (s->data);
  free (s->msgs);
  colo_wire_buf_reset (&s->buf);
}

/* Decodes the stream in random pieces, through feed or buffer/commit,
 * comparing each message with the model.  Returns the messages matched.
 */
static size_t
decode_stream (const struct stream *s, bool zero_copy)
{
  struct colo_wire_decoder *dec = colo_wire_decoder_new ();
  struct colo_wire_error err;
  size_t pos = 0, got = 0, used, n;
  void *b;
  int r;

  assert (dec);
  while (pos < s->buf.len) {
    n = rnd_chunk (s->buf.len - pos);
    if (zero_copy) {
      r = colo_wire_decoder_buffer (dec, &b, &used, &err);
      assert (r == 0 && used > 0);
      if (n > used)
        n = used;
      memcpy (b, s->buf.ptr + pos, n);
      r = colo_wire_decoder_commit (dec, n, &err);
      used = n;
    }
    else
      r = colo_wire_decoder_feed (dec, s->buf.ptr + pos, n, &used, &err);
    pos += used;
    if (r == -1) {
      diag ("message %zu: %s", got, err.msg);
      break;
    }
    if (r == 1) {
      if (got >= s->n || colo_wire_decoder_frame (dec)->sequence != got + 1 ||
          !msg_equal (colo_wire_decoder_msg (dec), &s->msgs[got])) {
        diag ("message %zu (%s) differs", got,
              colo_msg_type_name (s->msgs[got].type));
        break;
      }
      got++;
    }
  }
  if (colo_wire_decoder_eof (dec, &err) == -1) {
    diag ("at the end: %s", err.msg);
    got = 0;
  }
  colo_wire_decoder_free (dec);
  return got;
}

static void
test_round_trip_each_type (void)
{
  unsigned type;

  for (type = 1; type <= COLO_MSG_TYPE_MAX; type++) {
    struct colo_wire_encoder enc;
    struct colo_wire_decoder *dec = colo_wire_decoder_new ();
    colo_wire_buf buf = { 0 };
    struct colo_wire_error err = { 0 };
    struct colo_msg m;
    uint8_t *data;
    size_t used = 0;
    int r = -1;

    colo_wire_encoder_init (&enc);
    rnd_msg (type, &m, &data);
    if (colo_wire_encode (&enc, &m, &buf, &err) == 0)
      r = colo_wire_decoder_feed (dec, buf.ptr, buf.len, &used, &err);
    ok (r == 1 && used == buf.len &&
        msg_equal (colo_wire_decoder_msg (dec), &m) &&
        colo_wire_decoder_frame (dec)->sequence == 1 &&
        colo_wire_decoder_frame (dec)->length == buf.len - HDR &&
        memcmp (colo_wire_decoder_frame (dec)->header, buf.ptr, HDR) == 0 &&
        colo_wire_decoder_eof (dec, &err) == 0,
        "round trip of %s (%zu bytes)%s%s", colo_msg_type_name (type),
        buf.len, r == -1 ? ": " : "", r == -1 ? err.msg : "");
    free (data);
    colo_wire_buf_reset (&buf);
    colo_wire_decoder_free (dec);
  }
}

static void
test_round_trip_pieces (void)
{
  struct stream s;

  stream_make (&s, 300);
  ok (decode_stream (&s, false) == s.n,
      "300 messages (%zu bytes) fed in random pieces", s.buf.len);
  ok (decode_stream (&s, true) == s.n,
      "300 messages received in random pieces through buffer/commit");
  stream_free (&s);
}

/* ---- Over a socketpair ---- */

struct peer {
  int fd;
  uint64_t seed;
  const struct stream *s;
  int result;
};

static int
write_pieces (void *opaque, const void *buf, size_t len)
{
  struct peer *p = opaque;
  const uint8_t *b = buf;

  while (len) {
    ssize_t r = write (p->fd, b, rnd_chunk (len));
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1)
      return -1;
    b += r;
    len -= r;
  }
  return 0;
}

static ssize_t
read_pieces (void *opaque, void *buf, size_t len)
{
  struct peer *p = opaque;

  return read (p->fd, buf, rnd_chunk (len));
}

static void *
writer (void *arg)
{
  struct peer *p = arg;
  struct colo_wire_encoder enc;
  struct colo_wire_error err;
  size_t i;

  rng = p->seed;
  colo_wire_encoder_init (&enc);
  p->result = 0;
  for (i = 0; i < p->s->n; i++)
    if (colo_wire_send (&enc, &p->s->msgs[i], write_pieces, p, &err) == -1) {
      diag ("writer: %s", err.msg);
      p->result = -1;
      break;
    }
  close (p->fd);
  return NULL;
}

static void
test_socketpair (void)
{
  struct colo_wire_decoder *dec = colo_wire_decoder_new ();
  struct colo_wire_error err;
  const struct colo_msg *m;
  struct stream s;
  struct peer w, rd;
  pthread_t thread;
  int sv[2], r = 0;
  size_t got = 0;

  stream_make (&s, 200);
  if (socketpair (AF_UNIX, SOCK_STREAM, 0, sv) == -1)
    bail_out ("socketpair: %m");
  w = (struct peer) { .fd = sv[0], .seed = rnd () | 1, .s = &s };
  rd = (struct peer) { .fd = sv[1], .s = &s };
  if (pthread_create (&thread, NULL, writer, &w) != 0)
    bail_out ("pthread_create failed");
  while ((r = colo_wire_recv (dec, read_pieces, &rd, &m, &err)) == 1) {
    if (got >= s.n || !msg_equal (m, &s.msgs[got]))
      break;
    got++;
  }
  if (r != 0)
    shutdown (sv[1], SHUT_RDWR);  /* the writer may be blocked */
  pthread_join (thread, NULL);
  ok (w.result == 0 && got == s.n,
      "%zu messages over a socketpair, in random writes and reads", got);
  ok (r == 0, "end of stream between frames: recv returns 0%s%s",
      r == -1 ? ": " : "", r == -1 ? err.msg : "");
  close (sv[1]);
  colo_wire_decoder_free (dec);
  stream_free (&s);
}

/* The peer stops in the middle of a frame. */
static void
test_socketpair_truncated (void)
{
  struct colo_wire_decoder *dec = colo_wire_decoder_new ();
  struct colo_wire_encoder enc;
  colo_wire_buf buf = { 0 };
  struct colo_wire_error err;
  const struct colo_msg *m;
  struct peer rd;
  struct colo_msg msg;
  uint8_t *data;
  int sv[2], r;

  colo_wire_encoder_init (&enc);
  rnd_msg (COLO_MSG_HEARTBEAT, &msg, &data);
  colo_wire_encode (&enc, &msg, &buf, &err);
  rnd_msg (COLO_MSG_EPOCH_END, &msg, &data);
  colo_wire_encode (&enc, &msg, &buf, &err);
  if (socketpair (AF_UNIX, SOCK_STREAM, 0, sv) == -1)
    bail_out ("socketpair: %m");
  rd = (struct peer) { .fd = sv[1] };
  assert (write (sv[0], buf.ptr, buf.len - 5) == (ssize_t) buf.len - 5);
  close (sv[0]);
  r = colo_wire_recv (dec, read_pieces, &rd, &m, &err);
  ok (r == 1 && m->type == COLO_MSG_HEARTBEAT, "first frame received");
  r = colo_wire_recv (dec, read_pieces, &rd, &m, &err);
  ok (r == -1 && err.code == 0 &&
      strstr (err.msg, "connection closed in the middle of a frame: 19 of "
              "24 payload bytes of EPOCH_END frame 2"),
      "truncated payload over a socketpair: %s", err.msg);
  close (sv[1]);
  colo_wire_buf_reset (&buf);
  colo_wire_decoder_free (dec);
}

static void
test_max_extent (void)
{
  struct colo_wire_decoder *dec = colo_wire_decoder_new ();
  struct colo_wire_encoder enc;
  colo_wire_buf buf = { 0 };
  struct colo_wire_error err = { 0 };
  struct colo_msg m = { .type = COLO_MSG_EXTENT };
  uint8_t *data = malloc (COLO_WIRE_MAX_EXTENT);
  size_t pos = 0, used;
  int r = 0;

  assert (data);
  rnd_bytes (data, 4096);
  memset (data + 4096, 0xa5, COLO_WIRE_MAX_EXTENT - 4096);
  m.extent = (struct colo_msg_extent) {
    .offset = 1ull << 40, .length = COLO_WIRE_MAX_EXTENT,
    .flags = COLO_EXTENT_DATA, .data = data,
    .checksum = colo_wire_checksum (data, COLO_WIRE_MAX_EXTENT),
  };
  colo_wire_encoder_init (&enc);
  if (colo_wire_encode (&enc, &m, &buf, &err) == -1)
    bail_out ("encoding the largest extent: %s", err.msg);
  while (r == 0 && pos < buf.len) {
    r = colo_wire_decoder_feed (dec, buf.ptr + pos,
                                1 + rnd_below (1 << 20), &used, &err);
    pos += used;
  }
  ok (r == 1 && pos == buf.len &&
      msg_equal (colo_wire_decoder_msg (dec), &m) &&
      colo_wire_extent_verify (&colo_wire_decoder_msg (dec)->extent,
                               &err) == 0,
      "an extent of COLO_WIRE_MAX_EXTENT bytes");
  m.extent.length++;
  ok (colo_wire_encode (&enc, &m, &buf, &err) == -1 &&
      strstr (err.msg, "EXTENT: length 67108865 is not from 1 to 67108864"),
      "one byte more is refused by the encoder: %s", err.msg);
  free (data);
  colo_wire_buf_reset (&buf);
  colo_wire_decoder_free (dec);
}

/* ---- DIVERGED: a bitmap after the fixed part ---- */

/* What colo_wire_send wrote, in how many calls. */
struct sink {
  colo_wire_buf buf;
  unsigned writes;
};

static int
write_sink (void *opaque, const void *p, size_t len)
{
  struct sink *s = opaque;

  if (colo_wire_buf_reserve (&s->buf, len) == -1)
    abort ();
  memcpy (s->buf.ptr + s->buf.len, p, len);
  s->buf.len += len;
  s->writes++;
  return 0;
}

/* colo_wire_encode and colo_wire_send make the same frame (send passes
 * the bitmap in a second write, uncopied); it decodes to the model, the
 * bitmap pointing into the payload, and (if pieces) also when fed in
 * random pieces through both decoder interfaces.
 */
static bool
diverged_round_trip (const struct colo_msg *m, bool pieces)
{
  struct colo_wire_encoder enc, enc_send;
  struct colo_wire_decoder *dec = colo_wire_decoder_new ();
  struct colo_wire_error err = { .msg = "" };
  struct stream s = { .n = 1, .msgs = (struct colo_msg *) m };
  struct sink sink = { .writes = 0 };
  const uint8_t *want_bits = NULL;
  size_t used = 0;
  bool good = false;

  assert (dec);
  colo_wire_encoder_init (&enc);
  colo_wire_encoder_init (&enc_send);
  if (colo_wire_encode (&enc, m, &s.buf, &err) == -1 ||
      colo_wire_send (&enc_send, m, write_sink, &sink, &err) == -1) {
    diag ("encoding: %s", err.msg);
    goto out;
  }
  if (sink.buf.len != s.buf.len ||
      memcmp (sink.buf.ptr, s.buf.ptr, s.buf.len) != 0 ||
      sink.writes != (m->diverged.bit_count ? 2 : 1)) {
    diag ("colo_wire_send wrote other bytes, or in %u calls", sink.writes);
    goto out;
  }
  if (colo_wire_decoder_feed (dec, s.buf.ptr, s.buf.len, &used,
                              &err) != 1 || used != s.buf.len) {
    diag ("decoding: %s", err.msg);
    goto out;
  }
  if (m->diverged.bit_count)
    want_bits = colo_wire_decoder_frame (dec)->payload +
      sizeof (struct colo_wire_diverged);
  if (!msg_equal (colo_wire_decoder_msg (dec), m) ||
      colo_wire_decoder_msg (dec)->diverged.bits != want_bits) {
    diag ("decoded DIVERGED differs from the one sent");
    goto out;
  }
  good = !pieces ||
    (decode_stream (&s, false) == 1 && decode_stream (&s, true) == 1);
 out:
  colo_wire_buf_reset (&s.buf);
  colo_wire_buf_reset (&sink.buf);
  colo_wire_decoder_free (dec);
  return good;
}

static void
test_diverged_round_trip (void)
{
  struct colo_msg m = { .type = COLO_MSG_DIVERGED };
  struct colo_wire_error err = { .msg = "" };
  struct colo_wire_encoder enc;
  colo_wire_buf buf = { 0 };
  uint8_t bits[13], *big;
  unsigned i, good;

  m.diverged = (struct colo_msg_diverged) {
    .base_epoch = 9, .disk_size = 1, .cluster_size = 65536,
    .bit_count = 1, .bits = (const uint8_t *) "\x01" };
  ok (diverged_round_trip (&m, true), "DIVERGED of a one-byte disk");
  rnd_bytes (bits, sizeof bits);
  bits[12] &= 0x1f;
  m.diverged = (struct colo_msg_diverged) {
    .base_epoch = 1000, .disk_size = 100 * 4096 + 1, .cluster_size = 4096,
    .bit_count = 101, .bits = bits };
  ok (diverged_round_trip (&m, true),
      "DIVERGED of 101 clusters, the last one partial");
  m.diverged = (struct colo_msg_diverged) {
    .base_epoch = 0, .disk_size = 64 * 512, .cluster_size = 512,
    .bit_count = 64, .bits = bits };
  ok (diverged_round_trip (&m, true), "DIVERGED of 64 clusters, 8 bytes");
  m.diverged.disk = COLO_WIRE_MAX_DISKS - 1;
  ok (diverged_round_trip (&m, true),
      "DIVERGED of the last disk of a group of 16");
  m.diverged = (struct colo_msg_diverged) {
    .base_epoch = 5, .disk_size = 1ull << 40, .cluster_size = 65536 };
  ok (diverged_round_trip (&m, true),
      "DIVERGED of a 1 TiB disk where nothing diverged (bit_count 0)");
  m.diverged = (struct colo_msg_diverged) {
    .base_epoch = 5, .disk_size = 0, .cluster_size = 512 };
  ok (diverged_round_trip (&m, true), "DIVERGED of an empty disk");

  for (i = good = 0; i < 50; i++) {
    uint8_t *data;

    rnd_msg (COLO_MSG_DIVERGED, &m, &data);
    good += diverged_round_trip (&m, true);
    free (data);
  }
  ok (good == 50, "%u of 50 random DIVERGEDs make the round trip", good);

  /* The largest bitmap, 64 MiB: a 2 TiB disk of 4 KiB clusters. */
  big = malloc (COLO_WIRE_MAX_EXTENT);
  assert (big);
  memset (big, 0, COLO_WIRE_MAX_EXTENT);
  for (i = 0; i < 1000; i++)
    big[rnd_below (COLO_WIRE_MAX_EXTENT)] |= 1 << rnd_below (8);
  m.diverged = (struct colo_msg_diverged) {
    .base_epoch = 77, .disk_size = 2ull << 40, .cluster_size = 4096,
    .bit_count = (uint64_t) COLO_WIRE_MAX_EXTENT * 8, .bits = big };
  ok (diverged_round_trip (&m, false),
      "DIVERGED of a 2 TiB disk of 4 KiB clusters (a 64 MiB bitmap)");
  m.diverged.disk_size++;
  m.diverged.bit_count++;
  colo_wire_encoder_init (&enc);
  ok (colo_wire_encode (&enc, &m, &buf, &err) == -1 &&
      strstr (err.msg, "DIVERGED: 536870913 bits, more than one frame "
              "holds"),
      "one byte more of disk is refused by the encoder: %s", err.msg);
  free (big);
  colo_wire_buf_reset (&buf);
}

/* ---- Frames built by hand ---- */

static void
put16 (uint8_t *p, uint16_t v)
{
  p[0] = v;
  p[1] = v >> 8;
}

static void
put32 (uint8_t *p, uint32_t v)
{
  put16 (p, v);
  put16 (p + 2, v >> 16);
}

static void
put64 (uint8_t *p, uint64_t v)
{
  put32 (p, v);
  put32 (p + 4, v >> 32);
}

/* A frame with these header fields and correct checksums. */
static size_t
frame (uint8_t *out, uint16_t version, uint16_t type, uint32_t length,
       uint64_t sequence, const void *payload, size_t len)
{
  memcpy (out, "FLCO", 4);
  put16 (out + 4, version);
  put16 (out + 6, type);
  put32 (out + 8, length);
  put32 (out + 12, 0);
  put64 (out + 16, sequence);
  put64 (out + 24, XXH64 (payload, len, 0));
  put64 (out + 32, XXH64 (out, 32, 0));
  memcpy (out + HDR, payload, len);
  return HDR + len;
}

static size_t
simple_frame (uint8_t *out, uint16_t type, uint64_t seq, const void *payload,
              size_t len)
{
  return frame (out, COLO_WIRE_VERSION, type, len, seq, payload, len);
}

static void
fix_header (uint8_t *out)
{
  put64 (out + 32, XXH64 (out, 32, 0));
}

/* Decodes bytes in random pieces and wants the n-th frame (or the end of
 * stream) refused with code and a message containing want.
 */
static void
expect_error (const char *what, const uint8_t *p, size_t len, uint32_t code,
              const char *want)
{
  struct colo_wire_decoder *dec = colo_wire_decoder_new ();
  struct colo_wire_error err = { .msg = "(accepted)" };
  size_t pos = 0, used;
  int r = 0;

  while (r != -1 && pos < len) {
    r = colo_wire_decoder_feed (dec, p + pos, rnd_chunk (len - pos), &used,
                                &err);
    pos += used;
  }
  if (r != -1)
    r = colo_wire_decoder_eof (dec, &err);
  ok (r == -1 && err.code == code && strstr (err.msg, want) != NULL,
      "%s: %s", what, err.msg);
  if (r == -1) {
    struct colo_wire_error again;
    static const uint8_t zero[16];
    uint8_t hb[HDR + 16];

    simple_frame (hb, COLO_MSG_HEARTBEAT, 1, zero, 16);
    if (colo_wire_decoder_feed (dec, hb, sizeof hb, &used, &again) != -1 ||
        strcmp (again.msg, err.msg) != 0)
      ok (false, "%s: the error is final", what);
  }
  colo_wire_decoder_free (dec);
}

static void
expect_valid (const char *what, const uint8_t *p, size_t len, unsigned type)
{
  struct colo_wire_decoder *dec = colo_wire_decoder_new ();
  struct colo_wire_error err = { .msg = "" };
  size_t used;
  int r;

  r = colo_wire_decoder_feed (dec, p, len, &used, &err);
  ok (r == 1 && used == len && colo_wire_decoder_msg (dec)->type == type,
      "%s is valid%s%s", what, r == -1 ? ": " : "", err.msg);
  colo_wire_decoder_free (dec);
}

static void
test_header_errors (void)
{
  uint8_t f[2 * (HDR + 64)], p[64] = { 0 };
  size_t n;

  n = simple_frame (f, COLO_MSG_HEARTBEAT, 1, p, 16);
  f[0] = 'G';
  expect_error ("bad magic", f, n, COLO_ERROR_PROTOCOL,
                "bad magic: byte 0 is 0x47, expected \"FLCO\"");
  expect_error ("plaintext HTTP, 4 bytes", (const uint8_t *) "GET ", 4,
                COLO_ERROR_PROTOCOL, "bad magic: byte 0 is 0x47");
  expect_error ("FLCX", (const uint8_t *) "FLCX", 4, COLO_ERROR_PROTOCOL,
                "bad magic: byte 3 is 0x58");

  n = frame (f, 1, COLO_MSG_HEARTBEAT, 16, 1, p, 16);
  expect_error ("version 1 (before groups)", f, n, COLO_ERROR_VERSION,
                "peer speaks protocol version 1, this is version 2");
  expect_error ("version 1, 6 bytes", f, 6, COLO_ERROR_VERSION,
                "peer speaks protocol version 1, this is version 2");
  n = frame (f, 3, COLO_MSG_HEARTBEAT, 16, 1, p, 16);
  expect_error ("version 3", f, n, COLO_ERROR_VERSION,
                "peer speaks protocol version 3, this is version 2");
  n = frame (f, 0, COLO_MSG_HEARTBEAT, 16, 1, p, 16);
  expect_error ("version 0", f, n, COLO_ERROR_VERSION,
                "peer speaks protocol version 0, this is version 2");

  n = simple_frame (f, 12, 1, p, 16);
  expect_error ("unknown type 12", f, n, COLO_ERROR_PROTOCOL,
                "unknown message type 12 (this is protocol version 2)");
  n = simple_frame (f, 0, 1, p, 16);
  expect_error ("type 0", f, n, COLO_ERROR_PROTOCOL,
                "unknown message type 0");

  n = frame (f, COLO_WIRE_VERSION, COLO_MSG_EXTENT,
             COLO_WIRE_MAX_PAYLOAD + 1, 1, p, 0);
  expect_error ("length over the maximum", f, n, COLO_ERROR_PROTOCOL,
                "EXTENT: payload length 67112961 is over the maximum "
                "67112960");
  n = frame (f, COLO_WIRE_VERSION, COLO_MSG_HEARTBEAT, 0xffffffff, 1, p, 0);
  expect_error ("length 4 GiB", f, n, COLO_ERROR_PROTOCOL,
                "is over the maximum");
  n = simple_frame (f, COLO_MSG_HEARTBEAT, 1, p, 17);
  expect_error ("HEARTBEAT of 17 bytes", f, n, COLO_ERROR_PROTOCOL,
                "HEARTBEAT: payload of 17 bytes, expected 16");
  n = frame (f, COLO_WIRE_VERSION, COLO_MSG_HELLO, 1 << 20, 1, p, 0);
  expect_error ("HELLO of 1 MiB", f, n, COLO_ERROR_PROTOCOL,
                "HELLO: payload of 1048576 bytes, expected 72 to 6352");
  n = simple_frame (f, COLO_MSG_ERROR, 1, p, 5);
  expect_error ("ERROR shorter than its fixed part", f, n,
                COLO_ERROR_PROTOCOL,
                "ERROR: payload of 5 bytes, expected 6 to 1030");

  n = simple_frame (f, COLO_MSG_HEARTBEAT, 1, p, 16);
  f[16] ^= 1;
  expect_error ("header checksum", f, n, COLO_ERROR_PROTOCOL,
                "header checksum mismatch: received 0x");
  n = simple_frame (f, COLO_MSG_HEARTBEAT, 1, p, 16);
  f[HDR + 3] ^= 0x80;
  expect_error ("payload checksum", f, n, COLO_ERROR_PROTOCOL,
                "HEARTBEAT: payload checksum mismatch: received 0x");
  n = simple_frame (f, COLO_MSG_HEARTBEAT, 1, p, 16);
  put32 (f + 12, 4);
  fix_header (f);
  expect_error ("frame flags", f, n, COLO_ERROR_PROTOCOL,
                "unknown frame flags 0x4");
}

static void
test_sequence_errors (void)
{
  uint8_t f[3 * (HDR + 16)], p[16] = { 0 };
  size_t n;

  n = simple_frame (f, COLO_MSG_HEARTBEAT, 0, p, 16);
  expect_error ("first frame numbered 0", f, n, COLO_ERROR_PROTOCOL,
                "HEARTBEAT: sequence number 0 replays an earlier frame "
                "(expected 1)");
  n = simple_frame (f, COLO_MSG_HEARTBEAT, 1, p, 16);
  n += simple_frame (f + n, COLO_MSG_HEARTBEAT, 3, p, 16);
  expect_error ("sequence gap", f, n, COLO_ERROR_PROTOCOL,
                "sequence number 3 skips frames (expected 2)");
  n = simple_frame (f, COLO_MSG_HEARTBEAT, 1, p, 16);
  n += simple_frame (f + n, COLO_MSG_HEARTBEAT, 2, p, 16);
  n += simple_frame (f + n, COLO_MSG_HEARTBEAT, 2, p, 16);
  expect_error ("sequence replay", f, n, COLO_ERROR_PROTOCOL,
                "sequence number 2 replays an earlier frame (expected 3)");

  n = simple_frame (f, COLO_MSG_HEARTBEAT, 1, p, 16);
  expect_error ("truncated payload", f, n - 1, 0,
                "connection closed in the middle of a frame: 15 of 16 "
                "payload bytes of HEARTBEAT frame 1 received");
  expect_error ("truncated header", f, 10, 0,
                "connection closed in the middle of a frame: 10 of 40 "
                "header bytes received");
}

/* A string payload: fixed bytes of zeroes (type fields set by caller),
 * then a length field and text.
 */
static size_t
string_payload (uint8_t *p, size_t fixed, uint16_t length, const char *text)
{
  memset (p, 0, fixed);
  put16 (p + fixed, length);
  memcpy (p + fixed + 2, text, strlen (text));
  return fixed + 2 + strlen (text);
}

static void
test_string_errors (void)
{
  static uint8_t f[HDR + 2048], p[2048];
  size_t n;

  n = string_payload (p, 4, 100, "refused");
  n = simple_frame (f, COLO_MSG_HELLO_REPLY, 1, p, n);
  expect_error ("string length beyond the payload", f, n,
                COLO_ERROR_PROTOCOL, "HELLO_REPLY: string of 100 bytes "
                "runs past the end of the payload (7 bytes left)");
  n = string_payload (p, 4, 2000, "x");
  put32 (p, 1);
  n = simple_frame (f, COLO_MSG_ERROR, 1, p, n);
  expect_error ("string longer than the maximum", f, n, COLO_ERROR_PROTOCOL,
                "ERROR: string of 2000 bytes is longer than the maximum "
                "1024");
  n = string_payload (p, 12, 3, "abcdef");
  put64 (p, 5);
  put32 (p + 8, COLO_REFUSE_DIGEST);
  n = simple_frame (f, COLO_MSG_EPOCH_REFUSED, 1, p, n);
  expect_error ("bytes after the string", f, n, COLO_ERROR_PROTOCOL,
                "EPOCH_REFUSED: 3 bytes after the string");
  n = string_payload (p, 4, 6, "bad\nno");
  n = simple_frame (f, COLO_MSG_HELLO_REPLY, 1, p, n);
  expect_error ("control character in a string", f, n, COLO_ERROR_PROTOCOL,
                "HELLO_REPLY: unprintable byte 0x0a at position 3");
  n = string_payload (p, 4, 4, "ab");
  p[8] = 0;
  p[9] = 'c';
  n = simple_frame (f, COLO_MSG_HELLO_REPLY, 1, p, n + 2);
  expect_error ("NUL in a string", f, n, COLO_ERROR_PROTOCOL,
                "unprintable byte 0x00 at position 2");
  n = string_payload (p, 4, 0, "");
  put32 (p, 9);
  n = simple_frame (f, COLO_MSG_HELLO_REPLY, 1, p, n);
  expect_error ("HELLO_REPLY status", f, n, COLO_ERROR_PROTOCOL,
                "HELLO_REPLY: unknown status 9");
  n = string_payload (p, 4, 0, "");
  put32 (p, 0);
  n = simple_frame (f, COLO_MSG_ERROR, 1, p, n);
  expect_error ("ERROR code 0", f, n, COLO_ERROR_PROTOCOL,
                "ERROR: unknown code 0");
  n = string_payload (p, 12, 0, "");
  put64 (p, 5);
  n = simple_frame (f, COLO_MSG_EPOCH_REFUSED, 1, p, n);
  expect_error ("EPOCH_REFUSED reason 0", f, n, COLO_ERROR_PROTOCOL,
                "EPOCH_REFUSED: unknown reason 0");
}

static size_t
extent_payload (uint8_t *p, uint64_t offset, uint32_t length, uint32_t flags,
                uint64_t checksum, size_t data_len)
{
  put64 (p, offset);
  put32 (p + 8, length);
  put32 (p + 12, flags);
  put64 (p + 16, checksum);
  memset (p + 24, 0xab, data_len);
  return 24 + data_len;
}

static void
test_extent_errors (void)
{
  static uint8_t f[HDR + 24 + 8192], p[24 + 8192];
  size_t n;

  n = extent_payload (p, 0, 4096, COLO_EXTENT_DATA, 0, 4095);
  n = simple_frame (f, COLO_MSG_EXTENT, 1, p, n);
  expect_error ("extent data shorter than its length", f, n,
                COLO_ERROR_PROTOCOL,
                "EXTENT: DATA extent of 4096 bytes carries 4095 bytes");
  n = extent_payload (p, 0, 4096, COLO_EXTENT_DATA, 0, 4097);
  n = simple_frame (f, COLO_MSG_EXTENT, 1, p, n);
  expect_error ("extent data longer than its length", f, n,
                COLO_ERROR_PROTOCOL,
                "EXTENT: DATA extent of 4096 bytes carries 4097 bytes");
  n = extent_payload (p, 0, 4096, COLO_EXTENT_ZERO, 0, 10);
  n = simple_frame (f, COLO_MSG_EXTENT, 1, p, n);
  expect_error ("ZERO extent with data", f, n, COLO_ERROR_PROTOCOL,
                "EXTENT: ZERO extent of 4096 bytes carries 10 bytes");
  n = extent_payload (p, 0, 4096, COLO_EXTENT_ZERO, 7, 0);
  n = simple_frame (f, COLO_MSG_EXTENT, 1, p, n);
  expect_error ("ZERO extent with a checksum", f, n, COLO_ERROR_PROTOCOL,
                "EXTENT: ZERO extent with checksum 0x0000000000000007");
  n = extent_payload (p, 0, 16, 3, 0, 16);
  n = simple_frame (f, COLO_MSG_EXTENT, 1, p, n);
  expect_error ("extent flags DATA|ZERO", f, n, COLO_ERROR_PROTOCOL,
                "EXTENT: flags 0x3 are neither DATA (1) nor ZERO (2)");
  n = extent_payload (p, 0, 0, COLO_EXTENT_DATA, 0, 0);
  n = simple_frame (f, COLO_MSG_EXTENT, 1, p, n);
  expect_error ("empty extent", f, n, COLO_ERROR_PROTOCOL,
                "EXTENT: length 0 is not from 1");
  n = extent_payload (p, UINT64_MAX - 8, 16, COLO_EXTENT_ZERO, 0, 0);
  n = simple_frame (f, COLO_MSG_EXTENT, 1, p, n);
  expect_error ("extent past 2^64", f, n, COLO_ERROR_PROTOCOL,
                "EXTENT: offset 18446744073709551607 + length 16 overflows");
}

static size_t
hello_payload (uint8_t *p, uint32_t count, uint32_t entries)
{
  uint32_t i;

  memset (p, 0, 72 + entries * 24 + 8);
  put16 (p, COLO_ROLE_PRIMARY);
  put16 (p + 2, 1);
  put32 (p + 4, COLO_CHANNEL_DATA);
  put64 (p + 40, 10);           /* last committed */
  put64 (p + 48, 9);            /* last applied */
  put32 (p + 64, 65536);
  put32 (p + 68, count);
  for (i = 0; i < entries; i++) {
    memset (p + 72 + i * 24, 'a' + i, 16);
    put64 (p + 72 + i * 24 + 16, i * 10);
  }
  if (entries)
    memcpy (p + 24, p + 72 + (entries - 1) * 24, 16);
  /* Version 2: no disks listed (8 zero bytes). */
  memset (p + 72 + entries * 24, 0, 8);
  return 72 + entries * 24 + 8;
}

static void
test_message_errors (void)
{
  static uint8_t f[HDR + 8192], p[8192];
  size_t n;

  n = simple_frame (f, COLO_MSG_HELLO, 1, p, hello_payload (p, 2, 2));
  expect_valid ("a HELLO built by hand", f, n, COLO_MSG_HELLO);
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, hello_payload (p, 3, 2));
  expect_error ("HELLO history count beyond the payload", f, n,
                COLO_ERROR_PROTOCOL, "HELLO: payload of 128 bytes, "
                "expected at least 152 for a history of 3 generations");
  n = hello_payload (p, 2, 2);
  put32 (p + n - 8, 17);
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, n);
  expect_error ("HELLO with 17 disks", f, n, COLO_ERROR_PROTOCOL,
                "HELLO: 17 disks (at most 16)");
  n = hello_payload (p, 2, 2);
  put32 (p + n - 8, 2);
  put64 (p + n, 7);
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, n + 8);
  expect_error ("HELLO with 2 disks and 1 size", f, n, COLO_ERROR_PROTOCOL,
                "HELLO: payload of 136 bytes, expected 144 for a history "
                "of 2 generations and 2 disks");
  n = hello_payload (p, 2, 2);
  put64 (p + 56, 4096);
  put32 (p + n - 8, 2);
  put64 (p + n, 8192);
  put64 (p + n + 8, 4096);
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, n + 16);
  expect_error ("HELLO whose disk 0 is not disk_size", f, n,
                COLO_ERROR_PROTOCOL, "HELLO: disk 0 of 8192 bytes, not the "
                "disk size 4096");
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, hello_payload (p, 300, 3));
  expect_error ("HELLO history count over the maximum", f, n,
                COLO_ERROR_PROTOCOL,
                "HELLO: history of 300 generations, more than the "
                "maximum 256");
  n = hello_payload (p, 2, 2);
  put16 (p, 3);
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, n);
  expect_error ("HELLO role", f, n, COLO_ERROR_PROTOCOL,
                "HELLO: role 3 is neither primary (1) nor secondary (2)");
  n = hello_payload (p, 2, 2);
  put32 (p + 4, COLO_CHANNEL_HEARTBEAT);
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, n);
  expect_valid ("a HELLO on the heartbeat channel", f, n, COLO_MSG_HELLO);
  n = hello_payload (p, 2, 2);
  put32 (p + 4, 0);
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, n);
  expect_error ("HELLO channel 0", f, n, COLO_ERROR_PROTOCOL,
                "HELLO: channel 0 is neither data (1) nor heartbeat (2)");
  n = hello_payload (p, 2, 2);
  put32 (p + 4, 3);
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, n);
  expect_error ("HELLO channel 3", f, n, COLO_ERROR_PROTOCOL,
                "HELLO: channel 3 is neither data (1) nor heartbeat (2)");
  n = hello_payload (p, 2, 2);
  put32 (p + 4, 0x10001);
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, n);
  expect_error ("HELLO channel 0x10001", f, n, COLO_ERROR_PROTOCOL,
                "HELLO: channel 65537 is neither data (1) nor heartbeat");
  n = hello_payload (p, 2, 2);
  put64 (p + 48, 11);
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, n);
  expect_error ("HELLO applied after committed", f, n, COLO_ERROR_PROTOCOL,
                "HELLO: last applied epoch 11 is after the last committed "
                "epoch 10");
  n = hello_payload (p, 2, 2);
  p[24] ^= 1;
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, n);
  expect_error ("HELLO generation not in its history", f, n,
                COLO_ERROR_PROTOCOL, "HELLO: the current generation is not "
                "the last one of the history");
  n = hello_payload (p, 2, 2);
  put64 (p + 72 + 16, 50);
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, n);
  expect_error ("HELLO history out of order", f, n, COLO_ERROR_PROTOCOL,
                "HELLO: generation 1 starts at epoch 10, before generation "
                "0 (epoch 50)");
  n = hello_payload (p, 2, 2);
  put32 (p + 64, 1000);
  n = simple_frame (f, COLO_MSG_HELLO, 1, p, n);
  expect_error ("HELLO cluster size", f, n, COLO_ERROR_PROTOCOL,
                "HELLO: cluster size 1000 is not a power of two");

  memset (p, 0, 48);
  put64 (p, 7);
  put32 (p + 24, 65536);
  put64 (p + 32, 0);
  put64 (p + 40, 5);
  n = simple_frame (f, COLO_MSG_EPOCH_BEGIN, 1, p, 48);
  expect_error ("EPOCH_BEGIN bytes without extents", f, n,
                COLO_ERROR_PROTOCOL,
                "EPOCH_BEGIN: 5 bytes cannot be 0 extents");
  put64 (p + 32, 1);
  put32 (p + 28, 2);
  n = simple_frame (f, COLO_MSG_EPOCH_BEGIN, 1, p, 48);
  expect_error ("EPOCH_BEGIN flags", f, n, COLO_ERROR_PROTOCOL,
                "EPOCH_BEGIN: unknown flags 0x2");
  put32 (p + 28, 0);
  put64 (p, 0);
  n = simple_frame (f, COLO_MSG_EPOCH_BEGIN, 1, p, 48);
  expect_error ("EPOCH_BEGIN epoch 0", f, n, COLO_ERROR_PROTOCOL,
                "EPOCH_BEGIN: epoch 0");
  memset (p, 0, 24);
  n = simple_frame (f, COLO_MSG_EPOCH_END, 1, p, 24);
  expect_error ("EPOCH_END epoch 0", f, n, COLO_ERROR_PROTOCOL,
                "EPOCH_END: epoch 0");
  memset (p, 0, 32);
  put64 (p + 24, 1);
  n = simple_frame (f, COLO_MSG_HEARTBEAT_REPLY, 1, p, 32);
  expect_error ("HEARTBEAT_REPLY applied after committed", f, n,
                COLO_ERROR_PROTOCOL, "HEARTBEAT_REPLY: last applied epoch 1 "
                "is after the last committed epoch 0");
}

/* A DIVERGED payload: base epoch 7, then bytes of bitmap (0xa5, the
 * bits past bit_count cleared if bytes is right for it).
 */
static size_t
diverged_payload (uint8_t *p, uint64_t disk_size, uint32_t cluster_size,
                  uint64_t bit_count, size_t bytes)
{
  put64 (p, 7);
  put64 (p + 8, disk_size);
  put32 (p + 16, cluster_size);
  put32 (p + 20, 0);            /* disk */
  put64 (p + 24, bit_count);
  memset (p + 32, 0xa5, bytes);
  if (bytes && bytes == (bit_count + 7) / 8 && bit_count % 8)
    p[32 + bytes - 1] &= (1 << (bit_count % 8)) - 1;
  return 32 + bytes;
}

static void
test_diverged_errors (void)
{
  static uint8_t f[HDR + 64], p[64];
  const uint64_t disk = 11 * 4096 - 100; /* 11 clusters, the last partial */
  /* A DIVERGED payload and the error it must get. */
  const struct {
    uint64_t disk_size;
    uint32_t cluster_size;
    uint64_t bit_count;
    size_t bytes;
    const char *desc, *msg;
  } bad[] = {
    { disk, 1000, 11, 2, "DIVERGED cluster size 1000",
      "DIVERGED: cluster size 1000 is not a power of two from 512 to "
      "67108864" },
    { disk, 0, 0, 0, "DIVERGED cluster size 0",
      "DIVERGED: cluster size 0 is not a power of two" },
    { disk, 256, 0, 0, "DIVERGED cluster size 256",
      "DIVERGED: cluster size 256 is not a power of two" },
    { disk, 4096, 10, 2, "DIVERGED one bit short",
      "DIVERGED: 10 bits for a disk of 11 clusters" },
    { 11 * 4096, 4096, 12, 2, "DIVERGED one bit too many",
      "DIVERGED: 12 bits for a disk of 11 clusters" },
    { 0, 4096, 1, 1, "DIVERGED bits for an empty disk",
      "DIVERGED: 1 bits for a disk of 0 clusters" },
    { ((1ull << 29) + 1) * 4096, 4096, (1ull << 29) + 1, 0,
      "DIVERGED bitmap larger than a frame",
      "DIVERGED: 536870913 bits, more than one frame holds" },
    { disk, 4096, 11, 1, "DIVERGED bitmap one byte short",
      "DIVERGED: 11 bits in 1 bytes" },
    { disk, 4096, 11, 3, "DIVERGED bitmap one byte long",
      "DIVERGED: 11 bits in 3 bytes" },
    { disk, 4096, 0, 2, "DIVERGED bitmap with bit_count 0",
      "DIVERGED: 0 bits in 2 bytes" },
  };
  size_t n, i;

  n = simple_frame (f, COLO_MSG_DIVERGED, 1, p,
                    diverged_payload (p, disk, 4096, 11, 2));
  expect_valid ("a DIVERGED built by hand", f, n, COLO_MSG_DIVERGED);
  n = simple_frame (f, COLO_MSG_DIVERGED, 1, p,
                    diverged_payload (p, 1ull << 40, 65536, 0, 0));
  expect_valid ("a DIVERGED with nothing diverged", f, n, COLO_MSG_DIVERGED);

  for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    n = simple_frame (f, COLO_MSG_DIVERGED, 1, p,
                      diverged_payload (p, bad[i].disk_size,
                                        bad[i].cluster_size,
                                        bad[i].bit_count, bad[i].bytes));
    expect_error (bad[i].desc, f, n, COLO_ERROR_PROTOCOL, bad[i].msg);
  }

  n = diverged_payload (p, disk, 4096, 11, 2);
  put32 (p + 20, 15);
  n = simple_frame (f, COLO_MSG_DIVERGED, 1, p, n);
  expect_valid ("a DIVERGED of disk 15 of a group", f, n, COLO_MSG_DIVERGED);
  n = diverged_payload (p, disk, 4096, 11, 2);
  put32 (p + 20, 16);
  n = simple_frame (f, COLO_MSG_DIVERGED, 1, p, n);
  expect_error ("DIVERGED of disk 16", f, n, COLO_ERROR_PROTOCOL,
                "DIVERGED: disk 16 is not from 0 to 15");

  n = simple_frame (f, COLO_MSG_DIVERGED, 1, p, 31);
  expect_error ("DIVERGED shorter than its fixed part", f, n,
                COLO_ERROR_PROTOCOL,
                "DIVERGED: payload of 31 bytes, expected 32 to 67108896");
  n = frame (f, COLO_WIRE_VERSION, COLO_MSG_DIVERGED, 32 + COLO_WIRE_MAX_EXTENT + 1, 1, p, 0);
  expect_error ("DIVERGED longer than a 64 MiB bitmap", f, n,
                COLO_ERROR_PROTOCOL,
                "DIVERGED: payload of 67108897 bytes, expected 32 to "
                "67108896");
}

/* ---- The encoder's side ---- */

static void
test_encoder_checks (void)
{
  struct colo_wire_encoder enc;
  colo_wire_buf buf = { 0 };
  struct colo_wire_error err;
  struct colo_msg m = { .type = COLO_MSG_ERROR };
  int r;

  colo_wire_encoder_init (&enc);
  m.error.code = COLO_ERROR_PROTOCOL;
  memset (m.error.message, 'x', COLO_WIRE_MAX_STRING + 1);
  r = colo_wire_encode (&enc, &m, &buf, &err);
  ok (r == -1 && enc.sequence == 0 && buf.len == 0 &&
      strstr (err.msg, "ERROR: string longer than the maximum 1024"),
      "encoder refuses a string too long, takes no sequence number: %s",
      err.msg);
  m = (struct colo_msg) { .type = 42 };
  r = colo_wire_encode (&enc, &m, &buf, &err);
  ok (r == -1 && strstr (err.msg, "unknown message type 42"),
      "encoder refuses an unknown type: %s", err.msg);
  m = (struct colo_msg) { .type = COLO_MSG_EXTENT };
  m.extent = (struct colo_msg_extent) {
    .length = 512, .flags = COLO_EXTENT_DATA };
  r = colo_wire_encode (&enc, &m, &buf, &err);
  ok (r == -1 && strstr (err.msg, "EXTENT: DATA extent without data"),
      "encoder refuses a DATA extent without data: %s", err.msg);
  m = (struct colo_msg) { .type = COLO_MSG_HELLO };
  m.hello.role = COLO_ROLE_PRIMARY;
  m.hello.max_version = 1;
  r = colo_wire_encode (&enc, &m, &buf, &err);
  ok (r == -1 && strstr (err.msg, "HELLO: channel 0 is neither data (1) "
                         "nor heartbeat (2)"),
      "encoder refuses a HELLO without a channel: %s", err.msg);
  m.hello.channel = COLO_CHANNEL_HEARTBEAT;
  ok (colo_wire_encode (&enc, &m, &buf, &err) == 0,
      "encoder takes it with a channel");
  m = (struct colo_msg) { .type = COLO_MSG_DIVERGED };
  m.diverged = (struct colo_msg_diverged) {
    .disk_size = 11 * 4096, .cluster_size = 4096, .bit_count = 11 };
  r = colo_wire_encode (&enc, &m, &buf, &err);
  ok (r == -1 && strstr (err.msg, "DIVERGED: missing bits"),
      "encoder refuses a DIVERGED without its bitmap: %s", err.msg);
  m.diverged.bits = (const uint8_t *) "\xff\x07";
  m.diverged.bit_count = 0;
  r = colo_wire_encode (&enc, &m, &buf, &err);
  ok (r == -1 && strstr (err.msg, "DIVERGED: unexpected bits"),
      "encoder refuses a bitmap with bit_count 0: %s", err.msg);
  m.diverged.bit_count = 10;
  r = colo_wire_encode (&enc, &m, &buf, &err);
  ok (r == -1 && strstr (err.msg, "DIVERGED: 10 bits for a disk of 11 "
                         "clusters"),
      "encoder refuses a bitmap of the wrong size: %s", err.msg);
  m.diverged.bit_count = 11;
  m.diverged.cluster_size = 3000;
  r = colo_wire_encode (&enc, &m, &buf, &err);
  ok (r == -1 && strstr (err.msg, "DIVERGED: cluster size 3000 is not"),
      "encoder refuses a DIVERGED cluster size 3000: %s", err.msg);
  colo_wire_buf_reset (&buf);
}

/* The header layout of docs/replication.md, byte by byte. */
static void
test_layout (void)
{
  struct colo_wire_encoder enc = { .sequence = 0x0102030405060707 };
  colo_wire_buf buf = { 0 };
  struct colo_msg m = { .type = COLO_MSG_EPOCH_DURABLE };
  uint8_t want[HDR + 8], p[8];

  m.epoch_durable.epoch = 0x1122334455667788;
  put64 (p, m.epoch_durable.epoch);
  frame (want, COLO_WIRE_VERSION, COLO_MSG_EPOCH_DURABLE, 8, 0x0102030405060708, p, 8);
  colo_wire_encode (&enc, &m, &buf, NULL);
  ok (buf.len == sizeof want && memcmp (buf.ptr, want, sizeof want) == 0,
      "EPOCH_DURABLE encodes to the documented bytes");
  colo_wire_buf_reset (&buf);
}

static void
test_layout_diverged (void)
{
  struct colo_wire_encoder enc = { .sequence = 0 };
  colo_wire_buf buf = { 0 };
  struct colo_msg m = { .type = COLO_MSG_DIVERGED };
  uint8_t want[HDR + 34], p[34];
  size_t n;

  n = diverged_payload (p, 11 * 4096 - 100, 4096, 11, 2);
  assert (n == sizeof p);
  frame (want, COLO_WIRE_VERSION, COLO_MSG_DIVERGED, n, 1, p, n);
  m.diverged = (struct colo_msg_diverged) {
    .base_epoch = 7, .disk_size = 11 * 4096 - 100, .cluster_size = 4096,
    .bit_count = 11, .bits = p + 32 };
  colo_wire_encode (&enc, &m, &buf, NULL);
  ok (buf.len == sizeof want && memcmp (buf.ptr, want, sizeof want) == 0,
      "DIVERGED encodes to the documented bytes");
  colo_wire_buf_reset (&buf);
}

static void
test_extent_verify_and_digest (void)
{
  struct colo_wire_error err;
  struct colo_wire_digest d;
  struct colo_msg_extent x[3];
  uint8_t data[1000], desc[3 * 24];
  size_t i;

  rnd_bytes (data, sizeof data);
  x[0] = (struct colo_msg_extent) {
    .offset = 0, .length = 1000, .flags = COLO_EXTENT_DATA, .data = data,
    .checksum = XXH64 (data, 1000, 0) };
  x[1] = (struct colo_msg_extent) {
    .offset = 1 << 20, .length = 65536, .flags = COLO_EXTENT_ZERO };
  x[2] = (struct colo_msg_extent) {
    .offset = 4096, .length = 10, .flags = COLO_EXTENT_DATA,
    .data = data + 10, .checksum = XXH64 (data + 10, 10, 0) };
  ok (colo_wire_extent_verify (&x[0], &err) == 0 &&
      colo_wire_extent_verify (&x[1], &err) == 0,
      "extent checksums verify");
  data[999] ^= 1;
  ok (colo_wire_extent_verify (&x[0], &err) == -1 && err.code == 0 &&
      strstr (err.msg, "extent at offset 0 (1000 bytes): checksum 0x"),
      "a corrupted extent is found: %s", err.msg);
  colo_wire_digest_init (&d);
  for (i = 0; i < 3; i++) {
    colo_wire_digest_add (&d, &x[i]);
    extent_payload (desc + i * 24, x[i].offset, x[i].length, x[i].flags,
                    x[i].checksum, 0);
  }
  ok (d.count == 3 && colo_wire_digest_final (&d) == XXH64 (desc, 72, 0),
      "the digest is xxh64 of the extent descriptors");
}

static int
write_buf (void *opaque, const void *buf, size_t len)
{
  colo_wire_buf *b = opaque;

  assert (b->len + len <= b->cap);
  memcpy (b->ptr + b->len, buf, len);
  b->len += len;
  return 0;
}

static void
test_send_error (void)
{
  struct colo_wire_decoder *dec = colo_wire_decoder_new ();
  struct colo_wire_error e = { .code = COLO_ERROR_VERSION,
                               .msg = "version\t2\n" }, err;
  struct colo_wire_encoder enc;
  uint8_t space[4096];
  colo_wire_buf b = { .ptr = space, .cap = sizeof space };
  const struct colo_msg *m;
  int r;

  colo_wire_encoder_init (&enc);
  colo_wire_send_error (&enc, &e, write_buf, &b);
  r = colo_wire_decoder_feed (dec, b.ptr, b.len, NULL, &err);
  m = colo_wire_decoder_msg (dec);
  ok (r == 1 && m->type == COLO_MSG_ERROR &&
      m->error.code == COLO_ERROR_VERSION &&
      strcmp (m->error.message, "version?2?") == 0,
      "ERROR sent for a local error, made printable");
  e.code = 0;
  b.len = 0;
  ok (colo_wire_send_error (&enc, &e, write_buf, &b) == 0 && b.len == 0,
      "nothing sent for an I/O error");
  colo_wire_decoder_free (dec);
}

/* ---- The fuzzer's seed corpus ---- */

/* A fuzzer input: one byte that chooses how the stream is cut, then
 * the stream.
 */
static void
write_file (const char *dir, const char *name, const void *p, size_t len)
{
  char path[4096];
  uint8_t seed = rnd ();
  FILE *fp;

  snprintf (path, sizeof path, "%s/%s", dir, name);
  fp = fopen (path, "w");
  if (fp == NULL || fwrite (&seed, 1, 1, fp) != 1 ||
      fwrite (p, 1, len, fp) != len || fclose (fp) != 0)
    bail_out ("%s: %m", path);
}

static int
write_corpus (const char *dir)
{
  struct colo_wire_encoder enc;
  colo_wire_buf buf = { 0 };
  struct colo_msg m;
  uint8_t *data, f[HDR + 64], p[64] = { 0 };
  unsigned type, i;
  char name[64];
  size_t n;

  rng = 42;
  for (type = 1; type <= COLO_MSG_TYPE_MAX; type++)
    for (i = 0; i < 2; i++) {
      colo_wire_encoder_init (&enc);
      buf.len = 0;
      do {
        rnd_msg (type, &m, &data);
        if (type == COLO_MSG_HELLO)
          m.hello.history_count %= 4 + 1;
        if (type == COLO_MSG_EXTENT && m.extent.length > 512) {
          m.extent.length = 1 + rnd_below (512);
          m.extent.checksum = data ? XXH64 (data, m.extent.length, 0) : 0;
        }
        if (type == COLO_MSG_HELLO && m.hello.history_count)
          memcpy (m.hello.generation_id,
                  m.hello.history[m.hello.history_count - 1].id, 16);
        else if (type == COLO_MSG_HELLO)
          memset (m.hello.generation_id, 0, 16);
        while (type == COLO_MSG_DIVERGED) { /* -0 with bits, -1 without */
          free (data);
          rnd_diverged (&m.diverged, &data, 2000);
          if ((m.diverged.bit_count != 0) == (i == 0))
            break;
        }
        if (colo_wire_encode (&enc, &m, &buf, NULL) == -1)
          abort ();
        free (data);
      } while (buf.len < 300 && rnd_below (2));
      snprintf (name, sizeof name, "%s-%u", colo_msg_type_name (type), i);
      write_file (dir, name, buf.ptr, buf.len);
    }
  /* A whole conversation. */
  colo_wire_encoder_init (&enc);
  buf.len = 0;
  for (i = 0; i < 12; i++) {
    rnd_msg (1 + rnd_below (COLO_MSG_TYPE_MAX), &m, &data);
    if (m.type == COLO_MSG_EXTENT || m.type == COLO_MSG_HELLO) {
      free (data);
      continue;
    }
    if (m.type == COLO_MSG_DIVERGED) {
      free (data);
      rnd_diverged (&m.diverged, &data, 500);
    }
    colo_wire_encode (&enc, &m, &buf, NULL);
    free (data);
  }
  write_file (dir, "mixed", buf.ptr, buf.len);
  /* Broken ones. */
  n = simple_frame (f, COLO_MSG_HEARTBEAT, 2, p, 16);
  write_file (dir, "broken-sequence", f, n);
  n = frame (f, 2, COLO_MSG_HEARTBEAT, 16, 1, p, 16);
  write_file (dir, "broken-version", f, n);
  n = simple_frame (f, COLO_MSG_HEARTBEAT, 1, p, 16);
  f[HDR] ^= 1;
  write_file (dir, "broken-payload-checksum", f, n);
  n = string_payload (p, 4, 40, "cut");
  n = simple_frame (f, COLO_MSG_HELLO_REPLY, 1, p, n);
  write_file (dir, "broken-string", f, n);
  colo_wire_buf_reset (&buf);
  return 0;
}

int
main (int argc, char *argv[])
{
  if (argc == 3 && strcmp (argv[1], "--write-corpus") == 0)
    return write_corpus (argv[2]);

  signal (SIGPIPE, SIG_IGN);
  if (getenv ("TEST_WIRE_SEED"))
    rng = strtoull (getenv ("TEST_WIRE_SEED"), NULL, 0);
  else
    rng ^= (uint64_t) getpid () << 17 ^ (uint64_t) time (NULL);
  diag ("random seed 0x%016" PRIx64, rng);
  test_round_trip_each_type ();
  test_round_trip_pieces ();
  test_socketpair ();
  test_socketpair_truncated ();
  test_max_extent ();
  test_diverged_round_trip ();
  test_header_errors ();
  test_sequence_errors ();
  test_string_errors ();
  test_extent_errors ();
  test_message_errors ();
  test_diverged_errors ();
  test_encoder_checks ();
  test_layout ();
  test_layout_diverged ();
  test_extent_verify_and_digest ();
  test_send_error ();
  return done ();
}
