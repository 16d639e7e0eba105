/* The primary's side of an epoch (source.h): a control socket client and
 * the reader of an epoch's clusters.
 *
 * The control client speaks docs/control-protocol.md: it checks the
 * greeting, sends one request at a time and skips event lines while it
 * waits for the reply.  The reader takes the bitmap export's header and
 * bits (docs/bitmap-export.md), checks them, and reads the clusters that
 * are set from the snapshot export with libnbd, a run of adjacent
 * clusters at a time; each run is cut where the data turns from zero to
 * non-zero or back, so that zero clusters travel as zero records.
 */

#include <config.h>

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>
#include <xxhash.h>

#include "fleece-wire.h"
#include "source.h"

static int
seterr (char *err, size_t n, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

static int
seterr (char *err, size_t n, const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (err, n, fmt, ap);
  va_end (ap);
  return -1;
}

/* ---- control socket ---- */

struct colo_ctl {
  int fd;
  int timeout_ms;
  char *path;
  char buf[65536 + 1];
  size_t len;
  unsigned next_id;
};

/* One line (without its newline) into a new json_t, or NULL. */
static json_t *
read_reply_line (struct colo_ctl *c, char *err, size_t errlen)
{
  for (;;) {
    char *nl = memchr (c->buf, '\n', c->len);
    struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
    ssize_t r;

    if (nl) {
      json_error_t je;
      json_t *v;
      size_t linelen = nl - c->buf;
      *nl = '\0';
      v = json_loads (c->buf, 0, &je);
      memmove (c->buf, nl + 1, c->len - linelen - 1);
      c->len -= linelen + 1;
      if (v == NULL)
        seterr (err, errlen, "control socket %s: a reply is not JSON: %s",
                c->path, je.text);
      return v;
    }
    if (c->len == sizeof c->buf - 1) {
      seterr (err, errlen, "control socket %s: a reply line is too long",
              c->path);
      return NULL;
    }
    r = poll (&pfd, 1, c->timeout_ms);
    if (r == 0) {
      seterr (err, errlen, "control socket %s: no reply in %d ms", c->path,
              c->timeout_ms);
      return NULL;
    }
    if (r == -1) {
      seterr (err, errlen, "control socket %s: poll: %s", c->path,
              strerror (errno));
      return NULL;
    }
    r = read (c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len);
    if (r == 0) {
      seterr (err, errlen, "control socket %s: the server closed the "
              "connection", c->path);
      return NULL;
    }
    if (r == -1 && errno != EINTR) {
      seterr (err, errlen, "control socket %s: read: %s", c->path,
              strerror (errno));
      return NULL;
    }
    if (r > 0)
      c->len += r;
  }
}

struct colo_ctl *
colo_ctl_open (const char *path, int timeout_ms, char *err, size_t errlen)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct colo_ctl *c;
  json_t *g;

  if (strlen (path) >= sizeof sun.sun_path) {
    seterr (err, errlen, "control socket %s: the path is too long", path);
    return NULL;
  }
  c = calloc (1, sizeof *c);
  if (c == NULL || (c->path = strdup (path)) == NULL) {
    free (c);
    seterr (err, errlen, "control socket %s: out of memory", path);
    return NULL;
  }
  c->timeout_ms = timeout_ms;
  c->next_id = 1;
  strcpy (sun.sun_path, path);
  c->fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (c->fd == -1 ||
      connect (c->fd, (struct sockaddr *) &sun, sizeof sun) == -1) {
    seterr (err, errlen, "control socket %s: connect: %s", path,
            strerror (errno));
    goto fail;
  }
  g = read_reply_line (c, err, errlen);
  if (g == NULL)
    goto fail;
  if (json_object_get (g, "QMP") == NULL) {
    const char *desc = NULL;
    json_unpack (g, "{s:{s:s}}", "error", "desc", &desc);
    seterr (err, errlen, "control socket %s: %s", path,
            desc ? desc : "not a Fleece control socket (no greeting)");
    json_decref (g);
    goto fail;
  }
  json_decref (g);
  return c;
 fail:
  colo_ctl_close (c);
  return NULL;
}

