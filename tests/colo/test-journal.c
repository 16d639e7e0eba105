/* The secondary's epoch journal (colo/journal.c), against a shadow
 * model of the disk: every epoch's extents are applied to a reference
 * buffer too, and the disk must equal it.  Covers:
 *   - the digest and the descriptor encoding;
 *   - epochs applied in a row, with reopens, on a disk whose size is not
 *     a multiple of the cluster (a short last cluster), and extents
 *     larger than the journal's I/O buffer;
 *   - refusals (checksum, digest, count, range, epoch, generation) that
 *     leave the disk untouched;
 *   - a torn or corrupted journal: an incomplete epoch is dropped, a
 *     corrupted COMMIT record drops its epoch, corrupted data of a
 *     committed epoch makes open fail;
 *   - crashes: a child process runs an epoch and dies (SIGKILL or _exit)
 *     at each write and sync the journal makes, then at each of the
 *     recovery's; the reopened disk is the old or the new epoch exactly,
 *     and the new one whenever the COMMIT record was durable;
 *   - a loop device (BLKZEROOUT) when run as root.
 *
 * Size.  Over 1000 lines on purpose: every case runs against the same
 * shadow model of the disk and the same journal builders; a split
 * would repeat them.
 */

#undef NDEBUG
#include <config.h>

#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "journal.h"
#include "tap.h"

#define CLUSTER    4096u
#define NCLUSTERS  24u
#define DISK_SIZE  ((uint64_t) NCLUSTERS * CLUSTER - 1000) /* short last */
#define LAST_OFF   ((uint64_t) (NCLUSTERS - 1) * CLUSTER)

static char base[] = "/tmp/test-journal.XXXXXX";
static uint8_t volume[JOURNAL_ID_SIZE], gen1[JOURNAL_ID_SIZE],
  gen2[JOURNAL_ID_SIZE];

struct ext {
  uint64_t off;
  uint32_t len;
  bool zero;
};

struct dirs {
  char state[256], disk[256];
};

/* ---- helpers ---- */

static void
fill (char *p, size_t n, uint64_t seed)
{
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 12345;
  size_t i;

  for (i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p[i] = x >> 24;
  }
}

static uint64_t rng = 88172645463325252ull;

static uint64_t
rnd (uint64_t n)
{
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng % n;
}

