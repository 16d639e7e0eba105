/* fleece-colod secondary: its disks (secondary.c's note describes the
 * role): the locks it holds on every disk of the group while it alone
 * may write them, and their sizes, checked against the primary's at
 * the pairing.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "fleece.h"
#include "colod.h"
#include "log.h"
#include "secondary-internal.h"

/* ---- the disk's locks (nbdkit-fleece-plugin(1), LOCKING) ----
 *
 * While this side is a secondary, it alone may write the disk: it holds
 * the QEMU-compatible locks that the plugin takes, on a descriptor of
 * its own, so that nbdkit with the plugin, a VM or qemu-nbd cannot open
 * the disk for writing meanwhile, and a disk one of them has open is
 * refused.  Promotion hands the disk over: the locks go before
 * --on-promote starts a server on it, and a promoted side restarted
 * takes none.  On a file system without OFD locks it goes on unlocked
 * (the plugin's locking=auto).
 */
static int
lock_one_disk (const char *path, int *out, char *err, size_t errlen)
{
  bool locked;
  int fd;

  fd = open (path, O_RDWR | O_CLOEXEC);
  if (fd == -1) {
    snprintf (err, errlen, "open: %s: %s", path, strerror (errno));
    return -1;
  }
  if (fleece_lock_image (fd, "disk", path, FLEECE_LOCKING_AUTO,
                         &locked) == -1) {
    snprintf (err, errlen, "%s", fleece_last_error ());
    close (fd);
    return -1;
  }
  if (!locked)
    colod_warn ("disk %s: not locked: its file system has no OFD locks",
               path);
  *out = fd;
  return 0;
}

/* Every disk of the group, or none. */
int
secondary_lock_disks (char *err, size_t errlen)
{
  unsigned i;

  if (sec.locked)
    return 0;
  for (i = 0; i < colod.opt.ndisks; i++)
    if (lock_one_disk (colod.opt.disks[i], &sec.lock_fd[i], err,
                       errlen) == -1) {
      while (i > 0)
        close (sec.lock_fd[--i]);
      return -1;
    }
  sec.locked = true;
  return 0;
}

void
secondary_unlock_disk (void)
{
  unsigned i;

  if (!sec.locked)
    return;
  for (i = 0; i < colod.opt.ndisks; i++)
    close (sec.lock_fd[i]);
  sec.locked = false;
}

/* The size of a disk (file or block device), or -1: the journal says
 * why when it opens it.
 */
int64_t
secondary_disk_bytes (const char *path)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  off_t end;

  if (fd == -1)
    return -1;
  end = lseek (fd, 0, SEEK_END);
  close (fd);
  return end;
}
