/* The CBW store: allocation and freeing of slots, the snapshot limit, and
 * store failures.
 *
 * Allocation.  A seeded random sequence of snapshot creations, deletions,
 * client trims and whole-cluster live writes (data or zeroes) on a small
 * disk, checked after every step against a model of which old versions of
 * which clusters some snapshot still needs (the model of
 * test-engine-cbw.c, without the bytes): store_clusters_used, copies, the
 * space the store file occupies (freed slots are punched out), and that
 * freed slots are reused, lowest first, so the store never spans more
 * slots than were ever in use at once.
 *
 * The snapshot limit: FLEECE_SNAPSHOTS_MAX snapshots can exist, one more
 * is refused with ENOSPC and a message that says so, and one overwrite
 * under all of them still costs one copy (invariant 2).
 *
 * Store failures (invariant 6), with fleece_debug.fail_store_write:
 * break-snapshot lets the live write through and breaks exactly the
 * snapshots that needed the copy (reads then fail with EIO, an event says
 * why); fail-write fails the live write and changes nothing.
 *
 * Environment: FLEECE_TEST_SEED, FLEECE_TEST_OPS.
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fleece.h"
#include "test-engine.h"

#define KiB 1024u
#define MAX_SNAPS 8
#define CS 4096u                 /* cluster size of the failure tests */

static struct rng rng;

/* ---- Allocation against a model ---- */

struct msnap {
  char name[32];
  uint32_t *ver;
  bool *zero;                   /* the cluster was all zeroes at creation */
  bool *released;
};

struct model {
  struct fleece *fl;
  uint32_t cs;
  uint64_t nclusters;
  uint32_t *cur;
  bool *zero;                   /* live cluster is all zeroes */
  struct msnap snaps[MAX_SNAPS];
  unsigned nsnaps, next_name;
  uint64_t cbw, peak_used;
  uint8_t *data, *zeroes;
};

static void
model_expect (const struct model *m, uint64_t *copies, uint64_t *used)
{
  uint64_t c;
  unsigned i, j;

  *copies = *used = 0;
  for (c = 0; c < m->nclusters; c++)
    for (i = 0; i < m->nsnaps; i++) {
      const struct msnap *s = &m->snaps[i];
      bool dup = false;
      if (s->released[c] || s->ver[c] == m->cur[c])
        continue;
      for (j = 0; j < i; j++)
        dup |= !m->snaps[j].released[c] && m->snaps[j].ver[c] == s->ver[c];
      if (dup)
        continue;
      (*copies)++;
      *used += !s->zero[c];
    }
}

static void
m_create (struct model *m)
{
  struct msnap *s = &m->snaps[m->nsnaps];

  snprintf (s->name, sizeof s->name, "s%u", m->next_name++);
  if (fleece_snapshot_create (m->fl, s->name) == -1)
    bail_out ("fleece_snapshot_create: %s", fleece_last_error ());
  s->ver = malloc (m->nclusters * sizeof *s->ver);
  s->zero = malloc (m->nclusters * sizeof *s->zero);
  s->released = calloc (m->nclusters, sizeof *s->released);
  assert (s->ver && s->zero && s->released);
  memcpy (s->ver, m->cur, m->nclusters * sizeof *s->ver);
  memcpy (s->zero, m->zero, m->nclusters * sizeof *s->zero);
  m->nsnaps++;
}

static void
m_delete (struct model *m, unsigned i)
{
  struct msnap s = m->snaps[i];

  if (fleece_snapshot_delete (m->fl, s.name) == -1)
    bail_out ("fleece_snapshot_delete: %s", fleece_last_error ());
  memmove (&m->snaps[i], &m->snaps[i + 1],
           (m->nsnaps - i - 1) * sizeof m->snaps[0]);
  m->nsnaps--;
  free (s.ver);
  free (s.zero);
  free (s.released);
}

