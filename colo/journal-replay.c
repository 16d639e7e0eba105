/* The secondary's epoch journal: reading a committed epoch back, to
 * verify it and apply it to the disk, and recovery (journal.c's note
 * has the guarantees).
 *
 * Every byte is checked again on the way back: each EXTENT record
 * (checksum, nonce, epoch, index, range) and each extent's data against
 * its checksum, and recovery checks the whole epoch (count and digest)
 * before apply may touch the disk.  Recovery reads blocks 0 and 1 only:
 * a BEGIN and a valid COMMIT with the same nonce and epoch are a
 * committed epoch; anything else is an incomplete one, dropped.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include "journal.h"
#include "journal-internal.h"
#include "le.h"

/* ---- reading an epoch back ---- */

/* Is this extent acceptable for this disk?  NULL if so, else why not. */
const char *
journal_extent_problem (const struct journal_state *st, uint64_t offset,
                        uint32_t length, uint32_t flags)
{
  uint32_t kind = JOURNAL_EXTENT_KIND (flags), d = JOURNAL_EXTENT_DISK (flags);
  uint64_t size;

  if (kind != JOURNAL_EXTENT_DATA && kind != JOURNAL_EXTENT_ZERO)
    return "flags must be exactly one of DATA and ZERO";
  if (d >= st->disk_count)
    return "of a disk that is not in the group";
  size = st->disk_sizes[d];
  if (length == 0)
    return "empty extent";
  if (offset >= size || length > size - offset)
    return "beyond the end of the disk";
  if (offset % st->cluster_size != 0)
    return "offset not aligned to the cluster size";
  if (length % st->cluster_size != 0 && offset + length != size)
    return "length not a multiple of the cluster size and not ending "
      "at the end of the disk";
  return NULL;
}

/* Read and check extent record `index' of the journal's epoch at *pos;
 * *pos moves past the record (not its data).
 */
static int
read_extent_record (struct journal *j, uint64_t *pos, uint64_t index,
                    struct journal_extent *e)
{
  unsigned char raw[REC_SIZE];
  struct rec r;
  const char *why;

  if (journal_pread (j->jfd, raw, REC_SIZE, *pos) == -1)
    return jerr (j, errno, "read: %s: extent record %" PRIu64
                 " of epoch %" PRIu64 " at offset %" PRIu64,
                 j->journal_path, index, j->epoch, *pos);
  if (journal_rec_decode (raw, &r) != REC_OK || r.type != REC_EXTENT ||
      r.nonce != j->nonce || r.epoch != j->epoch ||
      get_u64 (r.body + 24) != index)
    return jerr (j, 0, "read: %s: extent record %" PRIu64 " of committed "
                 "epoch %" PRIu64 " at offset %" PRIu64 " is corrupt",
                 j->journal_path, index, j->epoch, *pos);
  e->offset = get_u64 (r.body);
  e->length = get_u32 (r.body + 8);
  e->flags = get_u32 (r.body + 12);
  e->checksum = get_u64 (r.body + 16);
  why = journal_extent_problem (&j->st, e->offset, e->length, e->flags);
  if (why == NULL && JOURNAL_EXTENT_KIND (e->flags) == JOURNAL_EXTENT_ZERO &&
      e->checksum != 0)
    why = "ZERO extent with a checksum";
  if (why)
    return jerr (j, 0, "read: %s: extent record %" PRIu64 " of committed "
                 "epoch %" PRIu64 ": %s", j->journal_path, index, j->epoch,
                 why);
  *pos += REC_BLOCK;
  return 0;
}

/* After an O_DIRECT call on the journal failed: true if that was the
 * file system refusing the alignment (EINVAL), after which O_DIRECT is
 * not tried again and the page cache serves instead.
 */
bool
journal_direct_refused (struct journal *j)
{
  if (errno != EINVAL)
    return false;
  close (j->jdfd);
  j->jdfd = -1;
  return true;
}

