/* A crash during snapshot-delete on a persistent store (subcluster=true):
 * the deletion is not stable until the image without the snapshot is,
 * so a kill -9 before that brings the snapshot back, and it must then
 * read exactly what it read before (docs/durability.md statements 6
 * and 7).
 *
 * The disk is 4 clusters of 64 KiB, blocks of 4 KiB, all 0x21.  The
 * engine's test hook (fl_test_delete_hook) runs inside the deletion,
 * after the snapshot left the list and before the image without it is
 * written: there a live write is made and acknowledged, then the store
 * and the disk are copied, as a kill -9 right then would leave them (the
 * crash image).  Each crash image is loaded:
 *
 *   partial   s1, then a write of block 0 of cluster 0 (s1's partly
 *             copied cluster), then s2; delete s1, and the hook writes
 *             block 1 of cluster 0.  No snapshot left needs s1's entry,
 *             but s1 comes back after the crash: it must read cluster 0
 *             as it was (the write must not copy the cluster again for
 *             s2 under a range that replaces s1's entry at replay).
 *   newest    the same start and s1's deletion again, then delete s2,
 *             the last snapshot, and the hook writes all of cluster 2
 *             and block 0 of cluster 3: s2 comes back and must read them
 *             as they were (the write must still copy them, whole and in
 *             part).
 *
 * And in that second run, the live engine: the deleted snapshots are
 * gone, s2 stays exact after s1's deletion, and deleting s2 gives the
 * store's space back at once.
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fleece.h"
#include "test-engine.h"

#define CS        65536u
#define BS        4096u
#define DISK_SIZE (4 * (uint64_t) CS)

/* The engine's test hook (server/snapshot.c); libfleece is linked in. */
extern void (*fl_test_delete_hook) (struct fleece *fl, const char *name);

static const char *disk, *store;
static uint8_t *now;                    /* the disk as the writes left it */

/* What the hook writes, and the crash image it takes. */
static struct {
  uint64_t offset;
  uint32_t len;
  uint8_t byte;
  uint8_t *store, *disk;
  size_t store_size, disk_size;
  uint64_t store_used;
} h;

static struct fleece *
open_store (void)
{
  struct fleece_config cfg = {
    .disk = disk, .store = store, .cluster_size = CS, .persistent = true,
  };

  return test_try_open (&cfg);
}

static void
live_write (struct fleece *fl, uint64_t offset, uint32_t len, uint8_t byte)
{
  uint8_t *buf = malloc (len);

  if (buf == NULL)
    bail_out ("out of memory");
  memset (buf, byte, len);
  if (fleece_live_pwrite (fl, buf, len, offset, 0) == -1)
    bail_out ("live write of %" PRIu32 " bytes at %" PRIu64 ": %s", len,
              offset, fleece_last_error ());
  memcpy (now + offset, buf, len);
  free (buf);
}

static void
hook (struct fleece *fl, const char *name)
{
  struct fleece_stats st;

  diag ("deleting %s: a write of %" PRIu32 " bytes at %" PRIu64
        ", then the crash image", name, h.len, h.offset);
  live_write (fl, h.offset, h.len, h.byte);
  settled_stats (fl, &st);
  h.store_used = st.store_bytes_used;
  free (h.store);
  free (h.disk);
  h.store = test_read_file (store, &h.store_size);
  h.disk = test_read_file (disk, &h.disk_size);
}

static void
delete_crashing (struct fleece *fl, const char *name, uint64_t offset,
                 uint32_t len, uint8_t byte)
{
  h.offset = offset;
  h.len = len;
  h.byte = byte;
  fl_test_delete_hook = hook;
  if (fleece_snapshot_delete (fl, name) == -1)
    bail_out ("snapshot delete %s: %s", name, fleece_last_error ());
  fl_test_delete_hook = NULL;
  if (h.store == NULL)
    bail_out ("snapshot delete %s did not call the test hook", name);
}

/* Does snapshot name read want?  Says where it first differs. */
static bool
reads (struct fleece *fl, const char *name, const uint8_t *want)
{
  uint8_t *buf = malloc (DISK_SIZE);
  struct fleece_snap *s = fleece_snap_get (fl, name);
  bool r = false;

  if (buf == NULL)
    bail_out ("out of memory");
  if (s == NULL)
    diag ("snapshot %s: %s", name, fleece_last_error ());
  else if (fleece_snap_pread (s, buf, DISK_SIZE, 0) == -1)
    diag ("snapshot %s: read: %s", name, fleece_last_error ());
  else if (memcmp (buf, want, DISK_SIZE) != 0) {
    int64_t d = test_first_diff (buf, want, DISK_SIZE);
    diag ("snapshot %s differs at byte %" PRId64 " (block %" PRId64
          "): 0x%02x, not 0x%02x", name, d, d / BS, buf[d], want[d]);
  }
  else
    r = true;
  fleece_snap_put (s);
  free (buf);
  return r;
}

