/* The header-only helpers of common/include: the vector type against a
 * plain array (its model), its refusal of a size that cannot fit,
 * CLEANUP_FREE (its leaks would fail under make check-valgrind), the
 * scoped lock (held inside its block, released when the block is left,
 * also through a return), the monotonic clock, and waiting for a file
 * descriptor until a deadline.
 *
 * TAP output (tap.h); the plan is printed at the end.
 */

#include <config.h>

#undef NDEBUG

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "deadline.h"
#include "monotonic.h"
#include "vector.h"
#include "tap.h"

DEFINE_VECTOR_TYPE (int_vector, int);
struct page { char bytes[4096]; };
DEFINE_VECTOR_TYPE (big_vector, struct page);

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void
test_vector (void)
{
  int_vector v = { 0 };
  int model[5000], i;
  bool same = true;

  for (i = 0; i < 5000; i++) {
    model[i] = i * 7 - 3;
    if (int_vector_append (&v, model[i]) == -1)
      break;
  }
  ok (i == 5000 && v.len == 5000 && v.cap >= v.len,
      "5000 appends: len %zu, capacity %zu", v.len, v.cap);
  for (i = 0; i < 5000 && same; i++)
    same = v.ptr[i] == model[i];
  ok (same, "every element equals the model's");
  ok (int_vector_reserve (&v, v.cap - v.len) == 0 && v.cap >= 5000,
      "reserving what is free keeps the capacity");
  int_vector_reset (&v);
  ok (v.ptr == NULL && v.len == 0 && v.cap == 0, "reset empties it");
}

static void
test_vector_overflow (void)
{
  big_vector v = { 0 };
  int r;

  errno = 0;
  r = big_vector_reserve (&v, SIZE_MAX / 1000);
  ok (r == -1 && errno == EOVERFLOW && v.ptr == NULL && v.cap == 0,
      "a size that does not fit a size_t is refused (EOVERFLOW), the "
      "vector unchanged");
}

/* Returns from inside the scope: the lock must be released anyway. */
static int
locked_return (int x)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);

  if (x > 0)
    return pthread_mutex_trylock (&lock);
  return -1;
}

static void
test_scoped_lock (void)
{
  int inside, after;

  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
    inside = pthread_mutex_trylock (&lock);
  }
  after = pthread_mutex_trylock (&lock);
  if (after == 0)
    pthread_mutex_unlock (&lock);
  ok (inside == EBUSY, "the lock is held inside its scope");
  if (!ok (after == 0, "and released when the scope ends")) {
    ok (false, "a return from inside the scope releases the lock "
        "(not tried: the lock leaked)");
    return;
  }

  inside = locked_return (1);
  after = pthread_mutex_trylock (&lock);
  if (after == 0)
    pthread_mutex_unlock (&lock);
  ok (inside == EBUSY && after == 0,
      "a return from inside the scope releases the lock");
}

static size_t
cleanup_free_len (const char *s)
{
  CLEANUP_FREE char *copy = strdup (s);

  return copy ? strlen (copy) : 0;
}

static void
test_cleanup_free (void)
{
  CLEANUP_FREE char *never = NULL;    /* freeing NULL is harmless */

  ok (cleanup_free_len ("fleece") == 6 && never == NULL,
      "CLEANUP_FREE frees on the way out (valgrind checks the leak)");
}

static void
test_monotonic (void)
{
  struct timespec ts = { .tv_nsec = 20 * 1000000 };
  int64_t a = monotonic_us (), ams = monotonic_ms (), b, bms;

  nanosleep (&ts, NULL);
  b = monotonic_us ();
  bms = monotonic_ms ();
  ok (b - a >= 20000 && b - a < 10000000,
      "monotonic_us advances across a 20 ms sleep (%" PRId64 " us)", b - a);
  ok (bms - ams >= 19 && bms >= ams,
      "monotonic_ms advances with it (%" PRId64 " ms)", bms - ams);
}

/* A pipe: nothing to read times out at the deadline (not before), a
 * byte written is ready at once, no deadline waits for it.
 */
static void
test_deadline (void)
{
  int fd[2], r;
  int64_t t0, t;

  ok (deadline_after (-1) == -1, "a negative timeout is no deadline");
  if (!ok (pipe (fd) == 0, "pipe"))
    return;
  t0 = monotonic_ms ();
  r = wait_fd_until (fd[0], POLLIN, deadline_after (50));
  t = monotonic_ms () - t0;
  ok (r == 0 && t >= 50 && t < 5000,
      "nothing to read: a timeout, at the deadline (%" PRId64 " ms)", t);
  ok (wait_fd_until (fd[0], POLLIN, monotonic_ms () - 10) == 0,
      "a deadline already past: a timeout at once");
  ok (write (fd[1], "x", 1) == 1 &&
      wait_fd_until (fd[0], POLLIN, deadline_after (5000)) == 1,
      "a byte to read: ready");
  ok (wait_fd_until (fd[0], POLLIN, -1) == 1,
      "and ready without a deadline");
  close (fd[0]);
  close (fd[1]);
}

int
main (void)
{
  test_vector ();
  test_vector_overflow ();
  test_scoped_lock ();
  test_cleanup_free ();
  test_monotonic ();
  test_deadline ();
  return done ();
}
