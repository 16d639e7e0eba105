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
 * Files: this one holds the journal's life (open and close, the
 * identity, begin, add, end, abort), the state file's writes and the
 * disk's; journal-format.c the records, their checksums and the epoch
 * digest; journal-replay.c reading a committed epoch back (verify,
 * apply, recovery).  They share struct journal (journal-internal.h) and
 * keep the one order of writes and syncs described above; the state
 * file's format is in state.c.
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
#include "journal-internal.h"
#include "le.h"
#include "state.h"

/* Set by a test (journal_set_test_hook) before it opens a journal,
 * then only read.
 */
static journal_test_hook_fn hook_fn;
static void *hook_opaque;

void
journal_set_test_hook (journal_test_hook_fn fn, void *opaque)
{
  hook_fn = fn;
  hook_opaque = opaque;
}

void
journal_step_hook (enum journal_step s)
{
  if (hook_fn)
    hook_fn (hook_opaque, s);
}

/* Record an error: "fmt: strerror (errnum)", or only fmt if errnum is 0,
 * or "fmt: unexpected end of file" for E_SHORT.
 */
int
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

int
journal_check_usable (struct journal *j)
{
  if (j->broken)
    return jerr (j, 0, "journal: %s: an earlier sync failed; reopen the "
                 "journal to recover", j->journal_path);
  return 0;
}

/* ---- I/O ---- */

/* Read (write false) or write all of iov[0..n-1] at off, retrying
 * short transfers and EINTR; 0, or -1 with errno (E_SHORT for a read
 * that met the end of the file).  iov is consumed.
 */
static int
full_io (bool write, int fd, struct iovec *iov, int n, uint64_t off)
{
  for (;;) {
    ssize_t r;

    while (n > 0 && iov->iov_len == 0) {
      iov++;
      n--;
    }
    if (n == 0)
      return 0;
    r = write ? pwritev (fd, iov, n, off) : preadv (fd, iov, n, off);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0 && !write) {
      errno = E_SHORT;
      return -1;
    }
    off += r;
    for (; n > 0 && r > 0; iov++, n--) {
      size_t k = (size_t) r < iov->iov_len ? (size_t) r : iov->iov_len;

      iov->iov_base = (char *) iov->iov_base + k;
      iov->iov_len -= k;
      r -= k;
      if (iov->iov_len > 0)
        break;
    }
  }
}

static int
full_pwritev (int fd, struct iovec *iov, int n, uint64_t off)
{
  return full_io (true, fd, iov, n, off);
}

static int
full_pwrite (int fd, const void *p, size_t len, uint64_t off)
{
  struct iovec iov = { .iov_base = (void *) p, .iov_len = len };

  return full_io (true, fd, &iov, 1, off);
}

int
journal_pread (int fd, void *p, size_t len, uint64_t off)
{
  struct iovec iov = { .iov_base = p, .iov_len = len };

  return full_io (false, fd, &iov, 1, off);
}

/* ---- the state file (its format: state.c) ---- */

/* Replace the state file atomically; j->st takes *st on success.  A
 * failure before the rename leaves the old file; one after it (the
 * directory's sync) leaves either, and is sticky.
 */
