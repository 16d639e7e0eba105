/* Loading partly copied clusters from a persistent store (subcluster=true,
 * docs/store-format.md "PARTIAL", "Loading"), and refusing damaged ones.
 *
 * The disk is 15.5 clusters of 64 KiB (its last cluster has 8 blocks of
 * 4 KiB).  Snapshot s is created, then two 4 KiB live writes copy one
 * block of cluster 0 and one of cluster 15: two PARTIAL records, the
 * last of the log.  The store file is copied while the engine is still
 * open, as a kill -9 would leave it (the crash image); closing it then
 * writes an image that holds both entries in its partial table (the
 * clean image).  Each case edits a copy, with valid checksums unless
 * said, and loads it:
 *
 *   crash, clean   load; s reads the disk as it was, 2 clusters partly
 *                  copied
 *   outside        the record's bitmap claims block 9 of cluster 15:
 *                  refused, naming the store, the record's offset and
 *                  the block
 *   past-end       the record's slot lies past the end of the store (a
 *                  truncated store, as the blocks were synced before the
 *                  record): loads, s broken, as for a lost copy
 *                  (docs/durability.md statement 12)
 *   truncated      the record's payload cut to 20 bytes: refused
 *   zero           a block said zero but not copied: refused
 *   checksum       a byte of the record's checksum changed: not loaded
 *                  silently: s broken, the warning names the store and
 *                  the record's offset (docs/durability.md: the tail of
 *                  the log is judged torn or damaged)
 *   image          the clean image's partial table claims block 9 of
 *                  cluster 15: refused, naming the offset in the store
 *   whole          the crash image opened with subcluster=false: refused,
 *                  saying to use subcluster=true
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include "fleece.h"
#include "test-engine.h"

#define CS        65536u
#define BS        4096u
#define DISK_SIZE (15 * (uint64_t) CS + CS / 2)
#define META_OFF  4096u
#define HALF      (2u << 20)
/* The superblock and the log, rounded up to a cluster. */
#define DATA_OFF  ((uint64_t) (4u << 20) + CS)
#define REC_PARTIAL 0x0023

static const char *disk, *store;
static uint8_t *before;                 /* the disk at s's creation */
static uint8_t *crash, *clean;          /* the two store images */
static size_t crash_size, clean_size;
static char warned[8192];

static void
on_warn (const char *msg)
{
  size_t n = strlen (warned);

  snprintf (warned + n, sizeof warned - n, "%s\n", msg);
}

static struct fleece *
open_store (bool whole)
{
  struct fleece_config cfg = {
    .disk = disk, .store = store, .cluster_size = CS, .persistent = true,
    .whole_clusters = whole,
  };

  warned[0] = '\0';
  return test_try_open (&cfg);
}

static uint32_t
get32 (const uint8_t *p)
{
  uint32_t v;

  memcpy (&v, p, 4);
  return le32toh (v);
}

static uint64_t
get64 (const uint8_t *p)
{
  uint64_t v;

  memcpy (&v, p, 8);
  return le64toh (v);
}

static void
put32 (uint8_t *p, uint32_t v)
{
  v = htole32 (v);
  memcpy (p, &v, 4);
}

static void
put64 (uint8_t *p, uint64_t v)
{
  v = htole64 (v);
  memcpy (p, &v, 8);
}

/* The record at p gets a valid checksum again. */
static void
rehash (uint8_t *p)
{
  XXH64_state_t *h = XXH64_createState ();

  XXH64_reset (h, 0);
  XXH64_update (h, p, 24);
  XXH64_update (h, p + 32, get32 (p + 8));
  put64 (p + 24, XXH64_digest (h));
  XXH64_freeState (h);
}

/* The active half of image p: the one whose STATE is newer. */
static size_t
active_half (const uint8_t *p)
{
  uint64_t s0 = get64 (p + META_OFF + 16);
  uint64_t s1 = get64 (p + META_OFF + HALF + 16);

  if (memcmp (p + META_OFF + HALF, "FLMR", 4) != 0)
    return META_OFF;
  return s1 > s0 ? META_OFF + HALF : META_OFF;
}

