/* The secondary's epoch journal: its on-disk records and checksums
 * (docs/replication.md, "Secondary journal", has the format; journal.c's
 * note the order in which they are written).
 *
 * A record is 64 bytes at the start of a 4 KiB block (layout in
 * journal-internal.h) and carries the epoch's nonce, so that a record
 * of an earlier attempt is never read as this one's.  An extent is
 * hashed with xxh64 as journal_extent_encode lays it out, and an epoch's
 * digest is the hash of its extents' encodings in order: the same
 * digest the primary sends in EPOCH_END.
 */

#include <config.h>

#include <endian.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "journal.h"
#include "journal-internal.h"
#include "le.h"

uint64_t
journal_checksum (const void *data, size_t len)
{
  return XXH64 (data, len, 0);
}

void
journal_extent_encode (const struct journal_extent *e,
                       unsigned char out[JOURNAL_EXTENT_ENCODED_SIZE])
{
  put_u64 (out, e->offset);
  put_u32 (out + 8, e->length);
  put_u32 (out + 12, e->flags);
  put_u64 (out + 16, e->checksum);
}

void
journal_digest_init (struct journal_digest *d)
{
  XXH64_reset (&d->state, 0);
}

void
journal_digest_add (struct journal_digest *d, const struct journal_extent *e)
{
  unsigned char enc[JOURNAL_EXTENT_ENCODED_SIZE];

  journal_extent_encode (e, enc);
  XXH64_update (&d->state, enc, sizeof enc);
}

uint64_t
journal_digest_final (const struct journal_digest *d)
{
  return XXH64_digest (&d->state);
}

uint64_t
journal_digest (const struct journal_extent *extents, size_t n)
{
  struct journal_digest d;
  size_t i;

  journal_digest_init (&d);
  for (i = 0; i < n; i++)
    journal_digest_add (&d, &extents[i]);
  return journal_digest_final (&d);
}

/* ---- records (their layout: journal-internal.h) ---- */

uint64_t
journal_block_up (uint64_t pos)
{
  return (pos + REC_BLOCK - 1) & ~(uint64_t) (REC_BLOCK - 1);
}

void
journal_rec_encode (unsigned char out[REC_SIZE], const struct rec *r)
{
  uint16_t v;

  memcpy (out, REC_MAGIC, 4);
  v = htole16 (r->type);
  memcpy (out + 4, &v, 2);
  v = htole16 (REC_VERSION);
  memcpy (out + 6, &v, 2);
  put_u64 (out + 8, r->nonce);
  put_u64 (out + 16, r->epoch);
  memcpy (out + 24, r->body, 32);
  put_u64 (out + 56, XXH64 (out, 56, 0));
}

enum rec_status
journal_rec_decode (const unsigned char in[REC_SIZE], struct rec *r)
{
  static const unsigned char zero[REC_SIZE];
  uint16_t type, version;

  if (memcmp (in, zero, REC_SIZE) == 0)
    return REC_ZERO;
  memcpy (&type, in + 4, 2);
  memcpy (&version, in + 6, 2);
  if (memcmp (in, REC_MAGIC, 4) != 0 || XXH64 (in, 56, 0) != get_u64 (in + 56))
    return REC_BAD;
  r->type = le16toh (type);
  r->nonce = get_u64 (in + 8);
  r->epoch = get_u64 (in + 16);
  memcpy (r->body, in + 24, 32);
  /* Version 2 is version 3 with one disk: BEGIN's disk count is 0 and
   * no EXTENT names another disk.
   */
  return le16toh (version) == REC_VERSION ||
    le16toh (version) == REC_VERSION_V2 ? REC_OK : REC_OTHER_VERSION;
}

