/* libfleececlient: the reader of a bitmap export (bitmap-export.h,
 * docs/bitmap-export.md).
 *
 * The header is checked before any bit is used, first as a format (a
 * header that is damaged or of another version says so, whoever reads
 * it), then against what the reader needs (the disk it is pulling, the
 * interval it copies).  The order of the checks is the order of the
 * messages: the first thing wrong is the one reported.  Bits past
 * bit_count in the last byte mean nothing and are cleared, so that a
 * caller can OR bitmaps together; the bits set must then be as many as
 * the header's dirty_count, or the export was damaged on the way.
 *
 * The I/O is plain libnbd preads: fleece-backup reads the header (and
 * the first bits) on a thread of its own and calls the checks itself;
 * bitmap_export_read is the same for a caller that just wants the bits.
 */

#include <config.h>

#include <endian.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "bitmap-export.h"
#include "export.h"
#include "messages.h"

#define BITMAP_MAX_REQUEST (4u << 20)

/* A NUL-padded name field of the header equals s. */
static bool
field_is (const char *field, const char *s)
{
  return memchr (field, '\0', FLEECE_BITMAP_NAME_SIZE) &&
    strcmp (field, s) == 0;
}

/* The format alone: the header is one of ours, intact, of a version we
 * read, and describes itself consistently.
 */
static int
check_format (const struct fleece_bitmap_header *h, uint64_t export_size,
              const char *name, char *err, size_t errlen)
{
  uint32_t gran = le32toh (h->granularity);
  uint64_t size = le64toh (h->disk_size), bits = le64toh (h->bit_count);

  if (memcmp (h->magic, FLEECE_BITMAP_MAGIC, 8) != 0)
    return seterr (err, errlen, "bitmap '%s' has a bad header: no "
                   "FLEECEBM magic", name);
  if (le32toh (h->version) != FLEECE_BITMAP_VERSION)
    return seterr (err, errlen, "bitmap '%s' has version %" PRIu32 ", this "
                   "program reads version %d", name, le32toh (h->version),
                   FLEECE_BITMAP_VERSION);
  if (XXH64 (h, offsetof (struct fleece_bitmap_header, checksum), 0)
      != le64toh (h->checksum))
    return seterr (err, errlen, "bitmap '%s' has a bad header: wrong "
                   "checksum", name);
  if (le32toh (h->header_size) != FLEECE_BITMAP_HEADER_SIZE)
    return seterr (err, errlen, "bitmap '%s' has a bad header: header size "
                   "%" PRIu32 ", not %d", name, le32toh (h->header_size),
                   FLEECE_BITMAP_HEADER_SIZE);
  if (gran == 0 || (gran & (gran - 1)) != 0)
    return seterr (err, errlen, "bitmap '%s' has a bad header: granularity "
                   "%" PRIu32 " is not a power of two", name, gran);
  if (!field_is (h->name, name))
    return seterr (err, errlen, "bitmap '%s' has a bad header: it is not "
                   "named '%s'", name, name);
  if (bits != size / gran + (size % gran != 0))
    return seterr (err, errlen, "bitmap '%s' has a bad header: %" PRIu64
                   " bits for %" PRIu64 " bytes at granularity %" PRIu32,
                   name, bits, size, gran);
  if (export_size < FLEECE_BITMAP_HEADER_SIZE + (bits + 7) / 8)
    return seterr (err, errlen, "bitmap '%s' is truncated: the export has "
                   "%" PRIu64 " bytes, its bits need %" PRIu64, name,
                   export_size, FLEECE_BITMAP_HEADER_SIZE + (bits + 7) / 8);
  return 0;
}

