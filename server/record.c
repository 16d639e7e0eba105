/* The metadata's encodings: every record of the metadata log, and the
 * image's header and copy table, are written and read here and nowhere
 * else (docs/store-format.md).
 *
 * Two layers.  The framing (rec_encode, rec_decode, rec_peek) is the
 * same for every record: a 32-byte header with a magic, the type, the
 * payload's length, the sequence number and an XXH64 of header and
 * payload, then the payload padded to 8 bytes.  Above it, one pair of
 * functions per payload (rec_put_TYPE, rec_get_TYPE): the writers in
 * cbw.c, snapshot.c, bitmap.c and meta.c call the first, the loader
 * (meta-load.c) the second, so that a field cannot be written in one
 * order and read in another.  A rec_get_* function only checks that the
 * payload holds what it must; what the values mean (a cluster beyond
 * the disk, a generation of no snapshot) is the loader's to judge.
 *
 * The snapshots' and the bitmaps' parts of the image are theirs
 * (snapshot.c, bitmap.c): they are built from and loaded into their own
 * structs, with the buffers below.
 *
 * Buffers.  struct wbuf grows as it is written and remembers running out
 * of memory (failed), so that a caller checks once at the end; struct
 * rbuf never reads past its end and remembers trying to (bad).  Both are
 * little-endian.
 */

#include <config.h>

#include <assert.h>
#include <endian.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "internal.h"

#define REC_MAGIC     "FLMR"
#define IMAGE_MAGIC   "FLIMAGE1"
#define STATE_PAYLOAD 32
#define COPY_SIZE     16        /* one copy in a COPY record or the image */

/* ---- buffers ---- */

void
wb_bytes (struct wbuf *b, const void *p, size_t n)
{
  if (b->failed)
    return;
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    char *q;
    while (cap < b->len + n)
      cap *= 2;
    q = realloc (b->p, cap);
    if (q == NULL) {
      b->failed = true;
      return;
    }
    b->p = q;
    b->cap = cap;
  }
  memcpy (b->p + b->len, p, n);
  b->len += n;
}

void wb_u16 (struct wbuf *b, uint16_t v)
{ v = htole16 (v); wb_bytes (b, &v, 2); }
void wb_u32 (struct wbuf *b, uint32_t v)
{ v = htole32 (v); wb_bytes (b, &v, 4); }
void wb_u64 (struct wbuf *b, uint64_t v)
{ v = htole64 (v); wb_bytes (b, &v, 8); }

void
wb_str (struct wbuf *b, const char *s)
{
  size_t n = strlen (s);

  assert (n <= UINT16_MAX);
  wb_u16 (b, n);
  wb_bytes (b, s, n);
}

void
wb_words (struct wbuf *b, _Atomic uint64_t *w, uint64_t n)
{
  uint64_t i;

  for (i = 0; i < n; i++)
    wb_u64 (b, atomic_load_explicit (&w[i], memory_order_relaxed));
}

void
wb_free (struct wbuf *b)
{
  free (b->p);
  memset (b, 0, sizeof *b);
}

const void *
rb_take (struct rbuf *b, size_t n)
{
  const void *p;

  if (b->bad || n > b->len - b->pos) {
    b->bad = true;
    return NULL;
  }
  p = b->p + b->pos;
  b->pos += n;
  return p;
}

/* n little-endian bytes (n <= 8), or 0 past the end. */
static uint64_t
rb_le (struct rbuf *b, size_t n)
{
  const unsigned char *p = rb_take (b, n);
  uint64_t v = 0;

  while (p && n > 0)
    v = (v << 8) | p[--n];
  return v;
}

uint16_t rb_u16 (struct rbuf *b) { return rb_le (b, 2); }
uint32_t rb_u32 (struct rbuf *b) { return rb_le (b, 4); }
uint64_t rb_u64 (struct rbuf *b) { return rb_le (b, 8); }

void
rb_str (struct rbuf *b, char *out, size_t max)
{
  uint16_t n = rb_u16 (b);
  const char *p;

  out[0] = '\0';
  if (n > max) {
    b->bad = true;
    return;
  }
  p = rb_take (b, n);
  if (p == NULL)
    return;
  memcpy (out, p, n);
  out[n] = '\0';
  if (strlen (out) != n)        /* an embedded NUL */
    b->bad = true;
}

void
rb_words (struct rbuf *b, _Atomic uint64_t *w, uint64_t n)
{
  uint64_t i;

  if (n > (b->len - b->pos) / 8) {
    b->bad = true;
    return;
  }
  for (i = 0; i < n; i++)
    atomic_store_explicit (&w[i], rb_u64 (b), memory_order_relaxed);
}

size_t
rb_left (const struct rbuf *b)
{
  return b->len - b->pos;
}

/* ---- framing ---- */

static size_t
rec_size (size_t payload)
{
  return REC_HDR_SIZE + ((payload + 7) & ~(size_t) 7);
}