/* Whole clusters [c0, c0+n): data, or zeroes written as data. */
static void
m_write (struct model *m, uint64_t c0, uint64_t n)
{
  uint64_t c;
  bool zero = rng_one_in (&rng, 5);
  unsigned i;

  for (c = c0; c < c0 + n; c++) {
    for (i = 0; i < m->nsnaps; i++)
      if (!m->snaps[i].released[c] && m->snaps[i].ver[c] == m->cur[c]) {
        m->cbw++;
        break;
      }
    m->cur[c]++;
    m->zero[c] = zero;
  }
  if (!zero) {
    rng_fill (&rng, m->data, n * m->cs);
    m->data[0] |= 1;
    for (c = 1; c < n; c++)
      m->data[c * m->cs] |= 1;
  }
  if (fleece_live_pwrite (m->fl, zero ? m->zeroes : m->data, n * m->cs,
                          c0 * m->cs, 0) == -1)
    bail_out ("fleece_live_pwrite: %s", fleece_last_error ());
}

static void
m_trim (struct model *m, unsigned i, uint64_t c0, uint64_t n)
{
  struct fleece_snap *h = fleece_snap_get (m->fl, m->snaps[i].name);
  uint64_t c;

  if (h == NULL || fleece_snap_trim (h, n * m->cs, c0 * m->cs) == -1)
    bail_out ("fleece_snap_trim: %s", fleece_last_error ());
  fleece_snap_put (h);
  for (c = c0; c < c0 + n; c++)
    m->snaps[i].released[c] = true;
}

/* Returns false (after a diag) on the first disagreement. */
static bool
m_check (struct model *m, unsigned step)
{
  struct fleece_stats st;
  uint64_t copies, used;

  settled_stats (m->fl, &st);
  model_expect (m, &copies, &used);
  if (used > m->peak_used)
    m->peak_used = used;
  if (st.store_clusters_used != used || st.copies != copies ||
      st.cbw_clusters != m->cbw) {
    diag ("step %u: used %" PRIu64 " (model %" PRIu64 "), copies %" PRIu64
          " (model %" PRIu64 "), cbw_clusters %" PRIu64 " (model %" PRIu64
          ")", step, st.store_clusters_used, used, st.copies, copies,
          st.cbw_clusters, m->cbw);
    return false;
  }
  if (st.store_clusters_total > m->peak_used) {
    diag ("step %u: the store spans %" PRIu64 " slots, but at most %"
          PRIu64 " were ever used at once", step, st.store_clusters_total,
          m->peak_used);
    return false;
  }
  /* The superblock, the used slots, and a little for the file system's
   * extent tree: freed slots take no space.
   */
  if (st.store_file_bytes < used * m->cs ||
      st.store_file_bytes > 4096 + used * m->cs + 64 * KiB) {
    diag ("step %u: the store file occupies %" PRIu64 " bytes for %" PRIu64
          " used slots", step, st.store_file_bytes, used);
    return false;
  }
  return true;
}

static void
test_allocation (unsigned nsteps)
{
  const uint32_t cs = 4 * KiB;
  const uint64_t nclusters = 256;
  const char *disk = test_path ("disk"), *store = test_path ("store");
  struct model m = { .cs = cs, .nclusters = nclusters };
  unsigned step, good = 1;
  uint64_t c;

  m.cur = calloc (nclusters, sizeof *m.cur);
  m.zero = calloc (nclusters, sizeof *m.zero);
  m.data = malloc (nclusters * cs);
  m.zeroes = calloc (nclusters, cs);
  assert (m.cur && m.zero && m.data && m.zeroes);
  rng_fill (&rng, m.data, nclusters * cs);
  for (c = 0; c < nclusters; c++) {
    m.data[c * cs] |= 1;
    if (c % 9 == 4) {
      memset (m.data + c * cs, 0, cs);
      m.zero[c] = true;
    }
  }
  test_write_disk (disk, m.data, nclusters * cs);
  m.fl = test_open (disk, store, cs);

  for (step = 0; step < nsteps && good; step++) {
    unsigned r = rng_below (&rng, 100);
    uint64_t c0 = rng_below (&rng, nclusters);
    uint64_t n = 1 + rng_below (&rng, 24);

    if (c0 + n > nclusters)
      n = nclusters - c0;
    if (r < 12 && m.nsnaps < MAX_SNAPS)
      m_create (&m);
    else if (r < 22 && m.nsnaps > 0)
      m_delete (&m, rng_below (&rng, m.nsnaps));
    else if (r < 32 && m.nsnaps > 0)
      m_trim (&m, rng_below (&rng, m.nsnaps), c0, n);
    else
      m_write (&m, c0, n);
    good = m_check (&m, step);
  }
  ok (good, "allocation: %u steps of create, delete, trim and write: store "
      "usage, copies and file size match the model (peak %" PRIu64
      " slots, %" PRIu64 " clusters copied)", step, m.peak_used, m.cbw);
  while (m.nsnaps > 0)
    m_delete (&m, 0);
  ok (m_check (&m, step), "allocation: deleting everything frees "
      "everything");
  fleece_close (m.fl);
  free (m.cur);
  free (m.zero);
  free (m.data);
  free (m.zeroes);
}

