/* Helpers shared by the engine tests (test-engine-*.c): a seeded PRNG, a
 * temporary directory removed at exit, disk files, and opening an engine.
 * Header-only: each test is one program.
 */

#ifndef FLEECE_TEST_ENGINE_H
#define FLEECE_TEST_ENGINE_H

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if defined __has_include
#if __has_include (<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define TEST_HAVE_VALGRIND_H 1
#endif
#endif

#include "fleece.h"
#include "tap.h"

/* ---- A seeded PRNG (splitmix64): deterministic given the seed. ---- */

struct rng {
  uint64_t s;
};

static inline uint64_t
rng_next (struct rng *r)
{
  uint64_t z = (r->s += UINT64_C (0x9e3779b97f4a7c15));

  z = (z ^ (z >> 30)) * UINT64_C (0xbf58476d1ce4e5b9);
  z = (z ^ (z >> 27)) * UINT64_C (0x94d049bb133111eb);
  return z ^ (z >> 31);
}

/* Uniform in [0, n), n > 0 (the bias is irrelevant here). */
static inline uint64_t
rng_below (struct rng *r, uint64_t n)
{
  return rng_next (r) % n;
}

/* True with probability 1/n. */
static inline bool
rng_one_in (struct rng *r, uint64_t n)
{
  return rng_below (r, n) == 0;
}

static inline void
rng_fill (struct rng *r, void *buf, size_t len)
{
  unsigned char *p = buf;

  while (len >= 8) {
    uint64_t x = rng_next (r);
    memcpy (p, &x, 8);
    p += 8;
    len -= 8;
  }
  if (len > 0) {
    uint64_t x = rng_next (r);
    memcpy (p, &x, len);
  }
}

/* The seed: $FLEECE_TEST_SEED if set, else from the clock.  Printed so
 * that a failing run can be repeated.
 */
static inline uint64_t
test_seed (void)
{
  const char *e = getenv ("FLEECE_TEST_SEED");
  uint64_t seed;

  if (e && *e)
    seed = strtoull (e, NULL, 0);
  else {
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    seed = (uint64_t) ts.tv_sec * 1000000007u ^ ts.tv_nsec ^
      ((uint64_t) getpid () << 32);
  }
  diag ("seed %" PRIu64 " (set FLEECE_TEST_SEED=%" PRIu64 " to repeat)",
        seed, seed);
  return seed;
}

/* Running under valgrind (make check-valgrind sets FLEECE_VALGRIND=1; a
 * direct "valgrind tests/test-..." is detected with valgrind.h when it is
 * installed): the tests do less work.
 */
static inline bool
test_under_valgrind (void)
{
  const char *e = getenv ("FLEECE_VALGRIND");

#ifdef TEST_HAVE_VALGRIND_H
  if (RUNNING_ON_VALGRIND)
    return true;
#endif
  return e && *e && strcmp (e, "0") != 0;
}

/* An unsigned from the environment, or def. */
static inline unsigned long
test_env_ulong (const char *name, unsigned long def)
{
  const char *e = getenv (name);

  return e && *e ? strtoul (e, NULL, 0) : def;
}

/* ---- The temporary directory, removed at exit. ---- */

#define TEST_MAX_FILES 16
static char test_dir[PATH_MAX];
static char test_files[TEST_MAX_FILES][PATH_MAX];

static inline void
test_cleanup (void)
{
  int i;

  if (test_dir[0] == '\0')
    return;
  for (i = 0; i < TEST_MAX_FILES; i++)
    if (test_files[i][0])
      unlink (test_files[i]);
  rmdir (test_dir);
  test_dir[0] = '\0';
}

/* Killed (^C, a timeout, a closed pipe) or crashed (an engine bug, a
 * failed assert): clean up, then die of the same signal.  unlink and
 * rmdir are async-signal-safe.
 */
static inline void
test_on_signal (int sig)
{
  test_cleanup ();
  signal (sig, SIG_DFL);
  raise (sig);
}

