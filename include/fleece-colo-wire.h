/* fleece-colod's wire protocol: the frames exchanged by a primary and a
 * secondary on their data and heartbeat connections.  All fields are
 * little-endian and the structures are packed.  docs/replication.md
 * ("Wire protocol") describes them for readers who do not read C;
 * colo/wire.h is the encoder and decoder.
 *
 * A frame is a struct colo_wire_header followed by `length' bytes of
 * payload.  Each payload starts with the fixed part below for its type;
 * some are followed by a variable part (a string, a list, extent data).
 */

#ifndef FLEECE_COLO_WIRE_H
#define FLEECE_COLO_WIRE_H

#include <stdint.h>

#define COLO_WIRE_MAGIC           "FLCO"
/* 2: consistency groups (HELLO's disk list, EXTENT's disk index). */
#define COLO_WIRE_VERSION         2
/* HELLO's max_version: 3, the sender also sends (a secondary) or takes
 * (a primary) one DIVERGED per disk of a group, each naming its disk;
 * the frames stay version 2, and a peer whose HELLO says 2 gets or
 * sends a single DIVERGED, as before.
 */
#define COLO_WIRE_MAX_VERSION     3
#define COLO_WIRE_VERSION_GROUP_DIVERGED 3
#define COLO_WIRE_HEADER_SIZE     40

/* Bounds that keep a hostile peer from making us allocate much. */
#define COLO_WIRE_MAX_EXTENT      (64u << 20)  /* bytes of data per EXTENT */
#define COLO_WIRE_MAX_PAYLOAD     (COLO_WIRE_MAX_EXTENT + 4096)
#define COLO_WIRE_MAX_STRING      1024         /* bytes, without a NUL */
#define COLO_WIRE_MAX_HISTORY     256          /* generations in a HELLO */
#define COLO_WIRE_MIN_CLUSTER     512
#define COLO_WIRE_MAX_DISKS       16           /* disks in a group */

/* ---- Frame header. ---- */

struct colo_wire_header {
  char magic[4];                /* COLO_WIRE_MAGIC, no NUL */
  uint16_t version;             /* COLO_WIRE_VERSION */
  uint16_t type;                /* enum colo_msg_type */
  uint32_t length;              /* payload bytes, <= COLO_WIRE_MAX_PAYLOAD */
  uint32_t flags;               /* none defined: 0 */
  uint64_t sequence;            /* 1 for a connection's first frame, +1 */
  uint64_t payload_checksum;    /* xxh64 (seed 0) of the payload */
  uint64_t header_checksum;     /* xxh64 (seed 0) of the 32 bytes above */
} __attribute__ ((__packed__));

_Static_assert (sizeof (struct colo_wire_header) == COLO_WIRE_HEADER_SIZE,
                "colo frame header changed: bump COLO_WIRE_VERSION");

/* Message types.  The numbers are part of the protocol: never reuse one. */
enum colo_msg_type {
  COLO_MSG_HELLO           = 1,
  COLO_MSG_HELLO_REPLY     = 2,
  COLO_MSG_EPOCH_BEGIN     = 3,
  COLO_MSG_EXTENT          = 4,
  COLO_MSG_EPOCH_END       = 5,
  COLO_MSG_EPOCH_DURABLE   = 6,
  COLO_MSG_EPOCH_REFUSED   = 7,
  COLO_MSG_HEARTBEAT       = 8,
  COLO_MSG_HEARTBEAT_REPLY = 9,
  COLO_MSG_ERROR           = 10,
  COLO_MSG_DIVERGED        = 11,
};
#define COLO_MSG_TYPE_MAX 11

/* ---- Strings: a length, then that many bytes (no NUL, no byte below
 * 0x20 and no 0x7f), at most COLO_WIRE_MAX_STRING.  Always the last
 * field of a payload.
 */
struct colo_wire_string {
  uint16_t length;
} __attribute__ ((__packed__));

/* ---- HELLO: each side introduces itself. ---- */

enum colo_role {
  COLO_ROLE_PRIMARY   = 1,
  COLO_ROLE_SECONDARY = 2,
};

/* Which of the pair's two connections a HELLO opens. */
enum colo_channel {
  COLO_CHANNEL_DATA      = 1,   /* epochs and their answers */
  COLO_CHANNEL_HEARTBEAT = 2,   /* heartbeats only */
};