int
journal_state_save (struct journal *j, const struct journal_state *st)
{
  unsigned char buf[COLO_STATE_MAX];
  size_t len = colo_state_encode (st, buf);
  int fd;

  journal_step_hook (JOURNAL_STEP_STATE_WRITE);
  fd = open (j->tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd == -1)
    return jerr (j, errno, "open: %s", j->tmp_path);
  if (full_pwrite (fd, buf, len, 0) == -1) {
    jerr (j, errno, "write: %s", j->tmp_path);
    goto out_close;
  }
  journal_step_hook (JOURNAL_STEP_STATE_WRITE);
  if (fsync (fd) == -1) {
    jerr (j, errno, "fsync: %s", j->tmp_path);
    goto out_close;
  }
  if (close (fd) == -1)
    return jerr (j, errno, "close: %s", j->tmp_path);
  journal_step_hook (JOURNAL_STEP_STATE_WRITE);
  if (rename (j->tmp_path, j->state_path) == -1)
    return jerr (j, errno, "rename: %s to %s", j->tmp_path, j->state_path);
  journal_step_hook (JOURNAL_STEP_STATE_WRITE);
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

int
journal_disk_write (struct journal *j, unsigned d, const void *p, size_t len,
                    uint64_t off)
{
  journal_step_hook (JOURNAL_STEP_DISK_WRITE);
  if (full_pwrite (j->dfd[d], p, len, off) == -1)
    return jerr (j, errno, "pwrite: %s", j->disk_path[d]);
  return 0;
}

/* Make [off, off+len) read as zeroes: BLKZEROOUT on a block device,
 * ZERO_RANGE or PUNCH_HOLE on a file, and writing zeroes if neither
 * works there (e.g. a range that is not sector-aligned).
 */
int
journal_disk_zero (struct journal *j, unsigned d, uint64_t off, uint64_t len)
{
  int fd = j->dfd[d];

  journal_step_hook (JOURNAL_STEP_DISK_WRITE);
  if (j->disk_is_blk[d]) {
    uint64_t range[2] = { off, len };

    if (ioctl (fd, BLKZEROOUT, range) == 0)
      return 0;
    if (errno != EINVAL && errno != EOPNOTSUPP && errno != ENOTTY)
      return jerr (j, errno, "ioctl BLKZEROOUT: %s", j->disk_path[d]);
  }
  else {
    if (fallocate (fd, FALLOC_FL_ZERO_RANGE, off, len) == 0)
      return 0;
    if (fallocate (fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   off, len) == 0)
      return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL)
      return jerr (j, errno, "fallocate: %s", j->disk_path[d]);
  }
  memset (j->buf, 0, IO_BUF_SIZE);
  while (len > 0) {
    size_t n = len < IO_BUF_SIZE ? len : IO_BUF_SIZE;

    if (full_pwrite (fd, j->buf, n, off) == -1)
      return jerr (j, errno, "pwrite: %s", j->disk_path[d]);
    off += n;
    len -= n;
  }
  return 0;
}

/* ---- the journal's life ---- */

void
journal_reset_phase (struct journal *j)
{
  j->phase = PHASE_IDLE;
  j->epoch = j->nonce = j->count = 0;
  j->pos = 0;
}

