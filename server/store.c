/* The copy-before-write store: one file holding the old data of clusters
 * that snapshots still need.
 *
 * Layout (docs/store-format.md): a 4 KiB superblock, a metadata log
 * reserved for persistent stores, then a data area of cluster-sized slots
 * starting at a cluster-aligned offset.  Slot s lives at
 * data_offset + s * cluster_size.
 *
 * Slots are allocated from a bitmap with a moving hint so that a run of
 * adjacent clusters copied together gets adjacent slots and is written
 * with one pwrite.  A freed slot is punched out of the file before its
 * bit is cleared, so that the space goes back to the filesystem and a
 * concurrent allocation can never have its fresh data punched; slots
 * freed together are punched a run at a time (store_free_slots); a free
 * of 64 MiB or more by the puncher's thread once the engine is started
 * (punch.c).
 *
 * With persistent=false the store is formatted anew at every start:
 * nothing in it is trusted.  A persistent store is kept if its superblock
 * validates and names this disk; meta-load.c then loads its metadata.
 *
 * Formatting destroys what a store holds, so it is done only to a store
 * that holds nothing to keep: an empty or all-zero file (for a block
 * device, an all-zero superblock and log region), or one whose intact
 * superblock says it keeps nothing (FLEECE_SB_PERSISTENT clear).  In
 * either mode anything else (a damaged superblock, another version,
 * somebody else's file) is refused with what was found: it may be a
 * persistent store's snapshots and bitmaps.  That is why a new persistent
 * store is given a superblock without FLEECE_SB_PERSISTENT at once, and
 * the persistent one only after its first image (meta_start).
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <endian.h>
#include <stddef.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <xxhash.h>

#include "fleece-wire.h"
#include "internal.h"

#define MAX_SLOTS (UINT32_MAX - 1)

static uint64_t
data_offset_for (uint32_t cluster_size)
{
  uint64_t meta_end = FLEECE_STORE_HEADER_SIZE + FLEECE_STORE_META_SIZE;

  return (meta_end + cluster_size - 1) & ~(uint64_t) (cluster_size - 1);
}

/* fleece.fail_meta_write=N: metadata writes after the first N fail. */
static bool
meta_write_fails (void)
{
  static atomic_int done;

  return fleece_debug.fail_meta_write &&
    atomic_fetch_add (&done, 1) >= fleece_debug.fail_meta_write;
}

/* Write the superblock block with these flags; with a persistent store
 * make it stable.
 */
static int
write_superblock (struct store *s, const struct disk *d, uint32_t flags)
{
  char block[FLEECE_STORE_HEADER_SIZE];
  struct fleece_superblock *sb = (void *) block;

  memset (block, 0, sizeof block);
  memcpy (sb->magic, FLEECE_STORE_MAGIC, 8);
  sb->version = htole32 (FLEECE_STORE_VERSION);
  sb->flags = htole32 (flags);
  sb->cluster_size = htole32 (s->cluster_size);
  sb->header_size = htole32 (FLEECE_STORE_HEADER_SIZE);
  sb->disk_size = htole64 (d->size);
  memcpy (sb->disk_id, d->id, sizeof sb->disk_id);
  sb->meta_offset = htole64 (FLEECE_STORE_HEADER_SIZE);
  sb->meta_size = htole64 (FLEECE_STORE_META_SIZE);
  sb->data_offset = htole64 (s->data_offset);
  sb->sequence = htole64 (++s->sb_sequence);
  sb->created = htole64 (s->created);
  sb->checksum = htole64 (XXH64 (sb, offsetof (struct fleece_superblock,
                                               checksum), 0));
  if (fl_pwrite_all (s->fd, "store superblock", s->path, block, sizeof block,
                     0, false) == -1)
    return -1;
  return s->persistent ? store_sync (s) : 0;
}

/* The superblock of a store in use, and with a persistent store make it
 * stable.
 */
int
store_write_superblock (struct store *s, const struct disk *d, bool clean)
{
  if (meta_write_fails ())
    return fl_error (EIO, "store: writing superblock: %s: injected error "
                     "(fleece.fail_meta_write)", s->path);
  return write_superblock (s, d, (clean ? FLEECE_SB_CLEAN : 0) |
                           (s->persistent ? FLEECE_SB_PERSISTENT : 0) |
                           s->features);
}

int
store_sync (struct store *s)
{
  return fl_fdatasync (s->fd, "store", s->path);
}

