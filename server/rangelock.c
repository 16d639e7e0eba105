/* Exclusive locks on ranges of clusters, held while a cluster's old data
 * is being copied to the store.
 *
 * Two writers that both find cluster c uncopied in the current generation
 * must not both copy it (the second would copy the first one's new data):
 * the loser waits here, then sees the cluster's generation already
 * current and skips the copy.  A snapshot client trimming the cluster
 * takes the same lock so that the set of snapshots needing a copy does not
 * change under a copy in progress.
 *
 * Snapshot reads of live data do not take these locks: they validate
 * afterwards (snapshot.c), so a backup reading the snapshot never makes a
 * live write wait, which is the stall QEMU's fleecing suffers.
 *
 * Copies are rare (once per cluster per generation) and short, so one
 * mutex and a small array of held ranges is enough.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>

#include "internal.h"

void
rangelock_init (struct rangelock *rl)
{
  pthread_mutex_init (&rl->lock, NULL);
  pthread_cond_init (&rl->cond, NULL);
  rl->held = (range_vector) { 0 };
}

void
rangelock_destroy (struct rangelock *rl)
{
  pthread_mutex_destroy (&rl->lock);
  pthread_cond_destroy (&rl->cond);
  range_vector_reset (&rl->held);
}

static bool
overlaps (const struct rangelock *rl, uint64_t start, uint64_t end)
{
  size_t i;

  for (i = 0; i < rl->held.len; i++)
    if (start < rl->held.ptr[i].end && rl->held.ptr[i].start < end)
      return true;
  return false;
}

/* Lock clusters [start, end). */
int
rangelock_acquire (struct rangelock *rl, uint64_t start, uint64_t end)
{
  pthread_mutex_lock (&rl->lock);
  while (overlaps (rl, start, end))
    pthread_cond_wait (&rl->cond, &rl->lock);
  if (range_vector_append (&rl->held,
                           (struct range) { start, end }) == -1) {
    pthread_mutex_unlock (&rl->lock);
    return fl_error (ENOMEM, "rangelock: realloc: out of memory");
  }
  pthread_mutex_unlock (&rl->lock);
  return 0;
}

void
rangelock_release (struct rangelock *rl, uint64_t start, uint64_t end)
{
  size_t i;

  pthread_mutex_lock (&rl->lock);
  for (i = 0; i < rl->held.len; i++) {
    if (rl->held.ptr[i].start == start && rl->held.ptr[i].end == end) {
      rl->held.ptr[i] = rl->held.ptr[--rl->held.len];
      break;
    }
  }
  pthread_cond_broadcast (&rl->cond);
  pthread_mutex_unlock (&rl->lock);
}