int
bitmap_export_check_header (const struct fleece_bitmap_header *h,
                            uint64_t export_size,
                            const struct bitmap_want *want,
                            char *err, size_t errlen)
{
  uint32_t flags = le32toh (h->flags), gran = le32toh (h->granularity);
  uint64_t size = le64toh (h->disk_size);
  const char *name = want->name, *by = h->frozen_by;

  if (check_format (h, export_size, name, err, errlen) == -1)
    return -1;
  if (flags & FLEECE_BM_INCONSISTENT)
    return seterr (err, errlen, "bitmap '%s' is marked inconsistent: a "
                   "full copy is needed", name);
  if (want->frozen && !(flags & FLEECE_BM_FROZEN))
    return seterr (err, errlen, "bitmap '%s' is not frozen: it is still "
                   "recording writes; create a checkpoint and pull its "
                   "snapshot", name);
  if (want->frozen && want->frozen_by && !field_is (by, want->frozen_by))
    return seterr (err, errlen, "bitmap '%s' was frozen by checkpoint "
                   "'%.*s', not by '%s': it does not describe the changes "
                   "up to snapshot/%s", name, (int) strnlen (by, 128), by,
                   want->frozen_by, want->frozen_by);
  if (size != want->disk_size)
    return seterr (err, errlen, "bitmap '%s' is for a disk of %" PRIu64
                   " bytes, the snapshot is %" PRIu64 " bytes", name, size,
                   want->disk_size);
  if (want->granularity && gran != want->granularity)
    return seterr (err, errlen, "bitmap '%s' has granularity %" PRIu32
                   ", the snapshot's cluster size is %" PRIu32, name, gran,
                   want->granularity);
  return 0;
}

uint64_t
bitmap_export_bytes (const struct fleece_bitmap_header *h)
{
  return (le64toh (h->bit_count) + 7) / 8;
}

int
bitmap_export_read_bits (struct nbd_handle *nbd,
                         const struct fleece_bitmap_header *h,
                         const char *name, uint8_t *bits, uint64_t from,
                         uint32_t max_request, uint64_t *count,
                         char *err, size_t errlen)
{
  uint64_t nbits = le64toh (h->bit_count), nbytes = (nbits + 7) / 8;
  uint64_t off, len, n = 0;

  for (off = from; off < nbytes; off += len) {
    len = nbytes - off < max_request ? nbytes - off : max_request;
    if (nbd_pread (nbd, bits + off, len, FLEECE_BITMAP_HEADER_SIZE + off,
                   0) == -1)
      return seterr (err, errlen, "bitmap '%s': reading its bits: %s",
                     name, nbd_get_error ());
  }
  if (nbits & 7)                /* bits past the end do not count */
    bits[nbytes - 1] &= (1u << (nbits & 7)) - 1;
  for (off = 0; off < nbytes; off++)
    n += __builtin_popcount (bits[off]);
  if (n != le64toh (h->dirty_count))
    return seterr (err, errlen, "bitmap '%s' is damaged: its header counts "
                   "%" PRIu64 " dirty granules, its bits %" PRIu64, name,
                   le64toh (h->dirty_count), n);
  *count = n;
  return 0;
}

int
bitmap_export_read (const char *uri, const struct bitmap_want *want,
                    struct fleece_bitmap_header *hp, uint8_t **bits,
                    char *err, size_t errlen)
{
  char expname[16 + FLEECE_BITMAP_NAME_SIZE], why[1024];
  union {
    struct fleece_bitmap_header h;
    char raw[FLEECE_BITMAP_HEADER_SIZE];
  } hdr;
  struct nbd_handle *nbd;
  uint64_t count;
  int64_t size;
  bool refused;
  int r = -1;

  *bits = NULL;
  snprintf (expname, sizeof expname, "bitmap/%s", want->name);
  nbd = export_open (uri, expname, "bitmap", 0, &refused, why, sizeof why);
  if (nbd == NULL)
    return seterr (err, errlen, refused ? "bitmap '%s' does not exist on "
                   "the server (export %s): %s" : "bitmap '%s' cannot be "
                   "opened (export %s): %s", want->name, expname, why);
  size = nbd_get_size (nbd);
  if (size == -1 || nbd_pread (nbd, &hdr, sizeof hdr, 0, 0) == -1) {
    seterr (err, errlen, "bitmap '%s': reading its header: %s", want->name,
            nbd_get_error ());
    goto out;
  }
  if (bitmap_export_check_header (&hdr.h, size, want, err, errlen) == -1)
    goto out;
  *bits = malloc (bitmap_export_bytes (&hdr.h) + 1);
  if (*bits == NULL) {
    seterr (err, errlen, "bitmap '%s': malloc: %m", want->name);
    goto out;
  }
  if (bitmap_export_read_bits (nbd, &hdr.h, want->name, *bits, 0,
                               BITMAP_MAX_REQUEST, &count, err,
                               errlen) == -1)
    goto out;
  if (hp)
    *hp = hdr.h;
  r = 0;
 out:
  if (r == -1) {
    free (*bits);
    *bits = NULL;
  }
  nbd_shutdown (nbd, 0);
  nbd_close (nbd);
  return r;
}