/* Append one record of type and seq with payload (len bytes) to out. */
void
rec_encode (struct wbuf *out, uint16_t type, uint64_t seq,
            const void *payload, size_t len)
{
  static const char zero[8];
  size_t start = out->len;
  XXH64_state_t *h;

  wb_bytes (out, REC_MAGIC, 4);
  wb_u16 (out, type);
  wb_u16 (out, 0);
  wb_u32 (out, len);
  wb_u32 (out, 0);
  wb_u64 (out, seq);
  if (out->failed)
    return;
  h = XXH64_createState ();
  if (h == NULL) {
    out->failed = true;
    return;
  }
  XXH64_reset (h, 0);
  XXH64_update (h, out->p + start, 24);
  XXH64_update (h, payload, len);
  wb_u64 (out, XXH64_digest (h));
  XXH64_freeState (h);
  wb_bytes (out, payload, len);
  wb_bytes (out, zero, ((len + 7) & ~(size_t) 7) - len);
}

/* Decode the record at p (avail bytes); returns its size, or 0 if there
 * is no valid record there.
 */
size_t
rec_decode (const char *p, size_t avail, struct rec *r)
{
  uint32_t len;
  uint64_t sum;
  XXH64_state_t *h;

  if (avail < REC_HDR_SIZE || memcmp (p, REC_MAGIC, 4) != 0)
    return 0;
  memcpy (&len, p + 8, 4);
  len = le32toh (len);
  if (len > avail - REC_HDR_SIZE || rec_size (len) > avail)
    return 0;
  memcpy (&sum, p + 24, 8);
  h = XXH64_createState ();
  if (h == NULL)
    return 0;
  XXH64_reset (h, 0);
  XXH64_update (h, p, 24);
  XXH64_update (h, p + REC_HDR_SIZE, len);
  if (XXH64_digest (h) != le64toh (sum)) {
    XXH64_freeState (h);
    return 0;
  }
  XXH64_freeState (h);
  memcpy (&r->type, p + 4, 2);
  r->type = le16toh (r->type);
  memcpy (&r->seq, p + 16, 8);
  r->seq = le64toh (r->seq);
  r->payload = (struct rbuf) { .p = p + REC_HDR_SIZE, .len = len };
  return rec_size (len);
}

/* What the first 24 bytes at p say, whether or not a valid record is
 * there (telling a torn record from a damaged one, meta-load.c).
 */
void
rec_peek (const char *p, bool *magic, uint32_t *len, uint64_t *seq)
{
  *magic = memcmp (p, REC_MAGIC, 4) == 0;
  memcpy (len, p + 8, 4);
  *len = le32toh (*len);
  memcpy (seq, p + 16, 8);
  *seq = le64toh (*seq);
}

/* ---- payloads ---- */

void
rec_put_state (struct wbuf *b, const struct rec_state *st)
{
  wb_u32 (b, st->slot);
  wb_u32 (b, st->nslots);
  wb_u64 (b, st->len);
  wb_u64 (b, st->hash);
  wb_u32 (b, st->gen);
  wb_u32 (b, 0);
}

bool
rec_get_state (const struct rec *r, struct rec_state *st)
{
  struct rbuf b = r->payload;

  if (r->type != REC_STATE || b.len != STATE_PAYLOAD)
    return false;
  st->slot = rb_u32 (&b);
  st->nslots = rb_u32 (&b);
  st->len = rb_u64 (&b);
  st->hash = rb_u64 (&b);
  st->gen = rb_u32 (&b);
  return !b.bad;
}

/* One copy, in a COPY record and in the image's copy table. */
void
rec_put_copy (struct wbuf *b, const struct copy *cp)
{
  wb_u32 (b, cp->cluster);
  wb_u32 (b, cp->lo);
  wb_u32 (b, cp->hi);
  wb_u32 (b, cp->slot);
}

void
rec_get_copy (struct rbuf *b, struct copy *cp)
{
  cp->cluster = rb_u32 (b);
  cp->lo = rb_u32 (b);
  cp->hi = rb_u32 (b);
  cp->slot = rb_u32 (b);
}

/* A COPY record: its count, then rec_put_copy for each copy, then
 * rec_copies_end, which writes the count.
 */
void
rec_copies_begin (struct wbuf *b)
{
  wb_u32 (b, 0);
  wb_u32 (b, 0);
}

void
rec_copies_end (struct wbuf *b, uint32_t n)
{
  uint32_t le = htole32 (n);

  if (!b->failed)
    memcpy (b->p, &le, 4);
}

/* The number of copies that follow, or false if the payload does not
 * hold exactly that many.
 */
bool
rec_get_copies (struct rbuf *b, uint32_t *n)
{
  *n = rb_u32 (b);
  rb_u32 (b);
  return !b->bad && *n == rb_left (b) / COPY_SIZE;
}

void
rec_put_release (struct wbuf *b, uint32_t gen, uint32_t first,
                 uint32_t count)
{
  wb_u32 (b, gen);
  wb_u32 (b, first);
  wb_u32 (b, count);
}