/* Empty the journal.  Not synced: see the comment at the top. */
int
journal_truncate (struct journal *j)
{
  journal_step_hook (JOURNAL_STEP_RESET);
  if (ftruncate (j->jfd, 0) == -1)
    return jerr (j, errno, "ftruncate: %s", j->journal_path);
  return 0;
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
  if (journal_check_usable (j) == -1)
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
load_or_init_state (struct journal *j, const uint64_t *sizes,
                    uint32_t cluster_size)
{
  struct journal_state st;
  unsigned d;
  int r = state_load (j);

  if (r == -1)
    return -1;
  if (r == 0) {
    memset (&st, 0, sizeof st);
    st.disk_size = sizes[0];
    st.cluster_size = cluster_size;
    st.disk_count = j->ndisks;
    memcpy (st.disk_sizes, sizes, j->ndisks * sizeof *sizes);
    return journal_state_save (j, &st);
  }
  if (j->st.disk_count != j->ndisks)
    return jerr (j, 0, "open: %s: made for a group of %" PRIu32 " disks, "
                 "not %u", j->state_path, j->st.disk_count, j->ndisks);
  for (d = 0; d < j->ndisks; d++)
    if (j->st.disk_sizes[d] != sizes[d] || j->st.cluster_size != cluster_size)
      return jerr (j, 0, "open: %s: made for a disk %u (%s) of %" PRIu64
                   " bytes in clusters of %" PRIu32 ", not %" PRIu64
                   " in clusters of %" PRIu32, j->state_path, d,
                   j->disk_path[d], j->st.disk_sizes[d], j->st.cluster_size,
                   sizes[d], cluster_size);
  if (j->st.applied_epoch > j->st.committed_epoch)
    return jerr (j, 0, "open: %s: applied epoch %" PRIu64 " is after the "
                 "committed epoch %" PRIu64, j->state_path,
                 j->st.applied_epoch, j->st.committed_epoch);
  return 0;
}

static int
open_disk (struct journal *j, unsigned d, uint64_t disk_size)
{
  const char *path = j->disk_path[d];
  struct stat sb;
  uint64_t size;

  j->dfd[d] = open (path, O_RDWR | O_CLOEXEC);
  if (j->dfd[d] == -1)
    return jerr (j, errno, "open: %s", path);
  if (fstat (j->dfd[d], &sb) == -1)
    return jerr (j, errno, "fstat: %s", path);
  if (S_ISBLK (sb.st_mode)) {
    j->disk_is_blk[d] = true;
    if (ioctl (j->dfd[d], BLKGETSIZE64, &size) == -1)
      return jerr (j, errno, "ioctl BLKGETSIZE64: %s", path);
  }
  else if (S_ISREG (sb.st_mode))
    size = sb.st_size;
  else
    return jerr (j, 0, "open: %s: not a regular file or a block device",
                 path);
  if (size < disk_size)
    return jerr (j, 0, "open: %s: %" PRIu64 " bytes, smaller than the "
                 "replicated disk %u (%" PRIu64 " bytes)", path, size, d,
                 disk_size);
  return 0;
}

struct journal *
journal_open (const char *state_dir, const char *disk_path,
              uint64_t disk_size, uint32_t cluster_size,
              char *err, size_t errlen)
{
  return journal_open_group (state_dir, 1, &disk_path, &disk_size,
                             cluster_size, err, errlen);
}

/* Each disk's geometry, before anything is opened. */
static int
check_geometry (struct journal *j, const char *const *paths,
                const uint64_t *sizes, uint32_t cluster_size)
{
  unsigned d;

  for (d = 0; d < j->ndisks; d++)
    if (sizes[d] == 0 || cluster_size < MIN_CLUSTER ||
        cluster_size > MAX_CLUSTER || (cluster_size & (cluster_size - 1)))
      return jerr (j, 0, "journal_open: %s: invalid geometry: disk of %"
                   PRIu64 " bytes, clusters of %" PRIu32 " (a power of two, "
                   "512 to 64M)", paths[d], sizes[d], cluster_size);
  return 0;
}

struct journal *
journal_open_group (const char *state_dir, unsigned ndisks,
                    const char *const *disk_paths, const uint64_t *disk_sizes,
                    uint32_t cluster_size, char *err, size_t errlen)
{
  struct journal *j = calloc (1, sizeof *j);
  bool paths_ok = true;
  unsigned d;

  if (j == NULL) {
    snprintf (err, errlen, "calloc: %s", strerror (errno));
    return NULL;
  }
  if (ndisks < 1 || ndisks > JOURNAL_MAX_DISKS) {
    snprintf (err, errlen, "journal_open: %s: %u disks: a group has 1 to %d",
              state_dir, ndisks, JOURNAL_MAX_DISKS);
    free (j);
    return NULL;
  }
  j->dir_fd = j->jfd = j->jdfd = -1;
  j->ndisks = ndisks;
  for (d = 0; d < ndisks; d++) {
    j->dfd[d] = -1;
    j->disk_path[d] = strdup (disk_paths[d]);
    paths_ok = paths_ok && j->disk_path[d];
  }
  j->state_path = path_join (state_dir, "state");
  j->tmp_path = path_join (state_dir, "state.tmp");
  j->journal_path = path_join (state_dir, "journal");
  if (posix_memalign ((void **) &j->buf, REC_BLOCK, IO_BUF_SIZE) != 0)
    j->buf = NULL;
  if (posix_memalign ((void **) &j->recblock, REC_BLOCK, REC_BLOCK) != 0)
    j->recblock = NULL;
  else
    memset (j->recblock, 0, REC_BLOCK);
  if (!j->state_path || !j->tmp_path || !j->journal_path || !paths_ok ||
      !j->buf || !j->recblock) {
    errno = ENOMEM;
    jerr (j, errno, "journal_open: %s", state_dir);
    goto out_close;
  }
  if (check_geometry (j, disk_paths, disk_sizes, cluster_size) == -1 ||
      open_state_dir (j, state_dir) == -1 ||
      load_or_init_state (j, disk_sizes, cluster_size) == -1)
    goto out_close;
  for (d = 0; d < ndisks; d++)
    if (open_disk (j, d, disk_sizes[d]) == -1)
      goto out_close;
  if (journal_recover (j) == -1)
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
  unsigned d;

  if (j == NULL)
    return;
  for (d = 0; d < j->ndisks; d++) {
    if (j->dfd[d] >= 0)
      close (j->dfd[d]);
    free (j->disk_path[d]);
  }
  if (j->jdfd >= 0)
    close (j->jdfd);
  if (j->jfd >= 0)
    close (j->jfd);             /* and the lock with it */
  if (j->dir_fd >= 0)
    close (j->dir_fd);
  free (j->state_path);
  free (j->tmp_path);
  free (j->journal_path);
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

  if (journal_check_usable (j) == -1 ||
      check_idle (j, "journal_set_identity") == -1)
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
  if (journal_truncate (j) == -1)
    return -1;
  if (fsync (j->jfd) == -1)
    return set_broken (j, errno, "fsync", j->journal_path);
  return journal_state_save (j, &st);
}

int
journal_new_generation (struct journal *j, const uint8_t id[JOURNAL_ID_SIZE],
                        uint64_t first_epoch)
{
  struct journal_state st;

  if (journal_check_usable (j) == -1 ||
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
  return journal_state_save (j, &st);
}

/* ---- one epoch ---- */

int
journal_begin (struct journal *j, uint64_t epoch,
               const uint8_t generation[JOURNAL_ID_SIZE])
{
  unsigned char block[EXTENTS_OFFSET];
  struct rec r = { .type = REC_BEGIN, .epoch = epoch };

  if (journal_check_usable (j) == -1 || check_idle (j, "journal_begin") == -1)
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
  if (journal_truncate (j) == -1)
    return -1;
  memset (block, 0, sizeof block);
  memcpy (r.body, generation, JOURNAL_ID_SIZE);
  put_u64 (r.body + 16, j->st.disk_size);
  put_u32 (r.body + 24, j->st.cluster_size);
  put_u32 (r.body + 28, j->st.disk_count);
  journal_rec_encode (block + BEGIN_OFFSET, &r);
  journal_step_hook (JOURNAL_STEP_JOURNAL_WRITE);
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
  journal_direct_refused (j);
  return -1;
}

static int
add_extent (struct journal *j, uint64_t offset, uint32_t length,
            uint32_t flags, const void *data, uint64_t checksum, bool verify)
{
  const struct journal_extent e = { offset, length, flags, checksum };
  bool is_data = JOURNAL_EXTENT_KIND (flags) == JOURNAL_EXTENT_DATA;
  struct rec r = { .type = REC_EXTENT, .nonce = j->nonce, .epoch = j->epoch };
  struct iovec iov[2];
  const char *why;

  if (check_open (j, "journal_add_extent") == -1)
    return -1;
  why = journal_extent_problem (&j->st, offset, length, flags);
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
  journal_rec_encode (j->recblock, &r);
  iov[0] = (struct iovec) { .iov_base = j->recblock, .iov_len = REC_BLOCK };
  iov[1] = (struct iovec) { .iov_base = (void *) data, .iov_len = length };
  journal_step_hook (JOURNAL_STEP_JOURNAL_WRITE);
  if (write_direct (j, is_data ? data : NULL, length, iov) == -1 &&
      full_pwritev (j->jfd, iov, is_data ? 2 : 1, j->pos) == -1) {
    jerr (j, errno, "pwrite: %s: epoch %" PRIu64 " refused",
          j->journal_path, j->epoch);
    return refuse (j);
  }
  j->pos = journal_block_up (j->pos + REC_BLOCK + (is_data ? length : 0));
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
  journal_step_hook (JOURNAL_STEP_JOURNAL_SYNC);
  if (fdatasync (j->jfd) == -1) {
    jerr (j, errno, "fdatasync: %s: epoch %" PRIu64 " refused",
          j->journal_path, j->epoch);
    return refuse (j);
  }
  put_u64 (r.body, j->count);
  put_u64 (r.body + 8, mine);
  put_u64 (r.body + 16, j->pos);
  journal_rec_encode (raw, &r);
  journal_step_hook (JOURNAL_STEP_JOURNAL_WRITE);
  if (full_pwrite (j->jfd, raw, REC_SIZE, COMMIT_OFFSET) == -1)
    return set_broken (j, errno, "pwrite (commit record)", j->journal_path);
  journal_step_hook (JOURNAL_STEP_JOURNAL_SYNC);
  if (fdatasync (j->jfd) == -1)
    return set_broken (j, errno, "fdatasync (commit record)",
                       j->journal_path);
  j->phase = PHASE_COMMITTED;
  j->st.committed_epoch = j->epoch;
  journal_step_hook (JOURNAL_STEP_COMMITTED);
  return 0;
}

int
journal_abort (struct journal *j)
{
  if (journal_check_usable (j) == -1)
    return -1;
  if (j->phase == PHASE_IDLE)
    return 0;
  if (j->phase == PHASE_COMMITTED)
    return jerr (j, 0, "journal_abort: %s: epoch %" PRIu64 " is committed: "
                 "it can only be applied", j->journal_path, j->epoch);
  journal_reset_phase (j);
  return journal_truncate (j);
}
