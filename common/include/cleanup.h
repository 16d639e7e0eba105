/* Fleece: cleanup attributes and scoped locks (header only).
 *
 * A variable declared CLEANUP_FREE is freed when it goes out of scope,
 * however the scope is left, so that an early return cannot leak it;
 * it must be initialised (NULL is fine) where it is declared.
 * ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&m) locks m until the end of the
 * enclosing block.  Both rely on GCC's and Clang's cleanup attribute.
 *
 * Locking and unlocking a mutex that is ours can only fail through a bug
 * (a lock not initialised, an unlock by another thread): that is an
 * assertion, not an error to report.
 */

#ifndef FLEECE_COMMON_CLEANUP_H
#define FLEECE_COMMON_CLEANUP_H

#include <assert.h>
#include <pthread.h>
#include <stdlib.h>

static inline void
cleanup_free (void *ptr)
{
  free (*(void **) ptr);
}
#define CLEANUP_FREE __attribute__ ((cleanup (cleanup_free)))

static inline pthread_mutex_t *
cleanup_lock (pthread_mutex_t *mutex)
{
  int r = pthread_mutex_lock (mutex);

  assert (r == 0);
  (void) r;
  return mutex;
}

static inline void
cleanup_unlock (pthread_mutex_t **mutex)
{
  int r = pthread_mutex_unlock (*mutex);

  assert (r == 0);
  (void) r;
}

#define CLEANUP_CONCAT_(a, b) a##b
#define CLEANUP_CONCAT(a, b) CLEANUP_CONCAT_ (a, b)

/* The variable is named after the line, so two scopes may nest. */
#define ACQUIRE_LOCK_FOR_CURRENT_SCOPE(mutex)                           \
  __attribute__ ((cleanup (cleanup_unlock), unused))                    \
  pthread_mutex_t *CLEANUP_CONCAT (scoped_lock_, __LINE__) =            \
    cleanup_lock (mutex)

#endif /* FLEECE_COMMON_CLEANUP_H */
