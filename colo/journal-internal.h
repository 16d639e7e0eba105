/* The secondary's epoch journal, inside: what journal.c (the journal's
 * life: open, the epoch's writes, the state file, the disk),
 * journal-format.c (records, checksums, the digest) and
 * journal-replay.c (reading a committed epoch back: verify, apply,
 * recovery) share.  journal.c's note has the order of writes and syncs
 * that all three keep.  Not for the journal's users, who see journal.h.
 */

#ifndef FLEECE_COLO_JOURNAL_INTERNAL_H
#define FLEECE_COLO_JOURNAL_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "journal.h"

/* Journal file. */
#define REC_SIZE        64
#define REC_MAGIC       "FLCJ"
#define REC_VERSION     3     /* 3: groups: BEGIN's disk count, the disk
                                 in EXTENT's flags */
#define REC_VERSION_V2  2     /* a single disk; replays as version 3 */
                              /* 1: data right after its record */
#define REC_BLOCK       4096  /* an EXTENT record's block; data is aligned */
#define BEGIN_OFFSET    0
#define COMMIT_OFFSET   4096
#define EXTENTS_OFFSET  8192

enum rec_type {
  REC_BEGIN  = 1,
  REC_EXTENT = 2,
  REC_COMMIT = 3,
};

#define MIN_CLUSTER     512u
#define MAX_CLUSTER     (64u << 20)
#define IO_BUF_SIZE     (4u << 20)  /* apply and verify in pieces of this */

/* errno after a read that met the end of the file. */
#define E_SHORT         (-1)

enum phase {
  PHASE_IDLE,                   /* no epoch in the journal */
  PHASE_OPEN,                   /* begun, taking extents */
  PHASE_REFUSED,                /* begun, refused: only abort */
  PHASE_COMMITTED,              /* durable, not yet applied */
};

/* A journal is used by one thread at a time: its owner serialises the
 * calls (the secondary holds jlock).
 */
struct journal {
  /* Set by journal_open, then constant. */
  char *state_path, *tmp_path, *journal_path;
  int dir_fd, jfd;
  int jdfd;                     /* the journal with O_DIRECT; -1: none */
  /* The disks of the group (one, unless a consistency group). */
  unsigned ndisks;
  char *disk_path[JOURNAL_MAX_DISKS];
  int dfd[JOURNAL_MAX_DISKS];
  bool disk_is_blk[JOURNAL_MAX_DISKS];
  char *buf;                    /* IO_BUF_SIZE bytes, REC_BLOCK-aligned */
  unsigned char *recblock;      /* REC_BLOCK bytes, aligned, zero-padded */

  /* The state file, with committed_epoch raised by a COMMIT record. */
  struct journal_state st;

  /* The epoch in the journal. */
  enum phase phase;
  uint64_t epoch, nonce;
  uint64_t count;               /* extents appended */
  uint64_t pos;                 /* journal offset of the next record */
  struct journal_digest digest;
  bool broken;

  char note[256];
  char err[1024];
};

/* A record: 64 bytes: magic[4], type u16, version u16, nonce u64, epoch u64, a
 * 32-byte body, checksum u64 (xxh64 of the 56 bytes before it).
 */
struct rec {
  uint16_t type;
  uint64_t nonce, epoch;
  unsigned char body[32];
};

enum rec_status { REC_OK, REC_ZERO, REC_BAD, REC_OTHER_VERSION };

/* journal.c */

/* Call the test hook (journal_set_test_hook), if any, before step s. */
extern void journal_step_hook (enum journal_step s);
/* Record an error: "fmt: strerror (errnum)", or only fmt if errnum is 0,
 * or "fmt: unexpected end of file" for E_SHORT.  Returns -1.
 */
extern int jerr (struct journal *j, int errnum, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));
/* -1 (recorded) if an earlier sync failed: the journal is broken. */
extern int journal_check_usable (struct journal *j);
/* Read len bytes; 0, or -1 with errno (E_SHORT for a short file). */
extern int journal_pread (int fd, void *p, size_t len, uint64_t off);
/* Replace the state file with st (temp file, fsync, rename, fsync). */
extern int journal_state_save (struct journal *j,
                               const struct journal_state *st);
/* Write or zero a range of replicated disk d. */
extern int journal_disk_write (struct journal *j, unsigned d, const void *p,
                               size_t len, uint64_t off);
extern int journal_disk_zero (struct journal *j, unsigned d, uint64_t off,
                              uint64_t len);
/* No epoch in the journal (PHASE_IDLE). */
extern void journal_reset_phase (struct journal *j);
/* Empty the journal.  Not synced: see journal.c's note. */
extern int journal_truncate (struct journal *j);

/* journal-format.c */

/* pos rounded up to the next REC_BLOCK. */
extern uint64_t journal_block_up (uint64_t pos);
extern void journal_rec_encode (unsigned char out[REC_SIZE],
                                const struct rec *r);
extern enum rec_status journal_rec_decode (const unsigned char in[REC_SIZE],
                                           struct rec *r);

/* journal-replay.c */

/* Why an extent is not acceptable for the disk described by st, or
 * NULL.
 */
extern const char *journal_extent_problem (const struct journal_state *st,
                                           uint64_t offset, uint32_t length,
                                           uint32_t flags);
/* O_DIRECT was refused for the journal (EINVAL): true, and it is not
 * used again.
 */
extern bool journal_direct_refused (struct journal *j);

#endif /* FLEECE_COLO_JOURNAL_INTERNAL_H */
