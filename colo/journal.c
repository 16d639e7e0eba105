/* The secondary's epoch journal (docs/replication.md, "Secondary
 * journal", has the format and the guarantees).
 *
 * The secondary's disk must always hold exactly one committed epoch,
 * never a mix of two, whatever crashes.  An epoch therefore goes to the
 * journal first, and to the disk only once the whole of it is durable
 * there:
 *
 *   begin   truncate the journal; write block 0: a BEGIN record (epoch,
 *           a fresh random nonce, generation, geometry), and block 1
 *           zeroed (where the COMMIT record goes)
 *   add     check the extent's range, verify its data against its
 *           checksum, append an EXTENT record and the data (streamed:
 *           nothing of the epoch is kept in memory but a running digest).
 *           Each record starts a 4 KiB block and its data the next one,
 *           so that data whose buffer and length are block-aligned goes
 *           to the journal with O_DIRECT: it is written once and read
 *           once, and copying it through the page cache cost more than
 *           the rest of the secondary's work together (bench/)
 *   end     check the count and the digest, fdatasync, write the COMMIT
 *           record in block 1, fdatasync: DURABLE, the caller may ack
 *   apply   read each extent back, verify it again, write it to the
 *           disk; fdatasync the disk; write the state file with applied
 *           = committed = epoch (temp file, fsync, rename, fsync the
 *           directory); truncate the journal
 *
 * Recovery looks at blocks 0 and 1 only.  An epoch whose COMMIT record
 * is valid and carries the BEGIN's nonce and epoch is committed: it is
 * verified whole (every record, every byte of data, the count and the
 * digest) and applied again.  Applying twice is harmless: an extent is
 * the absolute content of its range, not a change, and the extents are
 * applied in their order each time.  Anything else in the journal is an
 * incomplete epoch, dropped without touching the disk.  An epoch at or
 * below the state file's applied epoch is what a truncation that did not
 * reach the disk before a crash left behind, and is ignored.
 *
 * Truncations are never synced: the nonce is what keeps the records of
 * an earlier attempt (aborted, or applied and truncated) from being read
 * as this one's, and the COMMIT record is only written after an
 * fdatasync that made this attempt's BEGIN and extents durable.
 *
 * Invariants: the disk is written only by apply, only for an epoch whose
 * COMMIT record is durable; the state file's applied epoch only moves
 * after the disk is synced; the journal is truncated only after that.
 *
 * A failed sync or commit write of the journal is sticky (broken): what
 * is on disk is then unknown, so every call fails and the journal must
 * be reopened, whose recovery decides from what is on disk.  A failed
 * write to the disk during apply is not: the epoch stays committed and
 * apply can be retried, as it rewrites and resyncs everything.
 *
 * Deliberately not handled: storage that corrupts data after it was
 * synced.  The checksums detect it; a committed epoch that fails
 * verification makes recovery fail rather than guess, and a COMMIT
 * record that fails its checksum cannot be told from a torn write, so
 * its epoch is dropped (and the recovery note says so).
 *
 * Size.  Over 1000 lines because the invariants above are one order of
 * writes and syncs across begin, add, end, apply and recovery, which is
 * best checked in one file; the state file's format is in state.c.
 */

#include <config.h>

#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <linux/falloc.h>
#include <linux/fs.h>

#include "journal.h"
#include "le.h"
#include "state.h"

/* Journal file. */
#define REC_SIZE        64
#define REC_MAGIC       "FLCJ"
#define REC_VERSION     2     /* 1: data right after its record */
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

struct journal {
  /* Set by journal_open, then constant. */
  char *state_path, *tmp_path, *journal_path, *disk_path;
  int dir_fd, jfd, dfd;
  int jdfd;                     /* the journal with O_DIRECT; -1: none */
  bool disk_is_blk;
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

static journal_test_hook_fn hook_fn;
static void *hook_opaque;

void
journal_set_test_hook (journal_test_hook_fn fn, void *opaque)
{
  hook_fn = fn;
  hook_opaque = opaque;
}

static void
step (enum journal_step s)
{
  if (hook_fn)
    hook_fn (hook_opaque, s);
}

/* Record an error: "fmt: strerror (errnum)", or only fmt if errnum is 0,
 * or "fmt: unexpected end of file" for E_SHORT.
 */
static int jerr (struct journal *j, int errnum, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));
static int
jerr (struct journal *j, int errnum, const char *fmt, ...)
{
  va_list ap;
  size_t n;

  va_start (ap, fmt);
  vsnprintf (j->err, sizeof j->err, fmt, ap);
  va_end (ap);
  n = strlen (j->err);
  if (errnum && n < sizeof j->err)
    snprintf (j->err + n, sizeof j->err - n, ": %s",
              errnum == E_SHORT ? "unexpected end of file"
              : strerror (errnum));
  return -1;
}

/* A sync or a commit write failed: nothing more until reopened. */
static int
set_broken (struct journal *j, int errnum, const char *op, const char *path)
{
  j->broken = true;
  return jerr (j, errnum, "%s: %s", op, path);
}