static void
setup (const char *name, struct dirs *d, uint64_t size)
{
  char dir[128];
  int fd;

  snprintf (dir, sizeof dir, "%s/%s", base, name);
  snprintf (d->state, sizeof d->state, "%s/state", dir);
  snprintf (d->disk, sizeof d->disk, "%s/disk", dir);
  if (mkdir (dir, 0700) == -1 || mkdir (d->state, 0700) == -1)
    bail_out ("mkdir %s: %m", dir);
  fd = open (d->disk, O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (fd == -1 || ftruncate (fd, size) == -1)
    bail_out ("create %s: %m", d->disk);
  close (fd);
}

static struct journal *
jopen_size (const struct dirs *d, uint64_t size, uint32_t cluster)
{
  char err[1024];
  struct journal *j = journal_open (d->state, d->disk, size, cluster,
                                    err, sizeof err);

  if (j == NULL)
    diag ("journal_open: %s", err);
  return j;
}

static struct journal *
jopen (const struct dirs *d)
{
  return jopen_size (d, DISK_SIZE, CLUSTER);
}

/* journal_open must fail; its message must contain want. */
static bool
open_fails (const struct dirs *d, uint64_t size, uint32_t cluster,
            const char *want)
{
  char err[1024] = "";
  struct journal *j = journal_open (d->state, d->disk, size, cluster,
                                    err, sizeof err);

  if (j) {
    journal_close (j);
    return false;
  }
  diag ("expected failure: %s", err);
  return strstr (err, want) != NULL;
}

static bool
disk_equals (const char *path, const char *model, uint64_t size)
{
  char *buf = malloc (size);
  int fd = open (path, O_RDONLY);
  bool r;

  assert (buf && fd >= 0);
  r = pread (fd, buf, size, 0) == (ssize_t) size &&
    memcmp (buf, model, size) == 0;
  close (fd);
  free (buf);
  return r;
}

static void
pair (struct journal *j)
{
  struct journal_generation h = { .first_epoch = 1 };

  memcpy (h.id, gen1, JOURNAL_ID_SIZE);
  assert (journal_set_identity (j, volume, &h, 1, 0) == 0);
}

/* Send one epoch (begin, extents, end): 0 when durable.  model takes
 * its extents as they are added.
 */
static int
send_epoch (struct journal *j, uint64_t epoch, const uint8_t *gen,
            const struct ext *ex, size_t n, char *model)
{
  struct journal_digest d;
  size_t i;

  journal_digest_init (&d);
  if (journal_begin (j, epoch, gen) == -1)
    return -1;
  for (i = 0; i < n; i++) {
    struct journal_extent e = { ex[i].off, ex[i].len, JOURNAL_EXTENT_ZERO, 0 };
    char *mem = NULL, *buf = NULL;
    int r;

    if (!ex[i].zero) {
      /* Block-aligned data (which the journal writes with O_DIRECT) and
       * misaligned data (through the page cache), in turn.
       */
      assert (posix_memalign ((void **) &mem, 4096, ex[i].len + 64) == 0);
      buf = mem + (i % 2 ? 64 : 0);
      fill (buf, ex[i].len, epoch * 1000 + i);
      e.flags = JOURNAL_EXTENT_DATA;
      e.checksum = journal_checksum (buf, ex[i].len);
    }
    journal_digest_add (&d, &e);
    r = journal_add_extent (j, e.offset, e.length, e.flags, buf, e.checksum);
    if (model) {
      if (buf)
        memcpy (model + e.offset, buf, e.length);
      else
        memset (model + e.offset, 0, e.length);
    }
    free (mem);
    if (r == -1)
      return -1;
  }
  return journal_end (j, n, journal_digest_final (&d));
}

/* Random extents, some zero, some reaching the short last cluster. */
static size_t
random_epoch (struct ext *ex, size_t max)
{
  size_t n = 1 + rnd (max), i;

  for (i = 0; i < n; i++) {
    uint64_t off = rnd (NCLUSTERS) * CLUSTER;
    uint64_t len = (1 + rnd (3)) * CLUSTER;

    if (len > DISK_SIZE - off)
      len = DISK_SIZE - off;
    ex[i] = (struct ext) { off, len, rnd (4) == 0 };
  }
  return n;
}

static bool
has (const char *s, const char *want)
{
  if (strstr (s, want))
    return true;
  diag ("\"%s\" does not contain \"%s\"", s, want);
  return false;
}

/* The journal's layout (docs/replication.md): BEGIN in block 0, COMMIT
 * in block 1, then each extent record in a block of its own, its data
 * from the next block.
 */
#define J_COMMIT   4096
#define J_EXTENTS  8192
#define J_BLOCK    4096

static void
flip_byte (const char *path, off_t off)
{
  int fd = open (path, O_RDWR);
  unsigned char c;

  assert (fd >= 0);
  assert (pread (fd, &c, 1, off) == 1);
  c ^= 0x5a;
  assert (pwrite (fd, &c, 1, off) == 1);
  close (fd);
}

/* Give the 64-byte journal record at off another format version, with
 * a valid checksum.
 */
static void
set_record_version (const char *path, off_t off, uint16_t version)
{
  int fd = open (path, O_RDWR);
  unsigned char r[64];
  uint16_t v = htole16 (version);
  uint64_t sum;

  assert (fd >= 0);
  assert (pread (fd, r, sizeof r, off) == sizeof r);
  memcpy (r + 6, &v, 2);
  sum = htole64 (XXH64 (r, 56, 0));
  memcpy (r + 56, &sum, 8);
  assert (pwrite (fd, r, sizeof r, off) == sizeof r);
  close (fd);
}

/* Make every record of the journal at path version `version', as the
 * fleece-colod of that version wrote them: version 2 had no disk count
 * in BEGIN (bytes 52..55 of the record).
 */
static void
set_all_versions (const char *path, uint16_t version)
{
  int fd = open (path, O_RDWR);
  unsigned char r[64];
  struct stat sb;
  off_t off;

  assert (fd >= 0 && fstat (fd, &sb) == 0);
  for (off = 0; off + 64 <= sb.st_size; off += 4096)
    if (pread (fd, r, 4, off) == 4 && memcmp (r, "FLCJ", 4) == 0) {
      if (off == 0) {
        assert (pread (fd, r, 64, 0) == 64);
        memset (r + 52, 0, 4);
        assert (pwrite (fd, r, 64, 0) == 64);
      }
      set_record_version (path, off, version);
    }
  close (fd);
}

/* Empty the journal, then leave epoch 2 (extents ex) committed and not
 * applied in it; model becomes from with the epoch.
 */
static void
commit_in_empty_journal (const struct dirs *d, const char *jpath,
                         const struct ext *ex, size_t n, const char *from,
                         char *model)
{
  struct journal *j;

  assert (truncate (jpath, 0) == 0);
  j = jopen (d);
  assert (j);
  memcpy (model, from, DISK_SIZE);
  assert (send_epoch (j, 2, gen1, ex, n, model) == 0);
  journal_close (j);
}

/* The whole file at path (*len bytes), for putting back later. */
static char *
slurp (const char *path, size_t *len)
{
  struct stat sb;
  char *p;
  int fd = open (path, O_RDONLY);

  assert (fd >= 0 && fstat (fd, &sb) == 0);
  p = malloc (sb.st_size + 1);
  assert (p && pread (fd, p, sb.st_size, 0) == sb.st_size);
  close (fd);
  *len = sb.st_size;
  return p;
}

/* Write len bytes of p at off of path (a write that a crash kept). */
static void
put_back (const char *path, const char *p, size_t len, off_t off)
{
  int fd = open (path, O_WRONLY);

  assert (fd >= 0 && pwrite (fd, p, len, off) == (ssize_t) len);
  close (fd);
}

static char *
journal_file (const struct dirs *d, char *buf, size_t n)
{
  snprintf (buf, n, "%s/journal", d->state);
  return buf;
}

/* ---- tests ---- */

static void
test_digest (void)
{
  static const struct journal_extent ex[3] = {
    { 0x0102030405060708ull, 0x11223344, JOURNAL_EXTENT_DATA,
      0xa1a2a3a4a5a6a7a8ull },
    { 4096, 4096, JOURNAL_EXTENT_ZERO, 0 },
    { 8192, 100, JOURNAL_EXTENT_DATA, 42 },
  };
  static const unsigned char want[24] = {
    8, 7, 6, 5, 4, 3, 2, 1, 0x44, 0x33, 0x22, 0x11, 1, 0, 0, 0,
    0xa8, 0xa7, 0xa6, 0xa5, 0xa4, 0xa3, 0xa2, 0xa1,
  };
  unsigned char enc[3 * JOURNAL_EXTENT_ENCODED_SIZE];
  struct journal_digest d;
  size_t i;

  for (i = 0; i < 3; i++)
    journal_extent_encode (&ex[i], enc + i * JOURNAL_EXTENT_ENCODED_SIZE);
  ok (memcmp (enc, want, 24) == 0,
      "descriptor encoding: offset, length, flags, checksum, little-endian");
  ok (journal_digest (ex, 3) == XXH64 (enc, sizeof enc, 0),
      "digest is xxh64 of the concatenated descriptors");
  journal_digest_init (&d);
  for (i = 0; i < 3; i++)
    journal_digest_add (&d, &ex[i]);
  ok (journal_digest_final (&d) == journal_digest (ex, 3),
      "streamed digest equals the one-shot digest");
  ok (journal_checksum ("abc", 3) == XXH64 ("abc", 3, 0),
      "extent checksum is xxh64 with seed 0");
}

static void
test_happy (void)
{
  struct dirs d;
  struct journal *j;
  char *model = calloc (1, DISK_SIZE);
  struct ext ex[12];
  const struct ext full[] = {
    { 0, DISK_SIZE, false },                       /* first: a full copy */
  };
  const struct ext edges[] = {
    { LAST_OFF, DISK_SIZE - LAST_OFF, false },     /* short last cluster */
    { 0, CLUSTER, true },
    { CLUSTER, 2 * CLUSTER, false },
    { 2 * CLUSTER, CLUSTER, true },                /* overlaps: later wins */
    { LAST_OFF - CLUSTER, DISK_SIZE - LAST_OFF + CLUSTER, true },
  };
  uint64_t epoch;
  bool all = true, states = true;

  setup ("happy", &d, DISK_SIZE);
  j = jopen (&d);
  ok (j != NULL, "open a new state directory");
  ok (has (journal_recovery_note (j), "nothing to recover"),
      "a new journal has nothing to recover");
  ok (journal_begin (j, 1, gen1) == -1 &&
      has (journal_error (j), "not paired"), "no epoch before pairing");
  pair (j);
  ok (send_epoch (j, 1, gen1, full, 1, model) == 0 &&
      journal_get_state (j)->committed_epoch == 1 &&
      journal_get_state (j)->applied_epoch == 0,
      "epoch 1 (a full copy) durable, not applied yet");
  ok (journal_apply (j) == 0 && disk_equals (d.disk, model, DISK_SIZE) &&
      journal_get_state (j)->applied_epoch == 1, "epoch 1 applied");
  ok (journal_apply (j) == 0, "apply with nothing pending does nothing");
  ok (send_epoch (j, 2, gen1, edges, 5, model) == 0 &&
      journal_apply (j) == 0 && disk_equals (d.disk, model, DISK_SIZE),
      "epoch 2: short last cluster, zeroes, overlapping extents in order");
  ok (send_epoch (j, 3, gen1, NULL, 0, model) == 0 &&
      journal_apply (j) == 0 && disk_equals (d.disk, model, DISK_SIZE) &&
      journal_get_state (j)->applied_epoch == 3,
      "an empty epoch (nothing written in the interval)");
  for (epoch = 4; epoch <= 14; epoch++) {
    size_t n = random_epoch (ex, 12);

    if (send_epoch (j, epoch, gen1, ex, n, model) == -1 ||
        journal_apply (j) == -1) {
      diag ("epoch %" PRIu64 ": %s", epoch, journal_error (j));
      all = false;
      break;
    }
    all &= disk_equals (d.disk, model, DISK_SIZE);
    states &= journal_get_state (j)->committed_epoch == epoch &&
      journal_get_state (j)->applied_epoch == epoch;
    if (epoch % 4 == 0) {
      journal_close (j);
      j = jopen (&d);
      assert (j);
      states &= journal_get_state (j)->applied_epoch == epoch &&
        memcmp (journal_get_state (j)->volume_id, volume, 16) == 0 &&
        memcmp (journal_get_state (j)->generation_id, gen1, 16) == 0;
    }
  }
  ok (all, "epochs 4-14 (random extents) applied: disk equals the model");
  ok (states, "committed and applied epochs follow, and survive reopens");
  ok (send_epoch (j, 20, gen1, edges, 2, model) == 0 &&
      journal_apply (j) == 0 && disk_equals (d.disk, model, DISK_SIZE),
      "epochs need not be consecutive (a catch-up skips some)");
  journal_close (j);
  free (model);
}

/* Extents larger than the journal's 4 MiB I/O buffer: applied after a
 * hashing pass, and verified by recovery.
 */
static void
test_large (void)
{
  const uint64_t size = (9u << 20) + 512;
  const uint32_t cl = 64 << 10;
  struct dirs d;
  struct journal *j;
  char *model = calloc (1, size);
  const struct ext ex[] = {
    { 0, 8u << 20, false },
    { 4u << 20, 64 << 10, true },
    { 9u << 20, 512, false },
    { 8u << 20, 1u << 20, false },
  };

  setup ("large", &d, size);
  j = jopen_size (&d, size, cl);
  assert (j);
  pair (j);
  ok (send_epoch (j, 1, gen1, ex, 4, model) == 0 && journal_apply (j) == 0 &&
      disk_equals (d.disk, model, size),
      "an 8 MiB extent is applied in pieces");
  ok (send_epoch (j, 2, gen1, ex + 1, 3, model) == 0,
      "a second epoch durable");
  journal_close (j);            /* committed, not applied: a crash */
  j = jopen_size (&d, size, cl);
  ok (j && disk_equals (d.disk, model, size) &&
      has (journal_recovery_note (j), "applied it again"),
      "recovery verifies and applies it");
  journal_close (j);
  free (model);
}

/* Each refusal leaves the disk as it was and the next epoch works. */
static void
test_refusals (void)
{
  struct dirs d, d2;
  struct journal *j, *j2;
  char *model = calloc (1, DISK_SIZE), *next = malloc (DISK_SIZE);
  const struct ext e1[] = { { 0, DISK_SIZE, false } };
  const struct ext e2[] = { { CLUSTER, CLUSTER, false },
                            { 3 * CLUSTER, 2 * CLUSTER, true } };
  char data[CLUSTER];
  uint64_t sum;
  const struct {
    uint64_t off;
    uint32_t len, flags;
    const char *why;
  } bad[] = {
    { 100, CLUSTER, JOURNAL_EXTENT_ZERO, "not aligned" },
    { DISK_SIZE, CLUSTER, JOURNAL_EXTENT_ZERO, "beyond the end" },
    { LAST_OFF, CLUSTER, JOURNAL_EXTENT_ZERO, "beyond the end" },
    { 0, 1000, JOURNAL_EXTENT_ZERO, "not a multiple" },
    { 0, 0, JOURNAL_EXTENT_ZERO, "empty" },
    { 0, CLUSTER, 0, "flags" },
    { 0, CLUSTER, JOURNAL_EXTENT_ZERO | JOURNAL_EXTENT_DATA, "flags" },
  };
  bool all = true;
  size_t i;

  setup ("refuse", &d, DISK_SIZE);
  j = jopen (&d);
  assert (j);
  pair (j);
  assert (send_epoch (j, 1, gen1, e1, 1, model) == 0);
  assert (journal_apply (j) == 0);

  fill (data, sizeof data, 7);
  sum = journal_checksum (data, sizeof data);
  ok (journal_begin (j, 2, gen1) == 0 &&
      journal_add_extent (j, 0, CLUSTER, JOURNAL_EXTENT_DATA, data, sum) == 0
      && journal_add_extent (j, CLUSTER, CLUSTER, JOURNAL_EXTENT_DATA, data,
                             sum ^ 1) == -1 &&
      has (journal_error (j), "checksum mismatch") &&
      has (journal_error (j), "journal"),
      "an extent whose data does not match its checksum is refused");
  ok (journal_add_extent (j, 0, CLUSTER, JOURNAL_EXTENT_DATA, data, sum) == -1
      && has (journal_error (j), "refused") &&
      journal_end (j, 1, 0) == -1 && journal_apply (j) == -1,
      "a refused epoch takes nothing more and cannot be applied");
  ok (journal_begin (j, 2, gen1) == -1 && has (journal_error (j), "abort"),
      "nor can another begin before the abort");
  ok (journal_abort (j) == 0 && disk_equals (d.disk, model, DISK_SIZE) &&
      journal_get_state (j)->committed_epoch == 1,
      "aborted: the disk is untouched, epoch 1 still the last committed");

  memcpy (next, model, DISK_SIZE);
  assert (journal_begin (j, 2, gen1) == 0);
  assert (journal_add_extent (j, 0, CLUSTER, JOURNAL_EXTENT_DATA, data,
                              sum) == 0);
  ok (journal_end (j, 1, journal_digest (&(struct journal_extent) {
          0, CLUSTER, JOURNAL_EXTENT_DATA, sum }, 1) ^ 1) == -1 &&
      has (journal_error (j), "digest mismatch"), "a wrong digest is refused");
  ok (journal_abort (j) == 0 && disk_equals (d.disk, model, DISK_SIZE),
      "and the disk is untouched");
  assert (journal_begin (j, 2, gen1) == 0);
  assert (journal_add_extent (j, 0, CLUSTER, JOURNAL_EXTENT_DATA, data,
                              sum) == 0);
  ok (journal_end (j, 2, journal_digest (&(struct journal_extent) {
          0, CLUSTER, JOURNAL_EXTENT_DATA, sum }, 1)) == -1 &&
      has (journal_error (j), "count mismatch"),
      "a wrong extent count is refused");
  ok (journal_abort (j) == 0 && disk_equals (d.disk, model, DISK_SIZE),
      "and the disk is untouched");

  for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    assert (journal_begin (j, 2, gen1) == 0);
    all &= journal_add_extent (j, bad[i].off, bad[i].len, bad[i].flags,
                               NULL, 0) == -1 &&
      has (journal_error (j), bad[i].why);
    assert (journal_abort (j) == 0);
  }
  ok (all, "extents out of range, unaligned, empty or with bad flags");
  assert (journal_begin (j, 2, gen1) == 0);
  ok (journal_add_extent (j, 0, CLUSTER, JOURNAL_EXTENT_ZERO, NULL, 5) == -1
      && has (journal_error (j), "ZERO extent with"),
      "a zero extent with a checksum is refused");
  assert (journal_abort (j) == 0);
  assert (journal_begin (j, 2, gen1) == 0);
  ok (journal_add_extent (j, 0, CLUSTER, JOURNAL_EXTENT_DATA, NULL, 0) == -1,
      "a data extent without data is refused");
  assert (journal_abort (j) == 0);
  ok (disk_equals (d.disk, model, DISK_SIZE), "the disk is still epoch 1");

  ok (journal_begin (j, 1, gen1) == -1 &&
      has (journal_error (j), "not after the last committed"),
      "an epoch not after the last committed one is refused");
  ok (journal_begin (j, 2, gen2) == -1 &&
      has (journal_error (j), "another generation"),
      "an epoch of another generation is refused");
  ok (journal_add_extent (j, 0, CLUSTER, JOURNAL_EXTENT_ZERO, NULL, 0) == -1
      && has (journal_error (j), "no epoch is open"),
      "extents outside an epoch are refused");

  /* A refused epoch left in the journal by a crash is dropped. */
  assert (journal_begin (j, 2, gen1) == 0);
  assert (journal_add_extent (j, 0, CLUSTER, JOURNAL_EXTENT_DATA, data,
                              sum) == 0);
  journal_close (j);
  j = jopen (&d);
  ok (j && has (journal_recovery_note (j), "dropped epoch 2") &&
      disk_equals (d.disk, model, DISK_SIZE),
      "an epoch left open by a crash is dropped at open");

  ok (send_epoch (j, 2, gen1, e2, 2, next) == 0 &&
      journal_abort (j) == -1 && has (journal_error (j), "committed"),
      "resent, it is durable, and a committed epoch cannot be aborted");
  ok (journal_begin (j, 3, gen1) == -1 &&
      has (journal_error (j), "not applied") &&
      journal_set_identity (j, volume, NULL, 0, 0) == -1,
      "nothing else happens before it is applied");
  ok (journal_apply (j) == 0 && disk_equals (d.disk, next, DISK_SIZE),
      "applied");

  /* A new generation. */
  ok (journal_new_generation (j, gen2, 2) == -1 &&
      journal_new_generation (j, gen2, 3) == 0 &&
      journal_get_state (j)->history_len == 2,
      "a new generation starts after the last committed epoch");
  ok (journal_begin (j, 3, gen1) == -1 &&
      send_epoch (j, 3, gen2, e2, 1, next) == 0 && journal_apply (j) == 0,
      "then epochs of the old generation are refused");
  journal_close (j);
  j = jopen (&d);
  assert (j);
  ok (journal_get_state (j)->history_len == 2 &&
      journal_get_state (j)->history[1].first_epoch == 3 &&
      memcmp (journal_get_state (j)->generation_id, gen2, 16) == 0 &&
      disk_equals (d.disk, next, DISK_SIZE),
      "the generation history survives a reopen");

  /* Opening. */
  ok (open_fails (&d, DISK_SIZE, CLUSTER, "in use"),
      "a second opener of the state directory is refused");
  journal_close (j);
  ok (open_fails (&d, DISK_SIZE, 2 * CLUSTER, "state: made for a disk"),
      "another cluster size is refused, naming the state file");
  ok (open_fails (&d, DISK_SIZE + CLUSTER, CLUSTER, "made for a disk"),
      "another disk size is refused");
  ok (open_fails (&d, DISK_SIZE, 3000, "invalid geometry"),
      "a cluster size that is not a power of two is refused");
  setup ("small", &d2, DISK_SIZE - 1);
  ok (open_fails (&d2, DISK_SIZE, CLUSTER, "smaller than"),
      "a disk smaller than the volume is refused");
  snprintf (d2.disk, sizeof d2.disk, "%s/nonexistent", base);
  ok (open_fails (&d2, DISK_SIZE, CLUSTER, "open: "),
      "a missing disk is refused, naming the call and the file");
  j2 = jopen (&d);
  ok (j2 != NULL, "the state directory opens again once closed");
  journal_close (j2);
  free (model);
  free (next);
}

