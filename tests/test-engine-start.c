/* The engine's threads start in fleece_start, not in fleece_open (issue
 * 14): nbdkit opens the engine in .get_ready and forks into the
 * background (or, with --run, forks the server) afterwards, and a thread
 * does not survive fork.
 *
 * A persistent store's metadata log fills after about 2 MiB of records:
 * with 4 KiB clusters, about 512 MiB of first writes under a snapshot
 * (zeroes here, so that the disk stays sparse and the copies are records
 * only).  Then the compactor thread must write an image.
 *
 *  - Opened in one process and used in a forked child, as nbdkit does:
 *    the child calls fleece_start, its writes fill the log and go on past
 *    it, and fleece_close returns.  (When fleece_open started the thread,
 *    the child waited forever for an image.)
 *  - Without fleece_start, the writer that finds the log full fails with
 *    EIO and a message, instead of waiting forever; fleece_close still
 *    records the state, so the store loads again with its snapshot.
 *  - fleece_start twice is refused.
 * An alarm bounds every step: a hang fails the test.
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fleece.h"
#include "test-engine.h"

#define CS      4096u
#define MiB     (1024u * 1024u)
#define SIZE    (768ull * MiB)      /* the log fills once on the way */
#define CHUNK   (32u * MiB)
#define PATTERN 0xab                /* the disk's first MiB at the snapshot */
#define BOUND   120                 /* seconds for each step */

static const char *disk, *store;
/* The engine test_fork opens and leaves to its child, as nbdkit's parent
 * does: closing it here would write over the child's store.
 */
static struct fleece *parent_engine;

static struct fleece *
open_store (void)
{
  /* Unlocked: parent_engine keeps the locks it took, as nbdkit's parent
   * would if it did not exit, and the later opens are of the same files.
   */
  const struct fleece_config cfg = {
    .disk = disk, .store = store, .cluster_size = CS, .persistent = true,
    .locking = FLEECE_LOCKING_OFF,
  };

  return fleece_open (&cfg);
}

/* Zero the whole disk in CHUNKs; returns the bytes zeroed before the
 * first failure (errno set), or SIZE.
 */
static uint64_t
zero_all (struct fleece *fl)
{
  uint64_t off;

  for (off = 0; off < SIZE; off += CHUNK)
    if (fleece_live_zero (fl, CHUNK, off, FLEECE_F_MAY_TRIM) == -1)
      break;
  return off;
}

/* Snapshot name reads the disk as it was: PATTERN, then zeroes. */
static bool
snapshot_exact (struct fleece *fl, const char *name)
{
  struct fleece_snap *h = fleece_snap_get (fl, name);
  char *buf = malloc (MiB), *want = malloc (MiB);
  bool r = h != NULL && buf && want;
  uint64_t off;

  if (want)
    memset (want, PATTERN, MiB);
  for (off = 0; r && off < SIZE; off += MiB) {
    r = fleece_snap_pread (h, buf, MiB, off) == 0 &&
      memcmp (buf, want, MiB) == 0;
    if (off == 0 && want)
      memset (want, 0, MiB);
  }
  if (!r)
    diag ("snapshot %s: unreadable or different before offset %" PRIu64
          " (%s)", name, off, fleece_last_error ());
  fleece_snap_put (h);
  free (buf);
  free (want);
  return r;
}

static void
fresh_disk (void)
{
  char *first = malloc (MiB);

  assert (first);
  memset (first, PATTERN, MiB);
  test_write_disk (disk, first, MiB);
  if (truncate (disk, SIZE) == -1)      /* the rest sparse */
    bail_out ("truncate: %s: %m", disk);
  unlink (store);
  free (first);
}

/* The child of a fork, as nbdkit's serving process: exit status 0 if all
 * went well.
 */
