/* The state directory's files but the journal (state.h lists them;
 * docs/replication.md "The state directory" and "State file").
 *
 * Each file is replaced whole and atomically (a temporary file, fsync,
 * rename, fsync of the directory), never edited in place, so that a
 * crash leaves the old file or the new one.  The binary ones (state,
 * diverged) carry a magic and an xxh64 of everything before it, and a
 * file that fails them is reported as damaged, never half used.
 * STATE_DIR/state is written by journal.c, which orders its writes
 * against the journal's and the disk's (journal.c, "apply"); it is
 * encoded and decoded here.
 *
 * Nothing here logs or knows the daemon: errors go to err, naming the
 * file, and the caller decides what a missing or damaged file means.
 */

#include <config.h>

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>
#include <xxhash.h>

#include "le.h"
#include "state.h"

#define STATE_MAGIC     "FLCOLOST"
#define STATE_VERSION   1
#define STATE_VERSION_GROUP 2   /* a group of disks (below) */
#define DIVERGED_MAGIC  "FLCODIV1"

void
colo_state_path (const char *state_dir, const char *name, char *out,
                 size_t n)
{
  snprintf (out, n, "%s/%s", state_dir, name);
}

/* fsync the directory, for a rename in it to be durable. */
static int
sync_dir (const char *state_dir, char *err, size_t errlen)
{
  int fd = open (state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

  if (fd == -1 || fsync (fd) == -1) {
    snprintf (err, errlen, "fsync: %s: %s", state_dir, strerror (errno));
    if (fd >= 0)
      close (fd);
    return -1;
  }
  close (fd);
  return 0;
}

static int
write_all (int fd, const void *buf, size_t len)
{
  return len == 0 || write (fd, buf, len) == (ssize_t) len ? 0 : -1;
}

/* Create or truncate path, have fill write its contents to fd, fsync
 * and close it: -1 with errno on any failure.
 */
static int
create_synced (const char *path, int (*fill) (int fd, const void *opaque),
               const void *opaque)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600), e;

  if (fd == -1)
    return -1;
  if (fill (fd, opaque) == -1 || fsync (fd) == -1) {
    e = errno;
    close (fd);
    errno = e;
    return -1;
  }
  return close (fd);
}

struct bytes {
  const void *p;
  size_t len;
};

static int
write_bytes (int fd, const void *opaque)
{
  const struct bytes *b = opaque;

  return write_all (fd, b->p, b->len);
}

/* Create or truncate path and write buf to it, synced. */
static int
write_synced (const char *path, const void *buf, size_t len, char *err,
              size_t errlen)
{
  const struct bytes b = { buf, len };

  if (create_synced (path, write_bytes, &b) == -1) {
    snprintf (err, errlen, "%s: %s", path, strerror (errno));
    return -1;
  }
  return 0;
}

/* Replace STATE_DIR/name whole: fill writes its contents to fd, which
 * is name.tmp; that is synced and renamed over name, and the directory
 * synced.  On any failure name.tmp is removed and name is left as it
 * was.
 */
static int
replace_synced (const char *state_dir, const char *name,
                int (*fill) (int fd, const void *opaque), const void *opaque,
                char *err, size_t errlen)
{
  char path[PATH_MAX], tmpname[64], tmp[PATH_MAX];
  int e;

  colo_state_path (state_dir, name, path, sizeof path);
  snprintf (tmpname, sizeof tmpname, "%s.tmp", name);
  colo_state_path (state_dir, tmpname, tmp, sizeof tmp);
  if (create_synced (tmp, fill, opaque) == -1) {
    e = errno;
    unlink (tmp);               /* nothing half written stays */
    snprintf (err, errlen, "%s: %s", tmp, strerror (e));
    return -1;
  }
  if (rename (tmp, path) == -1) {
    e = errno;
    unlink (tmp);
    snprintf (err, errlen, "rename: %s to %s: %s", tmp, path, strerror (e));
    return -1;
  }
  return sync_dir (state_dir, err, errlen);
}

/* Open STATE_DIR/name (its path in path[PATH_MAX]) to read: 1 with
 * *fd, 0 if there is none, -1 with err.
 */
static int
open_to_read (const char *state_dir, const char *name, char *path,
              int *fd, char *err, size_t errlen)
{
  colo_state_path (state_dir, name, path, PATH_MAX);
  *fd = open (path, O_RDONLY | O_CLOEXEC);
  if (*fd >= 0)
    return 1;
  if (errno == ENOENT)
    return 0;
  snprintf (err, errlen, "open: %s: %s", path, strerror (errno));
  return -1;
}

