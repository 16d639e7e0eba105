/* The one reader of a bitmap export (lib/bitmap-export.c): real exports
 * made by the engine (libfleece, as the plugin serves them), served back
 * by "nbdkit -s file" through libnbd, then crafted bad headers and bits.
 *
 *  - a frozen bitmap is accepted with its exact bits, read whole or in
 *    small requests after a prefix the caller already has; bits past
 *    the end of the disk are cleared, not counted;
 *  - what the caller asks for is checked: frozen, frozen by which
 *    checkpoint, the name, the disk size, the granularity;
 *  - each damaged header (magic, version, checksum, header size,
 *    granularity, bit count, name without its NUL, inconsistent, too
 *    short an export) and damaged bits (a count that differs) is refused
 *    with a message that names the bitmap and what is wrong.
 *
 * The disk is 1 MiB + 12 KiB at 64 KiB clusters: 17 bits, the last
 * granule short and the last byte of bits partly past the end.
 *
 * TAP output (tap.h); the plan is printed at the end.
 */

#include <config.h>

#undef NDEBUG

#include <assert.h>
#include <endian.h>
#include <stddef.h>

#include <libnbd.h>
#include <xxhash.h>

#include "fleece-wire.h"
#include "bitmap-export.h"
#include "test-engine.h"

#define CS (64 * 1024)
#define DISK_SIZE (1024 * 1024 + 12 * 1024)
#define NBITS 17

static struct fleece *fl;

/* What a pull of snapshot c2 from bitmap c1 asks for. */
static const struct bitmap_want c1_want = {
  .name = "c1", .disk_size = DISK_SIZE, .frozen = true, .frozen_by = "c2",
};
static uint64_t c1_size;        /* of the export */

/* The export of bitmap name, malloc'ed, its size in *size. */
static uint8_t *
export_bytes (const char *name, uint64_t *size)
{
  struct fleece_bitmap_export *bx = fleece_bitmap_export_open (fl, name);
  uint8_t *buf;

  if (bx == NULL)
    bail_out ("fleece_bitmap_export_open: %s: %s", name,
              fleece_last_error ());
  *size = fleece_bitmap_export_size (bx);
  buf = malloc (*size);
  assert (buf);
  if (fleece_bitmap_export_pread (bx, buf, *size, 0) == -1)
    bail_out ("fleece_bitmap_export_pread: %s", fleece_last_error ());
  fleece_bitmap_export_close (bx);
  return buf;
}

/* buf served as an NBD export by nbdkit's file plugin on a pipe. */
static struct nbd_handle *
serve (const uint8_t *buf, uint64_t size)
{
  const char *path = test_path ("export");
  char *argv[] = { (char *) "nbdkit", (char *) "-s", (char *) "-r",
                   (char *) "--exit-with-parent", (char *) "file",
                   (char *) path, NULL };
  struct nbd_handle *h;

  test_write_disk (path, buf, size);
  h = nbd_create ();
  if (h == NULL || nbd_connect_command (h, argv) == -1)
    bail_out ("nbdkit -s file %s: %s", path, nbd_get_error ());
  return h;
}

static void
finish (struct nbd_handle *h)
{
  nbd_shutdown (h, 0);
  nbd_close (h);
}

/* The header of an export, with a checksum made anew after a change. */
static void
reseal (struct fleece_bitmap_header *h)
{
  h->checksum = htole64 (XXH64 (h, offsetof (struct fleece_bitmap_header,
                                            checksum), 0));
}

/* Check h; expect a refusal whose message holds each of the two words
 * (the second may be NULL).
 */
static void
refused (const struct fleece_bitmap_header *h, uint64_t size,
         const struct bitmap_want *want, const char *what,
         const char *word, const char *word2)
{
  char err[1024] = "";
  int r = bitmap_export_check_header (h, size, want, err, sizeof err);

  ok (r == -1 && strstr (err, "bitmap '") && strstr (err, word) &&
      (word2 == NULL || strstr (err, word2)),
      "%s: refused: %s", what, err);
}

static void
accepted (const struct fleece_bitmap_header *h, uint64_t size,
          const struct bitmap_want *want, const char *what)
{
  char err[1024] = "";

  ok (bitmap_export_check_header (h, size, want, err, sizeof err) == 0,
      "%s: accepted %s", what, err);
}

