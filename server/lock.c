/* Image locking: one writer per disk and per store, and QEMU agrees.
 *
 * A second writer on the live disk (another Fleece, qemu-nbd, a VM, a
 * qemu-io) changes clusters behind the copy-before-write path, so every
 * snapshot silently stops being what the disk was.  A second Fleece on
 * the store overwrites the first one's copies.  Both are refused here,
 * with the byte-range locks that QEMU's file-posix driver takes on the
 * images it opens, so that QEMU's tools and Fleece see each other:
 *
 *   byte 100 + p  held by whoever has permission p on the image;
 *   byte 200 + p  held by whoever does not let others have p;
 *
 * where p is 0 consistent read, 1 write, 2 write unchanged, 3 resize (4,
 * graph modification, is no longer used by QEMU and ignored here).  Every
 * lock is a read (shared) lock on one byte; a conflict is found by asking
 * F_OFD_GETLK whether a write lock on the byte could be had.  The locks
 * are open file description (OFD) locks: they belong to the descriptor,
 * not to the process, so they survive nbdkit's fork into the background,
 * are not dropped when some other descriptor of the file is closed, and
 * conflict with a second open of the same file even in this process.
 * Closing the descriptor (disk_close, store_close, or the process's end)
 * releases them.
 *
 * Fleece reads and writes the image and never resizes it, and lets others
 * read it but not change it:
 *
 *   it holds      consistent read, write             (bytes 100, 101)
 *   it refuses    write, write unchanged, resize     (bytes 201, 202, 203)
 *
 * the same as a QEMU VM's disk, except that a VM shares "write unchanged"
 * and Fleece, which must see every write, does not.  So while Fleece
 * serves a disk, QEMU refuses to open it for writing, and a plain reader
 * too (QEMU readers refuse to share "write"), exactly as for a VM's disk;
 * a reader that forces sharing (qemu-img -U, qemu-io -U) takes no lock
 * and works.  Fleece in turn refuses an image that someone writes or that
 * someone does not let it read or write.
 *
 * As QEMU does, the locks are taken first and the conflicts checked
 * after: two processes starting at once then both see each other and
 * both fail, rather than both succeeding.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* QEMU's RAW_LOCK_PERM_BASE and RAW_LOCK_SHARED_BASE. */
#define LOCK_PERM_BASE   100
#define LOCK_SHARED_BASE 200

enum {
  PERM_CONSISTENT_READ = 1 << 0,
  PERM_WRITE = 1 << 1,
  PERM_WRITE_UNCHANGED = 1 << 2,
  PERM_RESIZE = 1 << 3,
};
#define NPERMS 4

static const char *const perm_name[NPERMS] = {
  "consistent read", "write", "write unchanged", "resize",
};

#define HELD     (PERM_CONSISTENT_READ | PERM_WRITE)
#define REFUSED  (PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE)

static int
ofd_lock (int fd, int cmd, short type, off_t byte, struct flock *fl)
{
  int r;

  memset (fl, 0, sizeof *fl);
  fl->l_type = type;
  fl->l_whence = SEEK_SET;
  fl->l_start = byte;
  fl->l_len = 1;
  do
    r = fcntl (fd, cmd, fl);
  while (r == -1 && errno == EINTR);
  return r;
}

/* The errors of a kernel or a file system that has no OFD locks. */
static bool
unsupported (int err)
{
  return err == EINVAL || err == ENOTSUP || err == EOPNOTSUPP ||
    err == ENOSYS || err == ENOLCK;
}

static int
in_use (const char *what, const char *path, const char *why, int byte)
{
  return fl_error (EBUSY, "%s: %s: in use by another process (%s; QEMU "
                   "lock byte %d): stop that process first, or see LOCKING "
                   "in nbdkit-fleece-plugin(1)", what, path, why, byte);
}

