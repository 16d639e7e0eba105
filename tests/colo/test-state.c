/* STATE_DIR/diverged (colo/state.c): what `fleece-colod demote' writes
 * and the secondary reads back.  Covers:
 *   - a single disk's file is the FLCODIV1 record alone, as before
 *     groups (its size is the 40-byte header, the bitmap and the xxh64);
 *   - a group's (FLCODIV2) reads back disk by disk, a disk with no bits
 *     too;
 *   - a damaged byte in a disk's record, a record cut short, a byte
 *     after the last record, a damaged group header: refused, naming
 *     the disk whose record is damaged when it is known;
 *   - a write that fails leaves no temporary file.
 */

#undef NDEBUG
#include <config.h>

#include <assert.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "state.h"
#include "tap.h"

static char dir[] = "/tmp/test-state.XXXXXX";

static bool
has (const char *s, const char *sub)
{
  return strstr (s, sub) != NULL;
}

static char *
path_of (const char *name)
{
  static char p[256];

  snprintf (p, sizeof p, "%s/%s", dir, name);
  return p;
}

static off_t
file_size (void)
{
  struct stat st;

  return stat (path_of ("diverged"), &st) == 0 ? st.st_size : -1;
}

/* Flip the byte at offset (from the end if negative), or cut the file
 * to offset bytes (cut), or append a byte (offset 0, append).
 */
static void
damage (off_t offset, bool cut, bool append)
{
  int fd = open (path_of ("diverged"), O_RDWR);
  off_t size = lseek (fd, 0, SEEK_END);
  unsigned char b;

  assert (fd >= 0);
  if (append)
    assert (pwrite (fd, "", 1, size) == 1);
  else if (cut)
    assert (ftruncate (fd, offset) == 0);
  else {
    if (offset < 0)
      offset += size;
    assert (pread (fd, &b, 1, offset) == 1);
    b ^= 0x10;
    assert (pwrite (fd, &b, 1, offset) == 1);
  }
  close (fd);
}

/* A group of n disks of 10, 20, ... clusters of 4096 bytes, disk 1
 * with no bits when n > 2, a few bits set on the others.
 */
static void
make_group (struct colo_diverged *d, uint32_t n)
{
  uint32_t i;

  memset (d, 0, sizeof *d);
  d->base = 42;
  d->cluster_size = 4096;
  d->disk_count = n;
  for (i = 0; i < n; i++) {
    d->disk_sizes[i] = (uint64_t) (i + 1) * 10 * 4096 - 100;
    if (n > 2 && i == 1)
      continue;
    d->nbits[i] = (i + 1) * 10;
    d->bits[i] = calloc ((d->nbits[i] + 7) / 8, 1);
    assert (d->bits[i]);
    d->bits[i][0] = 1u << i;
    d->bits[i][1] = 0x81;
  }
}

static bool
same (const struct colo_diverged *a, const struct colo_diverged *b)
{
  uint32_t i;

  if (a->base != b->base || a->cluster_size != b->cluster_size ||
      a->disk_count != b->disk_count)
    return false;
  for (i = 0; i < a->disk_count; i++)
    if (a->disk_sizes[i] != b->disk_sizes[i] || a->nbits[i] != b->nbits[i]
        || (a->nbits[i] &&
            memcmp (a->bits[i], b->bits[i], (a->nbits[i] + 7) / 8) != 0))
      return false;
  return true;
}

static int
rm_entry (const char *p, const struct stat *st, int flag, struct FTW *f)
{
  (void) st; (void) flag; (void) f;
  return remove (p);
}