/* ---- STATE_DIR/state ----
 *
 * magic[8], version u32, history_count u32, volume_id[16],
 * generation_id[16], disk_size u64, cluster_size u32, reserved u32,
 * committed_epoch u64, applied_epoch u64, then history_count entries of
 * (id[16], first_epoch u64), then xxh64 of everything before.
 *
 * Version 2, a group of disk_count > 1 disks: reserved is disk_count,
 * and the sizes of disks 1 .. disk_count-1 (u64 each) follow the
 * history.  A single disk is still written as version 1, which older
 * fleece-colods read.
 */

size_t
colo_state_encode (const struct journal_state *st, unsigned char *p)
{
  size_t n = COLO_STATE_FIXED;
  uint32_t i;

  bool group = st->disk_count > 1;

  memset (p, 0, COLO_STATE_FIXED);
  memcpy (p, STATE_MAGIC, 8);
  put_u32 (p + 8, group ? STATE_VERSION_GROUP : STATE_VERSION);
  if (group)
    put_u32 (p + 60, st->disk_count);
  put_u32 (p + 12, st->history_len);
  memcpy (p + 16, st->volume_id, JOURNAL_ID_SIZE);
  memcpy (p + 32, st->generation_id, JOURNAL_ID_SIZE);
  put_u64 (p + 48, st->disk_size);
  put_u32 (p + 56, st->cluster_size);
  put_u64 (p + 64, st->committed_epoch);
  put_u64 (p + 72, st->applied_epoch);
  for (i = 0; i < st->history_len; i++, n += COLO_STATE_ENTRY) {
    memcpy (p + n, st->history[i].id, JOURNAL_ID_SIZE);
    put_u64 (p + n + 16, st->history[i].first_epoch);
  }
  for (i = 1; group && i < st->disk_count; i++, n += 8)
    put_u64 (p + n, st->disk_sizes[i]);
  put_u64 (p + n, XXH64 (p, n, 0));
  return n + 8;
}

bool
colo_state_decode (const unsigned char *p, size_t len, struct journal_state *st)
{
  static const uint8_t zero[JOURNAL_ID_SIZE];
  uint32_t count, disks = 1, version, i;
  size_t n = COLO_STATE_FIXED;

  if (len < COLO_STATE_FIXED + 8 || memcmp (p, STATE_MAGIC, 8) != 0)
    return false;
  version = get_u32 (p + 8);
  if (version == STATE_VERSION_GROUP)
    disks = get_u32 (p + 60);
  else if (version != STATE_VERSION || get_u32 (p + 60) != 0)
    return false;
  count = get_u32 (p + 12);
  if (count > JOURNAL_MAX_HISTORY || disks < 1 || disks > JOURNAL_MAX_DISKS ||
      len != COLO_STATE_FIXED + (size_t) count * COLO_STATE_ENTRY +
      (size_t) (disks - 1) * 8 + 8 ||
      XXH64 (p, len - 8, 0) != get_u64 (p + len - 8))
    return false;
  memset (st, 0, sizeof *st);
  st->history_len = count;
  memcpy (st->volume_id, p + 16, JOURNAL_ID_SIZE);
  memcpy (st->generation_id, p + 32, JOURNAL_ID_SIZE);
  st->disk_size = get_u64 (p + 48);
  st->cluster_size = get_u32 (p + 56);
  st->committed_epoch = get_u64 (p + 64);
  st->applied_epoch = get_u64 (p + 72);
  for (i = 0; i < count; i++, n += COLO_STATE_ENTRY) {
    memcpy (st->history[i].id, p + n, JOURNAL_ID_SIZE);
    st->history[i].first_epoch = get_u64 (p + n + 16);
  }
  st->disk_count = disks;
  st->disk_sizes[0] = st->disk_size;
  for (i = 1; i < disks; i++, n += 8)
    st->disk_sizes[i] = get_u64 (p + n);
  return memcmp (st->generation_id,
                 count ? st->history[count - 1].id : zero,
                 JOURNAL_ID_SIZE) == 0;
}