struct colo_wire_hello {
  uint16_t role;                /* enum colo_role */
  uint16_t max_version;         /* highest protocol version spoken, >= 1 */
  uint32_t channel;             /* enum colo_channel */
  uint8_t volume_id[16];        /* the replicated volume */
  uint8_t generation_id[16];    /* current generation; zero if none */
  uint64_t last_committed;      /* last epoch durable here */
  uint64_t last_applied;        /* last epoch applied to the disk here */
  uint64_t disk_size;           /* bytes */
  uint32_t cluster_size;        /* bytes, power of two */
  uint32_t history_count;       /* entries following */
} __attribute__ ((__packed__));

/* The generation history, oldest first: history_count of these. */
struct colo_wire_generation {
  uint8_t generation_id[16];
  uint64_t start_epoch;         /* first epoch of this generation */
} __attribute__ ((__packed__));

/* After the history (version 2): the disks of the group, in order.
 * disk_count 0: not known yet (a secondary before its first pairing);
 * else disk 0's size is disk_size above.
 */
struct colo_wire_disks {
  uint32_t disk_count;          /* 0 .. COLO_WIRE_MAX_DISKS */
  uint32_t reserved;            /* 0 */
} __attribute__ ((__packed__));
/* followed by disk_count u64: each disk's size in bytes */

/* ---- HELLO_REPLY: accept or refuse, then a string (the reason). ---- */

enum colo_hello_status {
  COLO_HELLO_ACCEPT       = 0,
  COLO_HELLO_REFUSE       = 1,  /* other reasons: see the string */
  COLO_HELLO_SPLIT_BRAIN  = 2,  /* both sides wrote since diverging */
  COLO_HELLO_UNRELATED    = 3,  /* no common generation */
  COLO_HELLO_WRONG_VOLUME = 4,  /* another volume id, size or cluster */
  COLO_HELLO_BUSY         = 5,  /* already paired with another peer */
};
#define COLO_HELLO_STATUS_MAX 5

struct colo_wire_hello_reply {
  uint32_t status;              /* enum colo_hello_status */
} __attribute__ ((__packed__));

/* ---- EPOCH_BEGIN, EXTENT..., EPOCH_END: one epoch. ---- */

#define COLO_EPOCH_FULL  (1u << 0)  /* a full copy, not a difference */

struct colo_wire_epoch_begin {
  uint64_t epoch;
  uint8_t generation_id[16];    /* the sender's generation */
  uint32_t cluster_size;        /* bytes, power of two */
  uint32_t flags;               /* COLO_EPOCH_* */
  uint64_t extent_count;        /* EXTENT frames that follow */
  uint64_t total_bytes;         /* sum of their lengths (DATA and ZERO) */
} __attribute__ ((__packed__));

#define COLO_EXTENT_DATA (1u << 0)  /* length bytes of data follow */
#define COLO_EXTENT_ZERO (1u << 1)  /* reads as zeroes; no data */
/* The extent's disk in the group: flags' high 16 bits (0: the first). */
#define COLO_EXTENT_KIND_MASK  0xffffu
#define COLO_EXTENT_DISK_SHIFT 16
#define COLO_EXTENT_KIND(flags) ((flags) & COLO_EXTENT_KIND_MASK)
#define COLO_EXTENT_DISK(flags) ((flags) >> COLO_EXTENT_DISK_SHIFT)

/* Also the unit of the epoch digest: EPOCH_END's digest is the xxh64
 * (seed 0) of the epoch's extent descriptors, exactly as sent, in order.
 */
struct colo_wire_extent {
  uint64_t offset;              /* disk offset, bytes */
  uint32_t length;              /* bytes, 1 .. COLO_WIRE_MAX_EXTENT */
  uint32_t flags;               /* COLO_EXTENT_DATA or COLO_EXTENT_ZERO,
                                   and the disk << COLO_EXTENT_DISK_SHIFT */
  uint64_t checksum;            /* xxh64 (seed 0) of the data; 0 for ZERO */
} __attribute__ ((__packed__));

struct colo_wire_epoch_end {
  uint64_t epoch;
  uint64_t extent_count;
  uint64_t digest;
} __attribute__ ((__packed__));