static void
test_corruption (void)
{
  struct dirs d;
  struct journal *j;
  char *m1 = calloc (1, DISK_SIZE), *m2 = malloc (DISK_SIZE);
  const struct ext e1[] = { { 0, DISK_SIZE, false } };
  const struct ext e2[] = { { CLUSTER, 2 * CLUSTER, false },
                            { 5 * CLUSTER, CLUSTER, true },
                            { LAST_OFF, DISK_SIZE - LAST_OFF, false } };
  char jpath[300], path[300];
  struct stat sb;
  int fd;

  setup ("corrupt", &d, DISK_SIZE);
  journal_file (&d, jpath, sizeof jpath);
  j = jopen (&d);
  assert (j);
  pair (j);
  assert (send_epoch (j, 1, gen1, e1, 1, m1) == 0);
  assert (journal_apply (j) == 0);
  memcpy (m2, m1, DISK_SIZE);

  /* An incomplete epoch with a torn tail. */
  assert (journal_begin (j, 2, gen1) == 0);
  assert (journal_add_extent (j, 0, CLUSTER, JOURNAL_EXTENT_ZERO, NULL,
                              0) == 0);
  journal_close (j);
  assert (stat (jpath, &sb) == 0);
  assert (truncate (jpath, sb.st_size - 30) == 0);
  j = jopen (&d);
  ok (j && has (journal_recovery_note (j), "dropped epoch 2") &&
      disk_equals (d.disk, m1, DISK_SIZE),
      "a truncated incomplete epoch is dropped, the disk untouched");
  journal_close (j);

  /* Garbage after a valid prefix, and garbage everywhere. */
  fd = open (jpath, O_WRONLY | O_APPEND);
  assert (fd >= 0 && write (fd, "garbage!", 8) == 8);
  close (fd);
  j = jopen (&d);
  ok (j && disk_equals (d.disk, m1, DISK_SIZE),
      "garbage in an emptied journal is ignored");
  journal_close (j);
  fd = open (jpath, O_WRONLY | O_TRUNC);
  assert (fd >= 0 && write (fd, "FLCJ garbage garbage", 20) == 20);
  close (fd);
  j = jopen (&d);
  ok (j && has (journal_recovery_note (j), "no valid begin record") &&
      disk_equals (d.disk, m1, DISK_SIZE),
      "a journal without a valid begin record is dropped");

  /* Committed, not applied, with a corrupted COMMIT record. */
  assert (send_epoch (j, 2, gen1, e2, 3, m2) == 0);
  journal_close (j);
  flip_byte (jpath, J_COMMIT + 30);
  j = jopen (&d);
  ok (j && has (journal_recovery_note (j), "commit record is torn or corrupt")
      && disk_equals (d.disk, m1, DISK_SIZE) &&
      journal_get_state (j)->committed_epoch == 1,
      "a corrupted commit record is detected: its epoch is dropped");

  /* Committed, not applied, with corrupted data. */
  memcpy (m2, m1, DISK_SIZE);
  assert (send_epoch (j, 2, gen1, e2, 3, m2) == 0);
  journal_close (j);
  flip_byte (jpath, J_EXTENTS + J_BLOCK + 100);  /* first extent's data */
  ok (open_fails (&d, DISK_SIZE, CLUSTER, "does not match its checksum") &&
      open_fails (&d, DISK_SIZE, CLUSTER, jpath) &&
      disk_equals (d.disk, m1, DISK_SIZE),
      "corrupted data of a committed epoch: open fails, disk untouched");
  flip_byte (jpath, J_EXTENTS + J_BLOCK + 100);
  flip_byte (jpath, J_EXTENTS + 10);
  ok (open_fails (&d, DISK_SIZE, CLUSTER, "is corrupt") &&
      disk_equals (d.disk, m1, DISK_SIZE),
      "a corrupted extent record of a committed epoch: open fails");
  flip_byte (jpath, J_EXTENTS + 10);
  assert (stat (jpath, &sb) == 0);
  assert (truncate (jpath, sb.st_size - 100) == 0);
  ok (open_fails (&d, DISK_SIZE, CLUSTER, jpath) &&
      disk_equals (d.disk, m1, DISK_SIZE),
      "a truncated committed epoch: open fails");
  /* A committed epoch in another version of the journal's format. */
  commit_in_empty_journal (&d, jpath, e2, 3, m1, m2);
  set_record_version (jpath, 0, 1);
  set_record_version (jpath, J_COMMIT, 1);
  ok (open_fails (&d, DISK_SIZE, CLUSTER, "another journal format") &&
      disk_equals (d.disk, m1, DISK_SIZE),
      "a committed epoch of another journal format: open fails, disk "
      "untouched");
  /* Epoch 2 again, intact, in an emptied journal. */
  commit_in_empty_journal (&d, jpath, e2, 3, m1, m2);
  j = jopen (&d);
  ok (j && has (journal_recovery_note (j), "applied it again") &&
      disk_equals (d.disk, m2, DISK_SIZE) &&
      journal_get_state (j)->applied_epoch == 2,
      "an intact committed epoch is applied at open");
  journal_close (j);
  j = jopen (&d);
  ok (j && disk_equals (d.disk, m2, DISK_SIZE) &&
      has (journal_recovery_note (j), "empty"), "and only once");
  journal_close (j);

  /* Truncations are not synced: old content may come back. */
  {
    const struct ext e3[] = { { 2 * CLUSTER, CLUSTER, false } };
    char *m3 = malloc (DISK_SIZE), *old;
    size_t len;

    memcpy (m3, m2, DISK_SIZE);
    j = jopen (&d);
    assert (j);
    assert (send_epoch (j, 3, gen1, e3, 1, m3) == 0);
    old = slurp (jpath, &len);          /* committed epoch 3 */
    assert (journal_apply (j) == 0);
    journal_close (j);
    put_back (jpath, old, len, 0);
    j = jopen (&d);
    ok (j && has (journal_recovery_note (j), "already applied") &&
        disk_equals (d.disk, m3, DISK_SIZE),
        "an applied epoch that comes back after a lost truncation is "
        "ignored");
    /* Epoch 4 begun over it, and the old COMMIT record and extents
     * come back over the new ones: another nonce, not committed.
     */
    assert (journal_begin (j, 4, gen1) == 0);
    assert (journal_add_extent (j, 0, CLUSTER, JOURNAL_EXTENT_ZERO, NULL,
                                0) == 0);
    journal_close (j);
    put_back (jpath, old + 4096, len - 4096, 4096);
    j = jopen (&d);
    ok (j && has (journal_recovery_note (j), "dropped epoch 4") &&
        disk_equals (d.disk, m3, DISK_SIZE) &&
        journal_get_state (j)->committed_epoch == 3,
        "an old COMMIT record under a new BEGIN commits nothing");
    journal_close (j);
    free (old);
    free (m3);
  }

  /* The state file. */
  snprintf (path, sizeof path, "%s/state.tmp", d.state);
  fd = open (path, O_WRONLY | O_CREAT, 0600);
  assert (fd >= 0 && write (fd, "half", 4) == 4);
  close (fd);
  j = jopen (&d);
  ok (j && access (path, F_OK) == -1 &&
      journal_get_state (j)->applied_epoch == 3,
      "a state update cut before its rename is ignored and removed");
  journal_close (j);
  snprintf (path, sizeof path, "%s/state", d.state);
  flip_byte (path, 70);
  ok (open_fails (&d, DISK_SIZE, CLUSTER, "state: not a valid"),
      "a corrupted state file is refused, naming it");
  free (m1);
  free (m2);
}

