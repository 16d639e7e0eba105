/* Snapshot creation racing with copy-before-write: the snapshot list must
 * not change under a writer that is walking it.
 *
 * Writers walk fl->snaps (cbw.c, needs_copy and count_holders) holding
 * snaps_lock for reading.  Creation must therefore only change the list
 * with snaps_lock held for writing: if it grows the array with realloc
 * outside that lock, a writer walking the old array reads freed memory.
 *
 * Two writer threads keep writing clusters whose old data some snapshot
 * needs, so they are in the list walk most of the time, while the main
 * thread creates snapshots up to a few hundred (the array is reallocated
 * at every creation and the walk is long) and deletes them again.  With
 * --enable-sanitizers (ASan) or under valgrind the bug shows as a use
 * after free at once; without them only as an occasional crash, when the
 * writer follows the allocator's bookkeeping that overwrote the first
 * entries of the freed array.
 *
 * Runs for FLEECE_STRESS_SECONDS / 2 seconds (at least 0.5), or 20 rounds
 * of NSNAPS creations.
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fleece.h"
#include "monotonic.h"
#include "test-engine.h"

#define CS 4096u
#define NCLUSTERS 512u
#define NSNAPS 400u
#define NWRITERS 2

static struct fleece *fl;
static atomic_bool stop;
static atomic_ullong writes, errors;

static void *
writer (void *arg)
{
  uint64_t c = (uintptr_t) arg * (NCLUSTERS / NWRITERS);
  uint8_t buf[512];

  memset (buf, 0x3c, sizeof buf);
  while (!atomic_load (&stop)) {
    if (fleece_live_pwrite (fl, buf, sizeof buf, c * CS, 0) == -1 &&
        atomic_fetch_add (&errors, 1) == 0)
      diag ("writer: %s", fleece_last_error ());
    atomic_fetch_add (&writes, 1);
    c = (c + 1) % NCLUSTERS;
  }
  return NULL;
}

int
main (int argc, char *argv[])
{
  const char *disk, *store;
  uint8_t *data = malloc (NCLUSTERS * CS);
  pthread_t w[NWRITERS];
  double seconds = test_env_ulong ("FLEECE_STRESS_SECONDS", 1) / 2.0;
  int64_t deadline;             /* monotonic_us */
  uint64_t w0;
  unsigned rounds = 0, created = 0, i, n;
  struct rng rng = { test_seed () };
  struct fleece_stats st;
  char name[32];

  if (seconds < 0.5)
    seconds = 0.5;
  test_make_dir ("test-engine-create-race");
  disk = test_path ("disk");
  store = test_path ("store");
  assert (data);
  rng_fill (&rng, data, NCLUSTERS * CS);
  test_write_disk (disk, data, NCLUSTERS * CS);
  free (data);
  fl = test_open (disk, store, CS);

  for (i = 0; i < NWRITERS; i++)
    if (pthread_create (&w[i], NULL, writer, (void *) (uintptr_t) i) != 0)
      bail_out ("pthread_create: %m");
  deadline = monotonic_us () + (int64_t) (seconds * 1e6);
  while (monotonic_us () < deadline && rounds < 20) {
    unsigned made;

    for (n = 0; n < NSNAPS && monotonic_us () < deadline; n++) {
      snprintf (name, sizeof name, "r%u-%u", rounds, n);
      if (fleece_snapshot_create (fl, name) == -1)
        bail_out ("fleece_snapshot_create: %s", fleece_last_error ());
      created++;
      /* Let the writers walk the new list before the next creation:
       * without this, back-to-back creations keep the gate closed and
       * the writers never get in (under valgrind they would never run).
       */
      w0 = atomic_load (&writes);
      while (atomic_load (&writes) < w0 + NWRITERS &&
             monotonic_us () < deadline)
        sched_yield ();
    }
    made = n;
    for (n = 0; n < made; n++) {
      snprintf (name, sizeof name, "r%u-%u", rounds, n);
      if (fleece_snapshot_delete (fl, name) == -1)
        bail_out ("fleece_snapshot_delete: %s", fleece_last_error ());
    }
    rounds++;
  }
  atomic_store (&stop, true);
  for (i = 0; i < NWRITERS; i++)
    pthread_join (w[i], NULL);

  settled_stats (fl, &st);
  diag ("%u snapshots created in %u rounds, %llu writes", created, rounds,
        (unsigned long long) writes);
  ok (errors == 0 && writes > 0,
      "writers survived %u snapshot creations walking the list "
      "(%llu write errors)", created, (unsigned long long) errors);
  ok (st.snapshots == 0 && st.copies == 0 && st.store_clusters_used == 0,
      "everything freed at the end");
  fleece_close (fl);
  return done ();
}
