/* fleece-backup: a file or a block device as the target.
 *
 * Full and top pulls write into a new sparse file, whose holes need no
 * writes (known_zero); an incremental pull writes onto the image of the
 * previous checkpoint, which must exist and have the source's size; a
 * block device is used as it is.  Operations are synchronous: each
 * completes its job before it returns, so the loop has nothing to poll
 * (rw->nbd is NULL).  Writes start their write-back at once
 * (sync_file_range), so that the flush (fdatasync) at the end of a batch
 * overlaps the copy.  Zeroes are a punched hole, else a zeroed range,
 * else written zeroes, downgraded once when the file system says no.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/falloc.h>
#include <linux/fs.h>

#include "backup.h"

enum { ZM_PUNCH, ZM_ZERO_RANGE, ZM_WRITE };

/* Read or write all of [off, off+len) of the target file, retrying
 * short transfers; a file that shrank under us is an I/O error.
 */
static int
file_io (struct rw *rw, bool write, char *buf, uint64_t len, uint64_t off)
{
  ssize_t r;

  while (len > 0) {
    r = write ? pwrite (rw->fd, buf, len, off) : pread (rw->fd, buf, len, off);
    if (r == -1 && errno == EINTR)
      continue;
    if (r <= 0) {
      if (r == 0)
        errno = EIO;
      return -1;
    }
    buf += r;
    len -= r;
    off += r;
  }
  return 0;
}

static int
file_pwrite (struct rw *rw, const char *buf, uint64_t len, uint64_t off)
{
  if (file_io (rw, true, (char *) buf, len, off) == -1)
    return -1;
  /* Start writing it back now, so that the flush at the end of the
   * batch overlaps the copy rather than following it.  Best effort: the
   * flush (fdatasync) is what makes the data stable.
   */
  (void) sync_file_range (rw->fd, off, len, SYNC_FILE_RANGE_WRITE);
  return 0;
}

static int
file_pread (struct rw *rw, char *buf, uint64_t len, uint64_t off)
{
  return file_io (rw, false, buf, len, off);
}

/* Zero a range of the target file: punch a hole, else zero the range,
 * else write zeroes.
 */
static int
file_zero (struct rw *rw, uint64_t len, uint64_t off)
{
  uint64_t n;

  if (rw->zero_method == ZM_PUNCH) {
    if (fallocate (rw->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   off, len) == 0)
      return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
      return -1;
    rw->zero_method = ZM_ZERO_RANGE;
  }
  if (rw->zero_method == ZM_ZERO_RANGE) {
    if (fallocate (rw->fd, FALLOC_FL_ZERO_RANGE, off, len) == 0)
      return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
      return -1;
    rw->zero_method = ZM_WRITE;
  }
  for (; len > 0; len -= n, off += n) {
    n = len < cfg.request_size ? len : cfg.request_size;
    if (file_pwrite (rw, zero_buf, n, off) == -1)
      return -1;
  }
  return 0;
}

/* A synchronous operation: complete the job now. */
static void
file_done (struct rw *rw, struct job *j, int r)
{
  job_completed (j, r == -1 ? errno : 0, rw->is_target);
}

static void
file_rw_pread (struct rw *rw, struct job *j, char *buf)
{
  file_done (rw, j, file_pread (rw, buf, j->length, j->offset));
}

static void
file_rw_pwrite (struct rw *rw, struct job *j, const char *buf)
{
  file_done (rw, j, file_pwrite (rw, buf, j->length, j->offset));
}

static void
file_rw_zero (struct rw *rw, struct job *j)
{
  file_done (rw, j, file_zero (rw, j->length, j->offset));
}

static void
file_rw_flush (struct rw *rw, struct job *j)
{
  file_done (rw, j, fdatasync (rw->fd));
}

static void
file_rw_close (struct rw *rw)
{
  if (close (rw->fd) == -1)
    die ("close: %s: %m", rw->uri);
  rw->fd = -1;
}

const struct rw_ops file_ops = {
  .name = "file",
  .pread = file_rw_pread,
  .pwrite = file_rw_pwrite,
  .zero = file_rw_zero,
  .flush = file_rw_flush,
  .close = file_rw_close,
};

/* Full and top pulls start from an empty sparse file, so that holes need
 * no writes; an incremental pull writes onto the previous image.  A
 * block device is used as it is.
 */
void
file_rw_open (struct rw *rw)
{
  bool fresh = cfg.sync != SYNC_INCREMENTAL;
  struct stat st;
  uint64_t size;

  rw->ops = &file_ops;
  rw->can_zero = true;          /* file_zero cuts at request_size */
  rw->can_flush = true;
  if (stat (rw->uri, &st) == 0 && S_ISBLK (st.st_mode)) {
    rw->fd = open (rw->uri, O_RDWR | O_CLOEXEC);
    if (rw->fd == -1)
      die ("open: %s: %m", rw->uri);
    if (ioctl (rw->fd, BLKGETSIZE64, &size) == -1)
      die ("ioctl BLKGETSIZE64: %s: %m", rw->uri);
    if (size < src.size)
      die ("target too small: %s is %" PRIu64 " bytes, the source is "
           "%" PRIu64 " bytes", rw->uri, size, src.size);
    return;
  }
  rw->fd = open (rw->uri, O_RDWR | O_CLOEXEC |
                 (fresh ? O_CREAT | O_TRUNC : 0), 0666);
  if (rw->fd == -1 && errno == ENOENT && !fresh)
    die ("target %s does not exist: an incremental pull writes onto the "
         "image of checkpoint '%s'", rw->uri, cfg.since);
  if (rw->fd == -1)
    die ("open: %s: %m", rw->uri);
  if (fstat (rw->fd, &st) == -1)
    die ("fstat: %s: %m", rw->uri);
  if (!S_ISREG (st.st_mode))
    die ("target %s is not a regular file or a block device", rw->uri);
  if (fresh) {
    if (ftruncate (rw->fd, src.size) == -1)
      die ("ftruncate: %s: %m", rw->uri);
    rw->known_zero = true;
  }
  else if ((uint64_t) st.st_size != src.size)
    die ("target %s is %" PRIi64 " bytes, the source is %" PRIu64 " bytes",
         rw->uri, (int64_t) st.st_size, src.size);
}
