/* fleece-backup: the dirty bitmap of --sync=incremental
 * (docs/bitmap-export.md).
 *
 * The bitmap comes from export bitmap/CHECKPOINT of the source's server
 * (the URI is SOURCE's with its path replaced, uri.c).  Its header is
 * checked against the pull before any bit is used: magic, version,
 * checksum, header size, granularity, name, bit count, size of the
 * export, not inconsistent, frozen, frozen by the checkpoint of the
 * snapshot being pulled, and the source's size; then the bits are
 * counted against the header's dirty count.  Any failure is a message
 * that --fallback-full turns into a full pull.
 *
 * Undocumented, for tests only: FLEECE_BACKUP_BITMAP_URI replaces the
 * bitmap URI derived from SOURCE, so that a test can serve a crafted
 * bitmap (bad checksum, not frozen...) with nbdkit file.
 */

#include <config.h>

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "fleece-wire.h"
#include "cleanup.h"
#include "backup.h"

struct dirty_bitmap bm;

bool
bit_test (uint64_t i)
{
  return bm.bits[i >> 3] & (1u << (i & 7));
}

/* The first bit at or after i that is set (or clear), or bm.nbits. */
uint64_t
bit_find (uint64_t i, bool set)
{
  const uint8_t skip = set ? 0 : 0xff;

  while (i < bm.nbits) {
    if ((i & 7) == 0 && bm.bits[i >> 3] == skip)
      i += 8;
    else if (bit_test (i) == set)
      return i;
    else
      i++;
  }
  return bm.nbits;
}

static bool
field_is (const char *field, const char *s)
{
  return memchr (field, '\0', FLEECE_BITMAP_NAME_SIZE) &&
    strcmp (field, s) == 0;
}

/* Check a bitmap header against the pull: the bitmap 'name' must
 * describe exactly the changes up to 'snapshot' of a disk of disk_size
 * bytes.  Returns -1 with the reason in err.
 */
static int
bitmap_check_header (const struct fleece_bitmap_header *h,
                     const char *name, const char *snapshot,
                     uint64_t disk_size, uint64_t export_size,
                     char *err, size_t n)
{
  uint32_t gran = le32toh (h->granularity), flags = le32toh (h->flags);
  uint64_t size = le64toh (h->disk_size), bits = le64toh (h->bit_count);
  const char *by = h->frozen_by;

  if (memcmp (h->magic, FLEECE_BITMAP_MAGIC, 8) != 0)
    snprintf (err, n, "bitmap '%s' has a bad header: no FLEECEBM magic",
              name);
  else if (le32toh (h->version) != FLEECE_BITMAP_VERSION)
    snprintf (err, n, "bitmap '%s' has version %" PRIu32 ", this "
              "fleece-backup reads version %d", name,
              le32toh (h->version), FLEECE_BITMAP_VERSION);
  else if (XXH64 (h, offsetof (struct fleece_bitmap_header, checksum), 0)
           != le64toh (h->checksum))
    snprintf (err, n, "bitmap '%s' has a bad header: wrong checksum",
              name);
  else if (le32toh (h->header_size) != FLEECE_BITMAP_HEADER_SIZE)
    snprintf (err, n, "bitmap '%s' has a bad header: header size "
              "%" PRIu32, name, le32toh (h->header_size));
  else if (gran == 0 || (gran & (gran - 1)) != 0)
    snprintf (err, n, "bitmap '%s' has a bad header: granularity "
              "%" PRIu32 " is not a power of two", name, gran);
  else if (!field_is (h->name, name))
    snprintf (err, n, "bitmap '%s' has a bad header: it is not named "
              "'%s'", name, name);
  else if (bits != size / gran + (size % gran != 0))
    snprintf (err, n, "bitmap '%s' has a bad header: %" PRIu64 " bits "
              "for %" PRIu64 " bytes at granularity %" PRIu32,
              name, bits, size, gran);
  else if (export_size < FLEECE_BITMAP_HEADER_SIZE + (bits + 7) / 8)
    snprintf (err, n, "bitmap '%s' is truncated: the export has "
              "%" PRIu64 " bytes, its bits need %" PRIu64, name,
              export_size, FLEECE_BITMAP_HEADER_SIZE + (bits + 7) / 8);
  else if (flags & FLEECE_BM_INCONSISTENT)
    snprintf (err, n, "bitmap '%s' is marked inconsistent: do a full "
              "pull", name);
  else if (!(flags & FLEECE_BM_FROZEN))
    snprintf (err, n, "bitmap '%s' is not frozen: it is still recording "
              "writes; create a checkpoint and pull its snapshot", name);
  else if (!field_is (by, snapshot))
    snprintf (err, n, "bitmap '%s' was frozen by checkpoint '%.*s', not "
              "by '%s': it does not describe the changes up to "
              "snapshot/%s", name, (int) strnlen (by, 128), by,
              snapshot, snapshot);
  else if (size != disk_size)
    snprintf (err, n, "bitmap '%s' is for a disk of %" PRIu64 " bytes, "
              "the source is %" PRIu64 " bytes", name, size, disk_size);
  else
    return 0;
  return -1;
}

