/* The state directory's files (state.c; docs/replication.md "The state
 * directory" and "State file"):
 *   state          the secondary's identity and epochs (journal.c keeps
 *                  it; FLCOLOST, binary, with a checksum)
 *   primary.json   the primary's identity
 *   diverged       the clusters a demoted primary wrote that its old
 *                  secondary never received, per disk of its group
 *                  (FLCODIV1 of one disk, FLCODIV2 of a group; checksums)
 *   failback       a failback's first epoch is not durable yet
 *   promoted       the generation this side started when promoted
 * and control.sock (ctl.c), journal (journal.c).  Every call reports a
 * failure in err, naming the file; none logs.
 */

#ifndef COLO_STATE_H
#define COLO_STATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "wire.h"

/* ---- STATE_DIR/state: the secondary's identity and epochs ----
 *
 * struct journal_state is this file's content, which journal.c keeps
 * (hence its name); it is defined here so that the state file's format
 * depends on nothing of the journal's.
 */

#define JOURNAL_ID_SIZE      16
#define JOURNAL_MAX_HISTORY  256
#define JOURNAL_MAX_DISKS    COLO_WIRE_MAX_DISKS  /* in a group */

struct journal_generation {
  uint8_t id[JOURNAL_ID_SIZE];
  uint64_t first_epoch;         /* first epoch of this generation */
};

struct journal_state {
  uint8_t volume_id[JOURNAL_ID_SIZE];     /* all zero: not paired yet */
  uint8_t generation_id[JOURNAL_ID_SIZE]; /* the last history entry's */
  struct journal_generation history[JOURNAL_MAX_HISTORY]; /* oldest first */
  uint32_t history_len;
  uint64_t disk_size;           /* disk 0's: disk_sizes[0] */
  uint32_t cluster_size;
  uint32_t disk_count;          /* disks in the group: 1 .. MAX_DISKS */
  uint64_t disk_sizes[JOURNAL_MAX_DISKS];
  uint64_t committed_epoch;     /* last durable epoch (0: none) */
  uint64_t applied_epoch;       /* last epoch the disk holds (0: none) */
};

#define COLO_STATE_FIXED  80
#define COLO_STATE_ENTRY  24
#define COLO_STATE_MAX    (COLO_STATE_FIXED + \
                           JOURNAL_MAX_HISTORY * COLO_STATE_ENTRY + \
                           (JOURNAL_MAX_DISKS - 1) * 8 + 8)

/* Encode into p (COLO_STATE_MAX bytes): the length. */
extern size_t colo_state_encode (const struct journal_state *st,
                                 unsigned char *p);
/* Decode len bytes: false if they are not a valid state file. */
extern bool colo_state_decode (const unsigned char *p, size_t len,
                               struct journal_state *st);
/* Read STATE_DIR/state without opening the journal (no lock, no
 * recovery): 1 with *st filled, 0 if there is none, -1 with err.
 */
extern int colo_state_read (const char *state_dir, struct journal_state *st,
                            char *err, size_t errlen);

/* ---- STATE_DIR/primary.json ---- */

struct colo_primary_state {
  uint8_t volume_id[16];
  struct colo_generation history[COLO_WIRE_MAX_HISTORY];
  uint32_t history_len;
  uint64_t acked;                 /* last epoch durable on the secondary */
  bool demoted;                   /* `fleece-colod demote' ran */
};

/* 1 loaded, 0 none, -1 damaged or unreadable (err). */
extern int colo_state_load_primary (const char *state_dir,
                                    struct colo_primary_state *ps,
                                    char *err, size_t errlen);
/* Replace it atomically (temporary file, fsync, rename, fsync of the
 * directory).
 */
extern int colo_state_save_primary (const char *state_dir,
                                    const struct colo_primary_state *ps,
                                    char *err, size_t errlen);

/* ---- STATE_DIR/diverged ----
 *
 * What a demoted primary wrote since its last acknowledged epoch, per
 * disk of its group (disk_count 1: a single disk).  One cluster size
 * for the group; bits[i] has nbits[i] bits (0: nothing diverged on disk
 * i, bits[i] NULL), ceil (disk_sizes[i] / cluster_size) otherwise.
 */

struct colo_diverged {
  uint64_t base;                  /* the last acknowledged epoch */
  uint32_t cluster_size;
  uint32_t disk_count;            /* 1 .. COLO_WIRE_MAX_DISKS */
  uint64_t disk_sizes[COLO_WIRE_MAX_DISKS];
  uint64_t nbits[COLO_WIRE_MAX_DISKS];
  uint8_t *bits[COLO_WIRE_MAX_DISKS];
};

/* Replace it atomically with d: every disk's record or none. */
extern int colo_state_write_diverged (const char *state_dir,
                                      const struct colo_diverged *d,
                                      char *err, size_t errlen);
/* 1 with the file's contents in *d (free them with
 * colo_diverged_free), 0 none, -1 damaged or unreadable (err, naming
 * the disk whose record is damaged); *d is empty but on 1.
 */
extern int colo_state_read_diverged (const char *state_dir,
                                     struct colo_diverged *d,
                                     char *err, size_t errlen);
extern void colo_diverged_free (struct colo_diverged *d);
extern bool colo_state_has_diverged (const char *state_dir);
/* Remove it: true if there was one. */
extern bool colo_state_remove_diverged (const char *state_dir);

/* ---- STATE_DIR/failback ----
 *
 * Written (synced) when a secondary takes a demoted primary's identity,
 * removed with diverged once the first epoch after it is durable: while
 * it is there, this side's own writes since the demoted epoch are known
 * only through diverged, so a diverged that goes missing must mean a
 * full copy, not an incremental resync that keeps them.
 */
extern int colo_state_write_failback (const char *state_dir, char *err,
                                      size_t errlen);
extern bool colo_state_failback_pending (const char *state_dir);

/* ---- STATE_DIR/promoted ---- */

/* Was this side promoted into generation gen? */
extern bool colo_state_promoted_in (const char *state_dir,
                                    const uint8_t gen[16]);
extern int colo_state_write_promoted (const char *state_dir,
                                      const uint8_t gen[16],
                                      char *err, size_t errlen);
extern void colo_state_clear_promoted (const char *state_dir);

/* The path of one of the directory's files, in out. */
extern void colo_state_path (const char *state_dir, const char *name,
                             char *out, size_t n);

#endif /* COLO_STATE_H */
