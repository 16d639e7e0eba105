/* colo-epoch: a test driver for colo/source.c and the plugin's control
 * client, lib/ctl-client.c (not installed).
 *
 *   colo-epoch ctl SOCKET COMMAND [JSON-ARGS]
 *       run one control command, print its "return" value as JSON
 *   colo-epoch read BASE-URI SNAPSHOT BITMAP|- TARGET [MAX-EXTENT]
 *       read an epoch (BITMAP "-": every cluster) and apply it to the
 *       file TARGET (created with the disk's size if missing): data
 *       extents written after checking their xxh64, zero extents written
 *       as zeroes; print "extents=N data=BYTES zero=BYTES" and one line
 *       per extent "OFFSET LENGTH data|zero"
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <xxhash.h>

#include "ctl-client.h"
#include "source.h"

struct target {
  int fd;
  FILE *log;
};

static int
apply (void *opaque, uint64_t offset, uint32_t length, bool zero,
       const void *data, uint64_t xxh)
{
  struct target *t = opaque;
  static char zeroes[1 << 16];
  uint32_t done = 0;

  if (!zero && XXH64 (data, length, 0) != xxh) {
    fprintf (stderr, "colo-epoch: extent %" PRIu64 "+%" PRIu32 ": bad "
             "checksum\n", offset, length);
    return -1;
  }
  while (done < length) {
    uint32_t n = length - done;
    ssize_t r;
    if (zero && n > sizeof zeroes)
      n = sizeof zeroes;
    r = pwrite (t->fd, zero ? zeroes : (const char *) data + done, n,
                offset + done);
    if (r <= 0) {
      fprintf (stderr, "colo-epoch: pwrite: %s\n", strerror (errno));
      return -1;
    }
    done += r;
  }
  fprintf (t->log, "%" PRIu64 " %" PRIu32 " %s\n", offset, length,
           zero ? "zero" : "data");
  return 0;
}

int
main (int argc, char *argv[])
{
  char err[1024];

  if (argc >= 4 && strcmp (argv[1], "ctl") == 0) {
    struct ctlc *c = ctlc_connect (argv[2], 10000, err, sizeof err);
    json_t *args = NULL, *ret;
    char *s;
    if (c == NULL) {
      fprintf (stderr, "colo-epoch: %s\n", err);
      return 1;
    }
    if (argc >= 5) {
      json_error_t je;
      args = json_loads (argv[4], 0, &je);
      if (args == NULL) {
        fprintf (stderr, "colo-epoch: arguments: %s\n", je.text);
        ctlc_close (c);
        return 1;
      }
    }
    ret = ctlc_execute (c, argv[3], args, err, sizeof err);
    ctlc_close (c);
    if (ret == NULL) {
      fprintf (stderr, "colo-epoch: %s\n", err);
      return 1;
    }
    s = json_dumps (ret, JSON_COMPACT | JSON_ENCODE_ANY);
    printf ("%s\n", s ? s : "");
    free (s);
    json_decref (ret);
    return 0;
  }
  if (argc >= 6 && strcmp (argv[1], "read") == 0) {
    struct colo_epoch_info info;
    struct target t = { .log = stdout };
    uint32_t max = argc >= 7 ? strtoul (argv[6], NULL, 0) : 4u << 20;
    t.fd = open (argv[5], O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (t.fd == -1) {
      fprintf (stderr, "colo-epoch: %s: %s\n", argv[5], strerror (errno));
      return 1;
    }
    if (colo_read_epoch (argv[2], argv[3],
                         strcmp (argv[4], "-") ? argv[4] : NULL, max, apply,
                         &t, &info, err, sizeof err) == -1) {
      fprintf (stderr, "colo-epoch: %s\n", err);
      close (t.fd);
      return 1;
    }
    if (ftruncate (t.fd, info.disk_size) == -1 || close (t.fd) == -1) {
      fprintf (stderr, "colo-epoch: %s: %s\n", argv[5], strerror (errno));
      return 1;
    }
    printf ("extents=%" PRIu64 " data=%" PRIu64 " zero=%" PRIu64 "\n",
            info.extents, info.data_bytes, info.zero_bytes);
    return 0;
  }
  fprintf (stderr, "usage: colo-epoch ctl SOCKET COMMAND [JSON-ARGS]\n"
           "       colo-epoch read BASE-URI SNAPSHOT BITMAP|- TARGET "
           "[MAX-EXTENT]\n");
  return 2;
}