/* Loading the bitmap runs on a thread of its own, started before the
 * source connection, so that the two handshakes overlap: the thread
 * connects to bitmap/CHECKPOINT and reads the header and, in the same
 * request, the first BITMAP_PREFETCH bytes of bits.  It only uses its
 * own handle and the fields below (nbd_get_error is per thread) and
 * reports its errors there; the checks that need the source (its size)
 * are made by the main thread after joining it, in the same order and
 * with the same messages as when the load came after the connection.
 */
#define BITMAP_PREFETCH (1u << 20)

static struct {
  pthread_t thread;
  /* Written by the thread, read after the join. */
  struct nbd_handle *h;         /* NULL: it could not connect */
  int64_t size;                 /* of the export */
  union {
    struct fleece_bitmap_header h;
    char raw[FLEECE_BITMAP_HEADER_SIZE];
  } hdr;
  char *prefix;                 /* bytes of bits after the header */
  uint64_t have;                /* ... how many */
  char err[1024];               /* why the load failed, or "" */
} bl;

static void *
bitmap_thread (void *arg)
{
  const char *override = getenv ("FLEECE_BACKUP_BITMAP_URI");
  const char *name = cfg.since;
  uint64_t want = FLEECE_BITMAP_HEADER_SIZE;
  CLEANUP_FREE char *uri = NULL, *msg = NULL;
  int64_t max;
  bool refused;

  uri = override ? strdup (override) : bitmap_uri (cfg.source, name);
  if (uri == NULL) {
    snprintf (bl.err, sizeof bl.err, "strdup: %m");
    return NULL;
  }
  bl.h = nbd_open_uri (uri, "bitmap", false, &msg, &refused);
  if (bl.h == NULL) {
    snprintf (bl.err, sizeof bl.err, refused
              ? "bitmap '%s' does not exist on the server: %s"
              : "bitmap '%s' cannot be opened: %s", name, msg);
    return NULL;
  }
  bl.size = nbd_get_size (bl.h);
  max = nbd_get_block_size (bl.h, LIBNBD_SIZE_MAXIMUM);
  /* The header and the first bits in one request when the export allows;
   * a short export fails the header read as it did before.
   */
  if (bl.size > (int64_t) want) {
    want = (uint64_t) bl.size < want + BITMAP_PREFETCH ? (uint64_t) bl.size
      : want + BITMAP_PREFETCH;
    if (max >= FLEECE_BITMAP_HEADER_SIZE && (uint64_t) max < want)
      want = max;
  }
  bl.prefix = malloc (want);
  if (bl.prefix == NULL) {
    snprintf (bl.err, sizeof bl.err, "malloc: %m");
    return NULL;
  }
  if (bl.size == -1 || nbd_pread (bl.h, bl.prefix, want, 0, 0) == -1) {
    snprintf (bl.err, sizeof bl.err, "bitmap '%s': %s", name,
              nbd_get_error ());
    return NULL;
  }
  memcpy (bl.hdr.raw, bl.prefix, FLEECE_BITMAP_HEADER_SIZE);
  bl.have = want - FLEECE_BITMAP_HEADER_SIZE;
  memmove (bl.prefix, bl.prefix + FLEECE_BITMAP_HEADER_SIZE, bl.have);
  return NULL;
}

