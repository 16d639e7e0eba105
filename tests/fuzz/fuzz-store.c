/* libFuzzer target: loading a persistent store (server/meta.c).
 *
 * A store file is untrusted input: fleece_open with persistent=true must
 * either refuse it with a message or load something it can serve without
 * crashing, leaking or invoking undefined behaviour, whatever the bytes.
 *
 * Random bytes would never get past the superblock and record checksums,
 * so the inputs are edits of real stores.  LLVMFuzzerInitialize makes a
 * persistent store through the engine (checkpoints, snapshots, copies with
 * data and of zero clusters, a trim, a disabled bitmap, a broken snapshot,
 * and with 8 KiB clusters of two 4 KiB blocks, clusters copied in part:
 * PARTIAL records, with data and zero blocks, the image's partial table,
 * partial copies completed and started after a reopen) and keeps four
 * images of its file, the bases:
 *
 *   0  open, after live writes: unclean, records after the image
 *   1  the same store after fleece_close: clean
 *   2  1 reopened, with more copies and a trim: unclean, other half
 *   3  2 after fleece_close: clean
 *
 * An input is a flags byte, then a list of edits:
 *
 *   byte 0   bits 0-1 base; bit 2 leave the superblock checksum wrong;
 *            bit 3 leave the checksums of patched records wrong; bit 4
 *            leave the STATE's image hash wrong; bit 5 flip the clean bit;
 *            bit 6 truncate the store; bit 7 damage the data area
 *   with bit 6, u24 t: 1 + t % (data area size) bytes are cut off the
 *            end; if t >= 0x800000, the store is cut to t % 4096 bytes,
 *            shorter than its superblock
 *   with bit 7, u24 o, u8 n: 1 + n % 8 bytes at data area offset
 *            o % (its size) are replaced by the bytes that follow
 *   edits    one byte op: op % 8 is the kind, op / 8 a parameter p; then
 *            the kind's arguments (missing bytes read as zero):
 *     0  superblock patch    off u8 (% 112), 1 + p % 8 bytes
 *     1  record patch        half p & 1, record u8, off u16, 1 + p/2 % 8
 *                            bytes
 *     2  record insert       half p & 1, position (end, or u8 if p & 16),
 *                            type u8 (% 8 picks STATE, BROKEN, COPY,
 *                            RELEASE, PARTIAL, two others or a u16),
 *                            length u8,
 *                            payload
 *     3  record replace      half p & 1, record u8, length u8, payload
 *     4  record cut          half p & 1, record u8; p & 2: remove it, or
 *                            tear it after u16 bytes, dropping what follows
 *     5  image patch         half p & 1, off u24, 1 + p/2 % 8 bytes
 *     6  image splice        half p & 1, off u24, delete u8, insert u8,
 *                            bytes
 *     7  raw patch           region p % 4 (file, log, data area,
 *                            superblock block), off u32, 1 + p/4 % 8 bytes
 *
 * "half 0" is the active half (its STATE has the higher sequence).
 * Inserted and replaced records get their length, their sequence (one
 * more than the record before) and their checksum; patched records get
 * their checksum, and an edited image the STATE's length, slots (moved to
 * the end of the file if it grew) and hash, unless a flag says otherwise.
 * Raw patches are applied last and never fixed up.
 *
 * Truncation and data damage are applied after everything else.  An
 * input that makes no other edit is checked against a model: what each
 * snapshot read when the bases were made.  A truncated store must refuse
 * to load only because its image is cut, and otherwise every snapshot
 * must read exactly what it read, or be broken (a copy whose slot the
 * truncation cut breaks the snapshots that read it); one cut shorter than
 * its superblock must be refused as such, unless it is empty (then it is
 * a new store).  Copied data has no
 * checksum, so damage in a data slot may show, but only as the damaged
 * bytes, at their offset within the slot, in clusters of snapshots that
 * are not broken; nothing else may differ.
 *
 * After a successful load the target reads every snapshot, opens every
 * bitmap's export, makes a few changes (copies, a trim, a checkpoint, a
 * deletion), then deletes every snapshot and checks that no copy and no
 * data slot is left: inconsistent loaded state shows as a crash, an
 * assertion, a hang or a leak.  The live disk is rewritten with its own
 * content, so every base keeps matching it; an input without edits must
 * load and read back exactly what the snapshots held when the bases were
 * made.
 *
 * $FUZZ_STORE_VERBOSE=1 says for each input whether the store loaded;
 * $FUZZ_STORE_SAVE=PREFIX saves the bases and the last store made, to
 * write seeds (tests/fuzz/store-corpus) against.
 *
 * Built and run by "make fuzz" (tests/Makefile.am) with clang
 * -fsanitize=fuzzer,address,undefined.  The store lives in /dev/shm when
 * it exists: the engine fdatasyncs.
 *
 * Size.  Over 1000 lines on purpose: a libFuzzer target is one program
 * with one entry point; the base stores, the edits and the checks of
 * what a load must leave are one input grammar and live together.
 */

#include <config.h>

#undef NDEBUG

#include <assert.h>
#include <endian.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include "fleece.h"
#include "fleece-wire.h"
#include "le.h"

#define CLUSTER     8192u                   /* two blocks: partial copies */
#define BLOCK       4096u
#define NCLUSTERS   259u                    /* 259 % 64 == 3: a tail word */
#define DISK_SIZE   ((NCLUSTERS - 1) * CLUSTER + 1000)  /* a short last
                                                         * cluster */
#define META_OFF    FLEECE_STORE_HEADER_SIZE
#define HALF_SIZE   (FLEECE_STORE_META_SIZE / 2)
#define DATA_OFF    ((META_OFF + FLEECE_STORE_META_SIZE + CLUSTER - 1) / \
                     CLUSTER * CLUSTER)
#define HDR         32
#define SB_SUM_OFF  104
#define NBASES      4
#define MAX_RECS    512
#define IMG_GROWTH  (1u << 20)  /* room for images moved to the end */

