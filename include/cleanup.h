/* Scoped cleanup helpers, in the shape of nbdkit's common/utils/cleanup.h. */

#ifndef FLEECE_CLEANUP_H
#define FLEECE_CLEANUP_H

#include <assert.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

static inline void
cleanup_free (void *ptr)
{
  free (*(void **) ptr);
}
#define CLEANUP_FREE __attribute__ ((cleanup (cleanup_free)))

static inline void
cleanup_close (int *fd)
{
  if (*fd >= 0)
    close (*fd);
}
#define CLEANUP_CLOSE __attribute__ ((cleanup (cleanup_close)))

static inline void
cleanup_unlock (pthread_mutex_t **ptr)
{
  int r = pthread_mutex_unlock (*ptr);
  assert (r == 0);
}
#define CLEANUP_UNLOCK __attribute__ ((cleanup (cleanup_unlock)))

#define FLEECE_UNIQUE_(a, b) a##b
#define FLEECE_UNIQUE(a, b) FLEECE_UNIQUE_ (a, b)

#define ACQUIRE_LOCK_FOR_CURRENT_SCOPE(mutex)                           \
  CLEANUP_UNLOCK pthread_mutex_t *FLEECE_UNIQUE (_lock, __LINE__) = mutex; \
  do {                                                                  \
    int _r = pthread_mutex_lock (FLEECE_UNIQUE (_lock, __LINE__));      \
    assert (_r == 0);                                                   \
  } while (0)

static inline void
cleanup_rwlock_unlock (pthread_rwlock_t **ptr)
{
  int r = pthread_rwlock_unlock (*ptr);
  assert (r == 0);
}
#define CLEANUP_RWLOCK_UNLOCK __attribute__ ((cleanup (cleanup_rwlock_unlock)))

#define ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE(rwlock)                        \
  CLEANUP_RWLOCK_UNLOCK pthread_rwlock_t *FLEECE_UNIQUE (_rw, __LINE__) = rwlock; \
  do {                                                                  \
    int _r = pthread_rwlock_rdlock (FLEECE_UNIQUE (_rw, __LINE__));     \
    assert (_r == 0);                                                   \
  } while (0)

#define ACQUIRE_WRLOCK_FOR_CURRENT_SCOPE(rwlock)                        \
  CLEANUP_RWLOCK_UNLOCK pthread_rwlock_t *FLEECE_UNIQUE (_rw, __LINE__) = rwlock; \
  do {                                                                  \
    int _r = pthread_rwlock_wrlock (FLEECE_UNIQUE (_rw, __LINE__));     \
    assert (_r == 0);                                                   \
  } while (0)

#endif /* FLEECE_CLEANUP_H */