/* The checks every Fleece superblock must pass, in either mode, before
 * the store is loaded or formatted: one that fails them may be a damaged
 * persistent store (docs/store-format.md, "Opening").
 */
static int
check_superblock_intact (struct store *s, const struct fleece_superblock *sb)
{
  uint32_t flags = le32toh (sb->flags);

  if (le64toh (sb->checksum) !=
      XXH64 (sb, offsetof (struct fleece_superblock, checksum), 0))
    return fl_error (EINVAL, "store: %s: the superblock checksum is wrong: "
                     "the store is damaged (remove it to start afresh, "
                     "losing what it holds)", s->path);
  if (le32toh (sb->version) != FLEECE_STORE_VERSION)
    return fl_error (EINVAL, "store: %s: format version %" PRIu32 ", this "
                     "Fleece reads version %d: refusing to load or format "
                     "it", s->path, le32toh (sb->version),
                     FLEECE_STORE_VERSION);
  if (flags & ~(uint32_t) FLEECE_SB_KNOWN)
    return fl_error (EINVAL, "store: %s: unknown superblock flags 0x%"
                     PRIx32 ": refusing to load or format it", s->path,
                     flags);
  return 0;
}

/* Check a persistent store's superblock against the disk and the
 * configuration (docs/store-format.md, "Validation on load").
 */
static int
check_superblock (struct store *s, const struct fleece_superblock *sb,
                  uint32_t *cluster_size, const struct disk *d)
{
  uint32_t cs = le32toh (sb->cluster_size);

  if (check_superblock_intact (s, sb) == -1)
    return -1;
  if (le32toh (sb->header_size) != FLEECE_STORE_HEADER_SIZE ||
      le64toh (sb->meta_offset) != FLEECE_STORE_HEADER_SIZE ||
      le64toh (sb->meta_size) != FLEECE_STORE_META_SIZE ||
      cs < FLEECE_CLUSTER_SIZE_MIN || cs > FLEECE_CLUSTER_SIZE_MAX ||
      (cs & (cs - 1)) != 0 ||
      le64toh (sb->data_offset) != data_offset_for (cs))
    return fl_error (EINVAL, "store: %s: the superblock's layout is not "
                     "valid: the store is damaged", s->path);
  if (*cluster_size && *cluster_size != cs)
    return fl_error (EINVAL, "store: %s: was made with cluster-size=%" PRIu32
                     ", not %" PRIu32 ": drop cluster-size or give the "
                     "store's", s->path, cs, *cluster_size);
  if (le64toh (sb->disk_size) != d->size)
    return fl_error (EINVAL, "store: %s: belongs to a disk of %" PRIu64
                     " bytes, but %s has %" PRIu64 ": refusing a store of "
                     "another disk", s->path, le64toh (sb->disk_size),
                     d->path, d->size);
  if (memcmp (sb->disk_id, d->id, sizeof sb->disk_id) != 0)
    return fl_error (EINVAL, "store: %s: belongs to another disk than %s "
                     "(the disk's identity, its device and inode, differs): "
                     "refusing it; remove the store to start afresh",
                     s->path, d->path);
  *cluster_size = cs;
  s->features = le32toh (sb->flags) & FLEECE_SB_PARTIAL;
  s->sb_sequence = le64toh (sb->sequence);
  s->created = le64toh (sb->created);
  return 0;
}

/* Is [off, off + len) of the store all zero?  Holes of a regular file
 * are skipped (SEEK_DATA), so a sparse store costs only its data.
 * Returns 1 if it is, 0 if not (with the first non-zero offset in *at),
 * -1 on error.
 */
static int
region_is_zero (struct store *s, uint64_t off, uint64_t len, uint64_t *at)
{
  const size_t chunk = 1 << 20;
  uint64_t end = off + len;
  char *buf = malloc (chunk);
  int r = 1;

  if (buf == NULL)
    return fl_error (ENOMEM, "store: out of memory");
  while (off < end && r == 1) {
    uint64_t data_end = end;
    if (s->is_file) {
      off_t d = lseek (s->fd, off, SEEK_DATA), h;
      if (d == -1 && errno == ENXIO)
        break;                  /* only holes from here */
      if (d == -1) {
        r = fl_error (errno, "store: lseek: %s: %m", s->path);
        break;
      }
      if ((uint64_t) d >= end)
        break;
      off = d;
      h = lseek (s->fd, off, SEEK_HOLE);
      if (h != -1 && (uint64_t) h < end)
        data_end = h;
    }
    while (off < data_end) {
      size_t n = data_end - off < chunk ? data_end - off : chunk;
      size_t i;
      if (fl_pread_all (s->fd, "store", s->path, buf, n, off) == -1) {
        r = -1;
        break;
      }
      if (!fl_is_zero (buf, n)) {
        for (i = 0; buf[i] == 0; i++)
          ;
        *at = off + i;
        r = 0;
        break;
      }
      off += n;
    }
  }
  free (buf);
  return r;
}