#define REC_STATE   0x0001
#define REC_BROKEN  0x0013
#define REC_COPY    0x0020
#define REC_RELEASE 0x0021
#define REC_PARTIAL 0x0023

#define F_NO_SB_FIX   (1u << 2)
#define F_NO_REC_FIX  (1u << 3)
#define F_NO_IMG_FIX  (1u << 4)
#define F_FLIP_CLEAN  (1u << 5)
#define F_TRUNCATE    (1u << 6)
#define F_DAMAGE_DATA (1u << 7)

static char dir[64], disk[80], store[80];
static bool verbose;            /* $FUZZ_STORE_VERBOSE: say what loads */

/* ---- the bases ---- */

struct base_rec {
  size_t off, len;              /* in the half */
};

struct base {
  uint8_t *p;
  size_t size;
  int active;                   /* the half whose STATE is newer */
  struct {
    struct base_rec rec[MAX_RECS];
    size_t nrecs;
    size_t end;                 /* of the last record */
    bool img;                   /* its image is there and intact */
    uint32_t img_slot, img_nslots;
    uint64_t img_len;
  } half[2];
};

static struct base bases[NBASES];

/* What each snapshot reads, for inputs without edits. */
struct expect {
  char name[FLEECE_SNAPSHOT_NAME_MAX + 1];
  bool broken;
  uint64_t hash;
  uint8_t *data;                /* DISK_SIZE bytes, unless broken */
};
static struct expect expect[16];
static size_t nexpect;

static uint8_t *disk_copy;      /* the live disk, which never changes */

/* xxh64 of header bytes 0-23 then the payload: the record checksum. */
static uint64_t
rec_sum (const uint8_t *hdr, const uint8_t *payload, size_t len)
{
  XXH64_state_t *h = XXH64_createState ();
  uint64_t sum;

  if (h == NULL)
    abort ();
  XXH64_reset (h, 0);
  XXH64_update (h, hdr, 24);
  XXH64_update (h, payload, len);
  sum = XXH64_digest (h);
  XXH64_freeState (h);
  return sum;
}

/* The size of the valid record at p (avail bytes), as the loader
 * decodes it, or 0.
 */
static size_t
rec_at (const uint8_t *p, size_t avail)
{
  uint32_t len;

  if (avail < HDR || memcmp (p, "FLMR", 4) != 0)
    return 0;
  len = get_u32 (p + 8);
  if (len > avail - HDR || HDR + ((len + 7) & ~7ul) > avail)
    return 0;
  if (rec_sum (p, p + HDR, len) != get_u64 (p + 24))
    return 0;
  return HDR + ((len + 7) & ~7ul);
}

static void
die (const char *what)
{
  fprintf (stderr, "fuzz-store: %s: %s\n", what, fleece_last_error ());
  abort ();
}

static uint8_t *
read_file (const char *path, size_t *size)
{
  int fd = open (path, O_RDONLY);
  struct stat st;
  uint8_t *p;

  if (fd == -1 || fstat (fd, &st) == -1)
    abort ();
  p = calloc (1, st.st_size);
  if (p == NULL || pread (fd, p, st.st_size, 0) != st.st_size)
    abort ();
  close (fd);
  *size = st.st_size;
  return p;
}

/* Find the records and the image of each half of base b. */
static void
parse_base (struct base *b)
{
  uint64_t seq[2] = { 0, 0 };
  int h;

  for (h = 0; h < 2; h++) {
    const uint8_t *half = b->p + META_OFF + (size_t) h * HALF_SIZE;
    size_t pos = 0, n;
    uint64_t prev = 0;

    while (b->half[h].nrecs < MAX_RECS &&
           (n = rec_at (half + pos, HALF_SIZE - pos)) != 0) {
      uint64_t s = get_u64 (half + pos + 16);
      if (pos > 0 && s != prev + 1)
        break;
      if (pos == 0 && get_u32 (half + 8) == 32 &&
          get_u32 (half + 4) == REC_STATE) {
        const uint8_t *st = half + HDR;
        seq[h] = s;
        b->half[h].img_slot = get_u32 (st);
        b->half[h].img_nslots = get_u32 (st + 4);
        b->half[h].img_len = get_u64 (st + 8);
        b->half[h].img = DATA_OFF + (uint64_t) b->half[h].img_slot * CLUSTER
          + b->half[h].img_len <= b->size &&
          XXH64 (b->p + DATA_OFF + (uint64_t) b->half[h].img_slot * CLUSTER,
                 b->half[h].img_len, 0) == get_u64 (st + 16);
      }
      b->half[h].rec[b->half[h].nrecs].off = pos;
      b->half[h].rec[b->half[h].nrecs].len = n;
      b->half[h].nrecs++;
      prev = s;
      pos += n;
    }
    b->half[h].end = pos;
  }
  b->active = seq[1] > seq[0];
  if (!b->half[b->active].img || b->half[b->active].nrecs == 0)
    abort ();
}

/* ---- making the bases ---- */

static struct fleece *
open_store (void)
{
  struct fleece_config cfg = {
    .disk = disk, .store = store, .cluster_size = CLUSTER,
    .persistent = true,
  };
  struct fleece *fl = fleece_open (&cfg);

  if (fl && fleece_start (fl) == -1) {
    fleece_close (fl);
    return NULL;
  }
  return fl;
}

static void
write_cluster (struct fleece *fl, uint32_t c, int fill)
{
  uint8_t buf[CLUSTER];
  uint32_t n = c == NCLUSTERS - 1 ? DISK_SIZE % CLUSTER : CLUSTER;

  memset (buf, fill, sizeof buf);
  buf[0] = c;                   /* every cluster different */
  if (fleece_live_pwrite (fl, buf, n, (uint64_t) c * CLUSTER, 0) == -1)
    die ("live write");
}

/* Write block b of cluster c alone (a partial copy); 0 < fill: that
 * byte, else the content it has (a copy, and no change).
 */