int
colo_state_read (const char *state_dir, struct journal_state *st,
                 char *err, size_t errlen)
{
  unsigned char buf[COLO_STATE_MAX + 1];
  char path[PATH_MAX];
  ssize_t len;
  int fd, r;

  if ((r = open_to_read (state_dir, "state", path, &fd, err, errlen)) <= 0)
    return r;
  do
    len = pread (fd, buf, sizeof buf, 0);
  while (len == -1 && errno == EINTR);
  close (fd);
  if (len == -1) {
    snprintf (err, errlen, "read: %s: %s", path, strerror (errno));
    return -1;
  }
  if (!colo_state_decode (buf, len, st)) {
    snprintf (err, errlen, "read: %s: not a valid fleece-colod state file "
              "(bad magic, version, length or checksum)", path);
    return -1;
  }
  return 1;
}


/* ---- STATE_DIR/primary.json ---- */

static void
hex (const uint8_t *id, size_t n, char *out)
{
  size_t i;

  for (i = 0; i < n; i++)
    sprintf (out + 2 * i, "%02x", id[i]);
  out[2 * n] = '\0';
}

static int
parse_hex (const char *s, uint8_t out[16])
{
  int i;

  if (s == NULL || strlen (s) != 32)
    return -1;
  for (i = 0; i < 16; i++)
    if (sscanf (s + 2 * i, "%2hhx", &out[i]) != 1)
      return -1;
  return 0;
}

static int
write_string (int fd, const void *s)
{
  return write_all (fd, s, strlen (s));
}

int
colo_state_save_primary (const char *state_dir,
                         const struct colo_primary_state *ps, char *err,
                         size_t errlen)
{
  char path[PATH_MAX], id[33];
  json_t *o, *h = json_array ();
  uint32_t i;
  int r;
  char *s;

  colo_state_path (state_dir, "primary.json", path, sizeof path);
  for (i = 0; i < ps->history_len; i++) {
    hex (ps->history[i].id, 16, id);
    json_array_append_new (h, json_pack ("{s:s,s:I}", "generation", id,
                                         "first-epoch", (json_int_t)
                                         ps->history[i].start_epoch));
  }
  hex (ps->volume_id, 16, id);
  o = json_pack ("{s:s,s:o,s:I,s:b}", "volume-id", id, "history", h,
                 "acked-epoch", (json_int_t) ps->acked, "demoted",
                 ps->demoted);
  s = o ? json_dumps (o, JSON_INDENT (2)) : NULL;
  json_decref (o);
  if (s == NULL) {
    snprintf (err, errlen, "%s: out of memory", path);
    return -1;
  }
  r = replace_synced (state_dir, "primary.json", write_string, s, err,
                      errlen);
  free (s);
  return r;
}

int
colo_state_load_primary (const char *state_dir,
                         struct colo_primary_state *ps, char *err,
                         size_t errlen)
{
  char path[PATH_MAX];
  json_error_t je;
  json_t *o, *h, *e;
  const char *vol;
  json_int_t acked;
  int demoted = 0;
  size_t i;

  colo_state_path (state_dir, "primary.json", path, sizeof path);
  o = json_load_file (path, 0, &je);
  if (o == NULL) {
    if (access (path, F_OK) == -1 && errno == ENOENT)
      return 0;
    snprintf (err, errlen, "%s: %s (line %d)", path, je.text, je.line);
    return -1;
  }
  if (json_unpack (o, "{s:s,s:o,s:I,s?b}", "volume-id", &vol, "history", &h,
                   "acked-epoch", &acked, "demoted", &demoted) == -1 ||
      parse_hex (vol, ps->volume_id) == -1 || !json_is_array (h) ||
      json_array_size (h) == 0 ||
      json_array_size (h) > COLO_WIRE_MAX_HISTORY || acked < 0)
    goto bad;
  json_array_foreach (h, i, e) {
    const char *g;
    json_int_t first;
    if (json_unpack (e, "{s:s,s:I}", "generation", &g, "first-epoch",
                     &first) == -1 || parse_hex (g, ps->history[i].id) == -1
        || first < 1)
      goto bad;
    ps->history[i].start_epoch = first;
  }
  ps->history_len = json_array_size (h);
  ps->acked = acked;
  ps->demoted = demoted;
  json_decref (o);
  return 1;
 bad:
  snprintf (err, errlen, "%s: not a valid fleece-colod primary state file",
            path);
  json_decref (o);
  return -1;
}

/* ---- STATE_DIR/diverged ----
 *
 * A disk's record: the header below, the bitmap (a bit a cluster, nbits
 * of them), then the xxh64 of both, little-endian.  A single disk's file
 * is its record alone (FLCODIV1, disk 0), as before groups.  A group's
 * (FLCODIV2) is a header of its own (magic, base u64, cluster_size u32,
 * disk_count u32, and the xxh64 of these 24 bytes), then the record of
 * each disk in the group's order, its index in the record's disk field,
 * and nothing after the last.  The file is written whole to
 * diverged.tmp and renamed: it holds every disk's record or is not
 * there.
 */

