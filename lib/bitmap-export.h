/* libfleececlient: the one reader of a bitmap export (bitmap-export.c,
 * docs/bitmap-export.md), used by fleece-backup --sync=incremental and
 * by fleece-colod's epochs.
 *
 * Every reader checks the same things, in the same order, with the same
 * messages (each names the bitmap and what is wrong): the header's
 * magic, version, checksum, header size, a granularity that is a power
 * of two, the name, a bit count that fits the disk size, an export long
 * enough for its bits, not inconsistent, the disk size expected, then
 * what the caller asks for in struct bitmap_want (a granularity, frozen,
 * frozen by one checkpoint); and, once the bits are read, that they
 * count what the header counts.
 */

#ifndef FLEECE_LIB_BITMAP_EXPORT_H
#define FLEECE_LIB_BITMAP_EXPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libnbd.h>

#include "fleece-wire.h"

/* What the reader expects of a bitmap beyond its format. */
struct bitmap_want {
  const char *name;             /* the bitmap; its header must say so */
  uint64_t disk_size;           /* the size of the disk it describes */
  uint32_t granularity;         /* 0: any; else exactly this */
  bool frozen;                  /* must be frozen by a checkpoint ... */
  const char *frozen_by;        /* ... this one (NULL: any) */
};

/* Check header h of an export of export_size bytes.  Returns 0, or -1
 * with the reason in err.
 */
extern int bitmap_export_check_header (const struct fleece_bitmap_header *h,
                                       uint64_t export_size,
                                       const struct bitmap_want *want,
                                       char *err, size_t errlen);

/* The bytes of bits a checked header needs: ceil (bit_count / 8). */
extern uint64_t bitmap_export_bytes (const struct fleece_bitmap_header *h);

/* Read the bits of a checked header's export from nbd into bits
 * (bitmap_export_bytes (h) bytes), starting at byte from of the bits
 * (the ones before are the caller's, read with the header), in requests
 * of at most max_request bytes; clear the bits past bit_count, and
 * check that the bits set are as many as the header counts, returned in
 * *count.  Returns 0, or -1 with the reason in err.
 */
extern int bitmap_export_read_bits (struct nbd_handle *nbd,
                                    const struct fleece_bitmap_header *h,
                                    const char *name, uint8_t *bits,
                                    uint64_t from, uint32_t max_request,
                                    uint64_t *count,
                                    char *err, size_t errlen);

/* The whole read: open bitmap/NAME on the server uri reaches (export.h),
 * read and check its header, then its bits.  *bits is malloc'ed
 * (bitmap_export_bytes bytes, at least 1); *h, if h is not NULL, is the
 * header.  Returns 0, or -1 with the reason in err.
 */
extern int bitmap_export_read (const char *uri,
                               const struct bitmap_want *want,
                               struct fleece_bitmap_header *h,
                               uint8_t **bits, char *err, size_t errlen);

#endif /* FLEECE_LIB_BITMAP_EXPORT_H */
