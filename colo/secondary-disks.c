/* fleece-colod secondary: its disks (secondary.c's note describes the
 * role): the locks it holds on every disk of the group while it alone
 * may write them, their sizes, checked against the primary's at the
 * pairing, and the clusters a demoted primary wrote on them (diverged).
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
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

/* ---- the disks' diverged clusters: STATE_DIR/diverged (state.c) ---- */

/* 1 with the file's contents in *d (colo_diverged_free), 0 none, -1
 * bad (said why).
 */
int
secondary_read_diverged (struct colo_diverged *d)
{
  char err[PATH_MAX + 128];
  int r = colo_state_read_diverged (colod.opt.state_dir, d, err,
                                    sizeof err);

  if (r == -1)
    colod_log ("%s: ignored; the resync will be a full copy of every "
               "disk", err);
  return r;
}

/* Is d of the group js describes?  If not, say why: the resync is then
 * a full copy.
 */
bool
secondary_diverged_fits (const struct colo_diverged *d,
                         const struct journal_state *js)
{
  char path[PATH_MAX];
  uint32_t i;

  colo_state_path (colod.opt.state_dir, "diverged", path, sizeof path);
  if (d->disk_count != js->disk_count || d->cluster_size != js->cluster_size) {
    colod_log ("%s: of %" PRIu32 " disk%s in clusters of %" PRIu32 ", this "
               "secondary's group %" PRIu32 " in clusters of %" PRIu32 ": "
               "ignored; the resync will be a full copy of every disk", path,
               d->disk_count, d->disk_count == 1 ? "" : "s",
               d->cluster_size, js->disk_count, js->cluster_size);
    return false;
  }
  for (i = 0; i < d->disk_count; i++)
    if (d->disk_sizes[i] != js->disk_sizes[i]) {
      colod_log ("%s: disk %" PRIu32 " of %" PRIu64 " bytes, this "
                 "secondary's (--disk %s) of %" PRIu64 ": ignored; the "
                 "resync will be a full copy of every disk", path, i,
                 d->disk_sizes[i], colod.opt.disks[i], js->disk_sizes[i]);
      return false;
    }
  return true;
}

void
secondary_drop_diverged (void)
{
  char path[PATH_MAX];

  colo_state_path (colod.opt.state_dir, "diverged", path, sizeof path);
  if (colo_state_remove_diverged (colod.opt.state_dir))
    colod_log ("the diverged clusters are replaced: %s removed", path);
}