/* Does half h of the metadata log start with a valid record? */
static bool
log_starts_with_record (struct store *s, int h)
{
  char rec[32 + 32];
  uint32_t len;
  uint64_t sum;
  XXH64_state_t *st;
  bool ok;

  if (fl_pread_all (s->fd, "store", s->path, rec, sizeof rec,
                    FLEECE_STORE_HEADER_SIZE +
                    (uint64_t) h * (FLEECE_STORE_META_SIZE / 2)) == -1 ||
      memcmp (rec, "FLMR", 4) != 0)
    return false;
  memcpy (&len, rec + 8, 4);
  memcpy (&sum, rec + 24, 8);
  if (le32toh (len) > 32)
    return true;                /* the magic alone says enough */
  st = XXH64_createState ();
  if (st == NULL)
    return true;
  XXH64_reset (st, 0);
  XXH64_update (st, rec, 24);
  XXH64_update (st, rec + 32, le32toh (len));
  ok = XXH64_digest (st) == le64toh (sum);
  XXH64_freeState (st);
  return ok;
}

/* The first bytes of something that is not a superblock, for a message:
 * printable ASCII as is, the rest as \xNN.
 */
static void
show_bytes (const unsigned char *p, size_t n, char *out, size_t outlen)
{
  size_t i, o = 0;

  for (i = 0; i < n && o + 5 < outlen; i++)
    o += snprintf (out + o, outlen - o,
                   p[i] >= 0x20 && p[i] < 0x7f && p[i] != '\\' && p[i] != '"'
                   ? "%c" : "\\x%02x", p[i]);
  out[o] = '\0';
}

/* A store without a valid superblock may be formatted only if it holds
 * nothing: no byte of a regular file, nor of a block device's superblock
 * and log, is other than zero.  Anything else is refused with what was
 * found, so that neither a damaged persistent store nor somebody else's
 * file is ever formatted (docs/store-format.md, "Opening").  Returns 0
 * when it may be formatted.
 */
static int
check_formattable (struct store *s, uint64_t size,
                   const struct fleece_superblock *sb, ssize_t got)
{
  const uint64_t meta_end = FLEECE_STORE_HEADER_SIZE + FLEECE_STORE_META_SIZE;
  struct fleece_superblock fixed;
  char shown[8 * 4 + 1];
  uint64_t at = 0;
  int r;

  r = region_is_zero (s, 0, s->is_file || size < meta_end ? size : meta_end,
                      &at);
  if (r != 0)
    return r == 1 ? 0 : -1;
  show_bytes ((const unsigned char *) sb->magic, got < 8 ? got : 8, shown,
              sizeof shown);
  if (s->is_file && size < FLEECE_STORE_HEADER_SIZE)
    return fl_error (EINVAL, "store: %s: is %" PRIu64 " bytes long, shorter "
                     "than a store's %d-byte superblock, and not empty%s: "
                     "refusing to format it (remove it to start afresh, "
                     "losing what it holds)", s->path, size,
                     FLEECE_STORE_HEADER_SIZE,
                     got >= 8 && memcmp (sb->magic, FLEECE_STORE_MAGIC, 8) == 0
                     ? " (it starts with a Fleece superblock's magic: a "
                     "truncated store)" : "");
  /* A superblock whose only fault is its magic. */
  fixed = *sb;
  memcpy (fixed.magic, FLEECE_STORE_MAGIC, 8);
  if (le64toh (fixed.checksum) ==
      XXH64 (&fixed, offsetof (struct fleece_superblock, checksum), 0))
    return fl_error (EINVAL, "store: %s: the superblock's magic is damaged "
                     "(\"%s\", not \"%s\"; the rest of the superblock is "
                     "intact): the store is damaged; refusing to format it "
                     "(remove it to start afresh, losing its snapshots and "
                     "bitmaps)", s->path, shown, FLEECE_STORE_MAGIC);
  if (log_starts_with_record (s, 0) || log_starts_with_record (s, 1))
    return fl_error (EINVAL, "store: %s: has no valid superblock (it starts "
                     "with \"%s\", not \"%s\"), but its metadata log holds "
                     "records: a damaged persistent store; refusing to "
                     "format it (remove it to start afresh, losing its "
                     "snapshots and bitmaps)", s->path, shown,
                     FLEECE_STORE_MAGIC);
  return fl_error (EINVAL, "store: %s: is not a Fleece store and not empty "
                   "(it starts with \"%s\", not the superblock magic \"%s\"; "
                   "first non-zero byte at offset %" PRIu64 "): refusing to "
                   "format it; give a new or empty file (or remove this one)",
                   s->path, shown, FLEECE_STORE_MAGIC, at);
}