/* Read n bytes of extent data at journal offset pos into j->buf, with
 * O_DIRECT when aligned (it was written so, and going through the page
 * cache would only copy it once more); 0, or -1 with errno.
 */
static int
read_data (struct journal *j, size_t n, uint64_t pos)
{
  if (j->jdfd >= 0 && n % REC_BLOCK == 0 && pos % REC_BLOCK == 0) {
    if (journal_pread (j->jdfd, j->buf, n, pos) == 0)
      return 0;
    if (!journal_direct_refused (j))
      return -1;
  }
  return journal_pread (j->jfd, j->buf, n, pos);
}

/* Hash the len bytes of data at journal offset pos and compare. */
static int
verify_data (struct journal *j, const struct journal_extent *e, uint64_t pos)
{
  XXH64_state_t h;
  uint64_t done;

  XXH64_reset (&h, 0);
  for (done = 0; done < e->length; ) {
    size_t n = e->length - done < IO_BUF_SIZE ? e->length - done
      : IO_BUF_SIZE;

    if (read_data (j, n, pos + done) == -1)
      return jerr (j, errno, "read: %s: data of the extent at disk offset %"
                   PRIu64 " of epoch %" PRIu64, j->journal_path, e->offset,
                   j->epoch);
    XXH64_update (&h, j->buf, n);
    done += n;
  }
  if (XXH64_digest (&h) != e->checksum)
    return jerr (j, 0, "read: %s: the data of the extent at disk offset %"
                 PRIu64 " of committed epoch %" PRIu64 " does not match its "
                 "checksum: the journal is corrupt", j->journal_path,
                 e->offset, j->epoch);
  return 0;
}

/* Write one DATA extent from the journal to the disk, verified first:
 * whole from the buffer when it fits, else in a hashing pass and a
 * copying pass.
 */
static int
apply_data (struct journal *j, const struct journal_extent *e, uint64_t pos)
{
  uint64_t done;

  if (e->length <= IO_BUF_SIZE) {
    if (read_data (j, e->length, pos) == -1)
      return jerr (j, errno, "read: %s: data of the extent at disk offset %"
                   PRIu64, j->journal_path, e->offset);
    if (journal_checksum (j->buf, e->length) != e->checksum)
      return jerr (j, 0, "read: %s: the data of the extent at disk offset %"
                   PRIu64 " of committed epoch %" PRIu64 " does not match "
                   "its checksum: the journal is corrupt", j->journal_path,
                   e->offset, j->epoch);
    return journal_disk_write (j, JOURNAL_EXTENT_DISK (e->flags), j->buf,
                               e->length, e->offset);
  }
  if (verify_data (j, e, pos) == -1)
    return -1;
  for (done = 0; done < e->length; ) {
    size_t n = e->length - done < IO_BUF_SIZE ? e->length - done
      : IO_BUF_SIZE;

    if (read_data (j, n, pos + done) == -1)
      return jerr (j, errno, "read: %s", j->journal_path);
    if (journal_disk_write (j, JOURNAL_EXTENT_DISK (e->flags), j->buf, n,
                            e->offset + done) == -1)
      return -1;
    done += n;
  }
  return 0;
}

/* Recovery's check of a committed epoch, before the disk is touched:
 * every record, every byte, the count, the digest, the journal's end.
 */
static int
verify_epoch (struct journal *j, uint64_t digest, uint64_t end)
{
  struct journal_digest d;
  struct journal_extent e;
  uint64_t pos = EXTENTS_OFFSET, i;

  journal_digest_init (&d);
  for (i = 0; i < j->count; i++) {
    if (read_extent_record (j, &pos, i, &e) == -1)
      return -1;
    if (JOURNAL_EXTENT_KIND (e.flags) == JOURNAL_EXTENT_DATA) {
      if (verify_data (j, &e, pos) == -1)
        return -1;
      pos = journal_block_up (pos + e.length);
    }
    journal_digest_add (&d, &e);
  }
  if (journal_digest_final (&d) != digest || pos != end)
    return jerr (j, 0, "read: %s: committed epoch %" PRIu64 " does not "
                 "match its commit record (digest or length): the journal "
                 "is corrupt", j->journal_path, j->epoch);
  return 0;
}