static int
check_usable (struct journal *j)
{
  if (j->broken)
    return jerr (j, 0, "journal: %s: an earlier sync failed; reopen the "
                 "journal to recover", j->journal_path);
  return 0;
}

/* ---- extents and digest ---- */

uint64_t
journal_checksum (const void *data, size_t len)
{
  return XXH64 (data, len, 0);
}

void
journal_extent_encode (const struct journal_extent *e,
                       unsigned char out[JOURNAL_EXTENT_ENCODED_SIZE])
{
  put_u64 (out, e->offset);
  put_u32 (out + 8, e->length);
  put_u32 (out + 12, e->flags);
  put_u64 (out + 16, e->checksum);
}

void
journal_digest_init (struct journal_digest *d)
{
  XXH64_reset (&d->state, 0);
}

void
journal_digest_add (struct journal_digest *d, const struct journal_extent *e)
{
  unsigned char enc[JOURNAL_EXTENT_ENCODED_SIZE];

  journal_extent_encode (e, enc);
  XXH64_update (&d->state, enc, sizeof enc);
}

uint64_t
journal_digest_final (const struct journal_digest *d)
{
  return XXH64_digest (&d->state);
}

uint64_t
journal_digest (const struct journal_extent *extents, size_t n)
{
  struct journal_digest d;
  size_t i;

  journal_digest_init (&d);
  for (i = 0; i < n; i++)
    journal_digest_add (&d, &extents[i]);
  return journal_digest_final (&d);
}

/* ---- records ----
 *
 * 64 bytes: magic[4], type u16, version u16, nonce u64, epoch u64, a
 * 32-byte body, checksum u64 (xxh64 of the 56 bytes before it).
 */

struct rec {
  uint16_t type;
  uint64_t nonce, epoch;
  unsigned char body[32];
};

enum rec_status { REC_OK, REC_ZERO, REC_BAD, REC_OTHER_VERSION };

static uint64_t
block_up (uint64_t pos)
{
  return (pos + REC_BLOCK - 1) & ~(uint64_t) (REC_BLOCK - 1);
}

static void
rec_encode (unsigned char out[REC_SIZE], const struct rec *r)
{
  uint16_t v;

  memcpy (out, REC_MAGIC, 4);
  v = htole16 (r->type);
  memcpy (out + 4, &v, 2);
  v = htole16 (REC_VERSION);
  memcpy (out + 6, &v, 2);
  put_u64 (out + 8, r->nonce);
  put_u64 (out + 16, r->epoch);
  memcpy (out + 24, r->body, 32);
  put_u64 (out + 56, XXH64 (out, 56, 0));
}

static enum rec_status
rec_decode (const unsigned char in[REC_SIZE], struct rec *r)
{
  static const unsigned char zero[REC_SIZE];
  uint16_t type, version;

  if (memcmp (in, zero, REC_SIZE) == 0)
    return REC_ZERO;
  memcpy (&type, in + 4, 2);
  memcpy (&version, in + 6, 2);
  if (memcmp (in, REC_MAGIC, 4) != 0 || XXH64 (in, 56, 0) != get_u64 (in + 56))
    return REC_BAD;
  r->type = le16toh (type);
  r->nonce = get_u64 (in + 8);
  r->epoch = get_u64 (in + 16);
  memcpy (r->body, in + 24, 32);
  return le16toh (version) == REC_VERSION ? REC_OK : REC_OTHER_VERSION;
}

/* ---- I/O ---- */

static int
full_pwritev (int fd, struct iovec *iov, int n, uint64_t off)
{
  while (n > 0) {
    ssize_t r = pwritev (fd, iov, n, off);

    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    off += r;
    while (n > 0 && (size_t) r >= iov->iov_len) {
      r -= iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = (char *) iov->iov_base + r;
      iov->iov_len -= r;
    }
  }
  return 0;
}

static int
full_pwrite (int fd, const void *p, size_t len, uint64_t off)
{
  struct iovec iov = { .iov_base = (void *) p, .iov_len = len };

  return full_pwritev (fd, &iov, 1, off);
}

/* Read len bytes; 0, or -1 with errno (E_SHORT for a short file). */
static int
full_pread (int fd, void *p, size_t len, uint64_t off)
{
  while (len > 0) {
    ssize_t r = pread (fd, p, len, off);

    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0) {
      errno = E_SHORT;
      return -1;
    }
    p = (char *) p + r;
    len -= r;
    off += r;
  }
  return 0;
}

/* ---- the state file (its format: state.c) ---- */

/* Replace the state file atomically; j->st takes *st on success.  A
 * failure before the rename leaves the old file; one after it (the
 * directory's sync) leaves either, and is sticky.
 */
