/* The primary's side of an epoch: read what changed from the plugin's
 * exports.  (Its control socket is driven through lib/ctl-client.h, by
 * plugin.c.)
 *
 * Errors: every function that can fail returns -1 (or NULL) and writes a
 * message naming the export or the bitmap into err.
 */

#ifndef COLO_SOURCE_H
#define COLO_SOURCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* One extent of an epoch: length bytes at offset, all zero or data (with
 * its xxh64, seed 0).  data is valid during the call only.
 */
typedef int (*colo_extent_fn) (void *opaque, uint64_t offset,
                               uint32_t length, bool zero, const void *data,
                               uint64_t xxh);

struct colo_epoch_info {
  uint64_t disk_size;
  uint32_t cluster_size;
  uint64_t extents, data_bytes, zero_bytes;
};

/* Read an epoch from the server that base reaches: the clusters set in
 * bitmap/BITMAP, read from snapshot/SNAPSHOT, or with bitmap NULL every
 * cluster (a full copy).  Extents are at most max_extent bytes (a
 * multiple of the cluster size), never mix zero and data, and come in
 * offset order.  fn returning -1 stops the read (its message in err).
 */
extern int colo_read_epoch (const char *base, const char *snapshot,
                            const char *bitmap, uint32_t max_extent,
                            colo_extent_fn fn, void *opaque,
                            struct colo_epoch_info *info,
                            char *err, size_t errlen);

/* The union of bitmaps bitmap/NAMES[0..n) (lib/bitmap-export.h's
 * checks, and the geometry; frozen: each has stopped recording, as an
 * epoch's have; demote reads the one still recording too): *bits is
 * calloc'ed, ceil (clusters / 8) bytes and one spare, bit i (LSB first)
 * = cluster i.
 */
extern int colo_union_bitmaps (const char *base, const char *const *names,
                               size_t n, uint64_t disk_size,
                               uint32_t cluster_size, bool frozen,
                               uint8_t **bits, char *err, size_t errlen);

/* An epoch planned before it is read, so that its extent count and
 * bytes are known up front (EPOCH_BEGIN carries them): its clusters cut into extents of at most max_extent
 * bytes, split where the snapshot's base:allocation turns from zero to
 * data.  Reading it (colo_plan_read) keeps the extents as planned; a
 * data extent that reads as all zeroes goes as a zero extent.
 */
struct colo_plan_extent {
  uint64_t offset;
  uint32_t length;
  bool zero;
};

struct colo_plan {
  uint64_t disk_size;
  uint32_t cluster_size;
  struct colo_plan_extent *v;
  size_t n, cap;
  uint64_t total_bytes, zero_bytes;
};

/* The clusters: every one if full, else the union of bitmap/NAME for
 * each of bitmaps and extra (extra_nbits bits, or NULL).
 */
extern int colo_plan_epoch (const char *base, const char *snapshot,
                            bool full, const char *const *bitmaps,
                            size_t nbitmaps, const uint8_t *extra,
                            uint64_t extra_nbits, uint32_t max_extent,
                            struct colo_plan *plan, char *err,
                            size_t errlen);
/* Read extents first .. n-1 of the plan from snapshot/SNAPSHOT, handing
 * each to fn in order.
 */
extern int colo_plan_read (const char *base, const char *snapshot,
                           const struct colo_plan *plan, size_t first,
                           colo_extent_fn fn, void *opaque,
                           char *err, size_t errlen);
extern void colo_plan_free (struct colo_plan *plan);

#endif /* COLO_SOURCE_H */