/* A committed epoch found by recovery (BEGIN b, COMMIT c): it must
 * agree with the state and verify whole before it may touch the disk.
 */
static int
load_committed (struct journal *j, const struct rec *b, const struct rec *c)
{
  uint32_t disks = get_u32 (b->body + 28);       /* 0: version 2 */

  if (memcmp (b->body, j->st.generation_id, JOURNAL_ID_SIZE) != 0 ||
      get_u64 (b->body + 16) != j->st.disk_size ||
      get_u32 (b->body + 24) != j->st.cluster_size ||
      (disks ? disks : 1) != j->st.disk_count)
    return jerr (j, 0, "read: %s: committed epoch %" PRIu64 " belongs to "
                 "another generation or geometry than %s",
                 j->journal_path, b->epoch, j->state_path);
  j->epoch = b->epoch;
  j->nonce = b->nonce;
  j->count = get_u64 (c->body);
  if (verify_epoch (j, get_u64 (c->body + 8), get_u64 (c->body + 16)) == -1) {
    journal_reset_phase (j);
    return -1;
  }
  j->pos = get_u64 (c->body + 16);
  j->phase = PHASE_COMMITTED;
  j->st.committed_epoch = b->epoch;
  snprintf (j->note, sizeof j->note, "epoch %" PRIu64 " was committed but "
            "not applied: applied it again", b->epoch);
  return 1;
}

/* Read the BEGIN and COMMIT records.  1 and the phase COMMITTED if an
 * epoch is committed and not applied, 0 if there is none (the journal is
 * then emptied), -1 on error.
 */
/* Does the journal hold a committed epoch, not yet applied, in another
 * version of the format?  (Its records have the same size and place.)
 */
static bool
other_version_committed (struct journal *j, const struct stat *sb,
                         struct rec *b)
{
  unsigned char raw[REC_SIZE];
  enum rec_status bs, cs;
  struct rec c;

  if (sb->st_size < COMMIT_OFFSET + REC_SIZE ||
      journal_pread (j->jfd, raw, REC_SIZE, BEGIN_OFFSET) == -1)
    return false;
  bs = journal_rec_decode (raw, b);
  if (journal_pread (j->jfd, raw, REC_SIZE, COMMIT_OFFSET) == -1)
    return false;
  cs = journal_rec_decode (raw, &c);
  return (bs == REC_OTHER_VERSION || cs == REC_OTHER_VERSION) &&
    (bs == REC_OK || bs == REC_OTHER_VERSION) &&
    (cs == REC_OK || cs == REC_OTHER_VERSION) &&
    b->type == REC_BEGIN && c.type == REC_COMMIT && c.nonce == b->nonce &&
    c.epoch == b->epoch && b->epoch > j->st.applied_epoch;
}