static int
write_block (struct fleece *fl, uint32_t c, uint32_t b, int fill)
{
  uint8_t buf[BLOCK];
  uint64_t off = (uint64_t) c * CLUSTER + (uint64_t) b * BLOCK;
  size_t n = off + BLOCK > DISK_SIZE ? DISK_SIZE - off : BLOCK;

  if (fill > 0) {
    memset (buf, fill, sizeof buf);
    buf[0] = c;
  }
  else
    memcpy (buf, disk_copy + off, n);
  return fleece_live_pwrite (fl, buf, n, off, 0);
}

/* Write a cluster with the content it has: a copy, and no change. */
static int
rewrite_cluster (struct fleece *fl, uint32_t c)
{
  uint32_t n = c == NCLUSTERS - 1 ? DISK_SIZE % CLUSTER : CLUSTER;

  return fleece_live_pwrite (fl, disk_copy + (size_t) c * CLUSTER, n,
                             (uint64_t) c * CLUSTER, 0);
}

static void
trim (struct fleece *fl, const char *snap, uint32_t c, uint32_t n)
{
  struct fleece_snap *s = fleece_snap_get (fl, snap);

  if (s == NULL ||
      fleece_snap_trim (s, n * CLUSTER, (uint64_t) c * CLUSTER) == -1)
    die ("trim");
  fleece_snap_put (s);
}

/* Hash a snapshot's content, and keep it in *keep if keep is not NULL;
 * false when it is broken.
 */
static bool
snap_read (struct fleece *fl, const char *name, uint64_t *hash,
           uint8_t **keep)
{
  struct fleece_snap *s = fleece_snap_get (fl, name);
  uint8_t *buf = malloc (DISK_SIZE);
  bool ok;

  if (s == NULL || buf == NULL)
    die ("snapshot get");
  ok = fleece_snap_pread (s, buf, DISK_SIZE, 0) == 0;
  *hash = ok ? XXH64 (buf, DISK_SIZE, 0) : 0;
  fleece_snap_put (s);
  if (keep && ok)
    *keep = buf;
  else
    free (buf);
  return ok;
}

static bool
snap_hash (struct fleece *fl, const char *name, uint64_t *hash)
{
  return snap_read (fl, name, hash, NULL);
}

/* Called with the list locked: names only, read afterwards. */
static void
add_expect (void *opaque, const struct fleece_snap_info *info)
{
  struct expect *e = &expect[nexpect++];

  (void) opaque;
  assert (nexpect <= sizeof expect / sizeof expect[0]);
  strcpy (e->name, info->name);
  e->broken = info->broken;
}

static void
check_expect (struct fleece *fl)
{
  size_t i;

  for (i = 0; i < nexpect; i++) {
    uint64_t hash;
    bool ok = snap_hash (fl, expect[i].name, &hash);
    if (ok == expect[i].broken || (ok && hash != expect[i].hash)) {
      fprintf (stderr, "fuzz-store: snapshot '%s' reads other data after "
               "loading an unchanged store\n", expect[i].name);
      abort ();
    }
  }
}

static void
save_file (const char *path, const uint8_t *p, size_t size)
{
  FILE *fp = fopen (path, "w");

  if (fp == NULL || fwrite (p, 1, size, fp) != size || fclose (fp) != 0)
    abort ();
}

/* $FUZZ_STORE_SAVE=PREFIX saves the bases as PREFIX0..3 and the store
 * made from the last input as PREFIXinput, for writing seeds.
 */
static void
keep_base (int i)
{
  const char *save = getenv ("FUZZ_STORE_SAVE");

  bases[i].p = read_file (store, &bases[i].size);
  parse_base (&bases[i]);
  if (save) {
    char path[256];
    snprintf (path, sizeof path, "%s%d", save, i);
    save_file (path, bases[i].p, bases[i].size);
  }
}

static void
make_bases (void)
{
  struct fleece *fl;
  uint32_t c;
  size_t n;

  fl = open_store ();
  if (fl == NULL)
    die ("creating the store");
  /* Clusters 200-240 stay zero: their copies are zero copies. */
  for (c = 0; c < NCLUSTERS; c++)
    if (c < 200 || c > 240)
      write_cluster (fl, c, 0x11);
  if (fleece_bitmap_add (fl, "off", false) == -1)
    die ("bitmap add");
  write_cluster (fl, 150, 0x12);
  if (fleece_bitmap_disable (fl, "off") == -1 ||
      fleece_checkpoint_create (fl, "cp1") == -1)
    die ("checkpoint cp1");
  for (c = 0; c < 10; c++)
    write_cluster (fl, c, 0x22);
  for (c = 200; c < 205; c++)
    write_cluster (fl, c, 0x22);
  write_cluster (fl, NCLUSTERS - 1, 0x22);
  if (fleece_snapshot_create (fl, "s2") == -1)
    die ("snapshot s2");
  for (c = 5; c < 15; c++)
    write_cluster (fl, c, 0x33);
  if (fleece_checkpoint_create (fl, "cp2") == -1)
    die ("checkpoint cp2");
  for (c = 20; c < 30; c++)
    write_cluster (fl, c, 0x44);
  write_cluster (fl, 205, 0x44);
  trim (fl, "s2", 10, 3);
  /* sb alone needs the copy of cluster 20 (written in cp2's generation):
   * a failed store write breaks sb and nothing else.
   */
  if (fleece_snapshot_create (fl, "sb") == -1)
    die ("snapshot sb");
  fleece_debug.fail_store_write = 1;
  write_cluster (fl, 20, 0x55);
  fleece_debug.fail_store_write = 0;
  /* Clusters copied in part for sb: one block with data (50-53, the
   * last, short, cluster), one all-zero block (210), one of a cluster
   * with older copies (5).
   */
  for (c = 50; c < 54; c++)
    if (write_block (fl, c, 0, 0x66) == -1)
      die ("block write");
  if (write_block (fl, 210, 1, 0x66) == -1 ||
      write_block (fl, 5, 1, 0x66) == -1 ||
      write_block (fl, NCLUSTERS - 1, 0, 0x66) == -1)
    die ("block write");
  /* Records after the last image. */
  for (c = 30; c < 35; c++)
    write_cluster (fl, c, 0x55);
  write_cluster (fl, 206, 0x55);
  trim (fl, "cp1", 0, 2);
  if (fleece_live_flush (fl) == -1)
    die ("flush");

  disk_copy = read_file (disk, &n);
  assert (n == DISK_SIZE);
  nexpect = 0;
  fleece_list_snapshots (fl, add_expect, NULL);
  assert (nexpect == 4);
  for (n = 0; n < nexpect; n++)
    if (snap_read (fl, expect[n].name, &expect[n].hash, &expect[n].data)
        == expect[n].broken)
      die ("a snapshot's broken state");
  keep_base (0);
  fleece_close (fl);
  keep_base (1);

  /* Reopen: the loader must give back what was there. */
  fl = open_store ();
  if (fl == NULL)
    die ("reopening the store");
  check_expect (fl);
  for (c = 40; c < 45; c++)
    if (rewrite_cluster (fl, c) == -1)
      die ("rewrite");
  if (rewrite_cluster (fl, 207) == -1)
    die ("rewrite");
  /* Partial copies completed (50, 210), continued in a new cluster (60),
   * and a partial copy of an older generation finished by a newer one
   * (51, after the checkpoint).
   */
  if (write_block (fl, 50, 1, 0) == -1 || write_block (fl, 210, 0, 0) == -1 ||
      write_block (fl, 60, 0, 0) == -1 ||
      fleece_checkpoint_create (fl, "cp3") == -1 ||
      write_block (fl, 51, 1, 0) == -1)
    die ("block rewrite");
  trim (fl, "cp1", 200, 3);    /* zero copies: reads the same */
  keep_base (2);
  fleece_close (fl);
  keep_base (3);
  free (read_file (disk, &n));
}