static int
state_save (struct journal *j, const struct journal_state *st)
{
  unsigned char buf[COLO_STATE_MAX];
  size_t len = colo_state_encode (st, buf);
  int fd;

  step (JOURNAL_STEP_STATE_WRITE);
  fd = open (j->tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd == -1)
    return jerr (j, errno, "open: %s", j->tmp_path);
  if (full_pwrite (fd, buf, len, 0) == -1) {
    jerr (j, errno, "write: %s", j->tmp_path);
    goto out_close;
  }
  step (JOURNAL_STEP_STATE_WRITE);
  if (fsync (fd) == -1) {
    jerr (j, errno, "fsync: %s", j->tmp_path);
    goto out_close;
  }
  if (close (fd) == -1)
    return jerr (j, errno, "close: %s", j->tmp_path);
  step (JOURNAL_STEP_STATE_WRITE);
  if (rename (j->tmp_path, j->state_path) == -1)
    return jerr (j, errno, "rename: %s to %s", j->tmp_path, j->state_path);
  step (JOURNAL_STEP_STATE_WRITE);
  if (fsync (j->dir_fd) == -1)
    return set_broken (j, errno, "fsync (directory of)", j->state_path);
  if (&j->st != st)
    j->st = *st;
  return 0;

 out_close:
  close (fd);
  return -1;
}

/* 1 if loaded, 0 if there is no state file, -1 on error. */
static int
state_load (struct journal *j)
{
  unsigned char buf[COLO_STATE_MAX + 1];
  ssize_t len;
  int fd;

  fd = open (j->state_path, O_RDONLY | O_CLOEXEC);
  if (fd == -1) {
    if (errno == ENOENT)
      return 0;
    return jerr (j, errno, "open: %s", j->state_path);
  }
  do
    len = pread (fd, buf, sizeof buf, 0);
  while (len == -1 && errno == EINTR);
  close (fd);
  if (len == -1)
    return jerr (j, errno, "read: %s", j->state_path);
  if (!colo_state_decode (buf, len, &j->st))
    return jerr (j, 0, "read: %s: not a valid fleece-colod state file "
                 "(bad magic, version, length or checksum)", j->state_path);
  return 1;
}

/* ---- the disk ---- */

static int
disk_write (struct journal *j, const void *p, size_t len, uint64_t off)
{
  step (JOURNAL_STEP_DISK_WRITE);
  if (full_pwrite (j->dfd, p, len, off) == -1)
    return jerr (j, errno, "pwrite: %s", j->disk_path);
  return 0;
}

/* Make [off, off+len) read as zeroes: BLKZEROOUT on a block device,
 * ZERO_RANGE or PUNCH_HOLE on a file, and writing zeroes if neither
 * works there (e.g. a range that is not sector-aligned).
 */
static int
disk_zero (struct journal *j, uint64_t off, uint64_t len)
{
  step (JOURNAL_STEP_DISK_WRITE);
  if (j->disk_is_blk) {
    uint64_t range[2] = { off, len };

    if (ioctl (j->dfd, BLKZEROOUT, range) == 0)
      return 0;
    if (errno != EINVAL && errno != EOPNOTSUPP && errno != ENOTTY)
      return jerr (j, errno, "ioctl BLKZEROOUT: %s", j->disk_path);
  }
  else {
    if (fallocate (j->dfd, FALLOC_FL_ZERO_RANGE, off, len) == 0)
      return 0;
    if (fallocate (j->dfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   off, len) == 0)
      return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL)
      return jerr (j, errno, "fallocate: %s", j->disk_path);
  }
  memset (j->buf, 0, IO_BUF_SIZE);
  while (len > 0) {
    size_t n = len < IO_BUF_SIZE ? len : IO_BUF_SIZE;

    if (full_pwrite (j->dfd, j->buf, n, off) == -1)
      return jerr (j, errno, "pwrite: %s", j->disk_path);
    off += n;
    len -= n;
  }
  return 0;
}

/* ---- reading an epoch back ---- */