/* ---- EPOCH_DURABLE, EPOCH_REFUSED: the secondary's answer. ---- */

struct colo_wire_epoch_durable {
  uint64_t epoch;
} __attribute__ ((__packed__));

enum colo_refuse_reason {
  COLO_REFUSE_CHECKSUM = 1,     /* an extent's data does not match */
  COLO_REFUSE_DIGEST   = 2,     /* the extent list does not match */
  COLO_REFUSE_COUNT    = 3,     /* extent count or bytes do not match */
  COLO_REFUSE_IO       = 4,     /* the journal could not take it */
};
#define COLO_REFUSE_REASON_MAX 4

/* Followed by a string. */
struct colo_wire_epoch_refused {
  uint64_t epoch;
  uint32_t reason;              /* enum colo_refuse_reason */
} __attribute__ ((__packed__));

/* ---- HEARTBEAT, HEARTBEAT_REPLY (on the heartbeat connection). ---- */

struct colo_wire_heartbeat {
  uint64_t monotonic_ms;        /* sender's CLOCK_MONOTONIC */
  uint64_t last_committed;
} __attribute__ ((__packed__));

struct colo_wire_heartbeat_reply {
  uint64_t echo_ms;             /* the HEARTBEAT's monotonic_ms */
  uint64_t monotonic_ms;        /* replier's CLOCK_MONOTONIC */
  uint64_t last_committed;
  uint64_t last_applied;
} __attribute__ ((__packed__));

/* ---- DIVERGED: the secondary's clusters that may differ from any
 * epoch of the primary's (its own writes as a primary that were never
 * replicated, since its last committed epoch base_epoch), sent on the
 * data connection after an accepting HELLO_REPLY: once, or, to a
 * primary of a group whose HELLO has max_version >= 3, once per disk of
 * the group, in order (disk 0, 1, ...), all with the same base_epoch.
 * Followed by (bit_count + 7) / 8 bytes of bitmap, bit i (LSB first) =
 * cluster i.  bit_count 0: nothing diverged.
 */
struct colo_wire_diverged {
  uint64_t base_epoch;          /* the bitmap covers writes since it */
  uint64_t disk_size;           /* bytes */
  uint32_t cluster_size;        /* bytes, power of two */
  uint32_t disk;                /* its index in the group: 0 .. 15 (0 for
                                   a single disk; was reserved, 0) */
  uint64_t bit_count;           /* 0, or ceil (disk_size / cluster_size) */
} __attribute__ ((__packed__));

/* ---- ERROR: sent before disconnecting; followed by a string. ---- */

enum colo_error_code {
  COLO_ERROR_PROTOCOL   = 1,    /* a malformed frame */
  COLO_ERROR_VERSION    = 2,    /* another protocol version */
  COLO_ERROR_UNEXPECTED = 3,    /* a valid message at the wrong time */
  COLO_ERROR_INTERNAL   = 4,    /* out of memory, I/O error here */
  COLO_ERROR_SHUTDOWN   = 5,    /* the sender is stopping */
};
#define COLO_ERROR_CODE_MAX 5

struct colo_wire_error_msg {
  uint32_t code;                /* enum colo_error_code */
} __attribute__ ((__packed__));

_Static_assert (sizeof (struct colo_wire_hello) == 72, "HELLO changed");
_Static_assert (sizeof (struct colo_wire_generation) == 24, "HELLO changed");
_Static_assert (sizeof (struct colo_wire_disks) == 8, "HELLO changed");
_Static_assert (sizeof (struct colo_wire_epoch_begin) == 48,
                "EPOCH_BEGIN changed");
_Static_assert (sizeof (struct colo_wire_extent) == 24, "EXTENT changed");
_Static_assert (sizeof (struct colo_wire_epoch_end) == 24,
                "EPOCH_END changed");
_Static_assert (sizeof (struct colo_wire_epoch_refused) == 12,
                "EPOCH_REFUSED changed");
_Static_assert (sizeof (struct colo_wire_diverged) == 32, "DIVERGED changed");
_Static_assert (sizeof (struct colo_wire_heartbeat_reply) == 32,
                "HEARTBEAT_REPLY changed");

#endif /* FLEECE_COLO_WIRE_H */