/* ---- an input ---- */

struct in {
  const uint8_t *p;
  size_t len, pos;
};

static uint32_t
take (struct in *in, int bytes)
{
  uint32_t v = 0;
  int i;

  for (i = 0; i < bytes; i++)
    v |= (uint32_t) (in->pos < in->len ? in->p[in->pos++] : 0) << (8 * i);
  return v;
}

/* n bytes of input (fewer at its end). */
static const uint8_t *
take_bytes (struct in *in, size_t *n)
{
  const uint8_t *p = in->p + in->pos;

  if (*n > in->len - in->pos)
    *n = in->len - in->pos;
  in->pos += *n;
  return p;
}

/* A record of the model: its bytes in the base, or its own. */
struct rec {
  uint8_t *own;                 /* NULL: the base's bytes */
  const uint8_t *p;
  size_t len;
  bool fresh;                   /* set its length and sequence */
  bool patched;                 /* fix its checksum unless F_NO_REC_FIX */
};

struct half {
  struct rec rec[MAX_RECS];
  size_t nrecs;
  const uint8_t *tail;          /* what followed the records */
  size_t tail_len;
  bool changed;
  /* The image. */
  bool img;
  uint8_t *img_p;               /* own copy once edited */
  size_t img_len;
  bool img_changed, img_resized;
  uint32_t img_slot, img_nslots;
};

struct model {
  const struct base *b;
  unsigned flags;
  struct half half[2];
  uint8_t sb[112];
  bool sb_patched;
  struct { uint64_t off; uint8_t bytes[8]; size_t n; } raw[64];
  size_t nraw;
  size_t nedits;
  uint32_t cut;                 /* F_TRUNCATE: parameter t */
  uint32_t dmg_off;             /* F_DAMAGE_DATA: parameter o, */
  uint8_t dmg[8];               /* ... the bytes */
  size_t ndmg;
};

static uint8_t *work;
static size_t work_cap;

static void
model_init (struct model *m, const struct base *b, unsigned flags)
{
  int h;

  memset (m, 0, sizeof *m);
  m->b = b;
  m->flags = flags;
  memcpy (m->sb, b->p, sizeof m->sb);
  for (h = 0; h < 2; h++) {
    int bh = h ? !b->active : b->active;
    const uint8_t *base_half = b->p + META_OFF + (size_t) bh * HALF_SIZE;
    struct half *hf = &m->half[h];
    size_t i;

    hf->nrecs = b->half[bh].nrecs;
    for (i = 0; i < hf->nrecs; i++) {
      hf->rec[i].p = base_half + b->half[bh].rec[i].off;
      hf->rec[i].len = b->half[bh].rec[i].len;
    }
    hf->tail = base_half + b->half[bh].end;
    hf->tail_len = HALF_SIZE - b->half[bh].end;
    hf->img = b->half[bh].img;
    hf->img_slot = b->half[bh].img_slot;
    hf->img_nslots = b->half[bh].img_nslots;
    hf->img_len = b->half[bh].img_len;
    hf->img_p = NULL;
  }
}

static void
model_free (struct model *m)
{
  int h;
  size_t i;

  for (h = 0; h < 2; h++) {
    for (i = 0; i < m->half[h].nrecs; i++)
      free (m->half[h].rec[i].own);
    free (m->half[h].img_p);
  }
}

/* Give record r bytes of its own, of size len (>= its current). */
static uint8_t *
rec_own (struct rec *r, size_t len)
{
  if (r->own == NULL || len > r->len) {
    uint8_t *p = calloc (1, len > r->len ? len : r->len);
    if (p == NULL)
      abort ();
    memcpy (p, r->p, r->len);
    free (r->own);
    r->own = p;
    r->p = p;
  }
  if (len > r->len)
    r->len = len;
  return r->own;
}

static const uint8_t *
img_bytes (const struct model *m, const struct half *hf)
{
  return hf->img_p ? hf->img_p :
    m->b->p + DATA_OFF + (uint64_t) hf->img_slot * CLUSTER;
}