/* Load the crash image: is snapshot name there, unbroken, reading want,
 * and, if other is not NULL, snapshot other reading other_want?
 */
static bool
crash_reads (const char *name, const uint8_t *want, const char *other,
             const uint8_t *other_want)
{
  struct fleece_snap_info info;
  struct fleece *fl;
  bool r = false;

  test_write_disk (disk, h.disk, h.disk_size);
  test_write_disk (store, h.store, h.store_size);
  fl = open_store ();
  if (fl == NULL)
    bail_out ("the crash image does not load: %s", fleece_last_error ());
  if (fleece_snapshot_info (fl, name, &info) == -1)
    diag ("snapshot %s is not in the crash image: %s", name,
          fleece_last_error ());
  else if (info.broken)
    diag ("snapshot %s is broken: %s", name, info.broken_reason);
  else
    r = reads (fl, name, want) &&
      (other == NULL || reads (fl, other, other_want));
  fleece_close (fl);
  free (h.store);
  free (h.disk);
  h.store = h.disk = NULL;
  return r;
}

/* A fresh disk (all 0x21) and store: s1, a write of block 0 of cluster
 * 0 (s1's partly copied cluster), s2.  at_s1, at_s2: what they read.
 */
static struct fleece *
start (uint8_t *at_s1, uint8_t *at_s2)
{
  struct fleece_stats st;
  struct fleece *fl;

  memset (now, 0x21, DISK_SIZE);
  test_write_disk (disk, now, DISK_SIZE);
  unlink (store);
  fl = open_store ();
  if (fl == NULL)
    bail_out ("fleece_open: %s", fleece_last_error ());
  if (fleece_snapshot_create (fl, "s1") == -1)
    bail_out ("snapshot s1: %s", fleece_last_error ());
  memcpy (at_s1, now, DISK_SIZE);
  live_write (fl, 0, BS, 0x42);
  if (fleece_snapshot_create (fl, "s2") == -1)
    bail_out ("snapshot s2: %s", fleece_last_error ());
  memcpy (at_s2, now, DISK_SIZE);
  settled_stats (fl, &st);
  if (st.partial_clusters != 1)
    bail_out ("%" PRIu64 " clusters partly copied, expected 1",
              st.partial_clusters);
  return fl;
}

int
main (void)
{
  uint8_t *at_s1, *at_s2;
  struct fleece_snap_info info;
  struct fleece_stats st;
  struct fleece *fl;

  test_make_dir ("test-engine-delete-crash");
  disk = test_path ("disk");
  store = test_path ("store");
  now = malloc (DISK_SIZE);
  at_s1 = malloc (DISK_SIZE);
  at_s2 = malloc (DISK_SIZE);
  if (now == NULL || at_s1 == NULL || at_s2 == NULL)
    bail_out ("out of memory");

  /* partial */
  fl = start (at_s1, at_s2);
  delete_crashing (fl, "s1", BS, BS, 0x43);
  fleece_close (fl);
  ok (crash_reads ("s1", at_s1, "s2", at_s2),
      "partial: after a crash in its deletion, s1 reads cluster 0 as it "
      "was, though s2 needed none of s1's blocks; s2 exact");

  /* Again, carried on to the newest: the live engine. */
  fl = start (at_s1, at_s2);
  delete_crashing (fl, "s1", BS, BS, 0x43);
  ok (fleece_snapshot_info (fl, "s1", &info) == -1 && reads (fl, "s2", at_s2),
      "partial: live, s1 is deleted and s2 exact");

  /* newest */
  delete_crashing (fl, "s2", 2 * (uint64_t) CS, CS + BS, 0x44);
  settled_stats (fl, &st);
  ok (fleece_snapshot_info (fl, "s2", &info) == -1 && st.copies == 0 &&
      st.partial_clusters == 0 && st.store_bytes_used < h.store_used,
      "newest: live, s2 is deleted, its copies are gone and their space "
      "is free at once (%" PRIu64 " bytes used, %" PRIu64 " before)",
      st.store_bytes_used, h.store_used);
  fleece_close (fl);
  ok (crash_reads ("s2", at_s2, NULL, NULL),
      "newest: after a crash in its deletion, s2 reads the disk as it was");

  free (now);
  free (at_s1);
  free (at_s2);
  return done ();
}