/* Take our bytes.  Returns 1 if the file system has no OFD locks. */
static int
apply (int fd, const char *what, const char *path)
{
  struct flock fl;
  int p;

  if (fleece_debug.no_ofd_locks) {
    errno = ENOLCK;
    return 1;
  }
  for (p = 0; p < NPERMS; p++) {
    if ((HELD & (1 << p)) &&
        ofd_lock (fd, F_OFD_SETLK, F_RDLCK, LOCK_PERM_BASE + p, &fl) == -1)
      goto failed;
    if ((REFUSED & (1 << p)) &&
        ofd_lock (fd, F_OFD_SETLK, F_RDLCK, LOCK_SHARED_BASE + p, &fl) == -1)
      goto failed;
  }
  return 0;

 failed:
  if (unsupported (errno))
    return 1;
  if (errno == EAGAIN || errno == EACCES)
    return in_use (what, path, "locked: it holds an exclusive lock",
                   (int) fl.l_start);
  return fl_error (errno, "%s: fcntl F_OFD_SETLK: %s: %m", what, path);
}

/* Is byte held by another open file description? */
static int
held_elsewhere (int fd, const char *what, const char *path, off_t byte)
{
  struct flock fl;

  if (ofd_lock (fd, F_OFD_GETLK, F_WRLCK, byte, &fl) == -1)
    return fl_error (errno, "%s: fcntl F_OFD_GETLK: %s: %m", what, path);
  return fl.l_type != F_UNLCK;
}

/* Refuse the image if another holds byte (of permission p): how is what
 * that means ("locked: it does not let others have").
 */
static int
check_byte (int fd, const char *what, const char *path, int p, off_t byte,
            const char *how)
{
  char why[128];
  int r = held_elsewhere (fd, what, path, byte);

  if (r <= 0)
    return r;
  snprintf (why, sizeof why, "%s \"%s\" permission", how, perm_name[p]);
  return in_use (what, path, why, byte);
}

static int
check (int fd, const char *what, const char *path)
{
  int p;

  for (p = 0; p < NPERMS; p++) {
    if ((REFUSED & (1 << p)) &&
        check_byte (fd, what, path, p, LOCK_PERM_BASE + p, "locked for "
                    "writing: it has the image open with") == -1)
      return -1;
    if ((HELD & (1 << p)) &&
        check_byte (fd, what, path, p, LOCK_SHARED_BASE + p,
                    "locked: it does not let others have") == -1)
      return -1;
  }
  return 0;
}

static void
release (int fd)
{
  struct flock fl;
  int p;

  for (p = 0; p < NPERMS; p++) {
    ofd_lock (fd, F_OFD_SETLK, F_UNLCK, LOCK_PERM_BASE + p, &fl);
    ofd_lock (fd, F_OFD_SETLK, F_UNLCK, LOCK_SHARED_BASE + p, &fl);
  }
}

int
fl_lock_image (int fd, const char *what, const char *path,
               enum fleece_locking mode, bool *locked)
{
  int r;

  *locked = false;
  if (mode == FLEECE_LOCKING_OFF) {
    fl_debug ("%s: %s: not locked (locking=off): nothing keeps a second "
              "writer away", what, path);
    return 0;
  }
  r = apply (fd, what, path);
  if (r == 1) {
    int err = errno;
    release (fd);
    if (mode == FLEECE_LOCKING_AUTO) {
      errno = err;
      fl_debug ("%s: %s: not locked: the file system has no OFD locks "
                "(fcntl F_OFD_SETLK: %m); locking=auto goes on without",
                what, path);
      return 0;
    }
    return fl_error (err, "%s: fcntl F_OFD_SETLK: %s: %m: the file system "
                     "cannot lock it against a second writer; start with "
                     "locking=auto or locking=off to serve it unlocked "
                     "(see LOCKING in nbdkit-fleece-plugin(1))", what, path);
  }
  if (r == -1 || check (fd, what, path) == -1) {
    int err = errno;
    release (fd);
    errno = err;
    return -1;
  }
  *locked = true;
  return 0;
}

int
fleece_lock_image (int fd, const char *what, const char *path,
                   enum fleece_locking mode, bool *locked)
{
  return fl_lock_image (fd, what, path, mode, locked);
}