static int
child (struct fleece *fl)
{
  /* Its own bound, should the parent die: an alarm does not survive
   * fork, and the parent's handler would remove the parent's directory.
   */
  signal (SIGALRM, SIG_DFL);
  alarm (2 * BOUND);
  if (fleece_start (fl) == -1 || fleece_snapshot_create (fl, "t") == -1) {
    fprintf (stderr, "child: %s\n", fleece_last_error ());
    return 1;
  }
  if (zero_all (fl) != SIZE) {
    fprintf (stderr, "child: zeroing: %s\n", fleece_last_error ());
    return 2;
  }
  fleece_close (fl);
  return 0;
}

/* Wait up to BOUND seconds for pid to exit. */
static bool
wait_child (pid_t pid, int *status)
{
  int i;

  for (i = 0; i < BOUND * 10; i++) {
    pid_t r = waitpid (pid, status, WNOHANG);
    if (r == -1)
      bail_out ("waitpid: %m");
    if (r == pid)
      return true;
    usleep (100000);
  }
  return false;
}

/* Opened here, served by a forked child. */
static void
test_fork (void)
{
  struct fleece *fl;
  pid_t pid;
  int status;

  fresh_disk ();
  parent_engine = open_store ();
  if (parent_engine == NULL)
    bail_out ("fleece_open: %s", fleece_last_error ());
  fflush (stdout);
  pid = fork ();
  if (pid == -1)
    bail_out ("fork: %m");
  if (pid == 0)
    _exit (child (parent_engine));
  if (!wait_child (pid, &status)) {
    diag ("the child still ran after %d s: killed", BOUND);
    kill (pid, SIGKILL);
    waitpid (pid, &status, 0);
  }
  ok (WIFEXITED (status) && WEXITSTATUS (status) == 0,
      "opened before fork, started in the child: %llu MiB of first writes "
      "go past the full log, and fleece_close returns (status %d)",
      (unsigned long long) (SIZE / MiB), status);

  alarm (BOUND);
  fl = open_store ();
  ok (fl != NULL && fleece_start (fl) == 0,
      "the store loads after the child's clean stop");
  if (fl) {
    ok (snapshot_exact (fl, "t"), "snapshot t is exact");
    bool refused;
    errno = 0;
    refused = fleece_start (fl) == -1 && errno == EINVAL;
    ok (refused, "fleece_start twice is refused: %s", fleece_last_error ());
    fleece_close (fl);
  }
  alarm (0);
}

/* Never started: a full log is an error, not a wait. */
static void
test_never_started (void)
{
  struct fleece *fl;
  uint64_t done_;
  int err;

  fresh_disk ();
  alarm (BOUND);
  fl = open_store ();
  if (fl == NULL || fleece_snapshot_create (fl, "s") == -1)
    bail_out ("%s", fleece_last_error ());
  done_ = zero_all (fl);
  err = errno;
  ok (done_ > 0 && done_ < SIZE && err == EIO &&
      strstr (fleece_last_error (), "fleece_start") != NULL,
      "without fleece_start, the write that finds the log full fails with "
      "EIO after %" PRIu64 " MiB: %s", done_ / MiB, fleece_last_error ());
  fleece_close (fl);
  alarm (0);
  ok (1, "fleece_close returns without fleece_start");

  alarm (BOUND);
  fl = open_store ();
  ok (fl != NULL && fleece_start (fl) == 0,
      "the store loads after a close without fleece_start");
  if (fl) {
    ok (snapshot_exact (fl, "s"), "snapshot s is exact");
    done_ = zero_all (fl);
    ok (done_ == SIZE, "started, the writes that failed go through "
        "(%" PRIu64 " MiB)", done_ / MiB);
    fleece_close (fl);
  }
  alarm (0);
}

int
main (void)
{
  test_make_dir ("test-engine-start");
  signal (SIGALRM, test_on_signal);
  disk = test_path ("disk");
  store = test_path ("store");
  test_fork ();
  test_never_started ();
  return done ();
}