#define DIVERGED_GROUP_MAGIC "FLCODIV2"

struct diverged_hdr {
  char magic[8];
  uint64_t base, disk_size;
  uint32_t cluster_size, disk;  /* disk: its index in the group */
  uint64_t nbits;
} __attribute__ ((__packed__));

struct diverged_group_hdr {
  char magic[8];
  uint64_t base;
  uint32_t cluster_size, disk_count;
  uint64_t xxh;                 /* of the fields before */
} __attribute__ ((__packed__));

/* A record's checksum: of its header and its bitmap. */
static uint64_t
record_sum (const struct diverged_hdr *h, const uint8_t *bits, size_t bytes)
{
  XXH64_state_t x;

  XXH64_reset (&x, 0);
  XXH64_update (&x, h, sizeof *h);
  if (bytes)
    XXH64_update (&x, bits, bytes);
  return XXH64_digest (&x);
}

static int
write_record (int fd, const struct colo_diverged *d, uint32_t disk)
{
  struct diverged_hdr h = { .base = htole64 (d->base),
                            .disk_size = htole64 (d->disk_sizes[disk]),
                            .cluster_size = htole32 (d->cluster_size),
                            .disk = htole32 (disk),
                            .nbits = htole64 (d->nbits[disk]) };
  size_t bytes = (d->nbits[disk] + 7) / 8;
  uint64_t sum;

  memcpy (h.magic, DIVERGED_MAGIC, 8);
  sum = htole64 (record_sum (&h, d->bits[disk], bytes));
  if (write_all (fd, &h, sizeof h) == -1 ||
      write_all (fd, d->bits[disk], bytes) == -1 ||
      write_all (fd, &sum, sizeof sum) == -1)
    return -1;
  return 0;
}

/* replace_synced's fill: the group's header, if a group, then every
 * disk's record.
 */
static int
write_diverged (int fd, const void *opaque)
{
  const struct colo_diverged *d = opaque;
  struct diverged_group_hdr g = { .base = htole64 (d->base),
                                  .cluster_size = htole32 (d->cluster_size),
                                  .disk_count = htole32 (d->disk_count) };
  uint32_t i;

  memcpy (g.magic, DIVERGED_GROUP_MAGIC, 8);
  g.xxh = htole64 (XXH64 (&g, offsetof (struct diverged_group_hdr, xxh),
                          0));
  if (d->disk_count > 1 && write_all (fd, &g, sizeof g) == -1)
    return -1;
  for (i = 0; i < d->disk_count; i++)
    if (write_record (fd, d, i) == -1)
      return -1;
  return 0;
}

int
colo_state_write_diverged (const char *state_dir,
                           const struct colo_diverged *d, char *err,
                           size_t errlen)
{
  return replace_synced (state_dir, "diverged", write_diverged, d, err,
                         errlen);
}

static int
read_all (int fd, void *buf, size_t len)
{
  return len == 0 || read (fd, buf, len) == (ssize_t) len ? 0 : -1;
}

/* Disk disk's record, at fd's offset: 0, or -1 if it is damaged. */
static int
read_record (int fd, struct colo_diverged *d, uint32_t disk)
{
  struct diverged_hdr h;
  uint64_t sum, nbits;
  size_t bytes;

  if (read_all (fd, &h, sizeof h) == -1 ||
      memcmp (h.magic, DIVERGED_MAGIC, 8) != 0 ||
      le32toh (h.disk) != disk ||
      (disk > 0 && (le64toh (h.base) != d->base ||
                    le32toh (h.cluster_size) != d->cluster_size)))
    return -1;
  nbits = le64toh (h.nbits);
  if (nbits > (uint64_t) COLO_WIRE_MAX_EXTENT * 8)
    return -1;
  d->base = le64toh (h.base);
  d->cluster_size = le32toh (h.cluster_size);
  d->disk_sizes[disk] = le64toh (h.disk_size);
  d->nbits[disk] = nbits;
  bytes = (nbits + 7) / 8;
  if (bytes) {
    d->bits[disk] = malloc (bytes);
    if (d->bits[disk] == NULL || read_all (fd, d->bits[disk], bytes) == -1)
      return -1;
  }
  if (read_all (fd, &sum, sizeof sum) == -1)
    return -1;
  return record_sum (&h, d->bits[disk], bytes) == le64toh (sum) ? 0 : -1;
}

