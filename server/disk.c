/* The live disk: a regular file or a block device, opened once and used
 * with positioned I/O from every thread.
 *
 * Zeroing prefers what the kernel does without writing data
 * (FALLOC_FL_PUNCH_HOLE when the client allows trimming, then
 * FALLOC_FL_ZERO_RANGE, BLKZEROOUT on block devices) and falls back to
 * writing zeroes unless the client asked for a fast zero.  Trim punches a
 * hole in a file and is advisory on a block device (BLKDISCARD).  Nothing
 * here knows about snapshots: callers copy-before-write first.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include "internal.h"

/* The size of a block device. */
int
fl_block_size (int fd, const char *what, const char *path, uint64_t *size)
{
  if (ioctl (fd, BLKGETSIZE64, size) == -1)
    return fl_error (errno, "%s: ioctl BLKGETSIZE64: %s: %m", what, path);
  return 0;
}

int
disk_open (struct disk *d, const char *path, enum fleece_locking locking)
{
  struct stat st;
  struct { uint64_t dev, ino, size; } ident;
  XXH128_hash_t h;

  memset (d, 0, sizeof *d);
  d->fd = open (path, O_RDWR | O_CLOEXEC);
  if (d->fd == -1)
    return fl_error (errno, "disk: open: %s: %m", path);
  if (fstat (d->fd, &st) == -1) {
    fl_error (errno, "disk: fstat: %s: %m", path);
    goto out_close_fd;
  }
  if ((S_ISBLK (st.st_mode) || S_ISREG (st.st_mode)) &&
      fl_lock_image (d->fd, "disk", path, locking, &d->locked) == -1)
    goto out_close_fd;
  if (S_ISBLK (st.st_mode)) {
    d->is_block = true;
    if (fl_block_size (d->fd, "disk", path, &d->size) == -1)
      goto out_close_fd;
    if (ioctl (d->fd, BLKSSZGET, &d->logical_block) == -1) {
      fl_error (errno, "disk: ioctl BLKSSZGET: %s: %m", path);
      goto out_close_fd;
    }
    ident.dev = st.st_rdev;
    ident.ino = 0;
  }
  else if (S_ISREG (st.st_mode)) {
    d->size = st.st_size;
    d->can_punch = true;
    d->can_seek_data = true;
    ident.dev = st.st_dev;
    ident.ino = st.st_ino;
  }
  else {
    fl_error (EINVAL, "disk: %s: not a regular file or a block device",
              path);
    goto out_close_fd;
  }
  if (d->size == 0) {
    fl_error (EINVAL, "disk: %s: size is zero", path);
    goto out_close_fd;
  }
  ident.size = d->size;
  h = XXH3_128bits (&ident, sizeof ident);
  memcpy (d->id, &h.low64, 8);
  memcpy (d->id + 8, &h.high64, 8);
  d->path = strdup (path);
  if (d->path == NULL) {
    fl_error (ENOMEM, "disk: strdup: out of memory");
    goto out_close_fd;
  }
  return 0;

 out_close_fd:
  close (d->fd);
  d->fd = -1;
  return -1;
}

void
disk_close (struct disk *d)
{
  if (d->fd >= 0)
    close (d->fd);
  d->fd = -1;
  free (d->path);
  d->path = NULL;
}

int
disk_pread (struct disk *d, void *buf, size_t count, uint64_t offset)
{
  if (fleece_debug.fail_disk_read)
    return fl_error (EIO, "disk: pread: %s: offset %" PRIu64 ": injected "
                     "error (fleece.fail_disk_read)", d->path, offset);
  return fl_pread_all (d->fd, "disk", d->path, buf, count, offset);
}

int
disk_pwrite (struct disk *d, const void *buf, size_t count, uint64_t offset,
             bool fua)
{
  if (fleece_debug.fail_disk_write)
    return fl_error (EIO, "disk: pwrite: %s: offset %" PRIu64 ": injected "
                     "error (fleece.fail_disk_write)", d->path, offset);
  return fl_pwrite_all (d->fd, "disk", d->path, buf, count, offset, fua);
}