bool
rec_get_release (struct rbuf *b, uint32_t *gen, uint32_t *first,
                 uint32_t *count)
{
  *gen = rb_u32 (b);
  *first = rb_u32 (b);
  *count = rb_u32 (b);
  return !b->bad;
}

void
rec_put_broken (struct wbuf *b, uint32_t gen, const char *reason)
{
  wb_u32 (b, gen);
  wb_str (b, reason);
}

/* reason: REC_REASON_MAX + 1 bytes. */
bool
rec_get_broken (struct rbuf *b, uint32_t *gen, char *reason)
{
  *gen = rb_u32 (b);
  rb_str (b, reason, REC_REASON_MAX);
  return !b->bad;
}

void
rec_put_dirty (struct wbuf *b, uint32_t first, uint32_t count)
{
  wb_u32 (b, first);
  wb_u32 (b, count);
}

bool
rec_get_dirty (struct rbuf *b, uint32_t *first, uint32_t *count)
{
  *first = rb_u32 (b);
  *count = rb_u32 (b);
  return !b->bad;
}

/* One partly copied cluster, in a PARTIAL record and in the image's
 * partial table: cluster, lo, hi, slot, the number of 64-bit words per
 * bitmap, zero, then the words of "copied", then those of "zero".
 */
void
rec_put_partial (struct wbuf *b, const struct partial_view *v,
                 uint32_t words)
{
  uint32_t i;

  wb_u32 (b, v->cluster);
  wb_u32 (b, v->lo);
  wb_u32 (b, v->hi);
  wb_u32 (b, v->slot);
  wb_u32 (b, words);
  wb_u32 (b, 0);
  for (i = 0; i < 2 * words; i++)
    wb_u64 (b, v->bits[i]);
}

/* False if b does not hold a whole entry (*words says how many words
 * per bitmap it claims; more than PARTIAL_WORDS_MAX is not valid).
 */
bool
rec_get_partial (struct rbuf *b, struct partial_view *v, uint32_t *words)
{
  uint32_t i;

  memset (v, 0, sizeof *v);
  v->cluster = rb_u32 (b);
  v->lo = rb_u32 (b);
  v->hi = rb_u32 (b);
  v->slot = rb_u32 (b);
  *words = rb_u32 (b);
  rb_u32 (b);
  if (b->bad || *words == 0 || *words > PARTIAL_WORDS_MAX ||
      rb_left (b) < (size_t) *words * 16) {
    b->bad = true;
    return false;
  }
  for (i = 0; i < 2 * *words; i++)
    v->bits[i] = rb_u64 (b);
  return !b->bad;
}

/* ---- the image ---- */

/* The header; its copy count is written by rec_image_copies once the
 * table is built.
 */
void
rec_put_image (struct wbuf *b, const struct rec_image *im)
{
  wb_bytes (b, IMAGE_MAGIC, 8);
  wb_u32 (b, im->cluster_size);
  wb_u32 (b, 0);
  wb_u64 (b, im->disk_size);
  wb_u32 (b, im->gen);
  wb_u32 (b, im->nsnaps);
  wb_u32 (b, im->nbitmaps);
  wb_u32 (b, 0);                /* partials: rec_image_partials */
  wb_u64 (b, 0);                /* copies: rec_image_copies */
}

#define IMAGE_NPARTIALS_AT 36
#define IMAGE_NCOPIES_AT 40

/* The image's partial table holds n entries: write n into the header.
 * Stores without partly copied clusters keep the zero that earlier
 * versions wrote there (a reserved field), so their images are the same.
 */
void
rec_image_partials (struct wbuf *b, uint32_t n)
{
  uint32_t le = htole32 (n);

  if (!b->failed)
    memcpy (b->p + IMAGE_NPARTIALS_AT, &le, 4);
}

/* The image's copy table runs from start (its length before the table)
 * to its end: write its count into the header.
 */
void
rec_image_copies (struct wbuf *b, size_t start)
{
  uint64_t n = htole64 ((b->len - start) / COPY_SIZE);

  if (!b->failed)
    memcpy (b->p + IMAGE_NCOPIES_AT, &n, 8);
}

/* False if b does not start with an image's magic.  A truncated header
 * reads as zeroes, with b->bad set, for the loader to judge.
 */
bool
rec_get_image (struct rbuf *b, struct rec_image *im)
{
  const char *magic = rb_take (b, 8);

  if (magic == NULL || memcmp (magic, IMAGE_MAGIC, 8) != 0)
    return false;
  im->cluster_size = rb_u32 (b);
  rb_u32 (b);
  im->disk_size = rb_u64 (b);
  im->gen = rb_u32 (b);
  im->nsnaps = rb_u32 (b);
  im->nbitmaps = rb_u32 (b);
  im->npartials = rb_u32 (b);
  im->ncopies = rb_u64 (b);
  return true;
}

/* Is what is left of b exactly the image's copy table? */
bool
rec_image_table_ok (const struct rbuf *b, uint64_t ncopies)
{
  return ncopies == rb_left (b) / COPY_SIZE && rb_left (b) % COPY_SIZE == 0;
}