/* ---- crashes ---- */

static struct {
  int count, kill_at, commit_at;
} crash;
static struct journal *child_j;     /* reachable at _exit */

static void
crash_hook (void *opaque, enum journal_step s)
{
  crash.count++;
  if (s == JOURNAL_STEP_COMMITTED)
    crash.commit_at = crash.count;
  if (crash.count == crash.kill_at) {
    if (crash.kill_at % 2)
      kill (getpid (), SIGKILL);
    _exit (42);
  }
}

static const struct ext crash_e1[] = { { 0, DISK_SIZE, false } };
static const struct ext crash_e2[] = {
  { 0, CLUSTER, false },
  { 2 * CLUSTER, 3 * CLUSTER, false },
  { 3 * CLUSTER, CLUSTER, true },
  { 6 * CLUSTER, CLUSTER, true },
  { 7 * CLUSTER, CLUSTER, false },
  { 9 * CLUSTER, 4 * CLUSTER, false },
  { 10 * CLUSTER, CLUSTER, false },
  { 14 * CLUSTER, 2 * CLUSTER, true },
  { 17 * CLUSTER, CLUSTER, false },
  { 19 * CLUSTER, CLUSTER, false },
  { 21 * CLUSTER, CLUSTER, true },
  { LAST_OFF, DISK_SIZE - LAST_OFF, false },
};
#define CRASH_N2 (sizeof crash_e2 / sizeof crash_e2[0])
static const struct ext crash_e3[] = { { 4 * CLUSTER, 2 * CLUSTER, false } };

