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

#endif /* FLEECE_WIRE_H */