static int
scan_journal (struct journal *j)
{
  unsigned char raw[REC_SIZE];
  struct rec b, c;
  struct stat sb;
  enum rec_status cs;

  if (fstat (j->jfd, &sb) == -1)
    return jerr (j, errno, "fstat: %s", j->journal_path);
  if (sb.st_size == 0) {
    snprintf (j->note, sizeof j->note, "journal empty: nothing to recover");
    return 0;
  }
  if (other_version_committed (j, &sb, &b))
    /* Written by another fleece-colod: guessing its layout could drop
     * (or misapply) an epoch that was acknowledged as durable.
     */
    return jerr (j, 0, "open: %s: holds committed epoch %" PRIu64 " in "
                 "another journal format than this fleece-colod's (version "
                 "%d): start the fleece-colod that wrote it once, to apply "
                 "it", j->journal_path, b.epoch, REC_VERSION);
  if (sb.st_size < REC_SIZE ||
      journal_pread (j->jfd, raw, REC_SIZE, BEGIN_OFFSET) == -1 ||
      journal_rec_decode (raw, &b) != REC_OK || b.type != REC_BEGIN) {
    snprintf (j->note, sizeof j->note,
              "dropped an incomplete epoch (no valid begin record)");
    return journal_truncate (j);
  }
  if (b.epoch <= j->st.applied_epoch) {
    snprintf (j->note, sizeof j->note, "journal held epoch %" PRIu64
              ", already applied: emptied", b.epoch);
    return journal_truncate (j);
  }
  cs = REC_ZERO;
  if (sb.st_size >= COMMIT_OFFSET + REC_SIZE) {
    if (journal_pread (j->jfd, raw, REC_SIZE, COMMIT_OFFSET) == -1)
      return jerr (j, errno, "read: %s", j->journal_path);
    cs = journal_rec_decode (raw, &c);
  }
  if (cs == REC_BAD) {
    snprintf (j->note, sizeof j->note, "dropped epoch %" PRIu64 ": its "
              "commit record is torn or corrupt (bad checksum)", b.epoch);
    return journal_truncate (j);
  }
  if (cs != REC_OK || c.type != REC_COMMIT || c.nonce != b.nonce ||
      c.epoch != b.epoch) {
    snprintf (j->note, sizeof j->note, "dropped epoch %" PRIu64
              ": incomplete (not committed)", b.epoch);
    return journal_truncate (j);
  }
  return load_committed (j, &b, &c);
}
int
journal_recover (struct journal *j)
{
  int r;

  if (journal_check_usable (j) == -1)
    return -1;
  if (j->phase == PHASE_OPEN || j->phase == PHASE_REFUSED)
    return jerr (j, 0, "journal_recover: %s: epoch %" PRIu64 " is open: "
                 "abort it first", j->journal_path, j->epoch);
  if (j->phase == PHASE_IDLE) {
    r = scan_journal (j);
    if (r <= 0)
      return r;
  }
  return journal_apply (j);
}

int
journal_apply (struct journal *j)
{
  struct journal_state st;
  struct journal_extent e;
  uint64_t pos = EXTENTS_OFFSET, i;
  unsigned d;

  if (journal_check_usable (j) == -1)
    return -1;
  if (j->phase == PHASE_IDLE)
    return 0;
  if (j->phase != PHASE_COMMITTED)
    return jerr (j, 0, "journal_apply: %s: epoch %" PRIu64 " is not "
                 "committed", j->journal_path, j->epoch);
  for (i = 0; i < j->count; i++) {
    if (read_extent_record (j, &pos, i, &e) == -1)
      return -1;
    if (JOURNAL_EXTENT_KIND (e.flags) == JOURNAL_EXTENT_ZERO) {
      if (journal_disk_zero (j, JOURNAL_EXTENT_DISK (e.flags), e.offset,
                             e.length) == -1)
        return -1;
    }
    else {
      if (apply_data (j, &e, pos) == -1)
        return -1;
      pos = journal_block_up (pos + e.length);
    }
  }
  /* Every disk of the group is synced before the state says the epoch
   * is applied: until then recovery applies it again, to all of them.
   */
  for (d = 0; d < j->ndisks; d++) {
    journal_step_hook (JOURNAL_STEP_DISK_SYNC);
    if (fdatasync (j->dfd[d]) == -1)
      return jerr (j, errno, "fdatasync: %s", j->disk_path[d]);
  }
  st = j->st;
  st.committed_epoch = st.applied_epoch = j->epoch;
  if (journal_state_save (j, &st) == -1)
    return -1;
  journal_reset_phase (j);
  return journal_truncate (j);
}

