/* The write gate: drains in-flight live writes so that snapshot creation
 * is atomic (docs/design.md invariant 3).
 *
 * Every live write, zero and trim runs inside the gate: it decides whether
 * to copy-before-write from the generation it read inside the gate, so no
 * write may straddle a generation flip.  Entering costs one atomic add on
 * a counter private to the calling thread (GATE_SLOTS cache-line padded
 * counters, a thread picks one at first use) and one load of the shared
 * closing flag, which is only written by snapshot creation: writers never
 * share a written cache line.  The add and the load are sequentially
 * consistent, as are the creator's store of closing and its loads of the
 * counters (Dekker), so either the writer sees closing and backs off or
 * the creator sees the writer's count and waits for it.
 *
 * Creation closes the gate, spins until every counter is zero (writes in
 * flight finish; new ones wait on the condition variable), flips the
 * generation and opens it again: writers stall for the length of the
 * longest write in flight plus the flip.
 *
 * Closures nest (depth): a group hold (hold.c) keeps the gate closed
 * between group-prepare and group-commit, and the snapshot or checkpoint
 * the commit creates closes and opens it inside that hold without
 * opening it for writers.  Only the outermost open lets writers in.
 */

#include <config.h>

#include <assert.h>
#include <sched.h>
#include <time.h>

#include "internal.h"

static atomic_uint next_slot;
static __thread int my_slot = -1;

void
gate_init (struct gate *g)
{
  int i;

  atomic_init (&g->closing, 0);
  g->depth = 0;
  for (i = 0; i < GATE_SLOTS; i++)
    atomic_init (&g->slot[i].n, 0);
  pthread_mutex_init (&g->lock, NULL);
  pthread_cond_init (&g->cond, NULL);
}

void
gate_destroy (struct gate *g)
{
  pthread_mutex_destroy (&g->lock);
  pthread_cond_destroy (&g->cond);
}

int
gate_enter (struct gate *g)
{
  if (my_slot < 0)
    my_slot = atomic_fetch_add (&next_slot, 1) % GATE_SLOTS;

  for (;;) {
    atomic_fetch_add (&g->slot[my_slot].n, 1);
    if (!atomic_load (&g->closing))
      return my_slot;
    atomic_fetch_sub (&g->slot[my_slot].n, 1);
    pthread_mutex_lock (&g->lock);
    while (atomic_load (&g->closing))
      pthread_cond_wait (&g->cond, &g->lock);
    pthread_mutex_unlock (&g->lock);
  }
}

void
gate_leave (struct gate *g, int slot)
{
  atomic_fetch_sub (&g->slot[slot].n, 1);
}

static void
gate_release (struct gate *g)
{
  pthread_mutex_lock (&g->lock);
  atomic_store (&g->closing, 0);
  pthread_cond_broadcast (&g->cond);
  pthread_mutex_unlock (&g->lock);
}

/* Close and drain, giving up at deadline (monotonic ns; 0: never): then
 * the gate is open again and -1 is returned.  Only one closer at a time:
 * the caller holds fl->admin_lock.
 */
int
gate_close_until (struct gate *g, uint64_t deadline)
{
  unsigned spins = 0;
  int i;

  if (g->depth++ > 0)
    return 0;                   /* already closed and drained */
  atomic_store (&g->closing, 1);
  for (i = 0; i < GATE_SLOTS; i++) {
    while (atomic_load (&g->slot[i].n) != 0) {
      if (deadline && (uint64_t) monotonic_ns () >= deadline) {
        g->depth--;
        gate_release (g);
        return -1;
      }
      if (++spins < 2000)
        sched_yield ();
      else {
        const struct timespec ts = { .tv_nsec = 20000 };
        nanosleep (&ts, NULL);
      }
    }
  }
  return 0;
}

void
gate_close (struct gate *g)
{
  gate_close_until (g, 0);
}

void
gate_open (struct gate *g)
{
  assert (g->depth > 0);
  if (--g->depth == 0)
    gate_release (g);
}
