/* Dirty bitmaps and checkpoints.
 *
 * 1. A model-based run (QEMU test-hbitmap.c style): random live writes,
 *    zeroes and trims, and random bitmap-add/remove/clear/enable/disable/
 *    merge and checkpoint-create; after every operation each bitmap's
 *    bits, count and state are compared with a naive model, and so is its
 *    export (header and bits).
 * 2. The incremental-backup property under load: writers keep writing
 *    while checkpoints are created back to back; for each pair of
 *    consecutive checkpoints A, B, every cluster that bitmap A (frozen by
 *    B) does not mark is identical in snapshot A and snapshot B.  A write
 *    that slipped between the steps of checkpoint-create would break it.
 */

#undef NDEBUG
#include <config.h>

#include <assert.h>
#include <endian.h>
#include <pthread.h>
#include <stdatomic.h>

#include <xxhash.h>

#include "fleece-wire.h"
#include "test-engine.h"

#define MAXB 8

struct mbitmap {
  char name[32];
  bool used, enabled, frozen, checkpoint;
  bool *bits;
};

static struct fleece *fl;
static uint64_t disk_size, nclusters;
static uint32_t cs;
static struct mbitmap model[MAXB];
static int active = -1;         /* the model's checkpoint bitmap */
static unsigned names;

static void
mark (uint64_t off, uint64_t len)
{
  uint64_t c;
  int i;

  for (i = 0; i < MAXB; i++)
    if (model[i].used && model[i].enabled && !model[i].frozen)
      for (c = off / cs; c <= (off + len - 1) / cs; c++)
        model[i].bits[c] = true;
}

static int
free_slot (void)
{
  int i;

  for (i = 0; i < MAXB; i++)
    if (!model[i].used)
      return i;
  return -1;
}

static int
pick (struct rng *r)
{
  int i, n = 0, k;

  for (i = 0; i < MAXB; i++)
    n += model[i].used;
  if (n == 0)
    return -1;
  k = rng_below (r, n);
  for (i = 0; i < MAXB; i++)
    if (model[i].used && k-- == 0)
      return i;
  return -1;
}

static bool
check_export (struct mbitmap *m, uint64_t count)
{
  struct fleece_bitmap_export *bx = fleece_bitmap_export_open (fl, m->name);
  struct fleece_bitmap_header h;
  uint64_t size, c;
  unsigned char *bits;
  bool good = true;

  if (bx == NULL)
    return false;
  size = fleece_bitmap_export_size (bx);
  bits = malloc (size);
  assert (bits);
  if (size % 4096 != 0 || fleece_bitmap_export_pread (bx, bits, size, 0))
    good = false;
  memcpy (&h, bits, sizeof h);
  good = good && memcmp (h.magic, FLEECE_BITMAP_MAGIC, 8) == 0 &&
    le32toh (h.version) == FLEECE_BITMAP_VERSION &&
    le32toh (h.granularity) == cs && le64toh (h.disk_size) == disk_size &&
    le64toh (h.bit_count) == nclusters && le64toh (h.dirty_count) == count &&
    strcmp (h.name, m->name) == 0 &&
    !!(le32toh (h.flags) & FLEECE_BM_FROZEN) == m->frozen &&
    !!(le32toh (h.flags) & FLEECE_BM_ENABLED) == (m->enabled && !m->frozen) &&
    le64toh (h.checksum) ==
    XXH64 (&h, offsetof (struct fleece_bitmap_header, checksum), 0);
  for (c = 0; good && c < nclusters; c++)
    good = !!(bits[4096 + c / 8] & (1 << (c % 8))) == m->bits[c];
  if (nclusters % 8)             /* bits past the end of the last byte */
    good = good && (bits[4096 + nclusters / 8] >> (nclusters % 8)) == 0;
  for (c = 4096 + (nclusters + 7) / 8; good && c < size; c++)
    good = bits[c] == 0;
  free (bits);
  fleece_bitmap_export_close (bx);
  return good;
}

/* Compare the engine with the model; returns a description of the first
 * difference, or NULL.
 */
static const char *
compare (void)
{
  static char why[1024];
  struct fleece_bitmap_info info;
  uint64_t c, count;
  int i;

  for (i = 0; i < MAXB; i++) {
    struct mbitmap *m = &model[i];
    if (!m->used)
      continue;
    if (fleece_bitmap_info (fl, m->name, &info) == -1)
      return "a bitmap of the model is missing";
    for (c = 0, count = 0; c < nclusters; c++) {
      count += m->bits[c];
      if (fleece_bitmap_test (fl, m->name, c) != m->bits[c]) {
        snprintf (why, sizeof why, "bitmap %s cluster %" PRIu64 ": %d, "
                  "model %d", m->name, c, fleece_bitmap_test (fl, m->name, c),
                  m->bits[c]);
        return why;
      }
    }
    if (info.count != count || info.frozen != m->frozen ||
        (info.enabled && !info.frozen) != (m->enabled && !m->frozen) ||
        info.checkpoint != m->checkpoint) {
      snprintf (why, sizeof why, "bitmap %s: count %" PRIu64 " (model %"
                PRIu64 "), frozen %d/%d", m->name, info.count, count,
                info.frozen, m->frozen);
      return why;
    }
    if (!check_export (m, count)) {
      snprintf (why, sizeof why, "bitmap %s: export differs", m->name);
      return why;
    }
  }
  return NULL;
}

