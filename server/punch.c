/* The puncher: gives freed store slots back to the file system on a
 * thread of its own.
 *
 * A freed slot is punched out of the store file (fallocate PUNCH_HOLE)
 * before its bit is cleared, so that an allocation can never have fresh
 * data punched.  A punch is slow when it matters most: on ext4 it first
 * writes back the range's dirty pages and holds the file's inode lock,
 * so deleting a snapshot of thousands of copies under live writes took
 * seconds, and it ran on the thread that deleted, under admin_lock: the
 * control socket answered nothing meanwhile, and a group's prepare on
 * that disk waited for it (issue 17).
 *
 * Once the engine is started (fleece_start, in the process that serves:
 * no thread survives nbdkit's fork), a free of 64 MiB or more
 * (store.c, punch_async) queues its runs instead; the slots stay
 * allocated, counted in punch_pending, until the thread has punched them
 * and cleared their bits (store_release_locked).  An
 * allocation that finds store-max reached while runs are queued waits
 * for them rather than fail a copy.  Before the start (loading, the C
 * tests that never start the engine) and when the queue cannot grow,
 * free_run punches inline as before.  store_close stops the thread after
 * it has released everything queued.
 *
 * All of the queue is protected by the store's lock.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

struct punch_run {
  uint32_t first, n;
  bool meta;
};

struct punch_queue {
  pthread_t thread;
  bool stopping;
  struct punch_run *runs;       /* runs[head .. len) are queued */
  size_t head, len, cap;
};

/* At most this much is punched by one fallocate: a punch holds the store
 * file's inode lock, which every store write needs, for a time that
 * grows with its length (about 0.5 ms per MiB of cached data here).
 */
#define PUNCH_MAX_BYTES (1u << 20)

void
store_punch (struct store *s, uint32_t first, uint32_t n)
{
  uint64_t off = s->data_offset + (uint64_t) first * s->cluster_size;
  uint64_t len = (uint64_t) n * s->cluster_size;

  /* Not while loading: a store refused later must be left as it was. */
  if (!s->is_file || s->loading)
    return;
  if (fleece_debug.punch_delay_ms)      /* a slow file system, for tests */
    usleep (fleece_debug.punch_delay_ms * 1000);
  while (len > 0) {
    uint64_t l = len < PUNCH_MAX_BYTES ? len : PUNCH_MAX_BYTES;
    /* Best effort: a file system without holes keeps the space, the
     * slot is still reused.
     */
    (void) fallocate (s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      off, l);
    off += l;
    len -= l;
  }
}

static void *
puncher (void *arg)
{
  struct store *s = arg;
  struct punch_queue *q = s->punch;

  pthread_mutex_lock (&s->lock);
  for (;;) {
    struct punch_run r;

    while (q->head == q->len && !q->stopping)
      pthread_cond_wait (&s->punch_cond, &s->lock);
    if (q->head == q->len)
      break;                    /* stopping, and nothing left */
    r = q->runs[q->head++];
    if (q->head == q->len)
      q->head = q->len = 0;
    pthread_mutex_unlock (&s->lock);
    store_punch (s, r.first, r.n);
    pthread_mutex_lock (&s->lock);
    store_release_locked (s, r.first, r.n, r.meta);
    s->punch_pending -= r.n;
    pthread_cond_broadcast (&s->punch_cond);
  }
  pthread_mutex_unlock (&s->lock);
  return NULL;
}

int
store_start_puncher (struct store *s)
{
  struct punch_queue *q = calloc (1, sizeof *q);
  int r;

  if (q == NULL)
    return fl_error (ENOMEM, "store: %s: out of memory for the puncher",
                     s->path);
  pthread_mutex_lock (&s->lock);
  s->punch = q;
  r = pthread_create (&q->thread, NULL, puncher, s);
  if (r != 0)
    s->punch = NULL;
  pthread_mutex_unlock (&s->lock);
  if (r != 0) {
    free (q);
    return fl_error (r, "store: %s: pthread_create: the puncher: %s",
                     s->path, strerror (r));
  }
  return 0;
}

/* Queue a run; false if it must be punched inline (no puncher, or no
 * memory).  Called with the lock held.
 */
bool
store_punch_queue_locked (struct store *s, uint32_t first, uint32_t n,
                          bool meta)
{
  struct punch_queue *q = s->punch;

  if (q == NULL || q->stopping || !s->is_file || s->loading)
    return false;
  if (q->len == q->cap) {
    size_t cap = q->cap ? 2 * q->cap : 64;
    struct punch_run *p = realloc (q->runs, cap * sizeof *p);
    if (p == NULL)
      return false;
    q->runs = p;
    q->cap = cap;
  }
  q->runs[q->len++] = (struct punch_run) { first, n, meta };
  s->punch_pending += n;
  pthread_cond_broadcast (&s->punch_cond);
  return true;
}

/* Wait until nothing is queued (store_close; the tests' "drain"). */
void
store_punch_drain (struct store *s)
{
  pthread_mutex_lock (&s->lock);
  while (s->punch_pending > 0)
    pthread_cond_wait (&s->punch_cond, &s->lock);
  pthread_mutex_unlock (&s->lock);
}

void
store_stop_puncher (struct store *s)
{
  struct punch_queue *q = s->punch;

  if (q == NULL)
    return;
  pthread_mutex_lock (&s->lock);
  q->stopping = true;
  pthread_cond_broadcast (&s->punch_cond);
  pthread_mutex_unlock (&s->lock);
  pthread_join (q->thread, NULL);
  s->punch = NULL;
  free (q->runs);
  free (q);
}
