/* Concurrency: snapshot isolation and atomic creation under load.
 *
 * (a) Isolation (docs/design.md invariant 1).  A disk of random data; the
 * reference is a copy of the disk taken, with the writers paused, just
 * before snapshot S is created.  Writer threads then do random live
 * writes, zeroes and trims on overlapping, unaligned ranges, mostly on a
 * small hot set of clusters, while reader threads read random ranges of
 * S and compare them with the reference, and another thread creates and
 * deletes extra snapshots every few milliseconds (so clusters gain
 * several copies and the snapshot list changes under the writers).  The
 * reference and S are renewed every few tens of milliseconds (writers
 * paused again), because the interesting moment, a reader meeting the
 * first copy-before-write of a cluster, happens once per cluster per
 * snapshot.  A read "raced" if a write to one of its clusters started
 * while it ran.  Any mismatch or read error fails.
 *
 * A third round runs with subcluster=true (sub-cluster copies): half the
 * writes then cover a few blocks or less, unaligned, so that clusters
 * are copied block by block, across generations, under the readers.
 *
 * (b) Atomic creation (invariant 3).  Writer threads each own 512-byte
 * sectors interleaved inside the same clusters and rewrite them with a
 * pattern encoding (sector, counter), publishing per sector the counter
 * of the last write started and the last write completed.  The main
 * thread records the completed counters (lo), creates a snapshot, records
 * the started counters (hi), then reads the snapshot: every sector must
 * be whole (not torn) with a counter in [lo, hi], and must read the same
 * again later while the writers go on.  The longest writer stall at
 * creation (max_drain_ns) is printed, not asserted: timing belongs to
 * bench/.  It runs again with subcluster=true.
 *
 * Environment:
 *   FLEECE_STRESS_SECONDS   length of each isolation round (default 2;
 *                           make check-valgrind sets 1)
 *   FLEECE_TEST_SEED        seed of the random choices (the interleaving
 *                           of the threads is not repeatable)
 *   FLEECE_BREAK_ISOLATION  =1 sets fleece_debug.skip_isolation_check,
 *                           which disables the validation of snapshot
 *                           reads of live data: this test must then FAIL
 *                           with mismatches.  It checks that the test can
 *                           see the race it is about; never set it in CI.
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fleece.h"
#include "monotonic.h"
#include "test-engine.h"

#define KiB 1024u
#define MODE (test_subcluster ? ", subcluster" : "")
#define MiB (1024u * 1024u)

static uint64_t seed;
static bool under_valgrind;

static void
sleep_us (unsigned us)
{
  struct timespec ts = { .tv_sec = us / 1000000,
                         .tv_nsec = (us % 1000000) * 1000 };

  nanosleep (&ts, NULL);
}

/* ---- (a) Isolation ---- */

#define NWRITERS 4
#define NREADERS 3
#define NHOT_MAX 32
#define MAX_REPORTS 5

struct iso {
  /* Constant during a round. */
  struct fleece *fl;
  uint64_t size;
  uint32_t cs;
  uint64_t nclusters;
  uint64_t hot[NHOT_MAX];
  unsigned nhot;

  /* Pausing the workers between epochs: protected by lock. */
  pthread_mutex_t lock;
  pthread_cond_t cond;
  unsigned paused;
  atomic_bool pause;
  atomic_bool stop;

  /* Changed only while the workers are paused. */
  struct fleece_snap *snap;
  char snap_name[32];
  uint8_t *ref;

  /* Live writes started on each cluster. */
  _Atomic uint64_t *wseq;

  /* Counters. */
  atomic_ullong reads, raced, bytes_read, writes, mismatches, errors;
  atomic_ullong churn_creates, churn_deletes, epochs;
  atomic_uint reports;
};

/* Between operations: wait while the main thread renews S.  Returns true
 * when the round is over.
 */