int
disk_flush (struct disk *d)
{
  return fl_fdatasync (d->fd, "disk", d->path);
}

static int
write_zeroes (struct disk *d, uint64_t count, uint64_t offset)
{
  static const char zeroes[65536];

  while (count > 0) {
    size_t n = count < sizeof zeroes ? count : sizeof zeroes;
    if (disk_pwrite (d, zeroes, n, offset, false) == -1)
      return -1;
    count -= n;
    offset += n;
  }
  return 0;
}

static bool
unsupported (int err)
{
  return err == EOPNOTSUPP || err == ENOSYS || err == ENOTTY ||
    err == EINVAL;
}

int
disk_zero (struct disk *d, uint64_t count, uint64_t offset, bool may_trim,
           bool fast, bool fua)
{
  if (d->is_block) {
    uint64_t range[2] = { offset, count };
    if (ioctl (d->fd, BLKZEROOUT, range) == 0)
      goto done;
    if (!unsupported (errno))
      return fl_error (errno, "disk: ioctl BLKZEROOUT: %s: %m", d->path);
  }
  else {
    if (may_trim && d->can_punch &&
        fallocate (d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   offset, count) == 0)
      goto done;
    if (fallocate (d->fd, FALLOC_FL_ZERO_RANGE, offset, count) == 0)
      goto done;
    if (!unsupported (errno))
      return fl_error (errno, "disk: fallocate: %s: %m", d->path);
  }
  if (fast)
    return fl_error (ENOTSUP, "disk: %s: no fast way to zero", d->path);
  if (write_zeroes (d, count, offset) == -1)
    return -1;
 done:
  return fua ? disk_flush (d) : 0;
}

int
disk_trim (struct disk *d, uint64_t count, uint64_t offset, bool fua)
{
  if (d->is_block) {
    uint64_t range[2] = { offset, count };
    if (ioctl (d->fd, BLKDISCARD, range) == -1 && !unsupported (errno))
      return fl_error (errno, "disk: ioctl BLKDISCARD: %s: %m", d->path);
  }
  else if (d->can_punch &&
           fallocate (d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      offset, count) == -1) {
    if (!unsupported (errno))
      return fl_error (errno, "disk: fallocate: %s: %m", d->path);
    d->can_punch = false;       /* a hint: racy but harmless */
  }
  return fua ? disk_flush (d) : 0;
}

/* Report data and holes in [offset, offset+count) with SEEK_DATA and
 * SEEK_HOLE; everything is data on a block device.
 */
int
disk_extents (struct disk *d, uint64_t count, uint64_t offset,
              fleece_extent_fn fn, void *opaque)
{
  uint64_t end = offset + count;

  if (!d->can_seek_data)
    return fn (opaque, offset, count, 0);

  while (offset < end) {
    off_t data = lseek (d->fd, offset, SEEK_DATA);
    off_t hole;

    if (data == -1 && errno == ENXIO)
      data = end;               /* a hole to the end of the file */
    else if (data == -1)
      return fl_error (errno, "disk: lseek SEEK_DATA: %s: %m", d->path);
    if ((uint64_t) data > offset) {
      uint64_t n = ((uint64_t) data < end ? (uint64_t) data : end) - offset;
      if (fn (opaque, offset, n, FLEECE_EXTENT_HOLE | FLEECE_EXTENT_ZERO)
          == -1)
        return -1;
      offset += n;
      continue;
    }
    hole = lseek (d->fd, offset, SEEK_HOLE);
    if (hole == -1)
      return fl_error (errno, "disk: lseek SEEK_HOLE: %s: %m", d->path);
    {
      uint64_t n = ((uint64_t) hole < end ? (uint64_t) hole : end) - offset;
      if (n == 0)
        n = end - offset;
      if (fn (opaque, offset, n, 0) == -1)
        return -1;
      offset += n;
    }
  }
  return 0;
}