/* A state directory at epoch 1, applied. */
static void
crash_setup (const char *name, struct dirs *d, char *m1)
{
  struct journal *j;

  setup (name, d, DISK_SIZE);
  j = jopen (d);
  assert (j);
  pair (j);
  memset (m1, 0, DISK_SIZE);
  assert (send_epoch (j, 1, gen1, crash_e1, 1, m1) == 0);
  assert (journal_apply (j) == 0);
  journal_close (j);
}

/* In a child: epoch 2 (and its apply if apply); die at step kill_at. */
static void
child_epoch2 (const struct dirs *d, int kill_at, bool apply)
{
  char *m = calloc (1, DISK_SIZE);

  child_j = jopen (d);
  if (child_j == NULL)
    _exit (3);
  crash = (typeof (crash)) { .kill_at = kill_at };
  journal_set_test_hook (crash_hook, NULL);
  if (send_epoch (child_j, 2, gen1, crash_e2, CRASH_N2, m) == -1 ||
      (apply && journal_apply (child_j) == -1))
    _exit (4);
  journal_set_test_hook (NULL, NULL);
  journal_close (child_j);
  free (m);
}

/* In a child: open (recovering epoch 2); die at step kill_at. */
static void
child_recover (const struct dirs *d, int kill_at)
{
  crash = (typeof (crash)) { .kill_at = kill_at };
  journal_set_test_hook (crash_hook, NULL);
  child_j = jopen (d);
  journal_set_test_hook (NULL, NULL);
  if (child_j == NULL)
    _exit (3);
  journal_close (child_j);
}