static bool
checkpoint (struct iso *t)
{
  if (atomic_load (&t->pause)) {
    pthread_mutex_lock (&t->lock);
    t->paused++;
    pthread_cond_broadcast (&t->cond);
    while (atomic_load (&t->pause) && !atomic_load (&t->stop))
      pthread_cond_wait (&t->cond, &t->lock);
    t->paused--;
    pthread_mutex_unlock (&t->lock);
  }
  return atomic_load (&t->stop);
}

/* A range around a hot cluster: unaligned, up to 2 clusters long, so it
 * often crosses a cluster edge.
 */
static void
hot_range (struct iso *t, struct rng *r, uint64_t *off, uint64_t *len)
{
  uint64_t h = t->hot[rng_below (r, t->nhot)] * t->cs;
  uint64_t o = h + rng_below (r, 2 * t->cs);
  uint64_t l = 1 + rng_below (r, 2 * t->cs);

  /* Sub-cluster copies: half the writes are of a few blocks or less,
   * unaligned, so that clusters are copied block by block under the
   * readers.
   */
  if (test_subcluster && rng_one_in (r, 2))
    l = 1 + rng_below (r, 9 * KiB);

  o = o >= t->cs / 2 ? o - t->cs / 2 : 0;
  if (o >= t->size)
    o = t->size - 1;
  if (o + l > t->size)
    l = t->size - o;
  *off = o;
  *len = l;
}

static void
any_range (struct iso *t, struct rng *r, uint64_t max, uint64_t *off,
           uint64_t *len)
{
  uint64_t o = rng_below (r, t->size), l = 1 + rng_below (r, max);

  if (o + l > t->size)
    l = t->size - o;
  *off = o;
  *len = l;
}