static void
img_own (const struct model *m, struct half *hf)
{
  if (hf->img_p == NULL) {
    uint8_t *p = malloc (hf->img_len ? hf->img_len : 1);
    if (p == NULL)
      abort ();
    memcpy (p, img_bytes (m, hf), hf->img_len);
    hf->img_p = p;
  }
}

static void
edit_record (struct model *m, struct in *in, int kind, unsigned p)
{
  struct half *hf = &m->half[p & 1];
  struct rec *r;
  size_t i, n;
  const uint8_t *src;

  hf->changed = true;
  switch (kind) {
  case 1:                       /* patch */
    if (hf->nrecs == 0)
      return;
    r = &hf->rec[take (in, 1) % hf->nrecs];
    if (r->len == 0)
      return;
    i = take (in, 2) % r->len;
    n = 1 + (p >> 1) % 8;
    src = take_bytes (in, &n);
    if (i + n > r->len)
      n = r->len - i;
    memcpy (rec_own (r, r->len) + i, src, n);
    r->patched = true;
    return;
  case 2: {                     /* insert */
    static const uint16_t types[7] = {
      REC_STATE, REC_BROKEN, REC_COPY, REC_RELEASE, REC_PARTIAL, 0x00ff,
      0x0035,
    };
    size_t at = (p & 16) ? take (in, 1) % (hf->nrecs + 1) : hf->nrecs;
    uint32_t t = take (in, 1);
    uint16_t type = (t % 8) < 7 ? types[t % 8] : take (in, 2);
    uint8_t *q;

    if (hf->nrecs == MAX_RECS)
      return;
    n = take (in, 1);
    src = take_bytes (in, &n);
    memmove (&hf->rec[at + 1], &hf->rec[at],
             (hf->nrecs - at) * sizeof hf->rec[0]);
    hf->nrecs++;
    r = &hf->rec[at];
    memset (r, 0, sizeof *r);
    q = r->own = calloc (1, HDR + ((n + 7) & ~7ul));
    if (q == NULL)
      abort ();
    r->p = q;
    r->len = HDR + ((n + 7) & ~7ul);
    memcpy (q, "FLMR", 4);
    q[4] = type;
    q[5] = type >> 8;
    q[6] = (t >> 3) & 1;        /* must understand */
    memcpy (q + HDR, src, n);
    put_u32 (q + 8, n);
    r->fresh = true;
    return;
  }
  case 3: {                     /* replace the payload */
    uint8_t hdr[HDR];
    if (hf->nrecs == 0)
      return;
    r = &hf->rec[take (in, 1) % hf->nrecs];
    n = take (in, 1);
    src = take_bytes (in, &n);
    memset (hdr, 0, HDR);
    memcpy (hdr, r->p, r->len < HDR ? r->len : HDR);
    free (r->own);
    r->own = calloc (1, HDR + ((n + 7) & ~7ul));
    if (r->own == NULL)
      abort ();
    r->p = r->own;
    r->len = HDR + ((n + 7) & ~7ul);
    memcpy (r->own, hdr, HDR);
    memcpy (r->own + HDR, src, n);
    put_u32 (r->own + 8, n);
    r->fresh = true;
    return;
  }
  default:                      /* cut */
    if (hf->nrecs == 0)
      return;
    i = take (in, 1) % hf->nrecs;
    r = &hf->rec[i];
    if (p & 2) {
      free (r->own);
      memmove (&hf->rec[i], &hf->rec[i + 1],
               (hf->nrecs - i - 1) * sizeof hf->rec[0]);
      hf->nrecs--;
      return;
    }
    r->len = r->len ? take (in, 2) % r->len : 0;  /* torn inside it */
    while (hf->nrecs > i + 1)
      free (hf->rec[--hf->nrecs].own);
    hf->tail_len = 0;
    return;
  }
}

static void
edit_image (struct model *m, struct in *in, int kind, unsigned p)
{
  struct half *hf = &m->half[p & 1];
  size_t off, del, n;
  const uint8_t *src;

  if (!hf->img)
    return;
  if (kind == 5) {              /* patch */
    if (hf->img_len == 0)
      return;
    off = take (in, 3) % hf->img_len;
    n = 1 + (p >> 1) % 8;
    src = take_bytes (in, &n);
    if (off + n > hf->img_len)
      n = hf->img_len - off;
    img_own (m, hf);
    memcpy (hf->img_p + off, src, n);
    hf->img_changed = true;
    return;
  }
  /* splice */
  off = take (in, 3) % (hf->img_len + 1);
  del = take (in, 1);
  if (del > hf->img_len - off)
    del = hf->img_len - off;
  n = take (in, 1);
  src = take_bytes (in, &n);
  if (hf->img_len - del + n > IMG_GROWTH / 2)
    return;
  {
    uint8_t *q = malloc (hf->img_len - del + n + 1);
    if (q == NULL)
      abort ();
    memcpy (q, img_bytes (m, hf), off);
    memcpy (q + off, src, n);
    memcpy (q + off + n, img_bytes (m, hf) + off + del,
            hf->img_len - off - del);
    free (hf->img_p);
    hf->img_p = q;
    hf->img_len = hf->img_len - del + n;
  }
  hf->img_changed = hf->img_resized = true;
}

static void
edit (struct model *m, struct in *in)
{
  unsigned op = take (in, 1), kind = op % 8, p = op / 8;
  size_t n, i;
  const uint8_t *src;

  m->nedits++;
  switch (kind) {
  case 0:
    i = take (in, 1) % sizeof m->sb;
    n = 1 + p % 8;
    src = take_bytes (in, &n);
    if (i + n > sizeof m->sb)
      n = sizeof m->sb - i;
    memcpy (m->sb + i, src, n);
    m->sb_patched = true;
    break;
  case 1: case 2: case 3: case 4:
    edit_record (m, in, kind, p);
    break;
  case 5: case 6:
    edit_image (m, in, kind, p);
    break;
  default:
    if (m->nraw == sizeof m->raw / sizeof m->raw[0])
      return;
    m->raw[m->nraw].off = take (in, 4);
    switch (p % 4) {
    case 1:
      m->raw[m->nraw].off = META_OFF +
        m->raw[m->nraw].off % FLEECE_STORE_META_SIZE;
      break;
    case 2:
      m->raw[m->nraw].off = DATA_OFF + m->raw[m->nraw].off %
        (m->b->size - DATA_OFF);
      break;
    case 3:
      m->raw[m->nraw].off %= FLEECE_STORE_HEADER_SIZE;
      break;
    }
    n = 1 + (p / 4) % 8;
    src = take_bytes (in, &n);
    memcpy (m->raw[m->nraw].bytes, src, n);
    m->raw[m->nraw].n = n;
    m->nraw++;
    break;
  }
}

