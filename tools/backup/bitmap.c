/* fleece-backup: the dirty bitmap of --sync=incremental
 * (docs/bitmap-export.md).
 *
 * The bitmap comes from export bitmap/CHECKPOINT of the source's server
 * (SOURCE's URI with that export name, lib/export.c).  Its header is
 * checked against the pull before any bit is used, by the one reader's
 * rules (lib/bitmap-export.c): magic, version, checksum, header size,
 * granularity, name, bit count, size of the export, not inconsistent,
 * frozen, frozen by the checkpoint of the snapshot being pulled, and the
 * source's size; then the bits are counted against the header's dirty
 * count.  Any failure is a message that --fallback-full turns into a
 * full pull.
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

#include "fleece-wire.h"
#include "bitmap-export.h"
#include "export.h"
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
  char expname[16 + FLEECE_BITMAP_NAME_SIZE], why[1024];
  int64_t max;
  bool refused;

  /* Export bitmap/NAME of the source's server (lib/export.c), or the
   * test's URI as it is.
   */
  snprintf (expname, sizeof expname, "bitmap/%s", name);
  bl.h = export_open (override ? override : cfg.source,
                      override ? NULL : expname, "bitmap", 0, &refused,
                      why, sizeof why);
  if (bl.h == NULL) {
    snprintf (bl.err, sizeof bl.err, refused
              ? "bitmap '%s' does not exist on the server: %s"
              : "bitmap '%s' cannot be opened: %s", name, why);
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

/* The bits: those the thread read, then the rest, checked and counted
 * by lib/bitmap-export.c.
 */
static int
bitmap_read_bits (const char *name, char *err, size_t n)
{
  uint64_t nbytes = bitmap_export_bytes (&bl.hdr.h), have, count;

  bm.bits = xcalloc (1, nbytes + 1);
  have = bl.have < nbytes ? bl.have : nbytes;
  memcpy (bm.bits, bl.prefix, have);
  if (bitmap_export_read_bits (bl.h, &bl.hdr.h, name, bm.bits, have,
                               cfg.request_size, &count, err, n) == -1)
    return -1;
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
  /* Exactly the changes up to the snapshot being pulled. */
  struct bitmap_want want = {
    .name = cfg.since, .disk_size = src.size, .frozen = true,
    .frozen_by = snapshot,
  };
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
  if (bitmap_export_check_header (&bl.hdr.h, bl.size, &want, err,
                                  n) == -1)
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