static bool
run_child (void (*fn) (const struct dirs *, int, bool), const struct dirs *d,
           int kill_at, bool apply)
{
  pid_t pid = fork ();
  int status;

  assert (pid >= 0);
  if (pid == 0) {
    fn (d, kill_at, apply);
    _exit (0);
  }
  assert (waitpid (pid, &status, 0) == pid);
  if (WIFSIGNALED (status))
    return WTERMSIG (status) == SIGKILL;
  return WEXITSTATUS (status) == 42 || WEXITSTATUS (status) == 0;
}

static void
recover_child (const struct dirs *d, int kill_at, bool unused)
{
  child_recover (d, kill_at);
}

/* After a crash: the disk is m1 or m2 exactly, the one `want' says (0:
 * either), and the journal takes epoch 3 afterwards.
 */
static bool
check_after_crash (const struct dirs *d, const char *m1, const char *m2,
                   int want, int k)
{
  struct journal *j = jopen (d);
  char *m3 = malloc (DISK_SIZE);
  const struct journal_state *st;
  bool is1, is2, r;
  int at;

  if (j == NULL) {
    free (m3);
    return false;
  }
  st = journal_get_state (j);
  is1 = disk_equals (d->disk, m1, DISK_SIZE);
  is2 = disk_equals (d->disk, m2, DISK_SIZE);
  at = is2 ? 2 : is1 ? 1 : 0;
  r = at != 0 && (want == 0 || want == at) &&
    st->committed_epoch == (uint64_t) at &&
    st->applied_epoch == (uint64_t) at;
  if (!r)
    diag ("crash at step %d: disk is %s, committed %" PRIu64 ", note: %s", k,
          is1 ? "epoch 1" : is2 ? "epoch 2" : "TORN",
          st->committed_epoch, journal_recovery_note (j));
  memcpy (m3, is2 ? m2 : m1, DISK_SIZE);
  r &= send_epoch (j, 3, gen1, crash_e3, 1, m3) == 0 &&
    journal_apply (j) == 0 && disk_equals (d->disk, m3, DISK_SIZE);
  journal_close (j);
  free (m3);
  return r;
}

/* Which epoch the disk must hold after dying at step k.  The steps end
 * with: write the COMMIT record (commit_at - 2), sync it (commit_at - 1),
 * durable (commit_at).  A process that dies between the write and the
 * sync leaves the record in the page cache, so either epoch is right
 * there (never acknowledged, but whole); before the write it is epoch 1,
 * once durable epoch 2.
 */