/* Write the image of half h into work (size *size) and point its STATE
 * at it.
 */
static void
place_image (struct model *m, struct half *hf, size_t *size)
{
  uint32_t nslots = (hf->img_len + CLUSTER - 1) / CLUSTER;
  uint8_t *st;

  if (!hf->img_changed)
    return;
  if (nslots > hf->img_nslots) {
    size_t old = *size;
    hf->img_slot = (*size - DATA_OFF + CLUSTER - 1) / CLUSTER;
    *size = DATA_OFF + (size_t) (hf->img_slot + nslots) * CLUSTER;
    assert (*size <= work_cap);
    memset (work + old, 0, *size - old);
  }
  memset (work + DATA_OFF + (size_t) hf->img_slot * CLUSTER, 0,
          (size_t) (nslots > hf->img_nslots ? nslots : hf->img_nslots)
          * CLUSTER);
  memcpy (work + DATA_OFF + (size_t) hf->img_slot * CLUSTER, hf->img_p,
          hf->img_len);
  if (hf->nrecs == 0 || hf->rec[0].len < HDR + 32 ||
      get_u32 (hf->rec[0].p + 4) != REC_STATE ||
      get_u32 (hf->rec[0].p + 8) != 32)
    return;
  st = rec_own (&hf->rec[0], hf->rec[0].len) + HDR;
  if (hf->img_resized) {
    put_u32 (st, hf->img_slot);
    put_u32 (st + 4, nslots);
    put_u64 (st + 8, hf->img_len);
  }
  if (!(m->flags & F_NO_IMG_FIX))
    put_u64 (st + 16, XXH64 (hf->img_p, hf->img_len, 0));
  hf->rec[0].fresh = true;      /* its checksum */
  hf->changed = true;
}

/* Lay the records of a half out in work. */
static void
place_records (struct model *m, struct half *hf, int bh)
{
  uint8_t *out = work + META_OFF + (size_t) bh * HALF_SIZE;
  uint64_t prev = 0;
  size_t pos = 0, i, n;

  if (!hf->changed)
    return;
  memset (out, 0, HALF_SIZE);
  for (i = 0; i < hf->nrecs && pos < HALF_SIZE; i++) {
    struct rec *r = &hf->rec[i];
    uint8_t *q = out + pos;
    uint32_t len;

    n = r->len < HALF_SIZE - pos ? r->len : HALF_SIZE - pos;
    memcpy (q, r->p, n);
    if (n >= HDR && r->fresh && i > 0)
      put_u64 (q + 16, prev + 1);
    if (n >= HDR &&
        (r->fresh || (r->patched && !(m->flags & F_NO_REC_FIX)))) {
      len = get_u32 (q + 8);
      if (len <= HALF_SIZE - pos - HDR)
        put_u64 (q + 24, rec_sum (q, q + HDR, len));
    }
    if (n >= HDR)
      prev = get_u64 (q + 16);
    pos += n;
  }
  n = hf->tail_len < HALF_SIZE - pos ? hf->tail_len : HALF_SIZE - pos;
  memcpy (out + pos, hf->tail, n);
}

static size_t
build (struct model *m)
{
  const struct base *b = m->b;
  size_t size = b->size, i;
  int h;

  memcpy (work, b->p, b->size);
  for (h = 0; h < 2; h++)
    place_image (m, &m->half[h], &size);
  for (h = 0; h < 2; h++)
    place_records (m, &m->half[h], h ? !b->active : b->active);
  memcpy (work, m->sb, sizeof m->sb);
  if (m->flags & F_FLIP_CLEAN)
    work[12] ^= FLEECE_SB_CLEAN;
  for (i = 0; i < m->nraw; i++) {
    uint64_t off = m->raw[i].off % size;
    size_t n = m->raw[i].n < size - off ? m->raw[i].n : size - off;
    memcpy (work + off, m->raw[i].bytes, n);
  }
  if (!(m->flags & F_NO_SB_FIX))
    put_u64 (work + SB_SUM_OFF, XXH64 (work, SB_SUM_OFF, 0));
  if ((m->flags & F_DAMAGE_DATA) && m->ndmg && size > DATA_OFF) {
    uint64_t off = DATA_OFF + m->dmg_off % (size - DATA_OFF);
    size_t n = m->ndmg < size - off ? m->ndmg : size - off;
    memcpy (work + off, m->dmg, n);
  }
  if ((m->flags & F_TRUNCATE) && m->cut >= 0x800000)
    size = m->cut % FLEECE_STORE_HEADER_SIZE;
  else if ((m->flags & F_TRUNCATE) && size > DATA_OFF)
    size -= 1 + m->cut % (size - DATA_OFF);
  return size;
}

/* Inputs that only truncate or damage data (see the top): every
 * snapshot reads what it read when the bases were made, or is broken;
 * damaged data shows only as itself.
 */
