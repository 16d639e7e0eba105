/* Loading a damaged persistent store: what the end of the log is judged
 * to be, and a truncated data area (docs/store-format.md, "Torn tail or
 * damage", "Loading").
 *
 * One crash image is made through the engine: a checkpoint c (snapshot c
 * and the recording bitmap c), then one live write of 64 clusters, whose
 * COPY record (64 entries, 1064 bytes: it spans 512-byte sectors) is the
 * last record of the log.  The store file is copied while the engine is
 * still open, as a kill -9 would leave it.  Each case edits that copy,
 * loads it, and checks the snapshot and the bitmap:
 *
 *   torn     the record's sectors after its first never written (zero):
 *            ignored; c reads the disk as it was before the write (which a
 *            torn record proves never reached it)
 *   gone     the whole record never written: the end of the log, ignored
 *   damaged  a byte of its checksum changed (written whole): c broken,
 *            bitmap c inconsistent, both said at the warning level
 *   sector   a short record inside one sector that fails its checksum: a
 *            torn write cannot do that: damaged
 *   unsure   a record whose only zero sector holds fewer than 16 of its
 *            bytes: cannot be told, c broken
 *   cut      the store truncated by one byte (inside the last copy's
 *            slot): c broken, as it reads that copy; the log is intact
 */

#include <config.h>

#undef NDEBUG
#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fleece.h"
#include "test-engine.h"

#define CS        4096u
#define NCL       256u
#define DISK_SIZE ((uint64_t) NCL * CS)
#define WRITTEN   64u                   /* clusters of the live write */
#define META_OFF  4096u
#define HALF      (2u << 20)
#define SECTOR    512u

static const char *disk, *store;
static uint8_t *before, *after;         /* the disk around the write */
static uint8_t *base;                   /* the crash image of the store */
static size_t base_size;
static size_t last_off, last_len;       /* the COPY record, in the file */
static uint64_t last_seq;
static char warned[8192];               /* what fl_warn said */

static void
on_warn (const char *msg)
{
  size_t n = strlen (warned);

  snprintf (warned + n, sizeof warned - n, "%s\n", msg);
}

static struct fleece *
open_store (void)
{
  struct fleece_config cfg = {
    .disk = disk, .store = store, .cluster_size = CS, .persistent = true,
  };

  warned[0] = '\0';
  return test_try_open (&cfg);
}

/* The active half's last record: walk both halves from their STATE while
 * the magic is there and the sequence goes on.
 */
static void
find_last_record (void)
{
  uint64_t best = 0;
  int h;

  for (h = 0; h < 2; h++) {
    size_t half = META_OFF + (size_t) h * HALF, pos = 0, off = 0, len = 0;
    uint64_t seq = 0, first = 0;
    while (pos + 32 <= HALF && memcmp (base + half + pos, "FLMR", 4) == 0) {
      uint32_t l;
      uint64_t s;
      memcpy (&l, base + half + pos + 8, 4);
      memcpy (&s, base + half + pos + 16, 8);
      l = le32toh (l);
      s = le64toh (s);
      if (pos > 0 && s != seq + 1)
        break;
      if (pos == 0)
        first = s;
      seq = s;
      off = half + pos;
      len = 32 + ((l + 7) & ~7u);
      pos += len;
    }
    if (first > best) {
      best = first;
      last_off = off;
      last_len = len;
      last_seq = seq;
    }
  }
  if (best == 0 || last_len < 1000)
    bail_out ("no COPY record of %u entries at the end of the log", WRITTEN);
}

static void
make_base (void)
{
  struct fleece *fl;
  uint8_t *buf = malloc (WRITTEN * CS);
  size_t n;

  if (buf == NULL)
    bail_out ("out of memory");
  before = malloc (DISK_SIZE);
  if (before == NULL)
    bail_out ("out of memory");
  memset (before, 0x21, DISK_SIZE);
  test_write_disk (disk, before, DISK_SIZE);
  unlink (store);
  fl = open_store ();
  if (fl == NULL)
    bail_out ("fleece_open: %s", fleece_last_error ());
  if (fleece_checkpoint_create (fl, "c") == -1)
    bail_out ("checkpoint c: %s", fleece_last_error ());
  memset (buf, 0x42, WRITTEN * CS);
  if (fleece_live_pwrite (fl, buf, WRITTEN * CS, 0, 0) == -1)
    bail_out ("live write: %s", fleece_last_error ());
  base = test_read_file (store, &base_size);  /* as a kill -9 leaves it */
  fleece_close (fl);
  after = test_read_file (disk, &n);
  assert (n == DISK_SIZE);
  find_last_record ();
  diag ("the COPY record: %zu bytes at file offset %zu, sequence %" PRIu64,
        last_len, last_off, last_seq);
  free (buf);
}

/* Write the edited crash image (size bytes) and the disk. */
static void
put_store (const uint8_t *p, size_t size, const uint8_t *disk_content)
{
  test_write_disk (store, p, size);
  test_write_disk (disk, disk_content, DISK_SIZE);
}

struct outcome {
  bool loaded, broken, inconsistent, reads_before;
  char reason[256];
};

static void
bitmap_state (void *opaque, const struct fleece_bitmap_info *info)
{
  struct outcome *o = opaque;

  if (strcmp (info->name, "c") == 0)
    o->inconsistent = info->inconsistent;
}

