/* The secondary's epoch journal: keeps a copy of the replicated disk at
 * exactly a committed epoch, never torn.  colo/journal.c explains the
 * design; docs/replication.md ("Secondary journal") the on-disk format,
 * the order of writes and syncs, and what is guaranteed.
 *
 * Use, one epoch at a time:
 *
 *   journal_begin (j, epoch, generation);
 *   journal_add_extent (j, ...);        for each extent, in order
 *   journal_end (j, count, digest);     0: DURABLE, the caller may ack
 *   journal_apply (j);                  the disk now holds the epoch
 *
 * A failure in begin, add or end refuses the epoch: journal_abort drops
 * it and the disk is untouched.  A struct journal is used by one thread
 * at a time (the caller serializes).  Every function that can fail
 * returns -1 (or NULL) with a message naming the file and the operation
 * in journal_error (j) (in err for journal_open).
 */

#ifndef FLEECE_COLO_JOURNAL_H
#define FLEECE_COLO_JOURNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef XXH_STATIC_LINKING_ONLY
#define XXH_STATIC_LINKING_ONLY /* XXH64_state_t by value */
#endif
#include <xxhash.h>

#include "state.h"

struct journal;

/* ---- Extents and the epoch digest, shared with the primary and the
 * wire code (the values are those of COLO_EXTENT_* on the wire).
 */

#define JOURNAL_EXTENT_DATA  (1u << 0)  /* length bytes of data */
#define JOURNAL_EXTENT_ZERO  (1u << 1)  /* reads as zeroes; checksum 0 */
/* In a group, the extent's disk is in flags' high 16 bits (as on the
 * wire): JOURNAL_EXTENT_DATA | d << JOURNAL_EXTENT_DISK_SHIFT.
 */
#define JOURNAL_EXTENT_DISK_SHIFT 16
#define JOURNAL_EXTENT_KIND(flags) ((flags) & 0xffffu)
#define JOURNAL_EXTENT_DISK(flags) ((flags) >> JOURNAL_EXTENT_DISK_SHIFT)

/* An extent descriptor.  Its encoding, the unit of the digest, is 24
 * bytes, little-endian: offset u64, length u32, flags u32, checksum u64.
 */
struct journal_extent {
  uint64_t offset;              /* disk offset, bytes */
  uint32_t length;              /* bytes, > 0 */
  uint32_t flags;               /* exactly one of JOURNAL_EXTENT_* */
  uint64_t checksum;            /* journal_checksum (data); 0 for ZERO */
};

#define JOURNAL_EXTENT_ENCODED_SIZE 24

/* The checksum of an extent's data: xxh64, seed 0. */
extern uint64_t journal_checksum (const void *data, size_t len);

/* The 24-byte encoding of an extent descriptor. */
extern void journal_extent_encode
  (const struct journal_extent *e,
   unsigned char out[JOURNAL_EXTENT_ENCODED_SIZE]);

/* The digest of an epoch: xxh64 (seed 0) over its extent descriptors'
 * encodings, concatenated in the order they are sent.  Either all at
 * once, or streamed (init, one add per extent, final).
 */
struct journal_digest {
  XXH64_state_t state;
};

extern uint64_t journal_digest (const struct journal_extent *extents,
                                size_t n);
extern void journal_digest_init (struct journal_digest *d);
extern void journal_digest_add (struct journal_digest *d,
                                const struct journal_extent *e);
extern uint64_t journal_digest_final (const struct journal_digest *d);

/* ---- Identity and state: struct journal_state (state.h). ---- */

/* ---- The journal. ---- */

/* Open (creating STATE_DIR's files the first time) and recover: a
 * committed epoch not yet applied is applied again, an incomplete one
 * dropped.  The disk (regular file or block device) must exist and be
 * at least disk_size bytes; cluster_size is a power of two, 512 bytes
 * to 64 MiB.  Later opens must give the same sizes.  The state
 * directory is locked against a second opener.
 */
extern struct journal *journal_open (const char *state_dir,
                                     const char *disk_path,
                                     uint64_t disk_size,
                                     uint32_t cluster_size,
                                     char *err, size_t errlen);

/* The same for a consistency group of ndisks disks (1 to
 * JOURNAL_MAX_DISKS), in the group's order: an epoch's extents name
 * their disk in their flags, and an epoch is applied to all of them, or
 * to none, whatever crashes.
 */