static void
check_model (struct fleece *fl, const struct model *m)
{
  uint64_t dmg_in_slot = 0;
  size_t i, c, k;

  if ((m->flags & F_DAMAGE_DATA) && m->ndmg)
    dmg_in_slot = (m->dmg_off % (m->b->size - DATA_OFF)) % CLUSTER;
  for (i = 0; i < nexpect; i++) {
    struct fleece_snap *s = fleece_snap_get (fl, expect[i].name);
    uint8_t *buf = malloc (DISK_SIZE);

    if (s == NULL || buf == NULL) {
      fprintf (stderr, "fuzz-store: snapshot '%s' is gone: %s\n",
               expect[i].name, fleece_last_error ());
      abort ();
    }
    if (fleece_snap_pread (s, buf, DISK_SIZE, 0) == -1) {
      fleece_snap_put (s);
      free (buf);
      continue;                 /* broken: refuses to read, as it must */
    }
    fleece_snap_put (s);
    if (expect[i].broken) {
      fprintf (stderr, "fuzz-store: snapshot '%s' was broken and reads\n",
               expect[i].name);
      abort ();
    }
    for (c = 0; c < DISK_SIZE; c += CLUSTER) {
      size_t n = DISK_SIZE - c < CLUSTER ? DISK_SIZE - c : CLUSTER;
      for (k = 0; k < n; k++) {
        size_t d = (k + CLUSTER - dmg_in_slot) % CLUSTER;
        if (buf[c + k] == expect[i].data[c + k])
          continue;
        /* The damaged bytes, at their place in the slot. */
        if ((m->flags & F_DAMAGE_DATA) && d < m->ndmg &&
            buf[c + k] == m->dmg[d])
          continue;
        fprintf (stderr, "fuzz-store: snapshot '%s' is not broken but "
                 "reads 0x%02x at offset %zu, not 0x%02x as at its "
                 "creation\n", expect[i].name, buf[c + k], c + k,
                 expect[i].data[c + k]);
        abort ();
      }
    }
    free (buf);
  }
}

/* Write work to the store file, leaving zero blocks as holes. */
static void
write_store (size_t size)
{
  static const uint8_t zero[4096];
  int fd = open (store, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  size_t off, n;

  if (fd == -1 || ftruncate (fd, size) == -1)
    abort ();
  for (off = 0; off < size; off += n) {
    n = size - off < sizeof zero ? size - off : sizeof zero;
    if (memcmp (work + off, zero, n) != 0 &&
        pwrite (fd, work + off, n, off) != (ssize_t) n)
      abort ();
  }
  close (fd);
}

/* ---- using what was loaded ---- */

struct names {
  char (*name)[FLEECE_SNAPSHOT_NAME_MAX + 1];
  size_t n;
};

static void
add_snap_name (void *opaque, const struct fleece_snap_info *info)
{
  struct names *ns = opaque;

  assert (ns->n < FLEECE_SNAPSHOTS_MAX);
  assert (strlen (info->name) <= FLEECE_SNAPSHOT_NAME_MAX);
  strcpy (ns->name[ns->n++], info->name);
}

static void
add_bitmap_name (void *opaque, const struct fleece_bitmap_info *info)
{
  struct names *ns = opaque;

  assert (ns->n < FLEECE_BITMAPS_MAX);
  assert (info->count <= info->bit_count);
  strcpy (ns->name[ns->n++], info->name);
}

static int
count_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t type)
{
  (void) offset; (void) length; (void) type;
  ++*(int *) opaque;
  return 0;
}

static void
read_snapshot (struct fleece *fl, const char *name, uint8_t *buf)
{
  struct fleece_snap *s = fleece_snap_get (fl, name);
  uint64_t off;
  int n = 0;

  assert (s != NULL);
  for (off = 0; off < DISK_SIZE; off += 65536) {
    uint32_t count = DISK_SIZE - off < 65536 ? DISK_SIZE - off : 65536;
    if (fleece_snap_pread (s, buf, count, off) == -1)
      assert (*fleece_last_error () != '\0');
  }
  (void) fleece_snap_extents (s, DISK_SIZE, 0, count_extent, &n);
  fleece_snap_put (s);
}

static void
use_store (struct fleece *fl)
{
  struct names snaps = { 0 }, bms = { 0 };
  uint8_t *buf = malloc (65536);
  size_t i;

  snaps.name = calloc (FLEECE_SNAPSHOTS_MAX, sizeof *snaps.name);
  bms.name = calloc (FLEECE_BITMAPS_MAX, sizeof *bms.name);
  if (buf == NULL || snaps.name == NULL || bms.name == NULL)
    abort ();
  fleece_list_snapshots (fl, add_snap_name, &snaps);
  for (i = 0; i < snaps.n; i++)
    read_snapshot (fl, snaps.name[i], buf);
  fleece_list_bitmaps (fl, add_bitmap_name, &bms);
  for (i = 0; i < bms.n; i++) {
    struct fleece_bitmap_export *bx = fleece_bitmap_export_open
      (fl, bms.name[i]);
    if (bx) {
      uint64_t size = fleece_bitmap_export_size (bx);
      assert (size >= FLEECE_BITMAP_HEADER_SIZE);
      assert (fleece_bitmap_export_pread (bx, buf, 4096, size - 4096) == 0);
      fleece_bitmap_export_close (bx);
    }
  }

  /* Change it: copies on top of what was loaded, a trim, a checkpoint
   * (freezes the active bitmap), a deletion (frees copies).  Any of them
   * may fail (a store whose log is now unwritable, a full list...).
   */
  (void) rewrite_cluster (fl, 0);
  (void) rewrite_cluster (fl, 25);
  (void) rewrite_cluster (fl, 220);
  (void) rewrite_cluster (fl, NCLUSTERS - 1);
  (void) write_block (fl, 52, 1, 0);
  (void) write_block (fl, 70, 0, 0);
  if (snaps.n > 0) {
    struct fleece_snap *s = fleece_snap_get (fl, snaps.name[snaps.n - 1]);
    if (s) {
      (void) fleece_snap_trim (s, 4 * CLUSTER, 3 * CLUSTER);
      fleece_snap_put (s);
    }
  }
  (void) fleece_checkpoint_create (fl, "fuzz-cp");
  (void) rewrite_cluster (fl, 1);
  if (snaps.n > 0)
    (void) fleece_snapshot_delete (fl, snaps.name[0]);
  (void) rewrite_cluster (fl, 2);

  /* With every snapshot gone, no copy and no data slot may remain. */
  snaps.n = 0;
  fleece_list_snapshots (fl, add_snap_name, &snaps);
  for (i = 0; i < snaps.n; i++)
    if (fleece_snapshot_delete (fl, snaps.name[i]) == -1)
      break;
  if (i == snaps.n) {
    struct fleece_stats st;
    fleece_wait_freed (fl);     /* the puncher gives the slots back */
    fleece_get_stats (fl, &st);
    if (st.snapshots != 0 || st.copies != 0 || st.store_clusters_used != 0) {
      fprintf (stderr, "fuzz-store: every snapshot deleted, yet %" PRIu32
               " snapshots, %" PRIu64 " copies, %" PRIu64 " data slots "
               "remain\n", st.snapshots, st.copies, st.store_clusters_used);
      abort ();
    }
  }
  free (buf);
  free (snaps.name);
  free (bms.name);
}