static void
test_real (const uint8_t *c1, const uint8_t *c2, uint64_t c2_size)
{
  struct bitmap_want want = c1_want;
  const struct fleece_bitmap_header *h = (const void *) c1;
  uint8_t bits[8], *copy;
  char err[1024] = "";
  struct nbd_handle *nbd;
  uint64_t count = 0;
  int r;

  accepted (h, c1_size, &want, "bitmap c1, frozen by c2");
  ok (bitmap_export_bytes (h) == 3, "its bits are 3 bytes");
  nbd = serve (c1, c1_size);
  memset (bits, 0xee, sizeof bits);
  r = bitmap_export_read_bits (nbd, h, "c1", bits, 0, 1 << 20, &count, err,
                               sizeof err);
  ok (r == 0 && count == 3, "read whole: 3 granules dirty %s", err);
  ok (bits[0] == 0x21 && bits[1] == 0 && bits[2] == 0x01,
      "the bits are clusters 0, 5 and 16 (the short last one): "
      "%02x %02x %02x", bits[0], bits[1], bits[2]);
  memset (bits + 1, 0xee, sizeof bits - 1);
  r = bitmap_export_read_bits (nbd, h, "c1", bits, 1, 1, &count, err,
                               sizeof err);
  ok (r == 0 && count == 3 && bits[1] == 0 && bits[2] == 0x01,
      "read after a 1-byte prefix, 1 byte a request: the same %s", err);
  finish (nbd);

  /* Bits past the end of the disk, set in the export: not counted. */
  copy = malloc (c1_size);
  assert (copy);
  memcpy (copy, c1, c1_size);
  copy[FLEECE_BITMAP_HEADER_SIZE + 2] |= 0xfe;
  nbd = serve (copy, c1_size);
  r = bitmap_export_read_bits (nbd, h, "c1", bits, 0, 1 << 20, &count, err,
                               sizeof err);
  ok (r == 0 && count == 3 && bits[2] == 0x01,
      "bits past bit 17 are cleared and not counted %s", err);
  finish (nbd);

  /* A bit that the header does not count: damaged. */
  copy[FLEECE_BITMAP_HEADER_SIZE + 1] |= 0x04;
  nbd = serve (copy, c1_size);
  r = bitmap_export_read_bits (nbd, h, "c1", bits, 0, 1 << 20, &count, err,
                               sizeof err);
  ok (r == -1 && strstr (err, "bitmap 'c1' is damaged") &&
      strstr (err, "counts 3 dirty granules, its bits 4"),
      "one bit more than the header counts: refused: %s", err);
  finish (nbd);
  free (copy);

  /* What the caller asks for. */
  want.frozen_by = "c3";
  refused (h, c1_size, &want, "frozen by another checkpoint",
           "was frozen by checkpoint 'c2', not by 'c3'", NULL);
  want.frozen_by = NULL;
  accepted (h, c1_size, &want, "frozen by any checkpoint");
  want.name = "c9";
  refused (h, c1_size, &want, "another name", "it is not named 'c9'", NULL);
  want.name = "c1";
  want.disk_size = DISK_SIZE + CS;
  refused (h, c1_size, &want, "another disk size",
           "is for a disk of 1060864 bytes", NULL);
  want.disk_size = DISK_SIZE;
  want.granularity = 4096;
  refused (h, c1_size, &want, "another granularity",
           "has granularity 65536", "cluster size is 4096");

  /* c2 is still recording. */
  h = (const void *) c2;
  want = (struct bitmap_want) { .name = "c2", .disk_size = DISK_SIZE,
                                .frozen = true };
  refused (h, c2_size, &want, "a bitmap still recording, frozen wanted",
           "is not frozen", NULL);
  want.frozen = false;
  accepted (h, c2_size, &want, "the same, frozen not asked for (demoting)");
}

/* h, resealed, refused with a message holding word (and word2). */
static void
crafted (struct fleece_bitmap_header h, const char *what, const char *word,
         const char *word2)
{
  reseal (&h);
  refused (&h, c1_size, &c1_want, what, word, word2);
}

/* Crafted headers: one thing wrong each. */
static void
test_crafted (const uint8_t *c1)
{
  struct fleece_bitmap_header good, h;

  memcpy (&good, c1, sizeof good);
  h = good;
  memcpy (h.magic, "FLEECEST", 8);
  crafted (h, "another magic", "no FLEECEBM magic", NULL);
  h = good;
  h.version = htole32 (2);
  crafted (h, "version 2", "has version 2", "reads version 1");
  h = good;
  h.dirty_count = htole64 (4);          /* not resealed */
  refused (&h, c1_size, &c1_want, "a change without its checksum",
           "wrong checksum", NULL);
  h = good;
  h.header_size = htole32 (512);
  crafted (h, "header size 512", "header size 512", "not 4096");
  h = good;
  h.granularity = htole32 (3000);
  crafted (h, "granularity 3000", "granularity 3000 is not a power of two",
           NULL);
  h = good;
  h.bit_count = htole64 (NBITS + 1);
  crafted (h, "a bit count that does not fit the size",
           "18 bits for 1060864 bytes", NULL);
  h = good;
  memset (h.name, 'c', sizeof h.name);
  crafted (h, "a name field without its NUL", "it is not named 'c1'", NULL);
  h = good;
  h.flags |= htole32 (FLEECE_BM_INCONSISTENT);
  crafted (h, "marked inconsistent", "marked inconsistent", NULL);
  refused (&good, FLEECE_BITMAP_HEADER_SIZE + 2, &c1_want,
           "an export too short for its bits", "is truncated",
           "the export has 4098 bytes, its bits need 4099");
}

int
main (void)
{
  static char data[CS];
  uint64_t c2_size;
  uint8_t *c1, *c2;

  test_make_dir ("test-bitmap-export");
  test_write_disk (test_path ("disk"), NULL, DISK_SIZE);
  fl = test_open (test_path ("disk"), test_path ("store"), CS);
  memset (data, 0x5a, sizeof data);
  if (fleece_checkpoint_create (fl, "c1") == -1 ||
      fleece_live_pwrite (fl, data, 512, 0, 0) == -1 ||
      fleece_live_pwrite (fl, data, CS, 5 * CS, 0) == -1 ||
      fleece_live_pwrite (fl, data, 4096, 16 * CS, 0) == -1 ||
      fleece_checkpoint_create (fl, "c2") == -1)
    bail_out ("checkpoints and writes: %s", fleece_last_error ());
  c1 = export_bytes ("c1", &c1_size);
  c2 = export_bytes ("c2", &c2_size);
  test_real (c1, c2, c2_size);
  test_crafted (c1);
  free (c1);
  free (c2);
  fleece_close (fl);
  return done ();
}
