/* On-disk and on-wire structures.  All fields are little-endian and the
 * structures are packed; each carries a magic, a version and an xxh64
 * checksum.  docs/store-format.md and docs/control-protocol.md describe
 * them for readers who do not read C.
 */

#ifndef FLEECE_WIRE_H
#define FLEECE_WIRE_H

#include <stdint.h>

/* ---- Store superblock (offset 0 of the store, 4096 bytes reserved). ---- */

#define FLEECE_STORE_MAGIC        "FLEECEST"
#define FLEECE_STORE_VERSION      1
#define FLEECE_STORE_HEADER_SIZE  4096
#define FLEECE_STORE_META_SIZE    (4u << 20)  /* metadata log, reserved */

/* Superblock flags. */
#define FLEECE_SB_PERSISTENT      (1u << 0)
#define FLEECE_SB_CLEAN           (1u << 1)
/* The metadata may hold partly copied clusters (PARTIAL records, the
 * image's partial table): a Fleece that does not know them refuses the
 * store as it refuses every unknown flag (docs/store-format.md).
 */
#define FLEECE_SB_PARTIAL         (1u << 2)
#define FLEECE_SB_KNOWN           (FLEECE_SB_PERSISTENT | FLEECE_SB_CLEAN | \
                                   FLEECE_SB_PARTIAL)

struct fleece_superblock {
  char magic[8];                /* FLEECE_STORE_MAGIC, no NUL */
  uint32_t version;             /* FLEECE_STORE_VERSION */
  uint32_t flags;               /* FLEECE_SB_* */
  uint32_t cluster_size;        /* bytes, power of two */
  uint32_t header_size;         /* FLEECE_STORE_HEADER_SIZE */
  uint64_t disk_size;           /* bytes */
  uint8_t disk_id[16];          /* identity of the protected disk */
  uint64_t meta_offset;         /* metadata log */
  uint64_t meta_size;
  uint64_t data_offset;         /* cluster-aligned start of the data area */
  uint64_t sequence;            /* bumped on every superblock write */
  uint64_t created;             /* Unix time the store was formatted */
  uint8_t reserved[16];
  uint64_t checksum;            /* xxh64 (seed 0) of the bytes above */
} __attribute__ ((__packed__));

_Static_assert (sizeof (struct fleece_superblock) == 112,
                "superblock layout changed: bump FLEECE_STORE_VERSION");

/* ---- Bitmap export (NBD export "bitmap/NAME", docs/bitmap-export.md). ----
 *
 * The export is a 4096-byte header, then the bits: bit i (granule i,
 * bytes [i * granularity, (i+1) * granularity) of the disk) is bit
 * (i % 8) of byte 4096 + i / 8, least significant bit first.  The export
 * size is rounded up to a multiple of 4096 with zero bytes.
 */

#define FLEECE_BITMAP_MAGIC        "FLEECEBM"
#define FLEECE_BITMAP_VERSION      1
#define FLEECE_BITMAP_HEADER_SIZE  4096
#define FLEECE_BITMAP_NAME_SIZE    136      /* NUL-padded, <= 128 bytes */

/* Header flags. */
#define FLEECE_BM_ENABLED          (1u << 0) /* still recording writes */
#define FLEECE_BM_FROZEN           (1u << 1) /* closed by a checkpoint */
#define FLEECE_BM_INCONSISTENT     (1u << 2) /* must not be trusted */

struct fleece_bitmap_header {
  char magic[8];                /* FLEECE_BITMAP_MAGIC, no NUL */
  uint32_t version;             /* FLEECE_BITMAP_VERSION */
  uint32_t flags;               /* FLEECE_BM_* when the export was opened */
  uint32_t granularity;         /* bytes per bit: the cluster size */
  uint32_t header_size;         /* FLEECE_BITMAP_HEADER_SIZE: bits start */
  uint64_t disk_size;           /* bytes */
  uint64_t bit_count;           /* ceil (disk_size / granularity) */
  uint64_t dirty_count;         /* bits set when the export was opened */
  char name[FLEECE_BITMAP_NAME_SIZE];      /* the bitmap */
  char frozen_by[FLEECE_BITMAP_NAME_SIZE]; /* checkpoint that froze it */
  uint64_t checksum;            /* xxh64 (seed 0) of the bytes above */
} __attribute__ ((__packed__));

_Static_assert (sizeof (struct fleece_bitmap_header) == 328,
                "bitmap header layout changed: bump FLEECE_BITMAP_VERSION");

#endif /* FLEECE_WIRE_H */