static void
new_model (int i, const char *name, bool enabled, bool checkpoint)
{
  memset (&model[i], 0, sizeof model[i]);
  snprintf (model[i].name, sizeof model[i].name, "%s", name);
  model[i].used = true;
  model[i].enabled = enabled;
  model[i].checkpoint = checkpoint;
  model[i].bits = calloc (nclusters, sizeof (bool));
  assert (model[i].bits);
}

static void
drop_model (int i)
{
  free (model[i].bits);
  model[i].used = false;
  if (active == i)
    active = -1;
}

/* One random operation on the engine and the model; false on a failure
 * the model did not expect.
 */
static bool
step (struct rng *r, char *buf)
{
  uint64_t off = rng_below (r, disk_size);
  uint64_t len = 1 + rng_below (r, disk_size - off < 3 * cs
                                ? disk_size - off : 3 * cs);
  int i = pick (r), k = rng_below (r, 10), j;
  char name[32];

  switch (k) {
  case 0: case 1: case 2:
    rng_fill (r, buf, len);
    mark (off, len);
    return fleece_live_pwrite (fl, buf, len, off, 0) == 0;
  case 3:
    mark (off, len);
    return (rng_one_in (r, 2) ? fleece_live_zero (fl, len, off, 0)
            : fleece_live_trim (fl, len, off, 0)) == 0;
  case 4:                       /* add */
    if ((j = free_slot ()) == -1)
      return true;
    snprintf (name, sizeof name, "b%u", names++);
    new_model (j, name, !rng_one_in (r, 3), false);
    return fleece_bitmap_add (fl, name, !model[j].enabled) == 0;
  case 5:                       /* checkpoint */
    if ((j = free_slot ()) == -1)
      return true;
    snprintf (name, sizeof name, "c%u", names++);
    if (fleece_checkpoint_create (fl, name) == -1)
      return false;
    if (active >= 0) {
      model[active].frozen = true;
      model[active].enabled = false;
    }
    new_model (j, name, true, true);
    active = j;
    return fleece_snapshot_delete (fl, name) == 0;  /* bound the store */
  case 6:                       /* remove */
    if (i < 0)
      return true;
    if (fleece_bitmap_remove (fl, model[i].name) == -1)
      return false;
    drop_model (i);
    return true;
  case 7:                       /* clear */
    if (i < 0)
      return true;
    if (model[i].frozen)
      return fleece_bitmap_clear (fl, model[i].name) == -1 && errno == EBUSY;
    memset (model[i].bits, 0, nclusters);
    return fleece_bitmap_clear (fl, model[i].name) == 0;
  case 8:                       /* enable / disable */
    if (i < 0)
      return true;
    if (model[i].frozen)
      return fleece_bitmap_enable (fl, model[i].name) == -1 && errno == EBUSY;
    model[i].enabled = !model[i].enabled;
    return (model[i].enabled ? fleece_bitmap_enable (fl, model[i].name)
            : fleece_bitmap_disable (fl, model[i].name)) == 0;
  default: {                    /* merge */
    int src = pick (r);
    const char *srcs[1];
    uint64_t c;
    if (i < 0)
      return true;
    srcs[0] = model[src].name;
    if (model[i].frozen)
      return fleece_bitmap_merge (fl, model[i].name, srcs, 1) == -1 &&
        errno == EBUSY;
    for (c = 0; c < nclusters; c++)
      model[i].bits[c] |= model[src].bits[c];
    return fleece_bitmap_merge (fl, model[i].name, srcs, 1) == 0;
  }
  }
}

static void
model_run (uint64_t seed, unsigned ops)
{
  struct rng r = { seed };
  char *buf = malloc (3 * 16384);
  const char *why = NULL;
  unsigned n;
  int i;

  cs = 16384;
  disk_size = 1024 * 1024 + 12288;
  nclusters = (disk_size + cs - 1) / cs;
  test_write_disk (test_path ("disk"), NULL, disk_size);
  fl = test_open (test_path ("disk"), test_path ("store"), cs);
  for (n = 0; n < ops && why == NULL; n++) {
    int saved;
    if (!step (&r, buf)) {
      saved = errno;
      snprintf (buf, 256, "operation %u failed: %s (errno %d)", n,
                fleece_last_error (), saved);
      why = buf;
      break;
    }
    why = compare ();
  }
  ok (why == NULL, "model run: bitmaps, states and exports match the model "
      "after each of %u operations%s%s", n, why ? ": " : "", why ? why : "");
  for (i = 0; i < MAXB; i++)
    if (model[i].used)
      drop_model (i);
  fleece_close (fl);
  free (buf);
}