void
bitmap_start (void)
{
  int e = pthread_create (&bl.thread, NULL, bitmap_thread, NULL);

  if (e != 0) {
    errno = e;
    die ("pthread_create: %m");
  }
}

/* The bits: those the thread read, then the rest; then count them. */
static int
bitmap_read_bits (const char *name, char *err, size_t n)
{
  uint64_t nbytes = (bm.nbits + 7) / 8, off, count = 0, dirty;
  size_t len;

  bm.bits = xcalloc (1, nbytes + 1);
  off = bl.have < nbytes ? bl.have : nbytes;
  memcpy (bm.bits, bl.prefix, off);
  for (; off < nbytes; off += len) {
    len = nbytes - off < cfg.request_size ? nbytes - off : cfg.request_size;
    if (nbd_pread (bl.h, bm.bits + off, len,
                   FLEECE_BITMAP_HEADER_SIZE + off, 0) == -1) {
      snprintf (err, n, "bitmap '%s': %s", name, nbd_get_error ());
      return -1;
    }
  }
  if (bm.nbits & 7)             /* bits past the end do not count */
    bm.bits[nbytes - 1] &= (1u << (bm.nbits & 7)) - 1;
  for (off = 0; off < nbytes; off++)
    count += __builtin_popcount (bm.bits[off]);
  dirty = le64toh (bl.hdr.h.dirty_count);
  if (count != dirty) {
    snprintf (err, n, "bitmap '%s' is damaged: its header counts "
              "%" PRIu64 " dirty granules, its bits %" PRIu64,
              name, dirty, count);
    return -1;
  }
  bm.dirty = count;
  bm.dirty_bytes = count * bm.granularity;
  if (count && bit_test (bm.nbits - 1) &&
      src.size % bm.granularity)
    bm.dirty_bytes -= bm.granularity - src.size % bm.granularity;
  return 0;
}

/* Wait for the thread and check what it read against the source.  Any
 * problem with the bitmap is returned as -1 and a message, so that
 * --fallback-full can say why it pulls everything.
 */
static int
bitmap_load (const char *snapshot, char *err, size_t n)
{
  int e, r = -1;

  e = pthread_join (bl.thread, NULL);
  if (e != 0) {
    errno = e;
    die ("pthread_join: %m");
  }
  if (bl.err[0]) {
    snprintf (err, n, "%s", bl.err);
    goto out;
  }
  if (bitmap_check_header (&bl.hdr.h, cfg.since, snapshot, src.size,
                           bl.size, err, n) == -1)
    goto out;
  bm.granularity = le32toh (bl.hdr.h.granularity);
  bm.nbits = le64toh (bl.hdr.h.bit_count);
  r = bitmap_read_bits (cfg.since, err, n);
 out:
  /* Say goodbye without waiting for the server to close: pull_end
   * closes the handle.
   */
  if (bl.h && !nbd_lost (bl.h) && nbd_aio_disconnect (bl.h, 0) == -1) {
    nbd_close (bl.h);
    bl.h = NULL;
  }
  free (bl.prefix);
  bl.prefix = NULL;
  if (r == -1) {
    free (bm.bits);
    bm.bits = NULL;
  }
  return r;
}

void
incremental_prepare (const char *snapshot)
{
  char err[1024];

  if (bitmap_load (snapshot, err, sizeof err) == 0)
    return;
  if (!cfg.fallback_full)
    die ("%s", err);
  warn ("%s: doing a full pull instead (--fallback-full)", err);
  cfg.sync = SYNC_FULL;
}

/* The end of the pull: wait for the server to close the bitmap's
 * connection, which bitmap_load left with a goodbye.
 */
void
bitmap_close (void)
{
  if (bl.h) {
    nbd_finish (bl.h, true);
    bl.h = NULL;
  }
}