static int
zero_log (struct store *s)
{
  char *zero = calloc (1, FLEECE_STORE_META_SIZE);
  int r;

  if (zero == NULL)
    return fl_error (ENOMEM, "store: out of memory");
  r = fl_pwrite_all (s->fd, "store metadata log", s->path, zero,
                     FLEECE_STORE_META_SIZE, FLEECE_STORE_HEADER_SIZE, false);
  free (zero);
  return r;
}

/* Read what the store holds and decide (docs/store-format.md,
 * "Opening"): 0 with *existing set if it is a persistent store to load,
 * 0 with *existing clear if it may be formatted, -1 if it is refused.
 */
static int
judge_store (struct store *s, uint64_t size, bool persistent,
             uint32_t *cluster_size, const struct disk *d, bool *existing)
{
  struct fleece_superblock sb;
  ssize_t got;
  bool found;

  memset (&sb, 0, sizeof sb);
  got = size == 0 ? 0 : pread (s->fd, &sb, sizeof sb, 0);
  if (got == -1)
    return fl_error (errno, "store: reading the superblock: %s: %m",
                     s->path);
  /* A superblock is a whole 4096-byte block: a shorter file has none. */
  found = size >= FLEECE_STORE_HEADER_SIZE && got == sizeof sb &&
    memcmp (sb.magic, FLEECE_STORE_MAGIC, 8) == 0;
  /* Whatever the mode, a Fleece superblock must be intact, and anything
   * else may be formatted only if it holds nothing.
   */
  if (!found)
    return size > 0 ? check_formattable (s, size, &sb, got) : 0;
  if (check_superblock_intact (s, &sb) == -1)
    return -1;
  if (!(le32toh (sb.flags) & FLEECE_SB_PERSISTENT)) {
    /* A persistent=false store, or a persistent=true start that stopped
     * before its first image: nothing to keep.
     */
    if (size > data_offset_for (le32toh (sb.cluster_size)))
      fl_debug ("store: %s: formatting it, discarding the copies of an "
                "earlier run that kept nothing (%" PRIu64 " bytes)",
                s->path, size);
    return 0;
  }
  if (!persistent)
    return fl_error (EEXIST, "store: %s: holds the persistent snapshots "
                     "and bitmaps of an earlier run: start with "
                     "persistent=true to keep them, or remove the file to "
                     "discard them", s->path);
  if (check_superblock (s, &sb, cluster_size, d) == -1)
    return -1;
  *existing = true;
  return 0;
}

/* Format a store that holds nothing to keep: a superblock that says so.
 * A persistent one gets its persistent superblock only after its first
 * image (meta_start), so that a crash in between leaves a store that is
 * formatted again, not one refused as damaged.
 */
static int
format_store (struct store *s, const struct disk *d)
{
  s->created = (uint64_t) time (NULL);
  if (s->is_file && ftruncate (s->fd, 0) == -1)
    return fl_error (errno, "store: ftruncate: %s: %m", s->path);
  /* A block device is not truncated: clear its metadata log, so that
   * the records of an earlier store on it can never be loaded.
   */
  if (!s->is_file && s->persistent && zero_log (s) == -1)
    return -1;
  return write_superblock (s, d, FLEECE_SB_CLEAN);
}