static inline void
test_make_dir (const char *prog)
{
  const char *tmp = getenv ("TMPDIR");

  if (snprintf (test_dir, sizeof test_dir, "%s/%s.XXXXXX",
                tmp && *tmp ? tmp : "/tmp", prog) >= (int) sizeof test_dir)
    bail_out ("TMPDIR is too long");
  if (mkdtemp (test_dir) == NULL)
    bail_out ("mkdtemp: %s: %m", test_dir);
  atexit (test_cleanup);
  signal (SIGINT, test_on_signal);
  signal (SIGTERM, test_on_signal);
  signal (SIGPIPE, test_on_signal);
  signal (SIGHUP, test_on_signal);
  signal (SIGSEGV, test_on_signal);
  signal (SIGBUS, test_on_signal);
  signal (SIGABRT, test_on_signal);
}

/* A path in the temporary directory, removed at exit. */
static inline const char *
test_path (const char *name)
{
  int i;

  for (i = 0; i < TEST_MAX_FILES; i++) {
    if (test_files[i][0] == '\0') {
      if (snprintf (test_files[i], PATH_MAX, "%s/%s", test_dir, name)
          >= PATH_MAX)
        bail_out ("test_path: %s: name too long", name);
      return test_files[i];
    }
    if (strcmp (strrchr (test_files[i], '/') + 1, name) == 0)
      return test_files[i];
  }
  bail_out ("test_path: too many files");
}

/* Write a disk file of size bytes with the content of buf (NULL: a
 * sparse file of zeroes).
 */
static inline void
test_write_disk (const char *path, const void *buf, uint64_t size)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  const char *p = buf;
  uint64_t done_ = 0;

  if (fd == -1)
    bail_out ("open: %s: %m", path);
  if (ftruncate (fd, size) == -1)
    bail_out ("ftruncate: %s: %m", path);
  while (buf && done_ < size) {
    ssize_t r = pwrite (fd, p + done_, size - done_, done_);
    if (r <= 0)
      bail_out ("pwrite: %s: %m", path);
    done_ += r;
  }
  if (close (fd) == -1)
    bail_out ("close: %s: %m", path);
}

/* The statistics once the space freed so far is given back: the store's
 * puncher gives it back on its own thread (fleece_wait_freed).
 */
static inline void
settled_stats (struct fleece *fl, struct fleece_stats *st)
{
  fleece_wait_freed (fl);
  fleece_get_stats (fl, st);
}

/* fleece_open and fleece_start, or NULL (fleece_last_error says why). */
static inline struct fleece *
test_try_open (const struct fleece_config *cfg)
{
  struct fleece *fl = fleece_open (cfg);

  if (fl && fleece_start (fl) == -1) {
    fleece_close (fl);
    return NULL;
  }
  return fl;
}

/* The whole content of a file (*size bytes), malloc'd. */
static inline uint8_t *
test_read_file (const char *path, size_t *size)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  struct stat st;
  uint8_t *p;

  if (fd == -1 || fstat (fd, &st) == -1)
    bail_out ("open: %s: %m", path);
  p = malloc (st.st_size ? st.st_size : 1);
  if (p == NULL || pread (fd, p, st.st_size, 0) != st.st_size)
    bail_out ("pread: %s: %m", path);
  close (fd);
  *size = st.st_size;
  return p;
}

/* Set by a test before test_open: sub-cluster copies (subcluster=true).
 * Off by default, so that the tests that count copies exactly count
 * whole clusters.
 */
static bool test_subcluster;

static inline struct fleece *
test_open (const char *disk, const char *store, uint32_t cluster_size)
{
  /* FLEECE_TEST_PERSISTENT=1 (test-engine-persistent.sh): the same
   * tests on a persistent store, started afresh.
   */
  struct fleece_config cfg = {
    .disk = disk,
    .store = store,
    .cluster_size = cluster_size,
    .persistent = getenv ("FLEECE_TEST_PERSISTENT") != NULL,
    .whole_clusters = !test_subcluster,
  };
  struct fleece *fl;

  if (cfg.persistent)
    unlink (store);
  fl = fleece_open (&cfg);

  if (fl == NULL)
    bail_out ("fleece_open: %s", fleece_last_error ());
  if (fleece_start (fl) == -1)
    bail_out ("fleece_start: %s", fleece_last_error ());
  return fl;
}

/* Offset of the first differing byte, or -1. */
static inline int64_t
test_first_diff (const void *a, const void *b, size_t len)
{
  const unsigned char *p = a, *q = b;
  size_t i;

  if (memcmp (a, b, len) == 0)
    return -1;
  for (i = 0; i < len; i++)
    if (p[i] != q[i])
      return i;
  return -1;
}

#endif /* FLEECE_TEST_ENGINE_H */
