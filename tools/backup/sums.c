/* fleece-backup: the checksum list of a restore point.
 *
 * For each cluster (REPO_CLUSTER bytes, the last one shorter) of the
 * whole point-in-time image, the xxh3 (64 bits) of its bytes: 8 bytes
 * per 64 KiB, 128 MiB per TiB of disk.  A full point hashes every
 * cluster it pulls; an incremental one starts from its parent's list
 * and replaces the clusters it pulls.  The hashes are taken from the
 * buffers read from the snapshot, before they are written, so that
 * verify proves the point holds what was read, without the source.
 *
 * During a pull (sums_on set) every planned piece must be made of whole
 * clusters: sums_align rounds the source's extents to clusters (a
 * cluster that is only partly zero is copied), sums_prepare makes the
 * dirty bitmap at least cluster-grained and checks that requests are
 * whole clusters; jobs are cut at multiples of the request size.  Then
 * each COPY job hashes its buffer (sums_data) and each zeroed range its
 * clusters (sums_zero).  In check mode (restore) the same hooks compare
 * instead of store, and the first mismatch stops the restore.
 *
 * File: "FLEECECS", version (le32), cluster size (le32), disk size
 * (le64), count (le64), then count le64 hashes.  The manifest holds the
 * xxh3 of the whole file, checked when it is read.
 */

#include <config.h>

#include <assert.h>
#include <endian.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <xxhash.h>

#include "cleanup.h"
#include "repo.h"

#define SUMS_MAGIC "FLEECECS"
#define SUMS_VERSION 1
#define SUMS_HEADER 32

struct sums *sums_on;

uint64_t
sums_hash (const char *buf, uint64_t length)
{
  return XXH3_64bits (buf, length);
}

void
sums_alloc (struct sums *s, uint64_t disk_size)
{
  s->cluster = REPO_CLUSTER;
  s->disk_size = disk_size;
  s->n = (disk_size + REPO_CLUSTER - 1) / REPO_CLUSTER;
  s->v = xcalloc (s->n + 1, sizeof *s->v);
}

/* After the bitmap is loaded: a granule smaller than a cluster makes the
 * bitmap coarser (a cluster is dirty if any of its granules is).
 */
void
sums_prepare (void)
{
  uint64_t c = sums_on->cluster, f, i, nbits, count = 0;
  uint8_t *bits;

  if (cfg.request_size % c)
    die ("the servers accept requests of %" PRIu32 " bytes, not a "
         "multiple of the repository's cluster size %" PRIu64,
         cfg.request_size, c);
  if (cfg.sync != SYNC_INCREMENTAL || bm.granularity >= c)
    return;
  f = c / bm.granularity;
  nbits = (src.size + c - 1) / c;
  bits = xcalloc (1, (nbits + 7) / 8 + 1);
  for (i = 0; i < bm.nbits; i++)
    if (bit_test (i))
      bits[i / f >> 3] |= 1u << (i / f & 7);
  free (bm.bits);
  bm.bits = bits;
  bm.nbits = nbits;
  bm.granularity = c;
  for (i = 0; i < nbits; i++)
    count += bit_test (i);
  bm.dirty = count;
  bm.dirty_bytes = count * c;
  if (count && bit_test (nbits - 1) && src.size % c)
    bm.dirty_bytes -= c - src.size % c;
}

/* Rewrite the extents of a block status job as whole clusters from
 * j->offset (a cluster boundary): a cluster is zero (or a hole) only if
 * all of it is.  A reply that ends inside a cluster is cut there, and
 * the rest asked again; one that covers less than a cluster becomes
 * that cluster, copied.
 */
void
sums_align (struct job *j)
{
  uint64_t c = sums_on->cluster, pos = j->offset, end = pos, cend, cl;
  extent_vector out = { 0 };
  uint32_t flags;
  size_t i, k;

  assert (pos % c == 0);
  for (i = 0; i < j->ext.v.len && j->ext.v.ptr[i].offset == end; i++)
    end += j->ext.v.ptr[i].length;
  if (end > j->offset + j->length)
    end = j->offset + j->length;
  if (end != src.size)
    end -= end % c;
  if (end <= pos) {
    end = pos + c < src.size ? pos + c : src.size;
    if (extent_vector_append (&out, (struct extent) {
          .offset = pos, .length = end - pos, .flags = 0 }) == -1)
      die ("realloc: %m");
    goto done;
  }
  for (k = 0; pos < end; pos = cend) {
    cend = pos + c < end ? pos + c : end;
    flags = LIBNBD_STATE_ZERO | LIBNBD_STATE_HOLE;
    for (cl = pos; cl < cend; ) {
      struct extent *e;
      while (j->ext.v.ptr[k].offset + j->ext.v.ptr[k].length <= cl)
        k++;
      e = &j->ext.v.ptr[k];
      flags &= e->flags;
      cl = e->offset + e->length;
    }
    if (out.len && out.ptr[out.len - 1].flags == flags)
      out.ptr[out.len - 1].length += cend - pos;
    else if (extent_vector_append (&out, (struct extent) {
          .offset = pos, .length = cend - pos, .flags = flags }) == -1)
      die ("realloc: %m");
  }
 done:
  extent_vector_reset (&j->ext.v);
  j->ext.v = out;
}