/* Is this extent acceptable for this disk?  NULL if so, else why not. */
static const char *
extent_problem (const struct journal_state *st, uint64_t offset,
                uint32_t length, uint32_t flags)
{
  if (flags != JOURNAL_EXTENT_DATA && flags != JOURNAL_EXTENT_ZERO)
    return "flags must be exactly one of DATA and ZERO";
  if (length == 0)
    return "empty extent";
  if (offset >= st->disk_size || length > st->disk_size - offset)
    return "beyond the end of the disk";
  if (offset % st->cluster_size != 0)
    return "offset not aligned to the cluster size";
  if (length % st->cluster_size != 0 && offset + length != st->disk_size)
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

  if (full_pread (j->jfd, raw, REC_SIZE, *pos) == -1)
    return jerr (j, errno, "read: %s: extent record %" PRIu64
                 " of epoch %" PRIu64 " at offset %" PRIu64,
                 j->journal_path, index, j->epoch, *pos);
  if (rec_decode (raw, &r) != REC_OK || r.type != REC_EXTENT ||
      r.nonce != j->nonce || r.epoch != j->epoch ||
      get_u64 (r.body + 24) != index)
    return jerr (j, 0, "read: %s: extent record %" PRIu64 " of committed "
                 "epoch %" PRIu64 " at offset %" PRIu64 " is corrupt",
                 j->journal_path, index, j->epoch, *pos);
  e->offset = get_u64 (r.body);
  e->length = get_u32 (r.body + 8);
  e->flags = get_u32 (r.body + 12);
  e->checksum = get_u64 (r.body + 16);
  why = extent_problem (&j->st, e->offset, e->length, e->flags);
  if (why == NULL && e->flags == JOURNAL_EXTENT_ZERO && e->checksum != 0)
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
static bool
direct_refused (struct journal *j)
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
    if (full_pread (j->jdfd, j->buf, n, pos) == 0)
      return 0;
    if (!direct_refused (j))
      return -1;
  }
  return full_pread (j->jfd, j->buf, n, pos);
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
    return disk_write (j, j->buf, e->length, e->offset);
  }
  if (verify_data (j, e, pos) == -1)
    return -1;
  for (done = 0; done < e->length; ) {
    size_t n = e->length - done < IO_BUF_SIZE ? e->length - done
      : IO_BUF_SIZE;

    if (read_data (j, n, pos + done) == -1)
      return jerr (j, errno, "read: %s", j->journal_path);
    if (disk_write (j, j->buf, n, e->offset + done) == -1)
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
    if (e.flags == JOURNAL_EXTENT_DATA) {
      if (verify_data (j, &e, pos) == -1)
        return -1;
      pos = block_up (pos + e.length);
    }
    journal_digest_add (&d, &e);
  }
  if (journal_digest_final (&d) != digest || pos != end)
    return jerr (j, 0, "read: %s: committed epoch %" PRIu64 " does not "
                 "match its commit record (digest or length): the journal "
                 "is corrupt", j->journal_path, j->epoch);
  return 0;
}

/* ---- the journal's life ---- */

static void
reset_phase (struct journal *j)
{
  j->phase = PHASE_IDLE;
  j->epoch = j->nonce = j->count = 0;
  j->pos = 0;
}

/* Empty the journal.  Not synced: see the comment at the top. */
static int
truncate_journal (struct journal *j)
{
  step (JOURNAL_STEP_RESET);
  if (ftruncate (j->jfd, 0) == -1)
    return jerr (j, errno, "ftruncate: %s", j->journal_path);
  return 0;
}

/* A committed epoch found by recovery (BEGIN b, COMMIT c): it must
 * agree with the state and verify whole before it may touch the disk.
 */
static int
load_committed (struct journal *j, const struct rec *b, const struct rec *c)
{
  if (memcmp (b->body, j->st.generation_id, JOURNAL_ID_SIZE) != 0 ||
      get_u64 (b->body + 16) != j->st.disk_size ||
      get_u32 (b->body + 24) != j->st.cluster_size)
    return jerr (j, 0, "read: %s: committed epoch %" PRIu64 " belongs to "
                 "another generation or geometry than %s",
                 j->journal_path, b->epoch, j->state_path);
  j->epoch = b->epoch;
  j->nonce = b->nonce;
  j->count = get_u64 (c->body);
  if (verify_epoch (j, get_u64 (c->body + 8), get_u64 (c->body + 16)) == -1) {
    reset_phase (j);
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
      full_pread (j->jfd, raw, REC_SIZE, BEGIN_OFFSET) == -1)
    return false;
  bs = rec_decode (raw, b);
  if (full_pread (j->jfd, raw, REC_SIZE, COMMIT_OFFSET) == -1)
    return false;
  cs = rec_decode (raw, &c);
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
      full_pread (j->jfd, raw, REC_SIZE, BEGIN_OFFSET) == -1 ||
      rec_decode (raw, &b) != REC_OK || b.type != REC_BEGIN) {
    snprintf (j->note, sizeof j->note,
              "dropped an incomplete epoch (no valid begin record)");
    return truncate_journal (j);
  }
  if (b.epoch <= j->st.applied_epoch) {
    snprintf (j->note, sizeof j->note, "journal held epoch %" PRIu64
              ", already applied: emptied", b.epoch);
    return truncate_journal (j);
  }
  cs = REC_ZERO;
  if (sb.st_size >= COMMIT_OFFSET + REC_SIZE) {
    if (full_pread (j->jfd, raw, REC_SIZE, COMMIT_OFFSET) == -1)
      return jerr (j, errno, "read: %s", j->journal_path);
    cs = rec_decode (raw, &c);
  }
  if (cs == REC_BAD) {
    snprintf (j->note, sizeof j->note, "dropped epoch %" PRIu64 ": its "
              "commit record is torn or corrupt (bad checksum)", b.epoch);
    return truncate_journal (j);
  }
  if (cs != REC_OK || c.type != REC_COMMIT || c.nonce != b.nonce ||
      c.epoch != b.epoch) {
    snprintf (j->note, sizeof j->note, "dropped epoch %" PRIu64
              ": incomplete (not committed)", b.epoch);
    return truncate_journal (j);
  }
  return load_committed (j, &b, &c);
}