json_t *
colo_ctl_execute (struct colo_ctl *c, const char *cmd, json_t *args,
                  char *err, size_t errlen)
{
  json_t *req, *reply, *ret;
  const char *desc;
  char *line;
  size_t len, off = 0;

  req = json_pack ("{s:s,s:o*,s:I}", "execute", cmd, "arguments", args,
                   "id", (json_int_t) c->next_id++);
  line = req ? json_dumps (req, JSON_COMPACT) : NULL;
  json_decref (req);
  if (line == NULL) {
    seterr (err, errlen, "%s: out of memory", cmd);
    return NULL;
  }
  len = strlen (line);
  line[len++] = '\n';           /* over the terminating NUL */
  while (off < len) {
    ssize_t r = send (c->fd, line + off, len - off, MSG_NOSIGNAL);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1) {
      seterr (err, errlen, "control socket %s: %s: send: %s", c->path, cmd,
              strerror (errno));
      free (line);
      return NULL;
    }
    off += r;
  }
  free (line);
  do {
    reply = read_reply_line (c, err, errlen);
    if (reply == NULL)
      return NULL;
    if (json_object_get (reply, "event")) {
      json_decref (reply);
      reply = NULL;
    }
  } while (reply == NULL);
  if (json_unpack (reply, "{s:{s:s}}", "error", "desc", &desc) == 0) {
    seterr (err, errlen, "%s: %s", cmd, desc);
    json_decref (reply);
    return NULL;
  }
  ret = json_object_get (reply, "return");
  if (ret == NULL) {
    seterr (err, errlen, "control socket %s: %s: a reply with neither "
            "\"return\" nor \"error\"", c->path, cmd);
    json_decref (reply);
    return NULL;
  }
  json_incref (ret);
  json_decref (reply);
  return ret;
}

void
colo_ctl_close (struct colo_ctl *c)
{
  if (c) {
    if (c->fd >= 0)
      close (c->fd);
    free (c->path);
    free (c);
  }
}

/* ---- exports ---- */

char *
colo_export_uri (const char *base, const char *name)
{
  const char *p = strstr (base, "://"), *path, *q;
  char *out;

  if (p == NULL)
    return NULL;
  path = strchr (p + 3, '/');
  q = strchr (p + 3, '?');
  if (path == NULL || (q && q < path))
    path = q ? q : base + strlen (base);
  q = strchr (path, '?');
  if (q == NULL)
    q = path + strlen (path);
  if (asprintf (&out, "%.*s/%s%s", (int) (path - base), base, name, q) == -1)
    return NULL;
  return out;
}

static struct nbd_handle *
open_export (const char *base, const char *name, char *err, size_t errlen)
{
  struct nbd_handle *h = nbd_create ();
  char *uri = colo_export_uri (base, name);

  if (h == NULL || uri == NULL) {
    seterr (err, errlen, "export %s: %s", name,
            h ? "bad URI" : nbd_get_error ());
    goto fail;
  }
  if (nbd_connect_uri (h, uri) == -1) {
    seterr (err, errlen, "export %s: %s", uri, nbd_get_error ());
    goto fail;
  }
  free (uri);
  return h;
 fail:
  free (uri);
  if (h)
    nbd_close (h);
  return NULL;
}

/* The bits of bitmap/NAME, checked; *bits is malloc'ed. */
static int
read_bitmap (const char *base, const char *name, uint64_t disk_size,
             uint32_t cs, uint8_t **bits, char *err, size_t errlen)
{
  char expname[8 + FLEECE_BITMAP_NAME_SIZE];
  struct fleece_bitmap_header h;
  struct nbd_handle *nbd;
  uint64_t nbits = (disk_size + cs - 1) / cs, bytes = (nbits + 7) / 8, off;
  int r = -1;

  snprintf (expname, sizeof expname, "bitmap/%s", name);
  nbd = open_export (base, expname, err, errlen);
  if (nbd == NULL)
    return -1;
  *bits = NULL;
  if (nbd_pread (nbd, &h, sizeof h, 0, 0) == -1) {
    seterr (err, errlen, "%s: reading the header: %s", expname,
            nbd_get_error ());
    goto out;
  }
  if (memcmp (h.magic, FLEECE_BITMAP_MAGIC, 8) != 0 ||
      le64toh (h.checksum) !=
      XXH64 (&h, offsetof (struct fleece_bitmap_header, checksum), 0) ||
      le32toh (h.version) != FLEECE_BITMAP_VERSION) {
    seterr (err, errlen, "%s: not a valid bitmap export (magic, version or "
            "checksum)", expname);
    goto out;
  }
  if (le32toh (h.flags) & FLEECE_BM_INCONSISTENT) {
    seterr (err, errlen, "%s: the bitmap is inconsistent: a full copy is "
            "needed", expname);
    goto out;
  }
  if (le32toh (h.granularity) != cs || le64toh (h.disk_size) != disk_size ||
      le64toh (h.bit_count) != nbits) {
    seterr (err, errlen, "%s: granularity %" PRIu32 ", disk size %" PRIu64
            " do not match the snapshot's (%" PRIu32 ", %" PRIu64 ")",
            expname, le32toh (h.granularity), le64toh (h.disk_size), cs,
            disk_size);
    goto out;
  }
  *bits = malloc (bytes ? bytes : 1);
  if (*bits == NULL) {
    seterr (err, errlen, "%s: out of memory", expname);
    goto out;
  }
  for (off = 0; off < bytes; ) {
    uint64_t n = bytes - off > (4u << 20) ? (4u << 20) : bytes - off;
    if (nbd_pread (nbd, *bits + off, n, le32toh (h.header_size) + off,
                   0) == -1) {
      seterr (err, errlen, "%s: reading the bits: %s", expname,
              nbd_get_error ());
      goto out;
    }
    off += n;
  }
  r = 0;
 out:
  if (r == -1) {
    free (*bits);
    *bits = NULL;
  }
  nbd_shutdown (nbd, 0);
  nbd_close (nbd);
  return r;
}