/* ---- checkpoints under load ---- */

static atomic_bool stop;

static void *
writer (void *arg)
{
  struct rng r = { (uintptr_t) arg };
  char buf[65536];
  unsigned long n = 0;

  while (!atomic_load (&stop)) {
    uint64_t len = 1 + rng_below (&r, sizeof buf);
    uint64_t off = rng_below (&r, disk_size - len);
    rng_fill (&r, buf, len);
    if (fleece_live_pwrite (fl, buf, len, off, 0) == -1)
      return (void *) -1;
    n++;
  }
  return (void *) n;
}

static uint64_t
pair_mismatches (const char *a, const char *b, char *ba, char *bb)
{
  struct fleece_snap *sa = fleece_snap_get (fl, a);
  struct fleece_snap *sb = fleece_snap_get (fl, b);
  uint64_t c, bad = 0;

  assert (sa && sb);
  if (fleece_snap_pread (sa, ba, disk_size, 0) == -1 ||
      fleece_snap_pread (sb, bb, disk_size, 0) == -1)
    bail_out ("snapshot read: %s", fleece_last_error ());
  for (c = 0; c < nclusters; c++) {
    uint64_t len = (c + 1) * cs > disk_size ? disk_size - c * cs : cs;
    if (fleece_bitmap_test (fl, a, c) == 0 &&
        memcmp (ba + c * cs, bb + c * cs, len) != 0)
      bad++;
  }
  fleece_snap_put (sa);
  fleece_snap_put (sb);
  return bad;
}

static void
load_run (uint64_t seed, unsigned checkpoints)
{
  pthread_t th[3];
  char *ba, *bb, name[2][32];
  uint64_t bad = 0, marked = 0;
  unsigned long writes = 0;
  struct fleece_bitmap_info info;
  unsigned k;
  int i;

  cs = 4096;
  disk_size = 2 * 1024 * 1024;
  nclusters = disk_size / cs;
  ba = malloc (disk_size);
  bb = malloc (disk_size);
  assert (ba && bb);
  test_write_disk (test_path ("disk2"), NULL, disk_size);
  fl = test_open (test_path ("disk2"), test_path ("store2"), cs);
  atomic_store (&stop, false);
  for (i = 0; i < 3; i++)
    pthread_create (&th[i], NULL, writer, (void *) (uintptr_t) (seed + i));
  snprintf (name[0], 32, "k0");
  if (fleece_checkpoint_create (fl, name[0]) == -1)
    bail_out ("checkpoint: %s", fleece_last_error ());
  for (k = 1; k <= checkpoints; k++) {
    struct timespec ts = { 0, 2000000 };
    nanosleep (&ts, NULL);
    snprintf (name[k % 2], 32, "k%u", k);
    if (fleece_checkpoint_create (fl, name[k % 2]) == -1)
      bail_out ("checkpoint: %s", fleece_last_error ());
    bad += pair_mismatches (name[(k + 1) % 2], name[k % 2], ba, bb);
    if (fleece_bitmap_info (fl, name[(k + 1) % 2], &info) == 0)
      marked += info.count;
    if (fleece_snapshot_delete (fl, name[(k + 1) % 2]) == -1 ||
        fleece_bitmap_remove (fl, name[(k + 1) % 2]) == -1)
      bail_out ("delete: %s", fleece_last_error ());
  }
  atomic_store (&stop, true);
  for (i = 0; i < 3; i++) {
    void *ret;
    pthread_join (th[i], &ret);
    if (ret == (void *) -1)
      bail_out ("writer failed: %s", fleece_last_error ());
    writes += (uintptr_t) ret;
  }
  diag ("%u checkpoints, %lu writes, %" PRIu64 " granules marked in all",
        checkpoints, writes, marked);
  ok (bad == 0, "under load: every cluster a frozen bitmap does not mark is "
      "the same in its checkpoint and the next (%" PRIu64 " differ)", bad);
  ok (writes > 100 && marked > 0, "under load: the writers were busy");
  fleece_close (fl);
  free (ba);
  free (bb);
}

int
main (void)
{
  uint64_t seed;
  bool vg = test_under_valgrind ();

  test_make_dir ("test-engine-bitmap");
  seed = test_seed ();
  model_run (seed, test_env_ulong ("FLEECE_TEST_OPS", vg ? 150 : 1500));
  load_run (seed, vg ? 10 : 60);
  return done ();
}