int
colo_state_read_diverged (const char *state_dir, struct colo_diverged *d,
                          char *err, size_t errlen)
{
  struct diverged_group_hdr g;
  char path[PATH_MAX], extra;
  uint32_t i = 0;
  int fd, r;

  memset (d, 0, sizeof *d);
  if ((r = open_to_read (state_dir, "diverged", path, &fd, err,
                         errlen)) <= 0)
    return r;
  if (read_all (fd, g.magic, 8) == -1)
    goto bad;
  if (memcmp (g.magic, DIVERGED_GROUP_MAGIC, 8) == 0) {
    if (read_all (fd, (char *) &g + 8, sizeof g - 8) == -1 ||
        XXH64 (&g, offsetof (struct diverged_group_hdr, xxh), 0) !=
        le64toh (g.xxh) || le32toh (g.disk_count) < 2 ||
        le32toh (g.disk_count) > COLO_WIRE_MAX_DISKS)
      goto bad;
    d->disk_count = le32toh (g.disk_count);
  }
  else if (lseek (fd, 0, SEEK_SET) == 0)
    d->disk_count = 1;
  else
    goto bad;
  for (i = 0; i < d->disk_count; i++)
    if (read_record (fd, d, i) == -1)
      goto bad;
  if ((d->disk_count > 1 && (d->base != le64toh (g.base) ||
                             d->cluster_size !=
                             le32toh (g.cluster_size))) ||
      read (fd, &extra, 1) != 0)
    goto bad;
  close (fd);
  return 1;
 bad:
  if (d->disk_count > 1 && i < d->disk_count)
    snprintf (err, errlen, "%s: the record of disk %" PRIu32 " of %" PRIu32
              " is damaged (bad magic, disk index, size or checksum)", path,
              i, d->disk_count);
  else
    snprintf (err, errlen, "%s: damaged (bad magic, size or checksum)",
              path);
  close (fd);
  colo_diverged_free (d);
  return -1;
}

void
colo_diverged_free (struct colo_diverged *d)
{
  uint32_t i;

  for (i = 0; i < COLO_WIRE_MAX_DISKS; i++)
    free (d->bits[i]);
  memset (d, 0, sizeof *d);
}

bool
colo_state_has_diverged (const char *state_dir)
{
  char path[PATH_MAX];

  colo_state_path (state_dir, "diverged", path, sizeof path);
  return access (path, F_OK) == 0;
}

bool
colo_state_remove_diverged (const char *state_dir)
{
  char path[PATH_MAX];
  bool had;

  colo_state_path (state_dir, "diverged", path, sizeof path);
  had = unlink (path) == 0;
  colo_state_path (state_dir, "failback", path, sizeof path);
  unlink (path);
  return had;
}

/* ---- STATE_DIR/failback: empty; its presence is the record ---- */

int
colo_state_write_failback (const char *state_dir, char *err, size_t errlen)
{
  char path[PATH_MAX];

  colo_state_path (state_dir, "failback", path, sizeof path);
  if (write_synced (path, "", 0, err, errlen) == -1)
    return -1;
  return sync_dir (state_dir, err, errlen);
}

bool
colo_state_failback_pending (const char *state_dir)
{
  char path[PATH_MAX];

  colo_state_path (state_dir, "failback", path, sizeof path);
  return access (path, F_OK) == 0;
}

/* ---- STATE_DIR/promoted: the 16 bytes of the generation ---- */

bool
colo_state_promoted_in (const char *state_dir, const uint8_t gen[16])
{
  char path[PATH_MAX];
  uint8_t buf[16];
  ssize_t n;
  int fd;

  colo_state_path (state_dir, "promoted", path, sizeof path);
  fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd == -1)
    return false;
  n = read (fd, buf, sizeof buf);
  close (fd);
  return n == sizeof buf && memcmp (buf, gen, 16) == 0;
}

int
colo_state_write_promoted (const char *state_dir, const uint8_t gen[16],
                           char *err, size_t errlen)
{
  char path[PATH_MAX];

  colo_state_path (state_dir, "promoted", path, sizeof path);
  return write_synced (path, gen, 16, err, errlen);
}

void
colo_state_clear_promoted (const char *state_dir)
{
  char path[PATH_MAX];

  colo_state_path (state_dir, "promoted", path, sizeof path);
  unlink (path);
}