int
store_open (struct store *s, const char *path, uint32_t *cluster_size,
            const struct disk *d, bool persistent, enum fleece_locking locking,
            bool *existing)
{
  struct stat st;
  uint64_t size;

  memset (s, 0, sizeof *s);
  *existing = false;
  s->persistent = persistent;
  s->fd = open (path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (s->fd == -1)
    return fl_error (errno, "store: open: %s: %m", path);
  s->path = strdup (path);
  if (s->path == NULL) {
    fl_error (ENOMEM, "store: strdup: out of memory");
    goto out_close_fd;
  }
  if (fstat (s->fd, &st) == -1) {
    fl_error (errno, "store: fstat: %s: %m", path);
    goto out_free_path;
  }
  if (!S_ISREG (st.st_mode) && !S_ISBLK (st.st_mode)) {
    fl_error (EINVAL, "store: %s: not a regular file or a block device",
              path);
    goto out_free_path;
  }
  {
    struct stat dst;
    if (fstat (d->fd, &dst) == 0 && dst.st_dev == st.st_dev &&
        dst.st_ino == st.st_ino && dst.st_rdev == st.st_rdev) {
      fl_error (EINVAL, "store: %s: is the disk itself", path);
      goto out_free_path;
    }
  }
  /* Before anything is read or the store is formatted. */
  if (fl_lock_image (s->fd, "store", path, locking, &s->locked) == -1)
    goto out_free_path;
  s->is_file = S_ISREG (st.st_mode);
  if (s->is_file)
    size = st.st_size;
  else if (fl_block_size (s->fd, "store", path, &size) == -1)
    goto out_free_path;
  if (judge_store (s, size, persistent, cluster_size, d, existing) == -1)
    goto out_free_path;
  if (!*existing && *cluster_size == 0)
    *cluster_size = FLEECE_CLUSTER_SIZE_DEFAULT;
  s->cluster_size = *cluster_size;
  s->data_offset = data_offset_for (s->cluster_size);
  if (!*existing && format_store (s, d) == -1)
    goto out_free_path;
  pthread_mutex_init (&s->lock, NULL);
  pthread_cond_init (&s->punch_cond, NULL);
  return 0;

 out_free_path:
  free (s->path);
  s->path = NULL;
 out_close_fd:
  close (s->fd);
  s->fd = -1;
  return -1;
}

/* The metadata log region, for meta.c. */
int
store_meta_pwrite (struct store *s, const void *buf, size_t len,
                   uint64_t offset)
{
  if (meta_write_fails ())
    return fl_error (EIO, "store: metadata log: pwrite: %s: offset %" PRIu64
                     ": injected error (fleece.fail_meta_write)", s->path,
                     offset);
  return fl_pwrite_all (s->fd, "store metadata log", s->path, buf, len,
                        offset, false);
}

int
store_meta_pread (struct store *s, void *buf, size_t len, uint64_t offset)
{
  return fl_pread_all (s->fd, "store metadata", s->path, buf, len, offset);
}

void
store_close (struct store *s)
{
  if (s->fd >= 0) {
    store_stop_puncher (s);     /* releases what it still holds */
    close (s->fd);
    pthread_mutex_destroy (&s->lock);
    pthread_cond_destroy (&s->punch_cond);
  }
  s->fd = -1;
  free (s->path);
  free (s->used);
  s->path = NULL;
  s->used = NULL;
}

static bool
slot_used (const struct store *s, uint32_t i)
{
  return i < s->nslots && (s->used[i / 64] >> (i % 64)) & 1;
}

static int
grow (struct store *s, uint32_t need)
{
  uint64_t n = s->nslots ? s->nslots : 1024;
  uint64_t *p;

  while (n < need)
    n *= 2;
  if (n > MAX_SLOTS)
    n = MAX_SLOTS;
  if (n < need)
    return fl_error (ENOSPC, "store: %s: more than %u clusters", s->path,
                     (unsigned) MAX_SLOTS);
  p = realloc (s->used, ((n + 63) / 64) * sizeof *p);
  if (p == NULL)
    return fl_error (ENOMEM, "store: realloc: out of memory");
  memset (p + (s->nslots + 63) / 64, 0,
          ((n + 63) / 64 - (s->nslots + 63) / 64) * sizeof *p);
  s->used = p;
  s->nslots = n;
  return 0;
}

/* Find the first free slot at or after from, wrapping around, and grow
 * the bitmap if there is none.  Called with lock held.
 */
static uint32_t
scan_free (const struct store *s, uint32_t from, uint32_t to)
{
  uint32_t i;

  for (i = from; i < to; i++) {
    if ((i % 64) == 0 && i + 64 <= to && s->used[i / 64] == UINT64_MAX) {
      i += 63;
      continue;
    }
    if (!slot_used (s, i))
      return i;
  }
  return UINT32_MAX;
}

static int
find_free (struct store *s, uint32_t from, uint32_t *slot)
{
  uint32_t old = s->nslots;

  *slot = scan_free (s, from < old ? from : old, old);
  if (*slot == UINT32_MAX)
    *slot = scan_free (s, 0, from < old ? from : old);
  if (*slot != UINT32_MAX)
    return 0;
  if (grow (s, old + 1) == -1)
    return -1;
  *slot = old;
  return 0;
}

/* store-max and store-warn (0: none). */
int
store_set_limits (struct store *s, uint64_t max_bytes, unsigned warn_percent)
{
  uint64_t slots = max_bytes / s->cluster_size;

  if (max_bytes && slots == 0)
    return fl_error (EINVAL, "store-max=%" PRIu64 " is smaller than one "
                     "cluster (%" PRIu32 " bytes)", max_bytes,
                     s->cluster_size);
  if (warn_percent > 100)
    return fl_error (EINVAL, "store-warn=%u: expected a percentage from 1 "
                     "to 100", warn_percent);
  if (warn_percent && max_bytes == 0)
    return fl_error (EINVAL, "store-warn needs store-max: a percentage of "
                     "what?");
  s->max_slots = slots > MAX_SLOTS ? MAX_SLOTS : slots;
  s->warn_slots = warn_percent
    ? (uint32_t) ((s->max_slots * (uint64_t) warn_percent + 99) / 100) : 0;
  return 0;
}

/* Has the store crossed the high-water mark since the last call?  *w
 * says what crossed it: the copy may have failed and its slots been
 * freed since, so what the store holds now can be below the mark.
 */
bool
store_take_warning (struct store *s, struct store_warning *w)
{
  bool r;

  pthread_mutex_lock (&s->lock);
  r = s->warn_pending;
  s->warn_pending = false;
  w->asked = s->warn_asked;
  w->held = s->warn_held;
  w->used = s->nused - s->nmeta;
  pthread_mutex_unlock (&s->lock);
  return r;
}

int
store_alloc (struct store *s, uint32_t n, uint32_t *first)
{
  uint32_t i, got, asked = n;

  assert (n >= 1);
  pthread_mutex_lock (&s->lock);
  /* Full, but slots freed are being punched: they are room, wait. */
  while (s->max_slots && s->nused - s->nmeta >= s->max_slots &&
         s->punch_pending > 0)
    pthread_cond_wait (&s->punch_cond, &s->lock);
  if (s->max_slots && s->nused - s->nmeta >= s->max_slots) {
    pthread_mutex_unlock (&s->lock);
    return fl_error (ENOSPC, "store: %s: full: store-max of %" PRIu64
                     " bytes reached", s->path,
                     (uint64_t) s->max_slots * s->cluster_size);
  }
  if (s->max_slots && n > s->max_slots - (s->nused - s->nmeta))
    n = s->max_slots - (s->nused - s->nmeta);
  if (find_free (s, s->hint, first) == -1) {
    pthread_mutex_unlock (&s->lock);
    return -1;
  }
  for (got = 0; got < n; got++) {
    i = *first + got;
    if (i >= MAX_SLOTS)
      break;
    if (i >= s->nslots && grow (s, i + 1) == -1)
      break;
    if (slot_used (s, i))
      break;
    s->used[i / 64] |= UINT64_C (1) << (i % 64);
  }
  s->nused += got;
  s->hint = *first + got;
  if (s->warn_slots && !s->above_warn &&
      s->nused - s->nmeta >= s->warn_slots) {
    s->above_warn = s->warn_pending = true;
    s->warn_asked = asked;
    s->warn_held = s->nused - s->nmeta - got;
  }
  pthread_mutex_unlock (&s->lock);
  return got;
}

/* n contiguous slots for metadata (the image), outside store-max. */
int
store_alloc_run (struct store *s, uint32_t n, uint32_t *first)
{
  uint32_t i, run = 0;

  pthread_mutex_lock (&s->lock);
  for (i = 0; i < s->nslots && run < n; i++) {
    if (slot_used (s, i))
      run = 0;
    else if (run++ == 0)
      *first = i;
  }
  if (run < n) {
    if (run == 0)
      *first = s->nslots;
    if ((uint64_t) *first + n > MAX_SLOTS || grow (s, *first + n) == -1) {
      pthread_mutex_unlock (&s->lock);
      return fl_error (ENOSPC, "store: %s: no room for %" PRIu32
                       " metadata clusters", s->path, n);
    }
  }
  for (i = *first; i < *first + n; i++)
    s->used[i / 64] |= UINT64_C (1) << (i % 64);
  s->nused += n;
  s->nmeta += n;
  pthread_mutex_unlock (&s->lock);
  return 0;
}

/* Mark a slot in use while loading a persistent store.  Fails if it
 * already is: two records naming one slot mean the store is damaged.
 */
int
store_claim (struct store *s, uint32_t slot, bool meta)
{
  int r = 0;

  if (slot >= MAX_SLOTS)
    return fl_error (EINVAL, "store: %s: slot %" PRIu32 " out of range",
                     s->path, slot);
  pthread_mutex_lock (&s->lock);
  if (slot >= s->nslots && grow (s, slot + 1) == -1)
    r = -1;
  else if (slot_used (s, slot))
    r = fl_error (EINVAL, "store: %s: slot %" PRIu32 " is claimed twice: "
                  "the metadata is damaged", s->path, slot);
  else {
    s->used[slot / 64] |= UINT64_C (1) << (slot % 64);
    s->nused++;
    s->nmeta += meta;
  }
  pthread_mutex_unlock (&s->lock);
  return r;
}

static void free_run (struct store *s, uint32_t first, uint32_t n,
                      bool meta, bool queue);

void
store_free (struct store *s, uint32_t slot)
{
  free_run (s, slot, 1, false, false);
}

void
store_free_meta (struct store *s, uint32_t slot)
{
  free_run (s, slot, 1, true, false);
}

/* Frees of fewer bytes than this are punched inline: they take little
 * time, and a punch on the puncher's thread competes for the CPU with
 * whatever comes next (a group's hold on 8 servers of one host, p99
 * 2-3 ms with every punch inline, went to 9-19 ms with every punch on
 * the thread, bench/group-bench.sh).  Deleting a big snapshot under
 * writes is what takes seconds (bench/delete-bench.sh).
 */
#define PUNCH_ASYNC_MIN_BYTES (UINT64_C (64) << 20)

static bool
punch_async (const struct store *s, uint64_t nslots)
{
  return nslots * s->cluster_size >= PUNCH_ASYNC_MIN_BYTES;
}

/* The slots of an image that a newer one replaced: one run. */
void
store_free_meta_run (struct store *s, uint32_t first, uint32_t n)
{
  free_run (s, first, n, true, punch_async (s, n));
}

static int
cmp_slot (const void *a, const void *b)
{
  uint32_t x = *(const uint32_t *) a, y = *(const uint32_t *) b;

  return x < y ? -1 : x > y;
}

/* Free n data slots, in any order (they are sorted in place): each run
 * of adjacent slots is punched as one (store_punch) rather than slot by
 * slot.  Deleting a snapshot frees thousands of slots, mostly adjacent
 * because copies are allocated in order, and a punch per slot kept the
 * store busy for hundreds of milliseconds.  These bulk frees (deletion,
 * pruning, the frees an image makes stable) of 64 MiB or more go to the
 * puncher's thread; smaller ones, a single slot, or the run of a copy
 * that failed, are punched inline.
 */
void
store_free_slots (struct store *s, uint32_t *slots, size_t n)
{
  bool async = punch_async (s, n);
  size_t i, j;

  if (n == 0)
    return;                     /* qsort must not get a NULL array */
  qsort (slots, n, sizeof *slots, cmp_slot);
  for (i = 0; i < n; i = j) {
    for (j = i + 1; j < n && slots[j] == slots[j - 1] + 1; j++)
      ;
    free_run (s, slots[i], j - i, false, async);
  }
}

/* Punched, then released; or (queue) queued for the puncher (punch.c),
 * which does both on its thread.
 */
static void
free_run (struct store *s, uint32_t first, uint32_t n, bool meta,
          bool queue)
{
  if (queue) {
    pthread_mutex_lock (&s->lock);
    if (store_punch_queue_locked (s, first, n, meta)) {
      pthread_mutex_unlock (&s->lock);
      return;
    }
    pthread_mutex_unlock (&s->lock);
  }
  store_punch (s, first, n);
  pthread_mutex_lock (&s->lock);
  store_release_locked (s, first, n, meta);
  pthread_mutex_unlock (&s->lock);
}

/* The slots [first, first + n), punched, are free again. */
void
store_release_locked (struct store *s, uint32_t first, uint32_t n, bool meta)
{
  uint32_t slot;

  for (slot = first; slot < first + n; slot++) {
    assert (slot_used (s, slot));
    s->used[slot / 64] &= ~(UINT64_C (1) << (slot % 64));
  }
  s->nused -= n;
  s->nmeta -= meta ? n : 0;
  if (first < s->hint)
    s->hint = first;
  if (s->above_warn && s->nused - s->nmeta < s->warn_slots)
    s->above_warn = false;      /* re-arm the warning */
}

/* The store's data writes, with their fault injection. */
static int
write_at (struct store *s, uint64_t offset, const void *buf, size_t len)
{
  if (fleece_debug.store_write_delay_ms)    /* a slow store, for tests */
    usleep (fleece_debug.store_write_delay_ms * 1000);
  if (fleece_debug.fail_store_write)
    return fl_error (EIO, "store: pwrite: %s: offset %" PRIu64
                     ": injected error (fleece.fail_store_write)",
                     s->path, offset);
  return fl_pwrite_all (s->fd, "store", s->path, buf, len, offset, false);
}

int
store_write (struct store *s, uint32_t slot, uint32_t nslots,
             const void *buf, size_t len)
{
  assert (len <= (uint64_t) nslots * s->cluster_size);
  return write_at (s, s->data_offset + (uint64_t) slot * s->cluster_size,
                   buf, len);
}

/* Write len bytes at within in slot: some blocks of a cluster copied
 * alone (cbw.c, subcluster).
 */
int
store_write_part (struct store *s, uint32_t slot, uint64_t within,
                  const void *buf, size_t len)
{
  assert (within + len <= s->cluster_size);
  return write_at (s, s->data_offset + (uint64_t) slot * s->cluster_size +
                   within, buf, len);
}

int
store_read (struct store *s, uint32_t slot, uint64_t within, void *buf,
            size_t len)
{
  uint64_t offset = s->data_offset + (uint64_t) slot * s->cluster_size +
    within;
  return fl_pread_all (s->fd, "store", s->path, buf, len, offset);
}

void
store_usage (struct store *s, uint64_t *used, uint64_t *total,
             uint64_t *file_bytes)
{
  struct stat st;
  uint32_t i, top = 0;

  pthread_mutex_lock (&s->lock);
  *used = s->nused - s->nmeta;
  for (i = s->nslots; i > 0; i--)
    if (slot_used (s, i - 1)) {
      top = i;
      break;
    }
  *total = top;
  pthread_mutex_unlock (&s->lock);
  *file_bytes = fstat (s->fd, &st) == 0 ? (uint64_t) st.st_blocks * 512 : 0;
}

/* Store a run of n clusters (len bytes at buf, copied together by
 * copy-before-write): an all-zero cluster gets ZERO_SLOT and no slot
 * (invariant 5), the others slots written with as few pwrites as the
 * allocator's runs allow.  slots[i] receives cluster i's slot, ZERO_SLOT,
 * or NO_SLOT if nothing was allocated for it before a failure (then
 * store_free_run gives back what was).  *copied counts the bytes
 * written.
 */
int
store_put_run (struct store *s, const char *buf, uint32_t n, uint64_t len,
               uint32_t *slots, _Atomic uint64_t *copied)
{
  uint32_t cs = s->cluster_size, i, j, k, first;

  for (i = 0; i < n; i++) {
    uint64_t clen = i == n - 1 ? len - (uint64_t) i * cs : cs;
    slots[i] = fl_is_zero (buf + (uint64_t) i * cs, clen)
      ? ZERO_SLOT : NO_SLOT;
  }
  for (i = 0; i < n; ) {
    int got;
    uint64_t blen;

    if (slots[i] == ZERO_SLOT) {
      i++;
      continue;
    }
    for (j = i; j < n && slots[j] != ZERO_SLOT; j++)
      ;
    got = store_alloc (s, j - i, &first);
    if (got <= 0)
      return -1;
    for (k = 0; k < (uint32_t) got; k++)
      slots[i + k] = first + k;
    blen = (uint64_t) got * cs;
    if (blen > len - (uint64_t) i * cs)
      blen = len - (uint64_t) i * cs;
    if (store_write (s, first, got, buf + (uint64_t) i * cs, blen) == -1)
      return -1;
    atomic_fetch_add_explicit (copied, blen, memory_order_relaxed);
    i += got;
  }
  return 0;
}

/* Give back the slots store_put_run allocated. */
void
store_free_run (struct store *s, const uint32_t *slots, uint32_t n)
{
  uint32_t i;

  for (i = 0; i < n; i++)
    if (slots[i] != ZERO_SLOT && slots[i] != NO_SLOT)
      store_free (s, slots[i]);
}