/* ---- The snapshot limit ---- */

static void
test_limit (void)
{
  const uint32_t cs = 4 * KiB;
  const char *disk = test_path ("disk"), *store = test_path ("store");
  uint8_t *data = malloc (16 * cs), patch[100];
  struct fleece *fl;
  struct fleece_stats st;
  struct fleece_snap_info info;
  char name[32];
  unsigned i, created = 0;
  struct timespec t0, t1;
  double secs;
  int r;

  assert (data);
  rng_fill (&rng, data, 16 * cs);
  data[3 * cs] |= 1;
  test_write_disk (disk, data, 16 * cs);
  fl = test_open (disk, store, cs);

  clock_gettime (CLOCK_MONOTONIC, &t0);
  for (i = 0; i < FLEECE_SNAPSHOTS_MAX; i++) {
    snprintf (name, sizeof name, "limit-%u", i);
    created += fleece_snapshot_create (fl, name) == 0;
  }
  errno = 0;
  r = fleece_snapshot_create (fl, "one-too-many");
  ok (created == FLEECE_SNAPSHOTS_MAX && r == -1 && errno == ENOSPC &&
      strstr (fleece_last_error (), "one-too-many") &&
      strstr (fleece_last_error (), "1024"),
      "%u snapshots, then one more is refused with ENOSPC: %s", created,
      fleece_last_error ());
  clock_gettime (CLOCK_MONOTONIC, &t1);
  secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
  diag ("creating %u snapshots took %.3f s", created, secs);

  memset (patch, 0x77, sizeof patch);
  if (fleece_live_pwrite (fl, patch, sizeof patch, 3 * cs + 10, 0) == -1)
    bail_out ("fleece_live_pwrite: %s", fleece_last_error ());
  settled_stats (fl, &st);
  ok (st.snapshots == FLEECE_SNAPSHOTS_MAX && st.cbw_clusters == 1 &&
      st.copies == 1 && st.store_clusters_used == 1,
      "one overwrite under %u snapshots: %" PRIu64 " copy", st.snapshots,
      st.copies);
  ok (fleece_snapshot_info (fl, "limit-0", &info) == 0 &&
      info.clusters_held == 1 &&
      fleece_snapshot_info (fl, "limit-1023", &info) == 0 &&
      info.clusters_held == 1,
      "the oldest and the newest snapshot both hold it");
  {
    struct fleece_snap *h = fleece_snap_get (fl, "limit-512");
    uint8_t buf[200];
    ok (h && fleece_snap_pread (h, buf, sizeof buf, 3 * cs) == 0 &&
        memcmp (buf, data + 3 * cs, sizeof buf) == 0,
        "a snapshot in the middle reads the old data");
    fleece_snap_put (h);
  }

  if (fleece_snapshot_delete (fl, "limit-7") == -1)
    bail_out ("fleece_snapshot_delete: %s", fleece_last_error ());
  ok (fleece_snapshot_create (fl, "limit-again") == 0,
      "after one delete, one more can be created");
  for (i = 0; i < FLEECE_SNAPSHOTS_MAX; i++) {
    snprintf (name, sizeof name, "limit-%u", i);
    if (i != 7 && fleece_snapshot_delete (fl, name) == -1)
      bail_out ("fleece_snapshot_delete: %s", fleece_last_error ());
  }
  fleece_snapshot_delete (fl, "limit-again");
  settled_stats (fl, &st);
  ok (st.snapshots == 0 && st.copies == 0 && st.store_clusters_used == 0,
      "deleting them all frees everything");
  fleece_close (fl);
  free (data);
}

/* ---- Store failures ---- */

struct events {
  unsigned n;
  char last_event[64], last_snapshot[64], last_reason[256];
};