static int
expect_at (int k, int commit_at)
{
  if (k <= commit_at - 2)
    return 1;
  if (k >= commit_at)
    return 2;
  return 0;
}

static void
test_crash (void)
{
  struct dirs d;
  char *m1 = malloc (DISK_SIZE), *m2 = malloc (DISK_SIZE), name[64];
  struct journal *j;
  int total, commit_at, k, bad = 0, points = 0;

  /* A dry run counts the steps of one epoch and finds its commit. */
  crash_setup ("crash-dry", &d, m1);
  j = jopen (&d);
  assert (j);
  memcpy (m2, m1, DISK_SIZE);
  crash = (typeof (crash)) { 0 };
  journal_set_test_hook (crash_hook, NULL);
  assert (send_epoch (j, 2, gen1, crash_e2, CRASH_N2, m2) == 0);
  assert (journal_apply (j) == 0);
  journal_set_test_hook (NULL, NULL);
  journal_close (j);
  total = crash.count;
  commit_at = crash.commit_at;
  diag ("one epoch of %zu extents: %d steps, durable at step %d", CRASH_N2,
        total, commit_at);
  ok (total >= 30 && commit_at > 0 && commit_at < total,
      "an epoch has at least 30 crash points");

  for (k = 1; k <= total + 1; k++) {
    snprintf (name, sizeof name, "crash-%d", k);
    crash_setup (name, &d, m1);
    if (!run_child (child_epoch2,
                    &d, k, true) ||
        !check_after_crash (&d, m1, m2, expect_at (k, commit_at), k))
      bad++;
    points++;
  }
  ok (bad == 0, "killed at each of %d steps of an epoch (SIGKILL or _exit): "
      "the disk is exactly epoch 1 before the commit, epoch 2 after", points);

  /* Crashes during recovery: epoch 2 committed, then the recovering
   * process dies at each step of its apply.
   */
  crash_setup ("recover-dry", &d, m1);
  assert (run_child (child_epoch2,
                     &d, 0, false));
  crash = (typeof (crash)) { 0 };
  journal_set_test_hook (crash_hook, NULL);
  j = jopen (&d);
  journal_set_test_hook (NULL, NULL);
  assert (j && disk_equals (d.disk, m2, DISK_SIZE));
  journal_close (j);
  total = crash.count;
  bad = points = 0;
  for (k = 1; k <= total + 1; k++) {
    snprintf (name, sizeof name, "recover-%d", k);
    crash_setup (name, &d, m1);
    if (!run_child (child_epoch2,
                    &d, 0, false) ||
        !run_child (recover_child, &d, k, false) ||
        !check_after_crash (&d, m1, m2, 2, k))
      bad++;
    points++;
  }
  ok (total >= 14 && bad == 0, "killed at each of %d steps of a recovery: "
      "the next open still applies epoch 2 exactly", points);
  free (m1);
  free (m2);
}

/* ---- a block device ---- */

/* A journal written before groups (version 2): a committed epoch in it
 * is replayed as one of a single disk.
 */
static void
test_version2 (void)
{
  const struct ext e1[] = { { 0, CLUSTER, false }, { LAST_OFF, 3096, false } };
  char *m = calloc (1, DISK_SIZE), jpath[300];
  struct dirs d;
  struct journal *j;

  setup ("v2", &d, DISK_SIZE);
  journal_file (&d, jpath, sizeof jpath);
  j = jopen (&d);
  assert (j && m);
  pair (j);
  assert (send_epoch (j, 1, gen1, e1, 2, m) == 0);
  journal_close (j);              /* committed, not applied */
  set_all_versions (jpath, 2);
  j = jopen (&d);
  ok (j && has (journal_recovery_note (j), "applied it again") &&
      disk_equals (d.disk, m, DISK_SIZE) &&
      journal_get_state (j)->applied_epoch == 1,
      "a committed epoch of journal version 2 is replayed at open");
  journal_close (j);
  free (m);
}

/* A group of two disks: one journal, one commit, both disks applied
 * together, whatever the crash.
 */
#define GSIZE (8 * CLUSTER)

static int group_kill_step = -1, group_kill_nth, group_seen;

static void
group_hook (void *opaque, enum journal_step s)
{
  (void) opaque;
  if ((int) s == group_kill_step && ++group_seen == group_kill_nth)
    _exit (0);
}

static struct journal *
gopen (const char *dir, unsigned n, char *err, size_t errlen)
{
  char state[300], p0[300], p1[300];
  const char *paths[2] = { p0, p1 };
  const uint64_t sizes[2] = { GSIZE, GSIZE };

  snprintf (state, sizeof state, "%s/state", dir);
  snprintf (p0, sizeof p0, "%s/disk0", dir);
  snprintf (p1, sizeof p1, "%s/disk1", dir);
  return journal_open_group (state, n, paths, sizes, CLUSTER, err, errlen);
}

/* Epoch e: CLUSTER bytes of byte v at offset 0 of disk 0 and at offset
 * CLUSTER of disk 1.  0 when durable.
 */
static int
group_epoch (struct journal *j, uint64_t e, int v)
{
  char *buf = malloc (CLUSTER);
  struct journal_digest d;
  struct journal_extent x[2] = {
    { 0, CLUSTER, JOURNAL_EXTENT_DATA, 0 },
    { CLUSTER, CLUSTER, JOURNAL_EXTENT_DATA | 1u << JOURNAL_EXTENT_DISK_SHIFT,
      0 },
  };
  int i, r = 0;

  assert (buf);
  memset (buf, v, CLUSTER);
  journal_digest_init (&d);
  r = journal_begin (j, e, gen1);
  for (i = 0; r == 0 && i < 2; i++) {
    x[i].checksum = journal_checksum (buf, CLUSTER);
    journal_digest_add (&d, &x[i]);
    r = journal_add_extent (j, x[i].offset, x[i].length, x[i].flags, buf,
                            x[i].checksum);
  }
  free (buf);
  return r ? r : journal_end (j, 2, journal_digest_final (&d));
}

