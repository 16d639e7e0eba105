/* group-writer: the writer and the checker of test-group-causality.sh.
 *
 *   group-writer write SECONDS URI...   dependent writes, round robin
 *   group-writer check URI...           is the cut a prefix?
 *
 * Writes.  Write k (k = 1, 2, ...) goes to disk (k - 1) mod N, the N
 * disks being the URIs in order, and is issued only once write k - 1 was
 * acknowledged: each write depends on the one before, across disks.
 * Every write to a disk overwrites its first sector with "FLGROUP\0" and
 * k (little-endian), so that a disk holds the last write it acknowledged.
 * The writer stops after SECONDS or at SIGTERM and prints how many
 * writes it made.
 *
 * Check.  The URIs are the snapshots of one group (or of one checkpoint
 * per disk), in the writer's order.  Each disk is linearizable, so its
 * snapshot holds exactly the writes to it up to the sequence number L(d)
 * it shows.  The writes found in all the snapshots are then a prefix
 * 1..P of the sequence exactly when every disk shows the last write of
 * the prefix that went to it: with P the largest L(d), L(d) must be the
 * largest k <= P with (k - 1) mod N = d (0 if none).  A disk behind
 * that means a write found on another disk without one it depended on:
 * the violation.  Prints the L(d) and exits 0 for a prefix, 1 for a
 * violation, 2 on error.
 */

#include <config.h>

#include <endian.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libnbd.h>

#define SECTOR 512
#define MAX_DISKS 16
static const char magic[8] = "FLGROUP";

static volatile sig_atomic_t stop;

static void
on_term (int sig)
{
  stop = 1;
}

static struct nbd_handle *
connect_uri (const char *uri)
{
  struct nbd_handle *h = nbd_create ();

  if (h == NULL || nbd_connect_uri (h, uri) == -1) {
    fprintf (stderr, "group-writer: nbd_connect_uri: %s: %s\n", uri,
             nbd_get_error ());
    exit (2);
  }
  return h;
}

static int
do_write (double seconds, int n, char **uris)
{
  struct nbd_handle *h[MAX_DISKS];
  struct timespec t0, t;
  char buf[SECTOR] = { 0 };
  uint64_t k, le;
  int i;

  signal (SIGTERM, on_term);
  for (i = 0; i < n; i++)
    h[i] = connect_uri (uris[i]);
  memcpy (buf, magic, sizeof magic);
  clock_gettime (CLOCK_MONOTONIC, &t0);
  for (k = 1; !stop; k++) {
    le = htole64 (k);
    memcpy (buf + 8, &le, sizeof le);
    if (nbd_pwrite (h[(k - 1) % n], buf, SECTOR, 0, 0) == -1) {
      fprintf (stderr, "group-writer: nbd_pwrite: %s, write %" PRIu64
               ": %s\n", uris[(k - 1) % n], k, nbd_get_error ());
      return 2;
    }
    clock_gettime (CLOCK_MONOTONIC, &t);
    if (t.tv_sec - t0.tv_sec + (t.tv_nsec - t0.tv_nsec) / 1e9 > seconds)
      break;
  }
  for (i = 0; i < n; i++) {
    nbd_shutdown (h[i], 0);
    nbd_close (h[i]);
  }
  printf ("%" PRIu64 "\n", k - 1);
  return 0;
}

/* The sequence number a snapshot shows: 0 if never written. */
static uint64_t
read_seq (const char *uri)
{
  struct nbd_handle *h = connect_uri (uri);
  char buf[SECTOR];
  uint64_t le;

  if (nbd_pread (h, buf, SECTOR, 0, 0) == -1) {
    fprintf (stderr, "group-writer: nbd_pread: %s: %s\n", uri,
             nbd_get_error ());
    exit (2);
  }
  nbd_shutdown (h, 0);
  nbd_close (h);
  if (memcmp (buf, magic, sizeof magic) != 0)
    return 0;
  memcpy (&le, buf + 8, sizeof le);
  return le64toh (le);
}

static int
do_check (int n, char **uris)
{
  uint64_t l[MAX_DISKS], p = 0, want, off;
  int d, bad = 0;

  for (d = 0; d < n; d++) {
    l[d] = read_seq (uris[d]);
    if (l[d] > p)
      p = l[d];
  }
  for (d = 0; d < n; d++) {
    /* The largest k <= p with (k - 1) mod n == d. */
    off = p == 0 ? 0 : ((p - 1) % n + n - d) % n;
    want = p > off ? p - off : 0;
    printf ("%s%" PRIu64, d ? " " : "", l[d]);
    if (l[d] != want)
      bad = 1;
  }
  printf (bad ? " violation\n" : " prefix\n");
  return bad;
}

int
main (int argc, char **argv)
{
  if (argc > 2 + MAX_DISKS + 1) {
    fprintf (stderr, "group-writer: at most %d disks\n", MAX_DISKS);
    return 2;
  }
  if (argc >= 4 && strcmp (argv[1], "write") == 0)
    return do_write (atof (argv[2]), argc - 3, argv + 3);
  if (argc >= 3 && strcmp (argv[1], "check") == 0)
    return do_check (argc - 2, argv + 2);
  fprintf (stderr, "usage: group-writer write SECONDS URI... | "
           "group-writer check URI...\n");
  return 2;
}
