/* Image locking (server/lock.c) against a model of QEMU's rules.
 *
 * Another process's QEMU-style lock is played by a second open file
 * description of the same file holding one byte: OFD locks conflict
 * between descriptions even in one process.  For every byte QEMU may
 * lock (100 + p: "holds permission p", 200 + p: "refuses p to others",
 * p = 0..4), fleece_open must be refused exactly when QEMU's own check
 * would refuse an image that holds consistent read and write and
 * refuses write, write unchanged and resize: someone holds write, write
 * unchanged or resize (101, 102, 103), or refuses consistent read or
 * write (200, 201); a refused open leaves nothing held (the next byte's
 * open succeeds).  Then: a second engine on the disk or on the store is
 * refused, naming it; locking=off opens anyway; closing releases; on a
 * file system without OFD locks (emulated) locking=on refuses and
 * locking=auto serves unlocked.
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fleece.h"
#include "tap.h"
#include "test-engine.h"

static bool
mentions (const char *what)
{
  return strstr (fleece_last_error (), what) != NULL;
}

/* Hold one byte of path's image, as QEMU does (a read lock), on an open
 * file description of its own; returns its descriptor.
 */
static int
other_lock (const char *path, off_t byte)
{
  struct flock fl = { .l_type = F_RDLCK, .l_whence = SEEK_SET,
                      .l_start = byte, .l_len = 1 };
  int fd = open (path, O_RDWR | O_CLOEXEC);

  if (fd == -1 || fcntl (fd, F_OFD_SETLK, &fl) == -1)
    bail_out ("other_lock: %s: byte %d: %m", path, (int) byte);
  return fd;
}

static struct fleece *
try_open (const char *disk, const char *store, enum fleece_locking locking)
{
  struct fleece_config cfg = { .disk = disk, .store = store,
                               .locking = locking };

  return fleece_open (&cfg);
}

static void
test_qemu_bytes (const char *disk, const char *store)
{
  static const int bytes[] = { 100, 101, 102, 103, 104,
                                200, 201, 202, 203, 204 };
  size_t i;

  for (i = 0; i < sizeof bytes / sizeof bytes[0]; i++) {
    int b = bytes[i];
    bool refused = b == 101 || b == 102 || b == 103 || b == 200 || b == 201;
    struct fleece *fl;
    int fd;

    fd = other_lock (disk, b);
    errno = 0;
    fl = try_open (disk, store, FLEECE_LOCKING_ON);
    if (refused)
      ok (fl == NULL && errno == EBUSY && mentions (disk) &&
          mentions ("in use by another process") && mentions ("byte"),
          "another process holding QEMU's byte %d: refused: %s", b,
          fleece_last_error ());
    else
      ok (fl != NULL && strcmp (fleece_locking_state (fl), "on") == 0,
          "another process holding QEMU's byte %d: opened", b);
    fleece_close (fl);
    close (fd);
  }
}

static void
test_two_engines (const char *disk, const char *store)
{
  const char *disk2 = test_path ("disk2"), *store2 = test_path ("store2");
  struct fleece *a, *b;

  test_write_disk (disk2, NULL, 1 << 20);
  a = try_open (disk, store, FLEECE_LOCKING_ON);
  ok (a != NULL, "first engine opens");
  b = try_open (disk, store2, FLEECE_LOCKING_ON);
  ok (b == NULL && mentions (disk) && mentions ("locked for writing"),
      "second engine on the disk refused: %s", fleece_last_error ());
  b = try_open (disk2, store, FLEECE_LOCKING_AUTO);
  ok (b == NULL && mentions (store) && mentions ("store: "),
      "second engine on the store refused, also with locking=auto: %s",
      fleece_last_error ());
  b = try_open (disk, store2, FLEECE_LOCKING_OFF);
  ok (b != NULL && strcmp (fleece_locking_state (b), "off") == 0,
      "locking=off opens it anyway, and says so");
  fleece_close (b);
  fleece_close (a);
  b = try_open (disk, store2, FLEECE_LOCKING_ON);
  ok (b != NULL, "closing the first released its locks");
  fleece_close (b);
}

/* A file system without OFD locks (emulated): locking=on refuses to
 * start, saying what to do; locking=auto serves unlocked and says so.
 */
static void
test_no_ofd_locks (const char *disk, const char *store)
{
  struct fleece *fl;

  fleece_debug.no_ofd_locks = 1;
  errno = 0;
  fl = try_open (disk, store, FLEECE_LOCKING_ON);
  ok (fl == NULL && errno == ENOLCK && mentions (disk) &&
      mentions ("locking=auto"),
      "no OFD locks, locking=on: refused: %s", fleece_last_error ());
  fleece_close (fl);
  fl = try_open (disk, store, FLEECE_LOCKING_AUTO);
  ok (fl != NULL && strcmp (fleece_locking_state (fl), "unsupported") == 0,
      "no OFD locks, locking=auto: opened, locking unsupported");
  fleece_debug.no_ofd_locks = 0;
  fleece_close (fl);
}

int
main (int argc, char *argv[])
{
  const char *disk, *store;

  test_make_dir ("test-engine-lock");
  disk = test_path ("disk");
  store = test_path ("store");
  test_write_disk (disk, NULL, 1 << 20);
  test_qemu_bytes (disk, store);
  test_two_engines (disk, store);
  test_no_ofd_locks (disk, store);
  return done ();
}
