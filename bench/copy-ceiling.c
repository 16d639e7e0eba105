/* copy-ceiling: how many copy-before-write copies per second this machine
 * can do with nothing else running.  THREADS threads each pread a 64 KiB
 * cluster at random from DISK and pwrite it to the next slot of STORE,
 * which is created empty, COPIES times in all; then the same again into
 * the now cached STORE.  With LOCK=1 a mutex serialises the pwrites (the
 * waiters sleep instead of spinning on the inode's rwsem).
 *
 *   cc -O2 -pthread -o copy-ceiling bench/copy-ceiling.c
 *   ./copy-ceiling DISK STORE THREADS COPIES [LOCK]
 *
 * DISK must hold at least 1 GiB.  Not built by make: a probe for
 * bench/PERF-NOTES.md.
 */

#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define CLUSTER 65536
#define NCLUSTERS 16384         /* 1 GiB */

static int disk_fd, store_fd, use_lock;
static unsigned copies;
static atomic_uint next;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static double total_read, total_write;

static double
now (void)
{
  struct timespec t;

  clock_gettime (CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void *
worker (void *arg)
{
  unsigned seed = (unsigned) (long) arg, i;
  char *buf = aligned_alloc (4096, CLUSTER);
  double tr = 0, tw = 0;

  while ((i = atomic_fetch_add (&next, 1)) < copies) {
    double t0 = now (), t1;
    off_t from = (off_t) (rand_r (&seed) % NCLUSTERS) * CLUSTER;

    if (pread (disk_fd, buf, CLUSTER, from) != CLUSTER)
      abort ();
    t1 = now ();
    if (use_lock)
      pthread_mutex_lock (&lock);
    if (pwrite (store_fd, buf, CLUSTER, (off_t) i * CLUSTER) != CLUSTER)
      abort ();
    if (use_lock)
      pthread_mutex_unlock (&lock);
    tw += now () - t1;
    tr += t1 - t0;
  }
  pthread_mutex_lock (&lock);
  total_read += tr;
  total_write += tw;
  pthread_mutex_unlock (&lock);
  free (buf);
  return NULL;
}

int
main (int argc, char *argv[])
{
  pthread_t t[64];
  int nthreads, pass, k;

  if (argc < 5) {
    fprintf (stderr, "usage: %s DISK STORE THREADS COPIES [LOCK]\n",
             argv[0]);
    return 1;
  }
  nthreads = atoi (argv[3]);
  copies = atoi (argv[4]);
  use_lock = argc > 5 && atoi (argv[5]);
  if (nthreads < 1 || nthreads > 64) {
    fprintf (stderr, "THREADS: 1 to 64\n");
    return 1;
  }
  disk_fd = open (argv[1], O_RDONLY);
  store_fd = open (argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (disk_fd == -1 || store_fd == -1) {
    perror ("open");
    return 1;
  }
  for (pass = 0; pass < 2; pass++) {
    double t0 = now (), el;

    atomic_store (&next, 0);
    total_read = total_write = 0;
    for (k = 0; k < nthreads; k++)
      pthread_create (&t[k], NULL, worker, (void *) (long) (k + 1 + pass * 100));
    for (k = 0; k < nthreads; k++)
      pthread_join (t[k], NULL);
    el = now () - t0;
    printf ("%s threads=%d lock=%d copies=%u %.3f s %.0f copies/s, mean "
            "pread %.1f us, pwrite %.1f us\n", pass ? "cached" : "fresh ",
            nthreads, use_lock, copies, el, copies / el,
            total_read / copies * 1e6, total_write / copies * 1e6);
  }
  return 0;
}