static struct outcome
load (void)
{
  struct outcome o = { 0 };
  struct fleece_snap_info info;
  struct fleece_snap *s;
  struct fleece *fl = open_store ();
  uint8_t *buf = malloc (DISK_SIZE);

  if (buf == NULL)
    bail_out ("out of memory");
  if (fl == NULL) {
    diag ("refused: %s", fleece_last_error ());
    free (buf);
    return o;
  }
  o.loaded = true;
  if (fleece_snapshot_info (fl, "c", &info) == -1)
    bail_out ("snapshot c is gone: %s", fleece_last_error ());
  o.broken = info.broken;
  snprintf (o.reason, sizeof o.reason, "%s", info.broken_reason);
  fleece_list_bitmaps (fl, bitmap_state, &o);
  s = fleece_snap_get (fl, "c");
  assert (s != NULL);
  if (fleece_snap_pread (s, buf, DISK_SIZE, 0) == 0)
    o.reads_before = memcmp (buf, before, DISK_SIZE) == 0;
  else
    ok (o.broken && errno == EIO, "a failed read of c is EIO from a broken "
        "snapshot (%s)", fleece_last_error ());
  fleece_snap_put (s);
  fleece_close (fl);
  free (buf);
  return o;
}

/* The record edited by fn, then loaded. */
static struct outcome
with_record (void (*fn) (uint8_t *p), const uint8_t *disk_content)
{
  uint8_t *p = malloc (base_size);
  struct outcome o;

  if (p == NULL)
    bail_out ("out of memory");
  memcpy (p, base, base_size);
  fn (p);
  put_store (p, base_size, disk_content);
  o = load ();
  free (p);
  return o;
}

static void
tear (uint8_t *p)
{
  size_t from = (last_off / SECTOR + 1) * SECTOR;

  assert (from + 16 < last_off + last_len);
  memset (p + from, 0, last_off + last_len - from);
}

static void
remove_record (uint8_t *p)
{
  memset (p + last_off, 0, last_len);
}

static void
flip_checksum (uint8_t *p)
{
  p[last_off + 24] ^= 0x01;
}

/* A record header with the next sequence number and length len, its
 * payload 0x5a up to keep bytes past its start, zero after.
 */
static void
fake_record (uint8_t *p, uint32_t len, size_t keep)
{
  uint64_t seq = htole64 (last_seq);
  uint32_t l = htole32 (len);

  memset (p + last_off, 0, last_len);
  memcpy (p + last_off, "FLMR", 4);
  p[last_off + 4] = 0x20;
  memcpy (p + last_off + 8, &l, 4);
  memcpy (p + last_off + 16, &seq, 8);
  memset (p + last_off + 24, 0x77, 8);  /* a checksum that is wrong */
  memset (p + last_off + 32, 0x5a, keep - 32);
}

static void
short_record (uint8_t *p)
{
  /* 32 + 16 bytes, inside the sector of its start unless it is too close
   * to its end; either way written whole.
   */
  fake_record (p, 16, 48);
}

static void
unsure_record (uint8_t *p)
{
  /* Its end 8 bytes into a sector that is zero. */
  size_t end = (last_off / SECTOR + 2) * SECTOR + 8;

  fake_record (p, end - last_off - 32, end - last_off - 8);
}

int
main (void)
{
  struct outcome o;

  test_make_dir ("test-engine-damage");
  disk = test_path ("disk");
  store = test_path ("store");
  fleece_set_warn (on_warn);
  make_base ();

  /* The crash image itself: the write was acknowledged. */
  put_store (base, base_size, after);
  o = load ();
  ok (o.loaded && !o.broken && o.reads_before && !o.inconsistent,
      "the crash image loads: c exact, bitmap c consistent");

  o = with_record (tear, before);
  ok (o.loaded && !o.broken && o.reads_before && !o.inconsistent,
      "torn: the record's later sectors never written: ignored, c exact "
      "(%s)", o.reason);
  ok (warned[0] == '\0', "torn: nothing to warn about (%s)", warned);

  o = with_record (remove_record, before);
  ok (o.loaded && !o.broken && o.reads_before,
      "gone: the record never written: the end of the log, c exact");

  o = with_record (flip_checksum, after);
  ok (o.loaded && o.broken && strstr (o.reason, "is damaged, not torn"),
      "damaged: a checksum byte changed: c broken (%s)", o.reason);
  ok (o.inconsistent, "damaged: the recording bitmap c is inconsistent");
  ok (strstr (warned, "snapshot 'c' is broken") &&
      strstr (warned, "bitmap 'c' is marked inconsistent"),
      "damaged: both are said at the warning level:\n%s", warned);

  o = with_record (short_record, after);
  ok (o.loaded && o.broken && strstr (o.reason, "is damaged, not torn"),
      "sector: a record inside one sector that fails its checksum is "
      "damaged (%s)", o.reason);

  o = with_record (unsure_record, after);
  ok (o.loaded && o.broken && strstr (o.reason, "cannot be told"),
      "unsure: 8 bytes in a zero sector: cannot be told, c broken (%s)",
      o.reason);
  ok (o.inconsistent, "unsure: the recording bitmap c is inconsistent");

  put_store (base, base_size - 1, after);
  o = load ();
  ok (o.loaded && o.broken && strstr (o.reason, "store was truncated"),
      "cut: one byte off the last copy's slot: c broken (%s)", o.reason);
  ok (!o.inconsistent, "cut: the log is intact, bitmap c consistent");
  ok (strstr (warned, "snapshot 'c' is broken"),
      "cut: said at the warning level");

  free (before);
  free (after);
  free (base);
  return done ();
}