int
main (void)
{
  struct colo_diverged w, r;
  char err[1024] = "";
  char magic[9] = "";
  int fd;

  if (mkdtemp (dir) == NULL)
    bail_out ("mkdtemp: %m");

  make_group (&w, 1);
  ok (colo_state_write_diverged (dir, &w, err, sizeof err) == 0 &&
      file_size () == 40 + 2 + 8, "a single disk's record: 50 bytes (%s)",
      err);
  fd = open (path_of ("diverged"), O_RDONLY);
  assert (fd >= 0 && read (fd, magic, 8) == 8);
  close (fd);
  ok (strcmp (magic, "FLCODIV1") == 0, "written as FLCODIV1, as before "
      "groups (%s)", magic);
  ok (colo_state_read_diverged (dir, &r, err, sizeof err) == 1 &&
      same (&w, &r), "and read back");
  colo_diverged_free (&r);
  damage (41, false, false);
  ok (colo_state_read_diverged (dir, &r, err, sizeof err) == -1 &&
      has (err, "diverged: damaged") && r.bits[0] == NULL,
      "a damaged bitmap is refused: %s", err);
  colo_diverged_free (&w);

  make_group (&w, 3);
  ok (colo_state_write_diverged (dir, &w, err, sizeof err) == 0,
      "a group of 3 disks, disk 1 with no bits, is written");
  fd = open (path_of ("diverged"), O_RDONLY);
  assert (fd >= 0 && read (fd, magic, 8) == 8);
  close (fd);
  ok (strcmp (magic, "FLCODIV2") == 0 &&
      file_size () == 32 + (48 + 2) + 48 + (48 + 4),
      "as FLCODIV2: a 32-byte header and a record per disk (%lld bytes)",
      (long long) file_size ());
  ok (access (path_of ("diverged.tmp"), F_OK) == -1,
      "no temporary file is left");
  ok (colo_state_read_diverged (dir, &r, err, sizeof err) == 1 &&
      same (&w, &r) && r.bits[1] == NULL,
      "and read back disk by disk");
  colo_diverged_free (&r);

  damage (-12, false, false);             /* disk 2's bitmap */
  ok (colo_state_read_diverged (dir, &r, err, sizeof err) == -1 &&
      has (err, "diverged: the record of disk 2 of 3 is damaged"),
      "a damaged byte of disk 2's record names it: %s", err);
  assert (colo_state_write_diverged (dir, &w, err, sizeof err) == 0);
  damage (32 + 50 + 28, false, false);    /* disk 1's disk index */
  ok (colo_state_read_diverged (dir, &r, err, sizeof err) == -1 &&
      has (err, "the record of disk 1 of 3 is damaged"),
      "a record with another disk's index is refused: %s", err);
  assert (colo_state_write_diverged (dir, &w, err, sizeof err) == 0);
  damage (32 + 50 + 48, true, false);     /* disk 2's record is gone */
  ok (colo_state_read_diverged (dir, &r, err, sizeof err) == -1 &&
      has (err, "the record of disk 2 of 3 is damaged"),
      "a file cut before the last record names it: %s", err);
  assert (colo_state_write_diverged (dir, &w, err, sizeof err) == 0);
  damage (0, false, true);
  ok (colo_state_read_diverged (dir, &r, err, sizeof err) == -1 &&
      has (err, "diverged: damaged"),
      "a byte after the last record is refused: %s", err);
  assert (colo_state_write_diverged (dir, &w, err, sizeof err) == 0);
  damage (20, false, false);              /* the header's disk count */
  ok (colo_state_read_diverged (dir, &r, err, sizeof err) == -1 &&
      has (err, "diverged: damaged"),
      "a damaged group header is refused: %s", err);
  colo_diverged_free (&r);

  ok (colo_state_remove_diverged (dir) &&
      colo_state_read_diverged (dir, &r, err, sizeof err) == 0,
      "removed, there is none");
  /* The rename fails: "diverged" is a directory. */
  assert (mkdir (path_of ("diverged"), 0700) == 0);
  ok (colo_state_write_diverged (dir, &w, err, sizeof err) == -1 &&
      has (err, "rename: ") && has (err, "diverged.tmp to ") &&
      access (path_of ("diverged.tmp"), F_OK) == -1,
      "a write that fails says where and leaves no temporary file: %s",
      err);
  assert (rmdir (path_of ("diverged")) == 0);
  colo_diverged_free (&w);

  nftw (dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
  return done ();
}