static void
sums_set (uint64_t i, uint64_t h, uint64_t offset)
{
  if (!sums_on->check) {
    sums_on->v[i] = h;
    return;
  }
  if (sums_on->v[i] != h)
    die ("point %s differs from its checksums at offset %" PRIu64
         " (cluster %" PRIu64 "): the repository is damaged",
         sums_on->what, offset, i);
}

/* Whole clusters only (the invariant above). */
static uint64_t
cluster_len (uint64_t offset, uint64_t end)
{
  uint64_t c = sums_on->cluster;

  if (offset % c || (end % c && end != sums_on->disk_size))
    die ("internal error: range %" PRIu64 "-%" PRIu64 " is not made of "
         "whole clusters", offset, end);
  return end - offset < c ? end - offset : c;
}

void
sums_data (uint64_t offset, uint64_t length, const char *buf)
{
  uint64_t end = offset + length, len;

  for (; offset < end; offset += len, buf += len) {
    len = cluster_len (offset, end);
    sums_set (offset / sums_on->cluster, sums_hash (buf, len), offset);
  }
}

void
sums_zero (uint64_t offset, uint64_t length)
{
  static uint64_t zero_full, zero_tail, tail_len = UINT64_MAX;
  uint64_t end = offset + length, len, c = sums_on->cluster;

  if (zero_full == 0) {
    CLEANUP_FREE char *z = xcalloc (1, c);
    zero_full = sums_hash (z, c);
    tail_len = sums_on->disk_size % c;
    zero_tail = sums_hash (z, tail_len);
  }
  for (; offset < end; offset += len) {
    len = cluster_len (offset, end);
    sums_set (offset / c, len == c ? zero_full : zero_tail, offset);
  }
}

/* ---- The file ---- */

void
sums_write (const char *path, const struct sums *s, char **hex)
{
  size_t bytes = SUMS_HEADER + s->n * 8;
  CLEANUP_FREE char *b = xmalloc (bytes);
  uint32_t u32;
  uint64_t u64, i;
  int fd;

  memcpy (b, SUMS_MAGIC, 8);
  u32 = htole32 (SUMS_VERSION); memcpy (b + 8, &u32, 4);
  u32 = htole32 (s->cluster); memcpy (b + 12, &u32, 4);
  u64 = htole64 (s->disk_size); memcpy (b + 16, &u64, 8);
  u64 = htole64 (s->n); memcpy (b + 24, &u64, 8);
  for (i = 0; i < s->n; i++) {
    u64 = htole64 (s->v[i]);
    memcpy (b + SUMS_HEADER + i * 8, &u64, 8);
  }
  fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd == -1)
    die ("open: %s: %m", path);
  if (write (fd, b, bytes) != (ssize_t) bytes)
    die ("write: %s: %m", path);
  if (fsync (fd) == -1 || close (fd) == -1)
    die ("fsync: %s: %m", path);
  if (asprintf (hex, "%016" PRIx64, (uint64_t) XXH3_64bits (b, bytes)) == -1)
    die ("asprintf: %m");
}

void
sums_read (const char *path, const char *hex, struct sums *s)
{
  CLEANUP_FREE char *b = NULL;
  char got[17];
  uint64_t u64, i, disk_size;
  uint32_t u32;
  ssize_t r;
  size_t bytes;
  FILE *fp = fopen (path, "re");

  if (fp == NULL)
    die ("open: %s: %m", path);
  b = xmalloc (SUMS_HEADER);
  if (fread (b, 1, SUMS_HEADER, fp) != SUMS_HEADER ||
      memcmp (b, SUMS_MAGIC, 8) != 0)
    die ("%s: not a checksum list (no FLEECECS header)", path);
  memcpy (&u64, b + 16, 8);
  disk_size = le64toh (u64);
  sums_alloc (s, disk_size);
  memcpy (&u32, b + 12, 4);
  memcpy (&u64, b + 24, 8);
  if (le32toh (u32) != s->cluster || le64toh (u64) != s->n)
    die ("%s: checksum list of cluster size %" PRIu32 " and %" PRIu64
         " clusters, not %u and %" PRIu64, path, le32toh (u32),
         le64toh (u64), s->cluster, s->n);
  bytes = SUMS_HEADER + s->n * 8;
  b = realloc (b, bytes);
  if (b == NULL)
    die ("realloc: %m");
  r = fread (b + SUMS_HEADER, 1, bytes - SUMS_HEADER, fp);
  fclose (fp);
  if (r != (ssize_t) (bytes - SUMS_HEADER))
    die ("%s: truncated checksum list", path);
  snprintf (got, sizeof got, "%016" PRIx64, (uint64_t) XXH3_64bits (b, bytes));
  if (hex == NULL || strcmp (got, hex) != 0)
    die ("%s: the checksum list is damaged (xxh3 %s, the manifest says "
         "%s)", path, got, hex ? hex : "nothing");
  for (i = 0; i < s->n; i++) {
    memcpy (&u64, b + SUMS_HEADER + i * 8, 8);
    s->v[i] = le64toh (u64);
  }
}