static bool
all_zero (const char *p, size_t n)
{
  return n == 0 || (p[0] == 0 && memcmp (p, p + 1, n - 1) == 0);
}

/* Hand a run read into buf to fn, cut at zero/data changes. */
static int
emit_run (const char *buf, uint64_t start, uint64_t len, uint32_t cs,
          colo_extent_fn fn, void *opaque, struct colo_epoch_info *info)
{
  uint64_t pos = 0;

  while (pos < len) {
    uint64_t end = pos;
    bool zero = all_zero (buf + pos, len - pos < cs ? len - pos : cs);

    while (end < len) {
      uint64_t n = len - end < cs ? len - end : cs;
      if (all_zero (buf + end, n) != zero)
        break;
      end += n;
    }
    if (fn (opaque, start + pos, end - pos, zero, zero ? NULL : buf + pos,
            zero ? 0 : XXH64 (buf + pos, end - pos, 0)) == -1)
      return -1;
    info->extents++;
    if (zero)
      info->zero_bytes += end - pos;
    else
      info->data_bytes += end - pos;
    pos = end;
  }
  return 0;
}

int
colo_read_epoch (const char *base, const char *snapshot, const char *bitmap,
                 uint32_t max_extent, colo_extent_fn fn, void *opaque,
                 struct colo_epoch_info *info, char *err, size_t errlen)
{
  char expname[16 + FLEECE_BITMAP_NAME_SIZE];
  struct nbd_handle *nbd;
  uint8_t *bits = NULL;
  char *buf = NULL;
  int64_t size;
  uint64_t nclusters, c, run_start = 0, run = 0, max_run;
  int64_t cs;
  int r = -1;

  memset (info, 0, sizeof *info);
  snprintf (expname, sizeof expname, "snapshot/%s", snapshot);
  nbd = open_export (base, expname, err, errlen);
  if (nbd == NULL)
    return -1;
  size = nbd_get_size (nbd);
  cs = nbd_get_block_size (nbd, LIBNBD_SIZE_PREFERRED);
  if (size < 0 || cs <= 0 || (cs & (cs - 1)) != 0) {
    seterr (err, errlen, "%s: size or preferred block size (the cluster "
            "size): %s", expname, nbd_get_error ());
    goto out;
  }
  info->disk_size = size;
  info->cluster_size = cs;
  if (max_extent < cs)
    max_extent = cs;
  max_run = max_extent / cs;
  nclusters = ((uint64_t) size + cs - 1) / cs;
  if (bitmap && read_bitmap (base, bitmap, size, cs, &bits, err,
                             errlen) == -1)
    goto out;
  buf = malloc (max_run * cs);
  if (buf == NULL) {
    seterr (err, errlen, "%s: out of memory", expname);
    goto out;
  }
  for (c = 0; c <= nclusters; c++) {
    bool set = c < nclusters && (bits == NULL || (bits[c / 8] >> (c % 8)) & 1);
    if (set && run == 0)
      run_start = c;
    if (set)
      run++;
    if (run > 0 && (!set || run == max_run)) {
      uint64_t off = run_start * cs, len = run * cs;
      if (off + len > (uint64_t) size)
        len = size - off;
      if (nbd_pread (nbd, buf, len, off, 0) == -1) {
        seterr (err, errlen, "%s: read at %" PRIu64 "+%" PRIu64 ": %s",
                expname, off, len, nbd_get_error ());
        goto out;
      }
      if (emit_run (buf, off, len, cs, fn, opaque, info) == -1)
        goto out;
      run = 0;
    }
  }
  r = 0;
 out:
  free (buf);
  free (bits);
  nbd_shutdown (nbd, 0);
  nbd_close (nbd);
  return r;
}
