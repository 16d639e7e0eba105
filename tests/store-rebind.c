/* store-rebind: give a persistent store fixture (tests/fixtures) the
 * identity of the disk file it is used with here.
 *
 *   store-rebind STORE DISK
 *
 * A store names its disk by an XXH3-128 hash of the disk file's device,
 * inode and size (docs/store-format.md, "disk_id"), so a store checked
 * into the repository belongs to a file of the machine that made it.
 * This rewrites the superblock's disk_id for DISK, and its checksum,
 * exactly as the engine computes them (server/disk.c, server/store.c),
 * and nothing else: the test then loads what the old code wrote.
 */

#include <config.h>

#include <endian.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include "fleece-wire.h"

int
main (int argc, char *argv[])
{
  struct { uint64_t dev, ino, size; } ident;
  struct fleece_superblock sb;
  struct stat st;
  XXH128_hash_t h;
  uint64_t sum;
  int fd;

  if (argc != 3) {
    fprintf (stderr, "usage: store-rebind STORE DISK\n");
    return 2;
  }
  if (stat (argv[2], &st) == -1 || !S_ISREG (st.st_mode)) {
    fprintf (stderr, "store-rebind: stat: %s: not a regular file\n",
             argv[2]);
    return 1;
  }
  fd = open (argv[1], O_RDWR | O_CLOEXEC);
  if (fd == -1 || pread (fd, &sb, sizeof sb, 0) != sizeof sb ||
      memcmp (sb.magic, FLEECE_STORE_MAGIC, 8) != 0) {
    fprintf (stderr, "store-rebind: %s: no Fleece superblock\n", argv[1]);
    return 1;
  }
  memset (&ident, 0, sizeof ident);
  ident.dev = st.st_dev;
  ident.ino = st.st_ino;
  ident.size = st.st_size;
  h = XXH3_128bits (&ident, sizeof ident);
  memcpy (sb.disk_id, &h.low64, 8);
  memcpy (sb.disk_id + 8, &h.high64, 8);
  sum = htole64 (XXH64 (&sb, offsetof (struct fleece_superblock, checksum),
                        0));
  memcpy (&sb.checksum, &sum, 8);
  if (pwrite (fd, &sb, sizeof sb, 0) != sizeof sb || close (fd) == -1) {
    fprintf (stderr, "store-rebind: pwrite: %s: %m\n", argv[1]);
    return 1;
  }
  return 0;
}