extern struct journal *journal_open_group (const char *state_dir,
                                           unsigned ndisks,
                                           const char *const *disk_paths,
                                           const uint64_t *disk_sizes,
                                           uint32_t cluster_size,
                                           char *err, size_t errlen);

/* colo_state_read (state.h) reads STATE_DIR/state without opening the
 * journal.
 */

/* Recovery, as done by journal_open; harmless to call again when idle. */
extern int journal_recover (struct journal *j);

/* What the last recovery did, in a sentence (for the log). */
extern const char *journal_recovery_note (const struct journal *j);

extern void journal_close (struct journal *j);

extern const char *journal_error (const struct journal *j);
extern const struct journal_state *journal_get_state (const struct journal *j);

/* Adopt an identity (at pairing, or when an old primary becomes a
 * secondary): the volume id, the generation history (the current
 * generation is its last entry) and the epoch the disk now holds (0:
 * none; the next epoch must then be a full copy).  Durable on return.
 * Refused while an epoch is open or committed but not applied.
 */
extern int journal_set_identity (struct journal *j,
                                 const uint8_t volume_id[JOURNAL_ID_SIZE],
                                 const struct journal_generation *history,
                                 uint32_t history_len, uint64_t epoch);

/* Start a new generation (at promotion): appended to the history, its
 * first epoch after the last committed one.  Durable on return.
 */
extern int journal_new_generation (struct journal *j,
                                   const uint8_t id[JOURNAL_ID_SIZE],
                                   uint64_t first_epoch);

/* Open epoch `epoch' (greater than the last committed one) of the
 * current generation.  Needs an identity and no epoch pending apply.
 */
extern int journal_begin (struct journal *j, uint64_t epoch,
                          const uint8_t generation[JOURNAL_ID_SIZE]);

/* Append one extent: offset cluster-aligned, length a multiple of the
 * cluster size except a last cluster that ends at the disk's end.  DATA
 * extents carry their data, verified against checksum before anything
 * is written; ZERO extents carry no data (NULL) and checksum 0.  Any
 * failure refuses the epoch.
 */
extern int journal_add_extent (struct journal *j, uint64_t offset,
                               uint32_t length, uint32_t flags,
                               const void *data, uint64_t checksum);

/* The same, for a caller that has just verified the data against its
 * checksum itself (the secondary, as it receives it): hashing it once
 * more would be the same answer at the cost of a pass over the data.
 */
extern int journal_add_verified_extent (struct journal *j, uint64_t offset,
                                        uint32_t length, uint32_t flags,
                                        const void *data, uint64_t checksum);

/* Close the epoch: the count and digest must match what was added.
 * Syncs the extents, writes the commit record, syncs it: on success the
 * epoch is DURABLE and survives any crash.
 */
extern int journal_end (struct journal *j, uint64_t extent_count,
                        uint64_t digest);

/* Drop the open epoch (not a committed one); the disk is untouched. */
extern int journal_abort (struct journal *j);

/* Apply the committed epoch to the disk, sync the disk, record it as
 * applied, reset the journal.  0 with nothing to do when none is
 * pending.  Idempotent across crashes: recovery redoes it.
 */
extern int journal_apply (struct journal *j);

/* ---- FOR TESTS ONLY: a hook called before every write and sync the
 * journal makes (and once after the commit record is durable), so that
 * a test can kill the process at any of them.  Process-wide.
 */
enum journal_step {
  JOURNAL_STEP_JOURNAL_WRITE,   /* a write to the journal file */
  JOURNAL_STEP_JOURNAL_SYNC,    /* an fdatasync of the journal */
  JOURNAL_STEP_COMMITTED,       /* after: the commit record is durable */
  JOURNAL_STEP_DISK_WRITE,      /* a write or zeroing of the disk */
  JOURNAL_STEP_DISK_SYNC,       /* an fdatasync of the disk */
  JOURNAL_STEP_STATE_WRITE,     /* a step of the atomic state update */
  JOURNAL_STEP_RESET,           /* the journal is truncated */
};

typedef void (*journal_test_hook_fn) (void *opaque, enum journal_step step);
extern void journal_set_test_hook (journal_test_hook_fn fn, void *opaque);

#endif /* FLEECE_COLO_JOURNAL_H */