/* ---- libFuzzer ---- */

static void
cleanup (void)
{
  int i;

  unlink (disk);
  unlink (store);
  rmdir (dir);
  for (i = 0; i < NBASES; i++)
    free (bases[i].p);
  free (disk_copy);
  free (work);
  for (i = 0; i < (int) nexpect; i++)
    free (expect[i].data);
}

int LLVMFuzzerInitialize (int *argc, char ***argv);
int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerInitialize (int *argc, char ***argv)
{
  struct stat st;
  FILE *fp;
  size_t max = 0;
  int i;

  (void) argc; (void) argv;
  verbose = getenv ("FUZZ_STORE_VERBOSE") != NULL;
  snprintf (dir, sizeof dir, "%s/fuzz-store.XXXXXX",
            stat ("/dev/shm", &st) == 0 && S_ISDIR (st.st_mode) &&
            access ("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  if (mkdtemp (dir) == NULL)
    abort ();
  snprintf (disk, sizeof disk, "%s/disk", dir);
  snprintf (store, sizeof store, "%s/store", dir);
  fp = fopen (disk, "w");
  if (fp == NULL || ftruncate (fileno (fp), DISK_SIZE) == -1)
    abort ();
  fclose (fp);
  atexit (cleanup);
  make_bases ();
  for (i = 0; i < NBASES; i++) {
    const struct base *b = &bases[i];
    if (b->size > max)
      max = b->size;
    if (verbose)
      fprintf (stderr, "fuzz-store: base %d: %zu bytes, active half %d "
               "with %zu records, image %" PRIu64 " bytes at slot %" PRIu32
               "; other half %zu records\n", i, b->size, b->active,
               b->half[b->active].nrecs, b->half[b->active].img_len,
               b->half[b->active].img_slot, b->half[!b->active].nrecs);
  }
  work_cap = max + IMG_GROWTH * 2 + 2 * CLUSTER;
  work = malloc (work_cap);
  if (work == NULL)
    abort ();
  return 0;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  static const char sentinel[] = "fuzz-store: no error yet";
  struct in in = { .p = data, .len = size };
  struct model *m;
  struct fleece *fl;
  unsigned flags;
  size_t len;
  bool unchanged, modelled;

  if (size == 0)
    return 0;
  flags = take (&in, 1);
  m = malloc (sizeof *m);
  if (m == NULL)
    abort ();
  model_init (m, &bases[flags % NBASES], flags);
  if (flags & F_TRUNCATE)
    m->cut = take (&in, 3);
  if (flags & F_DAMAGE_DATA) {
    size_t n;
    const uint8_t *src;
    m->dmg_off = take (&in, 3);
    n = 1 + take (&in, 1) % 8;
    src = take_bytes (&in, &n);
    memcpy (m->dmg, src, n);
    m->ndmg = n;
  }
  while (in.pos < in.len)
    edit (m, &in);
  len = build (m);
  write_store (len);
  if (getenv ("FUZZ_STORE_SAVE")) {
    char path[256];
    snprintf (path, sizeof path, "%sinput", getenv ("FUZZ_STORE_SAVE"));
    save_file (path, work, len);
  }
  modelled = m->nedits == 0 &&
    !((flags & F_FLIP_CLEAN) && (flags & F_NO_SB_FIX));
  unchanged = modelled && !(flags & (F_TRUNCATE | F_DAMAGE_DATA));

  /* A known message, so that a failure without one shows. */
  fleece_check_name (sentinel, "");
  fl = open_store ();
  if (verbose)
    fprintf (stderr, "fuzz-store: base %u, %zu edits: %s%s\n",
             flags % NBASES, m->nedits, fl ? "loaded" : "refused: ",
             fl ? "" : fleece_last_error ());
  if (fl == NULL) {
    const char *msg = fleece_last_error ();
    if (unchanged) {
      fprintf (stderr, "fuzz-store: an unchanged base does not load: %s\n",
               msg);
      abort ();
    }
    if (msg[0] == '\0' || strstr (msg, sentinel) ||
        strcmp (msg, "unknown error") == 0) {
      fprintf (stderr, "fuzz-store: fleece_open failed without saying "
               "why: %s\n", msg);
      abort ();
    }
    /* Only the image, cut or damaged, may stop a truncated or damaged
     * store from loading.
     */
    if (modelled && len > 0 && len < FLEECE_STORE_HEADER_SIZE
        ? !strstr (msg, "shorter than a store's")
        : modelled && !strstr (msg, "the STATE record points outside") &&
          !strstr (msg, "the image")) {
      fprintf (stderr, "fuzz-store: a store with only its data area "
               "truncated or damaged is refused: %s\n", msg);
      abort ();
    }
  }
  else {
    if (modelled && len > 0 && len < FLEECE_STORE_HEADER_SIZE) {
      fprintf (stderr, "fuzz-store: a store of %zu bytes loads\n", len);
      abort ();
    }
    if (unchanged)
      check_expect (fl);
    else if (modelled && len > 0)
      check_model (fl, m);
    use_store (fl);
    fleece_close (fl);
  }
  model_free (m);
  free (m);
  return 0;
}