/* The file offset of the last PARTIAL record in the active half of p. */
static size_t
last_partial (const uint8_t *p)
{
  size_t half = active_half (p), pos = 0, found = 0;

  while (pos + 32 <= HALF && memcmp (p + half + pos, "FLMR", 4) == 0) {
    if (get32 (p + half + pos + 4) == REC_PARTIAL)
      found = half + pos;
    pos += 32 + ((get32 (p + half + pos + 8) + 7) & ~7u);
  }
  if (found == 0)
    bail_out ("no PARTIAL record in the crash image");
  return found;
}

static void
make_images (void)
{
  uint8_t buf[BS];
  struct fleece *fl;

  before = malloc (DISK_SIZE);
  if (before == NULL)
    bail_out ("out of memory");
  memset (before, 0x21, DISK_SIZE);
  test_write_disk (disk, before, DISK_SIZE);
  unlink (store);
  fl = open_store (false);
  if (fl == NULL)
    bail_out ("fleece_open: %s", fleece_last_error ());
  if (fleece_snapshot_create (fl, "s") == -1)
    bail_out ("snapshot s: %s", fleece_last_error ());
  memset (buf, 0x42, BS);
  if (fleece_live_pwrite (fl, buf, BS, BS, 0) == -1 ||
      fleece_live_pwrite (fl, buf, BS, 15 * (uint64_t) CS + 3 * BS, 0) == -1)
    bail_out ("live write: %s", fleece_last_error ());
  crash = test_read_file (store, &crash_size);  /* as kill -9 leaves it */
  fleece_close (fl);
  clean = test_read_file (store, &clean_size);
}

struct outcome {
  bool loaded, broken, exact;
  uint64_t partial;
  char err[1024];
  char reason[256];
};

static struct outcome
load (const uint8_t *img, size_t size, bool whole)
{
  struct outcome o = { 0 };
  struct fleece_snap_info info;
  struct fleece_stats st;
  struct fleece_snap *s;
  struct fleece *fl;
  uint8_t *buf = malloc (DISK_SIZE);
  uint8_t *after;

  if (buf == NULL)
    bail_out ("out of memory");
  /* The disk as the writes left it. */
  after = malloc (DISK_SIZE);
  if (after == NULL)
    bail_out ("out of memory");
  memcpy (after, before, DISK_SIZE);
  memset (after + BS, 0x42, BS);
  memset (after + 15 * (uint64_t) CS + 3 * BS, 0x42, BS);
  test_write_disk (disk, after, DISK_SIZE);
  free (after);
  test_write_disk (store, img, size);
  fl = open_store (whole);
  if (fl == NULL) {
    snprintf (o.err, sizeof o.err, "%s", fleece_last_error ());
    diag ("refused: %s", o.err);
    free (buf);
    return o;
  }
  o.loaded = true;
  settled_stats (fl, &st);
  o.partial = st.partial_clusters;
  if (fleece_snapshot_info (fl, "s", &info) == -1)
    bail_out ("snapshot s is gone: %s", fleece_last_error ());
  o.broken = info.broken;
  snprintf (o.reason, sizeof o.reason, "%s", info.broken_reason);
  s = fleece_snap_get (fl, "s");
  assert (s != NULL);
  if (fleece_snap_pread (s, buf, DISK_SIZE, 0) == 0)
    o.exact = memcmp (buf, before, DISK_SIZE) == 0;
  fleece_snap_put (s);
  fleece_close (fl);
  free (buf);
  return o;
}

/* A copy of img with fn applied to it at off. */
static struct outcome
edited (const uint8_t *img, size_t size, size_t off,
        void (*fn) (uint8_t *rec))
{
  uint8_t *p = malloc (size);
  struct outcome o;

  if (p == NULL)
    bail_out ("out of memory");
  memcpy (p, img, size);
  fn (p + off);
  o = load (p, size, false);
  free (p);
  return o;
}

/* The payload of a PARTIAL record: cluster, lo, hi, slot, words, 0, then
 * the "copied" words and the "zero" words.
 */
static void
outside (uint8_t *rec)
{
  rec[32 + 25] |= 1 << 1;       /* block 9 */
  rehash (rec);
}

static void
past_end (uint8_t *rec)
{
  put32 (rec + 32 + 12, 100000);
  rehash (rec);
}

static void
truncated (uint8_t *rec)
{
  put32 (rec + 8, 20);
  rehash (rec);
}

static void
zero_not_copied (uint8_t *rec)
{
  rec[32 + 32] |= 1 << 5;       /* block 5: zero, not copied */
  rehash (rec);
}

static void
flip_checksum (uint8_t *rec)
{
  rec[24] ^= 0x01;
}

