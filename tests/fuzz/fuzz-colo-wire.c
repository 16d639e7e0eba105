/* libFuzzer target: fleece-colod's frame decoder (colo/wire.c).
 *
 * The first byte of the input chooses how the rest is cut, and whether
 * the checksums (bit 7) and sequence numbers (bit 6) of the frames in it
 * are made right first, so that mutations reach the payload checks
 * instead of all dying at the header checksum; the rest is what a peer
 * sends.  It is decoded three times: in one piece, in pieces
 * of pseudo-random sizes through colo_wire_decoder_feed, and in such
 * pieces through the zero-copy buffer/commit calls.  The three runs must
 * agree exactly (the same frames, the same final error or end), since a
 * TCP or TLS stream can be cut anywhere.  Every frame accepted must
 * pass colo_msg_check and re-encode to the very bytes received: the
 * encoding is canonical, so nothing the decoder lets through is
 * ambiguous.  ASan, UBSan and LeakSanitizer do the rest.
 *
 * Built and run by "make fuzz" (tests/Makefile.am) with clang
 * -fsanitize=fuzzer,address,undefined; seeds in
 * tests/fuzz/colo-wire-corpus (written by "tests/colo/test-wire
 * --write-corpus DIR").
 */

#include <config.h>

#include <endian.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "le.h"
#include "wire.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

/* What a run saw. */
struct outcome {
  size_t frames;
  uint64_t hash;                /* of every accepted frame, chained */
  int result;                   /* the last call's */
  struct colo_wire_error err;
};

static colo_wire_buf buf;

static void
fail (const char *what)
{
  fprintf (stderr, "fuzz-colo-wire: %s\n", what);
  abort ();
}

/* The frame the decoder holds re-encodes to the same bytes. */
static void
check_frame (struct colo_wire_decoder *dec, struct outcome *o)
{
  const struct colo_wire_frame *f = colo_wire_decoder_frame (dec);
  const struct colo_msg *m = colo_wire_decoder_msg (dec);
  struct colo_wire_encoder enc;
  struct colo_wire_error err;

  if (f == NULL || m == NULL || m->type != f->type)
    fail ("no message after a 1");
  enc.sequence = f->sequence - 1;
  if (colo_msg_check (m, &err) == -1)
    fail (err.msg);
  buf.len = 0;
  if (colo_wire_encode (&enc, m, &buf, &err) == -1)
    fail (err.msg);
  if (buf.len != COLO_WIRE_HEADER_SIZE + f->length ||
      memcmp (buf.ptr, f->header, COLO_WIRE_HEADER_SIZE) != 0 ||
      memcmp (buf.ptr + COLO_WIRE_HEADER_SIZE, f->payload, f->length) != 0)
    fail ("an accepted frame does not re-encode to the same bytes");
  if (m->type == COLO_MSG_EXTENT) {
    struct colo_wire_digest d;

    colo_wire_extent_verify (&m->extent, &err);
    colo_wire_digest_init (&d);
    colo_wire_digest_add (&d, &m->extent);
    colo_wire_digest_final (&d);
  }
  o->frames++;
  o->hash = XXH64 (buf.ptr, buf.len, o->hash);
}

static uint64_t rng;

static size_t
chunk (size_t left)
{
  size_t n;

  rng = rng * 6364136223846793005ull + 1442695040888963407ull;
  switch (rng >> 62) {
  case 0: n = 1; break;
  case 1: n = 1 + (rng >> 32) % 16; break;
  case 2: n = 1 + (rng >> 32) % 100; break;
  default: n = 1 + (rng >> 32) % left; break;
  }
  return n < left ? n : left;
}

/* mode 0: one piece; 1: pieces through feed; 2: through buffer/commit. */
static void
run (const uint8_t *p, size_t len, int mode, uint8_t seed,
     struct outcome *o)
{
  struct colo_wire_decoder *dec = colo_wire_decoder_new ();
  size_t pos = 0, n, used;
  void *b;

  if (dec == NULL)
    fail ("out of memory");
  memset (o, 0, sizeof *o);
  rng = seed;
  o->result = 0;
  while (o->result != -1 && pos < len) {
    n = mode == 0 ? len - pos : chunk (len - pos);
    if (mode == 2) {
      o->result = colo_wire_decoder_buffer (dec, &b, &used, &o->err);
      if (o->result == -1)
        break;
      if (used == 0)
        fail ("empty buffer");
      if (n > used)
        n = used;
      memcpy (b, p + pos, n);
      o->result = colo_wire_decoder_commit (dec, n, &o->err);
      used = n;
    }
    else
      o->result = colo_wire_decoder_feed (dec, p + pos, n, &used, &o->err);
    if (used > n)
      fail ("used more than given");
    pos += used;
    if (o->result == 1)
      check_frame (dec, o);
  }
  if (o->result != -1)
    o->result = colo_wire_decoder_eof (dec, &o->err);
  colo_wire_decoder_free (dec);
}

static bool
same (const struct outcome *a, const struct outcome *b)
{
  return a->frames == b->frames && a->hash == b->hash &&
    a->result == b->result &&
    (a->result != -1 ||
     (a->err.code == b->err.code && strcmp (a->err.msg, b->err.msg) == 0));
}

/* Walks the frames of the stream, rewriting their checksums (of the
 * payload bytes there are) and, if asked, their sequence numbers.
 */
static void
fix_frames (uint8_t *p, size_t len, bool sequence)
{
  const size_t hdr = COLO_WIRE_HEADER_SIZE;
  size_t pos = 0, avail;
  uint64_t seq = 1;
  uint32_t length;

  while (len - pos >= hdr) {
    memcpy (&length, p + pos + 8, sizeof length);
    length = le32toh (length);
    avail = len - pos - hdr;
    if (sequence)
      put_u64 (p + pos + 16, seq++);
    put_u64 (p + pos + 24,
           XXH64 (p + pos + hdr, length < avail ? length : avail, 0));
    put_u64 (p + pos + 32, XXH64 (p + pos, 32, 0));
    if (length >= avail)
      break;
    pos += hdr + length;
  }
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct outcome whole, pieces, zero_copy;
  uint8_t *p;

  if (size < 1)
    return 0;
  p = malloc (size);
  if (p == NULL)
    fail ("out of memory");
  memcpy (p, data + 1, size - 1);
  if (data[0] & 0x80)
    fix_frames (p, size - 1, data[0] & 0x40);
  run (p, size - 1, 0, data[0], &whole);
  run (p, size - 1, 1, data[0], &pieces);
  run (p, size - 1, 2, data[0], &zero_copy);
  free (p);
  if (!same (&whole, &pieces) || !same (&whole, &zero_copy)) {
    fprintf (stderr, "whole: %zu frames, %d %s\n"
             "pieces: %zu frames, %d %s\n"
             "zero copy: %zu frames, %d %s\n",
             whole.frames, whole.result, whole.err.msg,
             pieces.frames, pieces.result, pieces.err.msg,
             zero_copy.frames, zero_copy.result, zero_copy.err.msg);
    fail ("the decoder depends on how the stream is cut");
  }
  return 0;
}