/* Both disks hold byte v where epochs write. */
static bool
group_at (const char *dir, int v)
{
  char p[300], want[CLUSTER], got[CLUSTER];
  int d, fd;
  bool r = true;

  memset (want, v, CLUSTER);
  for (d = 0; d < 2; d++) {
    snprintf (p, sizeof p, "%s/disk%d", dir, d);
    fd = open (p, O_RDONLY);
    r = r && fd >= 0 && pread (fd, got, CLUSTER, d * CLUSTER) == CLUSTER &&
      memcmp (got, want, CLUSTER) == 0;
    close (fd);
  }
  return r;
}

/* Epoch e (byte v) in a child killed at the nth step s. */
static void
group_crash (const char *dir, uint64_t e, int v, enum journal_step s, int nth)
{
  char err[1024];
  pid_t pid = fork ();
  int status;

  assert (pid >= 0);
  if (pid == 0) {
    struct journal *j = gopen (dir, 2, err, sizeof err);
    group_kill_step = s;
    group_kill_nth = nth;
    journal_set_test_hook (group_hook, NULL);
    if (j && group_epoch (j, e, v) == 0)
      journal_apply (j);
    _exit (1);                  /* the kill did not come */
  }
  assert (waitpid (pid, &status, 0) == pid);
  assert (WIFEXITED (status) && WEXITSTATUS (status) == 0);
}

static void
test_group (void)
{
  char dir[200], p[300], err[1024] = "";
  struct journal *j;
  int d;

  snprintf (dir, sizeof dir, "%s/group", base);
  snprintf (p, sizeof p, "%s/state", dir);
  assert (mkdir (dir, 0700) == 0 && mkdir (p, 0700) == 0);
  for (d = 0; d < 2; d++) {
    snprintf (p, sizeof p, "%s/disk%d", dir, d);
    int fd = open (p, O_RDWR | O_CREAT, 0600);
    assert (fd >= 0 && ftruncate (fd, GSIZE) == 0);
    close (fd);
  }
  j = gopen (dir, 2, err, sizeof err);
  assert (j);
  pair (j);
  ok (group_epoch (j, 1, 0x61) == 0 && journal_apply (j) == 0 &&
      group_at (dir, 0x61) && journal_get_state (j)->disk_count == 2,
      "a group of 2 disks: an epoch with an extent on each is applied to "
      "both");
  ok (journal_begin (j, 2, gen1) == 0 &&
      journal_add_extent (j, 0, CLUSTER, JOURNAL_EXTENT_ZERO |
                          2u << JOURNAL_EXTENT_DISK_SHIFT, NULL, 0) == -1 &&
      has (journal_error (j), "of a disk that is not in the group") &&
      journal_abort (j) == 0,
      "an extent of disk 2 is refused: %s", journal_error (j));
  journal_close (j);

  /* Killed after disk 0's extent reached its disk, before disk 1's:
   * recovery applies the epoch to both.
   */
  group_crash (dir, 2, 0x62, JOURNAL_STEP_DISK_WRITE, 2);
  ok (!group_at (dir, 0x61) && !group_at (dir, 0x62),
      "killed between the disks' writes: the disks differ on their own");
  j = gopen (dir, 2, err, sizeof err);
  ok (j && has (journal_recovery_note (j), "applied it again") &&
      group_at (dir, 0x62) && journal_get_state (j)->applied_epoch == 2,
      "and recovery brings both to epoch 2");
  journal_close (j);
  /* Killed writing the COMMIT record (the 4th journal write): both
   * stay at epoch 2.
   */
  group_crash (dir, 3, 0x63, JOURNAL_STEP_JOURNAL_WRITE, 4);
  j = gopen (dir, 2, err, sizeof err);
  ok (j && group_at (dir, 0x62) &&
      journal_get_state (j)->committed_epoch == 2,
      "killed before the commit record: both disks stay at epoch 2 (%s)",
      j ? journal_recovery_note (j) : err);
  journal_close (j);
  j = gopen (dir, 1, err, sizeof err);
  ok (j == NULL && has (err, "made for a group of 2 disks, not 1"),
      "the group's state opened for one disk is refused: %s", err);
  journal_close (j);
}

static void
test_block_device (void)
{
  const uint64_t size = (1u << 20) - 3 * 512;   /* a short last cluster */
  struct dirs d;
  struct journal *j;
  char cmd[512], dev[64] = "", *model = calloc (1, size);
  const struct ext e1[] = { { 0, size, false } };
  const struct ext e2[] = { { 0, 64 * CLUSTER, true },
                            { 100 * CLUSTER, 2 * CLUSTER, false },
                            { 255 * CLUSTER, size - 255 * CLUSTER, true } };
  FILE *p;

  if (geteuid () != 0) {
    ok (true, "# SKIP a loop device needs root");
    free (model);
    return;
  }
  setup ("blk", &d, size);
  snprintf (cmd, sizeof cmd, "losetup -f --show '%s'", d.disk);
  p = popen (cmd, "r");
  if (p == NULL || fgets (dev, sizeof dev, p) == NULL) {
    if (p)
      pclose (p);
    ok (false, "losetup could not attach a loop device");
    free (model);
    return;
  }
  pclose (p);
  dev[strcspn (dev, "\n")] = '\0';
  diag ("loop device %s", dev);
  snprintf (d.disk, sizeof d.disk, "%s", dev);
  j = jopen_size (&d, size, CLUSTER);
  if (j) {
    pair (j);
    ok (send_epoch (j, 1, gen1, e1, 1, model) == 0 &&
        journal_apply (j) == 0 && send_epoch (j, 2, gen1, e2, 3, model) == 0
        && journal_apply (j) == 0 && disk_equals (dev, model, size),
        "on a loop device: data, and zeroes through BLKZEROOUT");
    journal_close (j);
  }
  else
    ok (false, "open on a loop device");
  snprintf (cmd, sizeof cmd, "losetup -d '%s'", dev);
  if (system (cmd) != 0)
    diag ("%s failed", cmd);
  free (model);
}

static int
rm_entry (const char *path, const struct stat *sb, int flag, struct FTW *f)
{
  return remove (path);
}

int
main (void)
{
  memset (volume, 0x11, sizeof volume);
  memset (gen1, 0x21, sizeof gen1);
  memset (gen2, 0x22, sizeof gen2);
  if (mkdtemp (base) == NULL)
    bail_out ("mkdtemp: %m");

  test_digest ();
  test_happy ();
  test_large ();
  test_refusals ();
  test_corruption ();
  test_crash ();
  test_version2 ();
  test_group ();
  test_block_device ();

  nftw (base, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
  return done ();
}