static bool
names (const char *err, size_t off, const char *what)
{
  char at[64];

  snprintf (at, sizeof at, "offset %zu ", off);
  return strstr (err, store) && strstr (err, at) && strstr (err, what);
}

/* The clean image's partial table: its entry for cluster 15 claims block
 * 9; the image's checksum and its STATE record are made valid again.
 * Returns the entry's offset in the store.
 */
static size_t
damage_image (uint8_t *p)
{
  size_t st = active_half (p), img, e, i;
  uint32_t slot = get32 (p + st + 32), len = get32 (p + st + 32 + 8);
  uint32_t nsnaps, npartials;

  img = DATA_OFF + (uint64_t) slot * CS;
  assert (memcmp (p + img, "FLIMAGE1", 8) == 0);
  npartials = get32 (p + img + 36);
  nsnaps = get32 (p + img + 28);
  assert (npartials == 2 && nsnaps == 1);
  /* The entries are the last before the copy table (empty here): 24 +
   * 16 bytes each, at the end of the image.
   */
  assert (get64 (p + img + 40) == 0);
  for (i = 0, e = img + len - 80; i < 2; i++, e += 40)
    if (get32 (p + e) == 15)
      break;
  assert (i < 2);
  p[e + 24 + 1] |= 1 << 1;      /* block 9 */
  put64 (p + st + 32 + 16, XXH64 (p + img, len, 0));
  rehash (p + st);
  return e;
}

int
main (void)
{
  struct outcome o;
  size_t off;
  uint8_t *p;

  test_make_dir ("test-engine-partial");
  disk = test_path ("disk");
  store = test_path ("store");
  fleece_set_warn (on_warn);
  make_images ();
  off = last_partial (crash);
  diag ("the last PARTIAL record is at offset %zu", off);

  o = load (crash, crash_size, false);
  ok (o.loaded && !o.broken && o.exact && o.partial == 2,
      "crash: loads, s reads the disk as it was, %" PRIu64 " clusters "
      "partly copied", o.partial);
  o = load (clean, clean_size, false);
  ok (o.loaded && !o.broken && o.exact && o.partial == 2,
      "clean: loads from the image's partial table, s exact, %" PRIu64
      " clusters partly copied", o.partial);

  o = edited (crash, crash_size, off, outside);
  ok (!o.loaded && names (o.err, off, "claims block 9 of cluster 15, "
                          "which has 8 blocks"),
      "outside: a block past the cluster's end is refused (%s)", o.err);
  o = edited (crash, crash_size, off, past_end);
  ok (o.loaded && o.broken && strstr (o.reason, "store was truncated") &&
      strstr (warned, "snapshot 's' is broken"),
      "past-end: a slot past the store's end: s broken, said at the "
      "warning level (%s)", o.reason);
  o = edited (crash, crash_size, off, truncated);
  ok (!o.loaded && names (o.err, off, "is truncated"),
      "truncated: a short record is refused (%s)", o.err);
  o = edited (crash, crash_size, off, zero_not_copied);
  ok (!o.loaded && names (o.err, off, "zero but not copied"),
      "zero: a block zero but not copied is refused (%s)", o.err);
  o = edited (crash, crash_size, off, flip_checksum);
  ok (o.loaded && o.broken && strstr (warned, store) &&
      strstr (warned, "is damaged, not torn"),
      "checksum: not loaded silently: s broken, said at the warning level "
      "(%s)", warned);
  snprintf (o.err, sizeof o.err, "offset %zu of half %zu",
            (off - META_OFF) % HALF, (off - META_OFF) / HALF);
  ok (strstr (warned, o.err) != NULL, "checksum: the warning says %s",
      o.err);

  p = malloc (clean_size);
  assert (p != NULL);
  memcpy (p, clean, clean_size);
  off = damage_image (p);
  o = load (p, clean_size, false);
  ok (!o.loaded && names (o.err, off, "claims block 9 of cluster 15"),
      "image: a partial table entry past the cluster is refused (%s)",
      o.err);
  free (p);

  o = load (crash, crash_size, true);
  ok (!o.loaded && strstr (o.err, store) &&
      strstr (o.err, "start with subcluster=true"),
      "whole: subcluster=false is refused on a store with partly copied "
      "clusters (%s)", o.err);

  free (before);
  free (crash);
  free (clean);
  return done ();
}