static int
check_idle (struct journal *j, const char *what)
{
  switch (j->phase) {
  case PHASE_IDLE:
    return 0;
  case PHASE_COMMITTED:
    return jerr (j, 0, "%s: %s: epoch %" PRIu64 " is committed but not "
                 "applied: apply it first", what, j->journal_path, j->epoch);
  default:
    return jerr (j, 0, "%s: %s: epoch %" PRIu64 " is open: end or abort "
                 "it first", what, j->journal_path, j->epoch);
  }
}

static int
check_open (struct journal *j, const char *what)
{
  if (check_usable (j) == -1)
    return -1;
  switch (j->phase) {
  case PHASE_OPEN:
    return 0;
  case PHASE_REFUSED:
    return jerr (j, 0, "%s: %s: epoch %" PRIu64 " was refused: abort it",
                 what, j->journal_path, j->epoch);
  case PHASE_COMMITTED:
    return jerr (j, 0, "%s: %s: epoch %" PRIu64 " is already committed",
                 what, j->journal_path, j->epoch);
  default:
    return jerr (j, 0, "%s: %s: no epoch is open", what, j->journal_path);
  }
}

/* The open epoch is refused (the error is already recorded). */
static int
refuse (struct journal *j)
{
  j->phase = PHASE_REFUSED;
  return -1;
}

int
journal_recover (struct journal *j)
{
  int r;

  if (check_usable (j) == -1)
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

  if (check_usable (j) == -1)
    return -1;
  if (j->phase == PHASE_IDLE)
    return 0;
  if (j->phase != PHASE_COMMITTED)
    return jerr (j, 0, "journal_apply: %s: epoch %" PRIu64 " is not "
                 "committed", j->journal_path, j->epoch);
  for (i = 0; i < j->count; i++) {
    if (read_extent_record (j, &pos, i, &e) == -1)
      return -1;
    if (e.flags == JOURNAL_EXTENT_ZERO) {
      if (disk_zero (j, e.offset, e.length) == -1)
        return -1;
    }
    else {
      if (apply_data (j, &e, pos) == -1)
        return -1;
      pos = block_up (pos + e.length);
    }
  }
  step (JOURNAL_STEP_DISK_SYNC);
  if (fdatasync (j->dfd) == -1)
    return jerr (j, errno, "fdatasync: %s", j->disk_path);
  st = j->st;
  st.committed_epoch = st.applied_epoch = j->epoch;
  if (state_save (j, &st) == -1)
    return -1;
  reset_phase (j);
  return truncate_journal (j);
}

/* ---- open and close ---- */

static char *
path_join (const char *dir, const char *name)
{
  size_t n = strlen (dir) + strlen (name) + 2;
  char *p = malloc (n);

  if (p)
    snprintf (p, n, "%s/%s", dir, name);
  return p;
}