static void
on_event (void *opaque, const char *event, const char *snapshot,
          const char *reason)
{
  struct events *e = opaque;

  e->n++;
  snprintf (e->last_event, sizeof e->last_event, "%s", event);
  snprintf (e->last_snapshot, sizeof e->last_snapshot, "%s", snapshot);
  snprintf (e->last_reason, sizeof e->last_reason, "%s", reason);
}

static void
test_break_snapshot (void)
{
  const uint32_t cs = CS;
  const char *disk = test_path ("disk"), *store = test_path ("store");
  uint8_t *data = malloc (16 * cs), buf[CS], patch[2 * CS];
  struct fleece *fl;
  struct fleece_snap *a, *b;
  struct fleece_snap_info info;
  struct fleece_stats st;
  struct events ev = { 0 };
  int r;

  assert (data);
  rng_fill (&rng, data, 16 * cs);
  test_write_disk (disk, data, 16 * cs);
  fl = test_open (disk, store, cs);
  fleece_set_event_listener (fl, on_event, &ev);
  /* a and b are of different generations, and both need cluster 9's
   * old data: one copy, which fails.
   */
  if (fleece_snapshot_create (fl, "a") == -1 ||
      fleece_live_pwrite (fl, data, cs, 5 * cs, 0) == -1 ||
      fleece_snapshot_create (fl, "b") == -1 ||
      (a = fleece_snap_get (fl, "a")) == NULL ||
      (b = fleece_snap_get (fl, "b")) == NULL)
    bail_out ("%s", fleece_last_error ());
  memset (patch, 0x42, sizeof patch);

  fleece_debug.fail_store_write = 1;
  r = fleece_live_pwrite (fl, patch, 100, 9 * cs + 7, 0);
  fleece_debug.fail_store_write = 0;
  ok (r == 0, "break-snapshot: the live write succeeds although the store "
      "fails");
  ok (fleece_live_pread (fl, buf, 100, 9 * cs + 7) == 0 &&
      memcmp (buf, patch, 100) == 0, "break-snapshot: ... and landed");
  errno = 0;
  r = fleece_snap_pread (a, buf, cs, 0);
  ok (r == -1 && errno == EIO &&
      strstr (fleece_last_error (), "broken"),
      "break-snapshot: snapshot a fails reads with EIO: %s",
      fleece_last_error ());
  ok (!fleece_last_error_is_repeat (),
      "break-snapshot: ... the first failure is to be logged");
  errno = 0;
  ok (fleece_snap_pread (b, buf, cs, 9 * cs) == -1 && errno == EIO,
      "break-snapshot: so does b, which needed the same copy");
  ok (!fleece_last_error_is_repeat (),
      "break-snapshot: ... b's first failure is to be logged too");
  errno = 0;
  ok (fleece_snap_pread (a, buf, cs, 5 * cs) == -1 && errno == EIO &&
      fleece_last_error_is_repeat (),
      "break-snapshot: a's next failure is not logged again");
  ok (fleece_snapshot_info (fl, "a", &info) == 0 && info.broken &&
      strstr (info.broken_reason, "injected"),
      "break-snapshot: the snapshot info says why: %s", info.broken_reason);
  ok (ev.n == 2 && strcmp (ev.last_event, "SNAPSHOT_BROKEN") == 0 &&
      strstr (ev.last_reason, "cluster 9"),
      "break-snapshot: one event per broken snapshot (%u): %s %s: %s", ev.n,
      ev.last_event, ev.last_snapshot, ev.last_reason);
  settled_stats (fl, &st);
  ok (st.cbw_errors == 1, "break-snapshot: cbw_errors is 1 (%" PRIu64 ")",
      st.cbw_errors);
  ok (st.copies == 0 && st.store_clusters_used == 0,
      "break-snapshot: a's copy of cluster 5 was freed at the break, "
      "before any delete (%" PRIu64 " copies, %" PRIu64 " clusters)",
      st.copies, st.store_clusters_used);
  ok (fleece_snapshot_info (fl, "a", &info) == 0 && info.clusters_held == 0,
      "break-snapshot: a holds no copies (%" PRIu64 ")", info.clusters_held);
  fleece_snap_put (a);
  fleece_snap_put (b);
  fleece_snapshot_delete (fl, "a");
  fleece_snapshot_delete (fl, "b");
  settled_stats (fl, &st);
  ok (st.copies == 0 && st.store_clusters_used == 0,
      "break-snapshot: deleting the broken snapshots frees everything");

  /* A snapshot that released the cluster does not break. */
  if (fleece_snapshot_create (fl, "c") == -1 ||
      (a = fleece_snap_get (fl, "c")) == NULL ||
      fleece_snap_trim (a, 2 * cs, 10 * cs) == -1)
    bail_out ("%s", fleece_last_error ());
  fleece_debug.fail_store_write = 1;
  r = fleece_live_pwrite (fl, patch, 2 * cs, 10 * cs, 0);
  fleece_debug.fail_store_write = 0;
  ok (r == 0 && fleece_snap_pread (a, buf, cs, 0) == 0 &&
      memcmp (buf, data, cs) == 0,
      "break-snapshot: a snapshot that released the clusters is not broken");
  fleece_snap_put (a);
  fleece_close (fl);
  free (data);
}