static void
report (struct iso *t, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
static void
report (struct iso *t, const char *fmt, ...)
{
  char msg[512];
  va_list ap;

  if (atomic_fetch_add (&t->reports, 1) >= MAX_REPORTS)
    return;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  diag ("%s", msg);
}

struct worker {
  struct iso *t;
  int id;
  pthread_t thread;
};

static void *
writer (void *arg)
{
  struct worker *w = arg;
  struct iso *t = w->t;
  struct rng r = { seed ^ (0x1000 + w->id) };
  uint8_t *buf = malloc (3 * t->cs);

  assert (buf);
  while (!checkpoint (t)) {
    uint64_t off, len, c;
    unsigned op = rng_below (&r, 100);
    int e;

    if (rng_one_in (&r, 4))
      any_range (t, &r, 3 * t->cs, &off, &len);
    else
      hot_range (t, &r, &off, &len);
    for (c = off / t->cs; c <= (off + len - 1) / t->cs; c++)
      atomic_fetch_add (&t->wseq[c], 1);
    if (op < 70) {
      memset (buf, rng_next (&r), len);
      e = fleece_live_pwrite (t->fl, buf, len, off, 0);
    }
    else if (op < 85)
      e = fleece_live_zero (t->fl, len, off,
                            rng_one_in (&r, 2) ? FLEECE_F_MAY_TRIM : 0);
    else
      e = fleece_live_trim (t->fl, len, off, 0);
    if (e == -1) {
      atomic_fetch_add (&t->errors, 1);
      report (t, "writer %d: %" PRIu64 "+%" PRIu64 ": %s", w->id, off, len,
              fleece_last_error ());
    }
    atomic_fetch_add (&t->writes, 1);
  }
  free (buf);
  return NULL;
}

static uint64_t
wseq_sum (struct iso *t, uint64_t off, uint64_t len)
{
  uint64_t c, sum = 0;

  for (c = off / t->cs; c <= (off + len - 1) / t->cs; c++)
    sum += atomic_load (&t->wseq[c]);
  return sum;
}

static void *
reader (void *arg)
{
  struct worker *w = arg;
  struct iso *t = w->t;
  struct rng r = { seed ^ (0x2000 + w->id) };
  uint8_t *buf = malloc (t->size);

  assert (buf);
  while (!checkpoint (t)) {
    uint64_t off, len, before;
    unsigned k = rng_below (&r, 100);
    int64_t d;

    if (k < 80)
      hot_range (t, &r, &off, &len);
    else if (k < 99 || under_valgrind)
      any_range (t, &r, 256 * KiB, &off, &len);
    else {
      off = 0;
      len = t->size;
    }
    before = wseq_sum (t, off, len);
    if (fleece_snap_pread (t->snap, buf, len, off) == -1) {
      atomic_fetch_add (&t->errors, 1);
      report (t, "reader %d: %s %" PRIu64 "+%" PRIu64 ": %s", w->id,
              t->snap_name, off, len, fleece_last_error ());
      continue;
    }
    if (wseq_sum (t, off, len) != before)
      atomic_fetch_add (&t->raced, 1);
    atomic_fetch_add (&t->reads, 1);
    atomic_fetch_add (&t->bytes_read, len);
    d = test_first_diff (buf, t->ref + off, len);
    if (d >= 0) {
      atomic_fetch_add (&t->mismatches, 1);
      report (t, "reader %d: %s %" PRIu64 "+%" PRIu64 " differs at offset %"
              PRIu64 " (cluster %" PRIu64 "): 0x%02x, expected 0x%02x",
              w->id, t->snap_name, off, len, off + d, (off + d) / t->cs,
              buf[d], t->ref[off + d]);
    }
  }
  free (buf);
  return NULL;
}

/* Creates and deletes extra snapshots every few milliseconds, keeping up
 * to three, and lists them now and then.
 */
static void
count_snap (void *opaque, const struct fleece_snap_info *info)
{
  (*(unsigned *) opaque)++;
}

static void *
churn (void *arg)
{
  struct worker *w = arg;
  struct iso *t = w->t;
  struct rng r = { seed ^ 0x3000 };
  unsigned first = 0, next = 0;
  char name[32];

  while (!atomic_load (&t->stop)) {
    snprintf (name, sizeof name, "extra-%u", next);
    if (fleece_snapshot_create (t->fl, name) == 0) {
      next++;
      atomic_fetch_add (&t->churn_creates, 1);
    }
    else {
      atomic_fetch_add (&t->errors, 1);
      report (t, "churn: create %s: %s", name, fleece_last_error ());
    }
    while (next - first > 3) {
      snprintf (name, sizeof name, "extra-%u", first++);
      if (fleece_snapshot_delete (t->fl, name) == 0)
        atomic_fetch_add (&t->churn_deletes, 1);
      else {
        atomic_fetch_add (&t->errors, 1);
        report (t, "churn: delete %s: %s", name, fleece_last_error ());
      }
    }
    if (rng_one_in (&r, 8)) {
      unsigned n = 0;
      fleece_list_snapshots (t->fl, count_snap, &n);
    }
    sleep_us (1000 + rng_below (&r, 4000));
  }
  while (first < next) {
    snprintf (name, sizeof name, "extra-%u", first++);
    if (fleece_snapshot_delete (t->fl, name) == -1) {
      atomic_fetch_add (&t->errors, 1);
      report (t, "churn: delete %s: %s", name, fleece_last_error ());
    }
  }
  return NULL;
}

/* With the workers paused: replace S by a new snapshot of the disk as
 * it is now.
 */
static void
renew (struct iso *t, unsigned epoch)
{
  if (t->snap) {
    fleece_snap_put (t->snap);
    if (fleece_snapshot_delete (t->fl, t->snap_name) == -1)
      bail_out ("fleece_snapshot_delete: %s", fleece_last_error ());
  }
  if (fleece_live_pread (t->fl, t->ref, t->size, 0) == -1)
    bail_out ("fleece_live_pread: %s", fleece_last_error ());
  snprintf (t->snap_name, sizeof t->snap_name, "S%u", epoch);
  if (fleece_snapshot_create (t->fl, t->snap_name) == -1)
    bail_out ("fleece_snapshot_create: %s", fleece_last_error ());
  t->snap = fleece_snap_get (t->fl, t->snap_name);
  if (t->snap == NULL)
    bail_out ("fleece_snap_get: %s", fleece_last_error ());
  atomic_fetch_add (&t->epochs, 1);
}

static void
pause_workers (struct iso *t, unsigned n)
{
  pthread_mutex_lock (&t->lock);
  atomic_store (&t->pause, true);
  while (t->paused < n)
    pthread_cond_wait (&t->cond, &t->lock);
  pthread_mutex_unlock (&t->lock);
}

static void
resume_workers (struct iso *t)
{
  pthread_mutex_lock (&t->lock);
  atomic_store (&t->pause, false);
  pthread_cond_broadcast (&t->cond);
  pthread_mutex_unlock (&t->lock);
}

static void
isolation_round (uint64_t size, uint32_t cs, unsigned nhot, double seconds)
{
  const char *disk = test_path ("disk"), *store = test_path ("store");
  struct iso t = { .size = size, .cs = cs, .nhot = nhot };
  struct worker w[NWRITERS + NREADERS + 1];
  struct rng r = { seed ^ cs };
  const unsigned nworkers = NWRITERS + NREADERS;
  unsigned epoch_ms = under_valgrind ? 200 : 40, epoch = 0, i;
  /* Under valgrind the threads take turns, and do a tenth of the work
   * or less.
   */
  unsigned long long min_reads = under_valgrind ? 200 : 1000;
  unsigned long long min_writes = under_valgrind ? 20 : 200;
  int64_t t0, deadline, hard_deadline;
  uint8_t *data = malloc (size);
  struct fleece_stats st;

  assert (data && nhot <= NHOT_MAX);
  rng_fill (&r, data, size);
  test_write_disk (disk, data, size);
  free (data);
  t.nclusters = (size + cs - 1) / cs;
  for (i = 0; i < nhot; i++)
    t.hot[i] = rng_below (&r, t.nclusters);
  t.ref = malloc (size);
  t.wseq = calloc (t.nclusters, sizeof *t.wseq);
  assert (t.ref && t.wseq);
  pthread_mutex_init (&t.lock, NULL);
  pthread_cond_init (&t.cond, NULL);
  t.fl = test_open (disk, store, cs);
  renew (&t, epoch++);

  for (i = 0; i < nworkers + 1; i++) {
    w[i].t = &t;
    w[i].id = i;
    if (pthread_create (&w[i].thread, NULL,
                        i < NWRITERS ? writer :
                        i < nworkers ? reader : churn, &w[i]) != 0)
      bail_out ("pthread_create: %m");
  }
  t0 = monotonic_ns ();
  deadline = t0 + (int64_t) (seconds * 1e9);
  /* The round lasts its time, and longer (up to ten times) on a loaded
   * machine until the minimum work is done: the check below is of the
   * engine, not of how busy the machine was.
   */
  hard_deadline = t0 + (int64_t) (10 * seconds * 1e9);
  while (monotonic_ns () < deadline ||
         (monotonic_ns () < hard_deadline &&
          (atomic_load (&t.reads) <= min_reads ||
           atomic_load (&t.writes) <= min_writes ||
           atomic_load (&t.raced) == 0))) {
    sleep_us (epoch_ms * 1000);
    pause_workers (&t, nworkers);
    renew (&t, epoch++);
    resume_workers (&t);
  }
  pthread_mutex_lock (&t.lock);
  atomic_store (&t.stop, true);
  pthread_cond_broadcast (&t.cond);
  pthread_mutex_unlock (&t.lock);
  for (i = 0; i < nworkers + 1; i++)
    pthread_join (w[i].thread, NULL);

  diag ("cluster size %" PRIu32 ", %u hot clusters, %.1f s: %llu reads "
        "(%llu raced a write, %llu MiB), %llu writes, %llu epochs, "
        "%llu extra snapshots created, %llu deleted",
        cs, nhot, (monotonic_ns () - t0) / 1e9, (unsigned long long) t.reads,
        (unsigned long long) t.raced,
        (unsigned long long) t.bytes_read / MiB,
        (unsigned long long) t.writes, (unsigned long long) t.epochs,
        (unsigned long long) t.churn_creates,
        (unsigned long long) t.churn_deletes);
  ok (t.mismatches == 0 && t.errors == 0,
      "isolation, %" PRIu32 " byte clusters%s: %llu mismatches, %llu "
      "errors in %llu snapshot reads racing live writes",
      cs, MODE, (unsigned long long) t.mismatches, (unsigned long long) t.errors,
      (unsigned long long) t.reads);
  ok (t.reads > min_reads && t.raced > 0 && t.writes > min_writes,
      "isolation, %" PRIu32 " byte clusters%s: enough work was done "
      "(%llu reads, %llu raced, %llu writes)", cs, MODE,
      (unsigned long long) t.reads, (unsigned long long) t.raced,
      (unsigned long long) t.writes);

  fleece_snap_put (t.snap);
  if (fleece_snapshot_delete (t.fl, t.snap_name) == -1)
    bail_out ("fleece_snapshot_delete: %s", fleece_last_error ());
  settled_stats (t.fl, &st);
  ok (st.snapshots == 0 && st.copies == 0 && st.store_clusters_used == 0 &&
      st.partial_clusters == 0,
      "isolation, %" PRIu32 " byte clusters%s: everything freed at the end "
      "(%u snapshots, %" PRIu64 " copies, %" PRIu64 " partly copied, %"
      PRIu64 " store clusters)", cs, MODE, st.snapshots, st.copies,
      st.partial_clusters, st.store_clusters_used);
  fleece_close (t.fl);
  pthread_mutex_destroy (&t.lock);
  pthread_cond_destroy (&t.cond);
  free (t.ref);
  free ((void *) t.wseq);
}

/* ---- (b) Atomic creation ---- */

#define SECTOR 512
#define NSWRITERS 4

struct atom {
  struct fleece *fl;
  uint64_t nsectors;
  _Atomic uint64_t *started, *completed;
  atomic_bool stop;
  atomic_ullong writes, errors;
};

struct swriter {
  struct atom *a;
  int id;
  pthread_t thread;
};

static void
fill_sector (uint64_t *buf, uint64_t sector, uint64_t counter)
{
  unsigned i;

  for (i = 0; i < SECTOR / 8; i++)
    buf[i] = (sector << 40) ^ counter ^ ((uint64_t) i << 56);
}

/* Decode a sector: returns false if it is torn or not this sector's. */
static bool
parse_sector (const uint64_t *buf, uint64_t sector, uint64_t *counter)
{
  unsigned i;

  *counter = (buf[0] ^ (sector << 40)) & ((UINT64_C (1) << 40) - 1);
  for (i = 0; i < SECTOR / 8; i++)
    if (buf[i] != ((sector << 40) ^ *counter ^ ((uint64_t) i << 56)))
      return false;
  return true;
}

/* Writer id owns sectors id, id + NSWRITERS, ...: interleaved with the
 * others' inside every cluster.
 */
static void *
sector_writer (void *arg)
{
  struct swriter *w = arg;
  struct atom *a = w->a;
  uint64_t buf[SECTOR / 8], s = w->id, counter = 0;

  while (!atomic_load (&a->stop)) {
    uint64_t k = ++counter;
    fill_sector (buf, s, k);
    atomic_store (&a->started[s], k);
    if (fleece_live_pwrite (a->fl, buf, SECTOR, s * SECTOR, 0) == -1) {
      if (atomic_fetch_add (&a->errors, 1) == 0)
        diag ("sector writer %d: %s", w->id, fleece_last_error ());
    }
    atomic_store (&a->completed[s], k);
    atomic_fetch_add (&a->writes, 1);
    s += NSWRITERS;
    if (s >= a->nsectors)
      s = w->id;
  }
  return NULL;
}

struct taken {
  char name[32];
  uint8_t *bytes;               /* as first read */
};

/* Read snapshot name and check every sector against [lo, hi]. */
static bool
check_snapshot (struct atom *a, const char *name, const uint64_t *lo,
                const uint64_t *hi, uint8_t *bytes, unsigned *bad)
{
  struct fleece_snap *h = fleece_snap_get (a->fl, name);
  uint64_t s, counter;

  if (h == NULL ||
      fleece_snap_pread (h, bytes, a->nsectors * SECTOR, 0) == -1) {
    diag ("%s: %s", name, fleece_last_error ());
    fleece_snap_put (h);
    return false;
  }
  fleece_snap_put (h);
  for (s = 0; s < a->nsectors; s++) {
    const uint64_t *p = (const uint64_t *) (bytes + s * SECTOR);
    if (!parse_sector (p, s, &counter)) {
      if ((*bad)++ < MAX_REPORTS)
        diag ("%s: sector %" PRIu64 " is torn or misplaced", name, s);
    }
    else if (counter < lo[s] || counter > hi[s]) {
      if ((*bad)++ < MAX_REPORTS)
        diag ("%s: sector %" PRIu64 " has write %" PRIu64 ", outside [%"
              PRIu64 ", %" PRIu64 "]", name, s, counter, lo[s], hi[s]);
    }
  }
  return true;
}

/* Read a snapshot again: the same bytes. */
static bool
reread_same (struct atom *a, const struct taken *tk, uint8_t *scratch)
{
  struct fleece_snap *h = fleece_snap_get (a->fl, tk->name);
  bool same = h && fleece_snap_pread (h, scratch, a->nsectors * SECTOR,
                                      0) == 0 &&
    memcmp (scratch, tk->bytes, a->nsectors * SECTOR) == 0;

  fleece_snap_put (h);
  return same;
}

static void
atomic_creation (uint32_t cs, unsigned nclusters, unsigned rounds)
{
  const char *disk = test_path ("disk"), *store = test_path ("store");
  struct atom a = { .nsectors = (uint64_t) nclusters * cs / SECTOR };
  struct swriter w[NSWRITERS];
  struct taken tk[2] = { { .name = "" }, { .name = "" } };
  uint64_t *lo = malloc (a.nsectors * sizeof *lo);
  uint64_t *hi = malloc (a.nsectors * sizeof *hi);
  uint8_t *init = malloc (a.nsectors * SECTOR);
  uint8_t *scratch = malloc (a.nsectors * SECTOR);
  unsigned i, bad = 0, read_fail = 0, changed = 0, n;
  uint64_t s;
  struct fleece_stats st;

  a.started = calloc (a.nsectors, sizeof *a.started);
  a.completed = calloc (a.nsectors, sizeof *a.completed);
  tk[0].bytes = malloc (a.nsectors * SECTOR);
  tk[1].bytes = malloc (a.nsectors * SECTOR);
  assert (lo && hi && init && scratch && a.started && a.completed &&
          tk[0].bytes && tk[1].bytes);
  for (s = 0; s < a.nsectors; s++)
    fill_sector ((uint64_t *) (init + s * SECTOR), s, 0);
  test_write_disk (disk, init, a.nsectors * SECTOR);
  a.fl = test_open (disk, store, cs);

  for (i = 0; i < NSWRITERS; i++) {
    w[i].a = &a;
    w[i].id = i;
    if (pthread_create (&w[i].thread, NULL, sector_writer, &w[i]) != 0)
      bail_out ("pthread_create: %m");
  }
  for (n = 0; n < rounds; n++) {
    struct taken *cur = &tk[n % 2];

    /* Let the writers go on for a moment, then re-read the snapshot
     * taken in the previous round and retire it.
     */
    sleep_us (500 + n % 7 * 300);
    if (cur->name[0]) {
      if (!reread_same (&a, cur, scratch))
        changed++;
      if (fleece_snapshot_delete (a.fl, cur->name) == -1)
        bail_out ("fleece_snapshot_delete: %s", fleece_last_error ());
    }
    for (s = 0; s < a.nsectors; s++)
      lo[s] = atomic_load (&a.completed[s]);
    snprintf (cur->name, sizeof cur->name, "atomic-%u", n);
    if (fleece_snapshot_create (a.fl, cur->name) == -1)
      bail_out ("fleece_snapshot_create: %s", fleece_last_error ());
    for (s = 0; s < a.nsectors; s++)
      hi[s] = atomic_load (&a.started[s]);
    if (!check_snapshot (&a, cur->name, lo, hi, cur->bytes, &bad))
      read_fail++;
  }
  for (i = 0; i < 2; i++)
    if (tk[i].name[0] && !reread_same (&a, &tk[i], scratch))
      changed++;
  atomic_store (&a.stop, true);
  for (i = 0; i < NSWRITERS; i++)
    pthread_join (w[i].thread, NULL);

  settled_stats (a.fl, &st);
  diag ("atomic creation, %" PRIu32 " byte clusters, %" PRIu64 " sectors: "
        "%u snapshots, %llu sector writes; writer stall at creation: "
        "max %.1f us, last %.1f us", cs, a.nsectors, rounds,
        (unsigned long long) a.writes, st.max_drain_ns / 1e3,
        st.last_drain_ns / 1e3);
  ok (bad == 0 && read_fail == 0 && a.errors == 0,
      "atomic creation, %" PRIu32 " byte clusters%s: every sector of %u "
      "snapshots whole and between the writes completed before and "
      "started after creation (%u bad, %u failed reads, %llu write errors)",
      cs, MODE, rounds, bad, read_fail, (unsigned long long) a.errors);
  ok (changed == 0, "atomic creation, %" PRIu32 " byte clusters%s: "
      "snapshots read the same later, as the writers go on (%u changed)",
      cs, MODE, changed);
  ok (a.writes > rounds, "atomic creation: the writers were busy "
      "(%llu writes)", (unsigned long long) a.writes);

  for (i = 0; i < 2; i++)
    if (tk[i].name[0])
      fleece_snapshot_delete (a.fl, tk[i].name);
  settled_stats (a.fl, &st);
  ok (st.copies == 0 && st.store_clusters_used == 0 &&
      st.partial_clusters == 0,
      "atomic creation%s: everything freed at the end", MODE);
  fleece_close (a.fl);
  free (lo);
  free (hi);
  free (init);
  free (scratch);
  free (tk[0].bytes);
  free (tk[1].bytes);
  free ((void *) a.started);
  free ((void *) a.completed);
}

int
main (int argc, char *argv[])
{
  double seconds;

  under_valgrind = test_under_valgrind ();
  seconds = test_env_ulong ("FLEECE_STRESS_SECONDS", under_valgrind ? 1 : 2);
  seed = test_seed ();
  if (test_env_ulong ("FLEECE_BREAK_ISOLATION", 0)) {
    diag ("FLEECE_BREAK_ISOLATION: isolation check disabled, this test "
          "must fail");
    fleece_debug.skip_isolation_check = 1;
  }
  test_make_dir ("test-engine-stress");

  isolation_round (8 * MiB, 64 * KiB, 8, seconds);
  isolation_round (8 * MiB, 4 * KiB, 32, seconds);
  atomic_creation (64 * KiB, 2, 50);
  atomic_creation (4 * KiB, 8, 50);
  /* subcluster=true: clusters copied block by block, also on a
   * persistent store (test-engine-persistent.sh: PARTIAL records).
   */
  test_subcluster = true;
  isolation_round (8 * MiB, 64 * KiB, 8, seconds);
  atomic_creation (64 * KiB, 2, 50);
  return done ();
}