static int
open_state_dir (struct journal *j, const char *state_dir)
{
  j->dir_fd = open (state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (j->dir_fd == -1)
    return jerr (j, errno, "open: %s", state_dir);
  j->jfd = open (j->journal_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (j->jfd == -1)
    return jerr (j, errno, "open: %s", j->journal_path);
  if (flock (j->jfd, LOCK_EX | LOCK_NB) == -1) {
    if (errno == EWOULDBLOCK)
      return jerr (j, 0, "flock: %s: in use by another process",
                   j->journal_path);
    return jerr (j, errno, "flock: %s", j->journal_path);
  }
  /* Where the file system has no O_DIRECT (EINVAL), everything goes
   * through the page cache.
   */
  j->jdfd = open (j->journal_path, O_RDWR | O_DIRECT | O_CLOEXEC);
  if (j->jdfd == -1 && errno != EINVAL)
    return jerr (j, errno, "open (O_DIRECT): %s", j->journal_path);
  /* A state update that crashed before its rename. */
  if (unlink (j->tmp_path) == -1 && errno != ENOENT)
    return jerr (j, errno, "unlink: %s", j->tmp_path);
  if (fsync (j->dir_fd) == -1)
    return jerr (j, errno, "fsync: %s", state_dir);
  return 0;
}

static int
load_or_init_state (struct journal *j, uint64_t disk_size,
                    uint32_t cluster_size)
{
  struct journal_state st;
  int r = state_load (j);

  if (r == -1)
    return -1;
  if (r == 0) {
    memset (&st, 0, sizeof st);
    st.disk_size = disk_size;
    st.cluster_size = cluster_size;
    return state_save (j, &st);
  }
  if (j->st.disk_size != disk_size || j->st.cluster_size != cluster_size)
    return jerr (j, 0, "open: %s: made for a disk of %" PRIu64 " bytes in "
                 "clusters of %" PRIu32 ", not %" PRIu64 " in clusters of %"
                 PRIu32, j->state_path, j->st.disk_size, j->st.cluster_size,
                 disk_size, cluster_size);
  if (j->st.applied_epoch > j->st.committed_epoch)
    return jerr (j, 0, "open: %s: applied epoch %" PRIu64 " is after the "
                 "committed epoch %" PRIu64, j->state_path,
                 j->st.applied_epoch, j->st.committed_epoch);
  return 0;
}

static int
open_disk (struct journal *j, uint64_t disk_size)
{
  struct stat sb;
  uint64_t size;

  j->dfd = open (j->disk_path, O_RDWR | O_CLOEXEC);
  if (j->dfd == -1)
    return jerr (j, errno, "open: %s", j->disk_path);
  if (fstat (j->dfd, &sb) == -1)
    return jerr (j, errno, "fstat: %s", j->disk_path);
  if (S_ISBLK (sb.st_mode)) {
    j->disk_is_blk = true;
    if (ioctl (j->dfd, BLKGETSIZE64, &size) == -1)
      return jerr (j, errno, "ioctl BLKGETSIZE64: %s", j->disk_path);
  }
  else if (S_ISREG (sb.st_mode))
    size = sb.st_size;
  else
    return jerr (j, 0, "open: %s: not a regular file or a block device",
                 j->disk_path);
  if (size < disk_size)
    return jerr (j, 0, "open: %s: %" PRIu64 " bytes, smaller than the "
                 "replicated disk (%" PRIu64 " bytes)", j->disk_path, size,
                 disk_size);
  return 0;
}

struct journal *
journal_open (const char *state_dir, const char *disk_path,
              uint64_t disk_size, uint32_t cluster_size,
              char *err, size_t errlen)
{
  struct journal *j = calloc (1, sizeof *j);

  if (j == NULL) {
    snprintf (err, errlen, "calloc: %s", strerror (errno));
    return NULL;
  }
  j->dir_fd = j->jfd = j->jdfd = j->dfd = -1;
  j->state_path = path_join (state_dir, "state");
  j->tmp_path = path_join (state_dir, "state.tmp");
  j->journal_path = path_join (state_dir, "journal");
  j->disk_path = strdup (disk_path);
  if (posix_memalign ((void **) &j->buf, REC_BLOCK, IO_BUF_SIZE) != 0)
    j->buf = NULL;
  if (posix_memalign ((void **) &j->recblock, REC_BLOCK, REC_BLOCK) != 0)
    j->recblock = NULL;
  else
    memset (j->recblock, 0, REC_BLOCK);
  if (!j->state_path || !j->tmp_path || !j->journal_path || !j->disk_path ||
      !j->buf || !j->recblock) {
    errno = ENOMEM;
    jerr (j, errno, "journal_open: %s", state_dir);
    goto out_close;
  }
  if (disk_size == 0 || cluster_size < MIN_CLUSTER ||
      cluster_size > MAX_CLUSTER || (cluster_size & (cluster_size - 1))) {
    jerr (j, 0, "journal_open: %s: invalid geometry: disk of %" PRIu64
          " bytes, clusters of %" PRIu32 " (a power of two, 512 to 64M)",
          disk_path, disk_size, cluster_size);
    goto out_close;
  }
  if (open_state_dir (j, state_dir) == -1 ||
      load_or_init_state (j, disk_size, cluster_size) == -1 ||
      open_disk (j, disk_size) == -1 ||
      journal_recover (j) == -1)
    goto out_close;
  return j;

 out_close:
  snprintf (err, errlen, "%s", j->err);
  journal_close (j);
  return NULL;
}

void
journal_close (struct journal *j)
{
  if (j == NULL)
    return;
  if (j->dfd >= 0)
    close (j->dfd);
  if (j->jdfd >= 0)
    close (j->jdfd);
  if (j->jfd >= 0)
    close (j->jfd);             /* and the lock with it */
  if (j->dir_fd >= 0)
    close (j->dir_fd);
  free (j->state_path);
  free (j->tmp_path);
  free (j->journal_path);
  free (j->disk_path);
  free (j->buf);
  free (j->recblock);
  free (j);
}

const char *
journal_error (const struct journal *j)
{
  return j->err;
}

const char *
journal_recovery_note (const struct journal *j)
{
  return j->note;
}

const struct journal_state *
journal_get_state (const struct journal *j)
{
  return &j->st;
}

/* ---- identity ---- */

int
journal_set_identity (struct journal *j,
                      const uint8_t volume_id[JOURNAL_ID_SIZE],
                      const struct journal_generation *history,
                      uint32_t history_len, uint64_t epoch)
{
  static const uint8_t zero[JOURNAL_ID_SIZE];
  struct journal_state st;
  uint32_t i;

  if (check_usable (j) == -1 || check_idle (j, "journal_set_identity") == -1)
    return -1;
  if (memcmp (volume_id, zero, JOURNAL_ID_SIZE) == 0)
    return jerr (j, 0, "journal_set_identity: %s: the volume id is zero",
                 j->state_path);
  if (history_len == 0 || history_len > JOURNAL_MAX_HISTORY)
    return jerr (j, 0, "journal_set_identity: %s: a history of %" PRIu32
                 " generations (1 to %d)", j->state_path, history_len,
                 JOURNAL_MAX_HISTORY);
  for (i = 1; i < history_len; i++)
    if (history[i].first_epoch < history[i - 1].first_epoch)
      return jerr (j, 0, "journal_set_identity: %s: generation history not "
                   "in epoch order", j->state_path);
  st = j->st;
  memcpy (st.volume_id, volume_id, JOURNAL_ID_SIZE);
  memcpy (st.history, history, history_len * sizeof *history);
  st.history_len = history_len;
  memcpy (st.generation_id, history[history_len - 1].id, JOURNAL_ID_SIZE);
  st.committed_epoch = st.applied_epoch = epoch;
  /* A leftover of an old epoch above the new applied one must never be
   * taken for a committed epoch of this identity: empty it for good.
   */
  if (truncate_journal (j) == -1)
    return -1;
  if (fsync (j->jfd) == -1)
    return set_broken (j, errno, "fsync", j->journal_path);
  return state_save (j, &st);
}

int
journal_new_generation (struct journal *j, const uint8_t id[JOURNAL_ID_SIZE],
                        uint64_t first_epoch)
{
  struct journal_state st;

  if (check_usable (j) == -1 ||
      check_idle (j, "journal_new_generation") == -1)
    return -1;
  if (j->st.history_len == 0)
    return jerr (j, 0, "journal_new_generation: %s: no identity yet",
                 j->state_path);
  if (j->st.history_len == JOURNAL_MAX_HISTORY)
    return jerr (j, 0, "journal_new_generation: %s: generation history "
                 "full (%d)", j->state_path, JOURNAL_MAX_HISTORY);
  if (memcmp (id, j->st.generation_id, JOURNAL_ID_SIZE) == 0)
    return jerr (j, 0, "journal_new_generation: %s: already the current "
                 "generation", j->state_path);
  if (first_epoch <= j->st.committed_epoch)
    return jerr (j, 0, "journal_new_generation: %s: first epoch %" PRIu64
                 " is not after the last committed epoch %" PRIu64,
                 j->state_path, first_epoch, j->st.committed_epoch);
  st = j->st;
  memcpy (st.history[st.history_len].id, id, JOURNAL_ID_SIZE);
  st.history[st.history_len].first_epoch = first_epoch;
  st.history_len++;
  memcpy (st.generation_id, id, JOURNAL_ID_SIZE);
  return state_save (j, &st);
}

/* ---- one epoch ---- */

int
journal_begin (struct journal *j, uint64_t epoch,
               const uint8_t generation[JOURNAL_ID_SIZE])
{
  unsigned char block[EXTENTS_OFFSET];
  struct rec r = { .type = REC_BEGIN, .epoch = epoch };

  if (check_usable (j) == -1 || check_idle (j, "journal_begin") == -1)
    return -1;
  if (j->st.history_len == 0)
    return jerr (j, 0, "journal_begin: %s: no identity (not paired)",
                 j->state_path);
  if (memcmp (generation, j->st.generation_id, JOURNAL_ID_SIZE) != 0)
    return jerr (j, 0, "journal_begin: %s: epoch %" PRIu64 " is of another "
                 "generation than the current one", j->state_path, epoch);
  if (epoch <= j->st.committed_epoch)
    return jerr (j, 0, "journal_begin: %s: epoch %" PRIu64 " is not after "
                 "the last committed epoch %" PRIu64, j->journal_path, epoch,
                 j->st.committed_epoch);
  if (getrandom (&r.nonce, sizeof r.nonce, 0) != sizeof r.nonce)
    return jerr (j, errno, "getrandom: nonce for %s", j->journal_path);
  if (truncate_journal (j) == -1)
    return -1;
  memset (block, 0, sizeof block);
  memcpy (r.body, generation, JOURNAL_ID_SIZE);
  put_u64 (r.body + 16, j->st.disk_size);
  put_u32 (r.body + 24, j->st.cluster_size);
  rec_encode (block + BEGIN_OFFSET, &r);
  step (JOURNAL_STEP_JOURNAL_WRITE);
  if (full_pwrite (j->jfd, block, sizeof block, 0) == -1)
    return jerr (j, errno, "pwrite: %s", j->journal_path);
  j->phase = PHASE_OPEN;
  j->epoch = epoch;
  j->nonce = r.nonce;
  j->count = 0;
  j->pos = EXTENTS_OFFSET;
  journal_digest_init (&j->digest);
  return 0;
}

/* Write an EXTENT record's block and its data with O_DIRECT, if the
 * data can go that way: 0 when written, -1 to write it through the page
 * cache instead.  A file system that refuses this alignment after all
 * (EINVAL) is not asked again.
 */
static int
write_direct (struct journal *j, const void *data, uint32_t length,
              const struct iovec iov[2])
{
  struct iovec v[2] = { iov[0], iov[1] };

  if (j->jdfd == -1 || data == NULL ||
      (uintptr_t) data % REC_BLOCK != 0 || length % REC_BLOCK != 0)
    return -1;
  if (full_pwritev (j->jdfd, v, 2, j->pos) == 0)
    return 0;
  direct_refused (j);
  return -1;
}

static int
add_extent (struct journal *j, uint64_t offset, uint32_t length,
            uint32_t flags, const void *data, uint64_t checksum, bool verify)
{
  const struct journal_extent e = { offset, length, flags, checksum };
  bool is_data = flags == JOURNAL_EXTENT_DATA;
  struct rec r = { .type = REC_EXTENT, .nonce = j->nonce, .epoch = j->epoch };
  struct iovec iov[2];
  const char *why;

  if (check_open (j, "journal_add_extent") == -1)
    return -1;
  why = extent_problem (&j->st, offset, length, flags);
  if (why == NULL && is_data && data == NULL)
    why = "DATA extent without data";
  if (why == NULL && !is_data && (data != NULL || checksum != 0))
    why = "ZERO extent with data or a checksum";
  if (why == NULL && is_data && verify &&
      journal_checksum (data, length) != checksum)
    why = "checksum mismatch: the data does not match its checksum";
  if (why) {
    jerr (j, 0, "journal_add_extent: %s: epoch %" PRIu64 " refused: extent %"
          PRIu64 " (offset %" PRIu64 ", length %" PRIu32 "): %s",
          j->journal_path, j->epoch, j->count, offset, length, why);
    return refuse (j);
  }
  put_u64 (r.body, offset);
  put_u32 (r.body + 8, length);
  put_u32 (r.body + 12, flags);
  put_u64 (r.body + 16, checksum);
  put_u64 (r.body + 24, j->count);
  rec_encode (j->recblock, &r);
  iov[0] = (struct iovec) { .iov_base = j->recblock, .iov_len = REC_BLOCK };
  iov[1] = (struct iovec) { .iov_base = (void *) data, .iov_len = length };
  step (JOURNAL_STEP_JOURNAL_WRITE);
  if (write_direct (j, is_data ? data : NULL, length, iov) == -1 &&
      full_pwritev (j->jfd, iov, is_data ? 2 : 1, j->pos) == -1) {
    jerr (j, errno, "pwrite: %s: epoch %" PRIu64 " refused",
          j->journal_path, j->epoch);
    return refuse (j);
  }
  j->pos = block_up (j->pos + REC_BLOCK + (is_data ? length : 0));
  j->count++;
  journal_digest_add (&j->digest, &e);
  return 0;
}

int
journal_add_extent (struct journal *j, uint64_t offset, uint32_t length,
                    uint32_t flags, const void *data, uint64_t checksum)
{
  return add_extent (j, offset, length, flags, data, checksum, true);
}

int
journal_add_verified_extent (struct journal *j, uint64_t offset,
                             uint32_t length, uint32_t flags,
                             const void *data, uint64_t checksum)
{
  return add_extent (j, offset, length, flags, data, checksum, false);
}

int
journal_end (struct journal *j, uint64_t extent_count, uint64_t digest)
{
  unsigned char raw[REC_SIZE];
  struct rec r = { .type = REC_COMMIT, .nonce = j->nonce, .epoch = j->epoch };
  uint64_t mine;

  if (check_open (j, "journal_end") == -1)
    return -1;
  if (extent_count != j->count) {
    jerr (j, 0, "journal_end: %s: epoch %" PRIu64 " refused: extent count "
          "mismatch: %" PRIu64 " announced, %" PRIu64 " received",
          j->journal_path, j->epoch, extent_count, j->count);
    return refuse (j);
  }
  mine = journal_digest_final (&j->digest);
  if (digest != mine) {
    jerr (j, 0, "journal_end: %s: epoch %" PRIu64 " refused: digest "
          "mismatch: %016" PRIx64 " announced, %016" PRIx64 " computed",
          j->journal_path, j->epoch, digest, mine);
    return refuse (j);
  }
  /* The extents first: a COMMIT record must never be durable before
   * what it commits.  Failing here leaves no COMMIT: only refused.
   */
  step (JOURNAL_STEP_JOURNAL_SYNC);
  if (fdatasync (j->jfd) == -1) {
    jerr (j, errno, "fdatasync: %s: epoch %" PRIu64 " refused",
          j->journal_path, j->epoch);
    return refuse (j);
  }
  put_u64 (r.body, j->count);
  put_u64 (r.body + 8, mine);
  put_u64 (r.body + 16, j->pos);
  rec_encode (raw, &r);
  step (JOURNAL_STEP_JOURNAL_WRITE);
  if (full_pwrite (j->jfd, raw, REC_SIZE, COMMIT_OFFSET) == -1)
    return set_broken (j, errno, "pwrite (commit record)", j->journal_path);
  step (JOURNAL_STEP_JOURNAL_SYNC);
  if (fdatasync (j->jfd) == -1)
    return set_broken (j, errno, "fdatasync (commit record)",
                       j->journal_path);
  j->phase = PHASE_COMMITTED;
  j->st.committed_epoch = j->epoch;
  step (JOURNAL_STEP_COMMITTED);
  return 0;
}

int
journal_abort (struct journal *j)
{
  if (check_usable (j) == -1)
    return -1;
  if (j->phase == PHASE_IDLE)
    return 0;
  if (j->phase == PHASE_COMMITTED)
    return jerr (j, 0, "journal_abort: %s: epoch %" PRIu64 " is committed: "
                 "it can only be applied", j->journal_path, j->epoch);
  reset_phase (j);
  return truncate_journal (j);
}