static void
test_fail_write (void)
{
  const uint32_t cs = CS;
  const char *disk = test_path ("disk"), *store = test_path ("store");
  uint8_t *data = malloc (16 * cs), *buf = malloc (16 * cs), patch[3 * CS];
  struct fleece_config cfg = { .disk = disk, .store = store,
                               .cluster_size = cs,
                               .on_cbw_error = FLEECE_CBW_FAIL_WRITE };
  struct fleece *fl;
  struct fleece_snap *h;
  struct fleece_stats st;
  struct fleece_snap_info info;
  int r, err;

  assert (data && buf);
  rng_fill (&rng, data, 16 * cs);
  test_write_disk (disk, data, 16 * cs);
  fl = fleece_open (&cfg);
  if (fl == NULL || fleece_start (fl) == -1 ||
      fleece_snapshot_create (fl, "f") == -1 ||
      (h = fleece_snap_get (fl, "f")) == NULL)
    bail_out ("%s", fleece_last_error ());
  memset (patch, 0x24, sizeof patch);

  fleece_debug.fail_store_write = 1;
  r = fleece_live_pwrite (fl, patch, 2 * cs + 10, 4 * cs - 5, 0);
  err = errno;
  fleece_debug.fail_store_write = 0;
  ok (r == -1 && err == EIO && strstr (fleece_last_error (), "injected"),
      "fail-write: the live write fails with EIO: %s", fleece_last_error ());
  ok (fleece_live_pread (fl, buf, 16 * cs, 0) == 0 &&
      memcmp (buf, data, 16 * cs) == 0,
      "fail-write: the live disk is unchanged");
  ok (fleece_snap_pread (h, buf, 16 * cs, 0) == 0 &&
      memcmp (buf, data, 16 * cs) == 0 &&
      fleece_snapshot_info (fl, "f", &info) == 0 && !info.broken,
      "fail-write: the snapshot is intact and not broken");
  settled_stats (fl, &st);
  ok (st.cbw_errors == 1 && st.store_clusters_used == 0,
      "fail-write: nothing is left allocated (%" PRIu64 " slots)",
      st.store_clusters_used);

  ok (fleece_live_pwrite (fl, patch, 2 * cs + 10, 4 * cs - 5, 0) == 0,
      "fail-write: the write succeeds once the store works");
  ok (fleece_snap_pread (h, buf, 16 * cs, 0) == 0 &&
      memcmp (buf, data, 16 * cs) == 0,
      "fail-write: and the snapshot still reads the old data");
  settled_stats (fl, &st);
  ok (st.cbw_clusters == 4 && st.store_clusters_used == 4,
      "fail-write: the 4 clusters are copied once (%" PRIu64 ")",
      st.cbw_clusters);
  fleece_snap_put (h);
  fleece_close (fl);
  free (data);
  free (buf);
}

int
main (int argc, char *argv[])
{
  unsigned nsteps = test_env_ulong ("FLEECE_TEST_OPS",
                                    test_under_valgrind () ? 400 : 3000);

  rng.s = test_seed ();
  test_make_dir ("test-engine-store");
  test_allocation (nsteps);
  test_limit ();
  test_break_snapshot ();
  test_fail_write ();
  return done ();
}
