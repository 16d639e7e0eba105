/* fleece-backup verify, restore and serve: reading restore points.
 *
 * All three read a point through QEMU (qemu-img check, qemu-nbd), and
 * hold REPO/readers shared, so that no prune changes the files under
 * them; none of them takes the writers' lock, so a backup may run
 * meanwhile (it never changes a complete point).
 *
 * verify checks each file with qemu-img check, then reads the point's
 * whole image and compares each cluster with its checksum list.
 * restore is a pull (the same machinery as a backup, main.c's note) from
 * the point, served read-only by qemu-nbd, to a file, a block device or
 * an NBD URI; each cluster is checked against the list as it is read
 * (sums.c, check mode), so that a damaged repository stops the restore
 * at the first bad cluster.  serve replaces itself with qemu-nbd, so
 * that SIGTERM to its PID stops the export.
 */

#include <config.h>

#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cleanup.h"
#include "repo.h"

#define VERIFY_CHUNK (4u << 20)

static struct point *
find_complete (struct repo *r, const char *name)
{
  struct point *p = repo_find (r, name);

  if (p == NULL)
    die ("repository %s has no point '%s' ('fleece-backup list %s' lists "
         "them)", r->dir, name, r->dir);
  if (!p->complete)
    die ("point %s of %s is incomplete (its backup did not finish)",
         name, r->dir);
  return p;
}

/* The point that an interrupted prune drops is no longer a restore
 * point: its file may already hold its child's clusters.
 */
static bool
dropping (const struct repo *r, const struct point *p)
{
  return r->prune_drop && strcmp (r->prune_drop, p->name) == 0;
}

/* qcow2 rounds a disk's size up to a multiple of 512: the image holds
 * the disk, then zeroes.
 */
static bool
image_fits (int64_t image_size, uint64_t disk_size)
{
  return image_size >= 0 && (uint64_t) image_size >= disk_size &&
    (uint64_t) image_size - disk_size < 512;
}

/* A point to restore or serve. */
static struct point *
find_readable (struct repo *r, const char *name)
{
  struct point *p = find_complete (r, name);

  if (dropping (r, p))
    die ("point %s is being dropped by an interrupted prune: 'fleece-backup "
         "prune' finishes it", p->name);
  return p;
}

/* qemu-img check of p's file and of every file it is backed by. */
static void
check_chain (struct repo *r, struct point *p)
{
  static const char *const quiet[] = { "-q", NULL };

  for (; p; p = p->parent ? repo_find (r, p->parent) : NULL) {
    CLEANUP_FREE char *path = NULL;
    struct qimg q;
    int st;

    repo_qimg (r, p, &q, &path);
    /* An interrupted prune that renamed the merged file already: the
     * point it drops is gone and its child stands alone (cmd-prune.c).
     */
    if (dropping (r, p) && access (path, F_OK) == -1)
      break;
    qemu_key_check (&q, p->name);
    st = qemu_img ("check", quiet, &q, 0);
    if (st != 0)
      die ("verify: point %s: 'qemu-img check %s' failed with status %d "
           "(2: corrupted, 3: leaked clusters)", p->name, path, st);
  }
}

/* Read the point's whole image and compare every cluster. */
static void
verify_sums (struct repo *r, struct point *p)
{
  CLEANUP_FREE char *path = NULL;
  CLEANUP_FREE char *spath = repo_path (r, p->sums);
  CLEANUP_FREE char *uri = NULL, *msg = NULL, *buf = NULL;
  struct sums s = { 0 };
  struct nbd_handle *h;
  uint64_t off, len, i;
  struct qimg q;
  bool refused;

  sums_read (spath, p->sums_xxh3, &s);
  repo_qimg (r, p, &q, &path);
  qemu_key_check (&q, p->name);
  uri = qemu_nbd_start (&q, true);
  h = nbd_open_uri (uri, NULL, "verify", false, &msg, &refused);
  if (h == NULL)
    die ("%s: %s", uri, msg);
  qemu_nbd_connected ();
  if (!image_fits (nbd_get_size (h), s.disk_size))
    die ("verify: point %s is %" PRIi64 " bytes, its checksum list is for "
         "%" PRIu64, p->name, nbd_get_size (h), s.disk_size);
  buf = xmalloc (VERIFY_CHUNK);
  for (off = 0; off < s.disk_size; off += len) {
    len = s.disk_size - off < VERIFY_CHUNK ? s.disk_size - off
      : VERIFY_CHUNK;
    if (nbd_pread (h, buf, len, off, 0) == -1)
      die ("verify: point %s: read at offset %" PRIu64 ": %s", p->name,
           off, nbd_get_error ());
    for (i = 0; i < len; i += s.cluster) {
      uint64_t n = len - i < s.cluster ? len - i : s.cluster;
      uint64_t c = (off + i) / s.cluster;
      if (sums_hash (buf + i, n) != s.v[c])
        die ("verify: point %s%s%s differs from its checksum list at "
             "offset %" PRIu64 " (cluster %" PRIu64 " of %" PRIu64
             " bytes)", p->name, r->member_of ? " of disk " : "",
             r->member_of ? r->member_of : "", off + i, c,
             (uint64_t) s.cluster);
    }
  }
  nbd_finish (h, false);
  qemu_nbd_wait ();
  free (s.v);
}

static const struct option key_opts[] = {
  { "encrypt-key-file", required_argument, NULL, 'k' },
  { "progress", no_argument, NULL, 'p' },
  { "quiet", no_argument, NULL, 'q' },
  { "socket", required_argument, NULL, 's' },
  { NULL }
};

/* The options of verify, restore and serve (allowed: the letters of the
 * options the command takes); returns the socket of serve.
 */
static const char *
read_options (int argc, char **argv, const char *allowed)
{
  const char *sock = NULL;
  int c;

  while ((c = getopt_long (argc, argv, "q", key_opts, NULL)) != -1) {
    if (c == '?' || strchr (allowed, c) == NULL)
      usage_error ("%s: bad option", argv[0]);
    switch (c) {
    case 'k': repo_key_file = optarg; break;
    case 'p': cfg.progress = true; break;
    case 'q': cfg.quiet = true; break;
    case 's': sock = optarg; break;
    }
  }
  return sock;
}

/* qemu-img check of point p's chain, then its checksum list against
 * its content; dies on the first fault.
 */
void
verify_point (struct repo *r, struct point *p)
{
  check_chain (r, p);
  verify_sums (r, p);
}

int
cmd_verify (int argc, char **argv)
{
  const char *only;
  struct repo r;
  size_t i;

  read_options (argc, argv, "k");
  if (argc - optind != 1 && argc - optind != 2)
    usage_error ("verify: expected REPO [POINT]");
  only = argv[optind + 1];
  repo_open (&r, argv[optind], REPO_READ);
  if (r.ndisks)
    return group_verify (&r, only);
  for (i = 0; i < r.n; i++) {
    struct point *p = &r.points[i];

    if (only ? p != find_complete (&r, only) : !p->complete)
      continue;
    if (dropping (&r, p)) {
      printf ("%s: not checked: an interrupted prune is dropping it\n",
              p->name);
      continue;
    }
    verify_point (&r, p);
    printf ("%s: ok\n", p->name);
  }
  repo_close (&r);
  return EXIT_SUCCESS;
}

/* Restore point name of r to target (a file, a block device or an NBD
 * URI), checking each cluster against the point's checksum list.
 */
void
restore_point (struct repo *r, const char *name, const char *target)
{
  CLEANUP_FREE char *path = NULL, *spath = NULL, *uri = NULL;
  struct sums s = { 0 };
  struct point *p;
  struct qimg q;

  p = find_readable (r, name);
  spath = repo_path (r, p->sums);
  sums_read (spath, p->sums_xxh3, &s);
  s.check = true;
  s.what = p->name;
  repo_qimg (r, p, &q, &path);
  qemu_key_check (&q, p->name);
  uri = qemu_nbd_start (&q, true);
  pull_reset ();
  cfg.source = uri;
  cfg.target = target;
  cfg.sync = SYNC_FULL;
  progress_start ();
  source_open ();
  qemu_nbd_connected ();
  if (!image_fits (src.size, s.disk_size))
    die ("restore: point %s is %" PRIu64 " bytes, its checksum list is for "
         "%" PRIu64, p->name, src.size, s.disk_size);
  src.size = s.disk_size;       /* not qcow2's rounding */
  sums_on = &s;
  sums_prepare ();
  target_open ();
  pull_setup ();
  pull_run ();
  pull_end ();
  qemu_nbd_wait ();
  if (!cfg.quiet)
    fprintf (stderr, "fleece-backup: restored point %s to %s: read=%"
             PRIu64 " written=%" PRIu64 " zeroed=%" PRIu64
             " seconds=%.2f checksums=ok\n", p->name, cfg.target, P.read,
             P.written, P.zeroed, progress_seconds ());
  sums_on = NULL;
  free (s.v);
}

int
cmd_restore (int argc, char **argv)
{
  static const struct option opts[] = {
    { "encrypt-key-file", required_argument, NULL, 'k' },
    { "progress", no_argument, NULL, 'p' },
    { "quiet", no_argument, NULL, 'q' },
    { "target", required_argument, NULL, 't' },
    { NULL }
  };
  string_vector targets = { 0 };
  struct repo r;
  int c;

  while ((c = getopt_long (argc, argv, "q", opts, NULL)) != -1) {
    switch (c) {
    case 'k': repo_key_file = optarg; break;
    case 'p': cfg.progress = true; break;
    case 'q': cfg.quiet = true; break;
    case 't':
      if (string_vector_append (&targets, optarg) == -1)
        die ("realloc: %m");
      break;
    default: usage_error ("restore: bad option");
    }
  }
  if (targets.len ? argc - optind != 2 : argc - optind != 3)
    usage_error ("restore: expected REPO POINT TARGET, or REPO GROUP "
                 "--target DISK=TARGET...");
  repo_open (&r, argv[optind], REPO_READ);
  catch_signals ();
  if (r.ndisks)
    group_restore (&r, argv[optind + 1],
                   targets.len ? NULL : argv[optind + 2],
                   (const char *const *) targets.ptr, targets.len);
  else if (targets.len)
    usage_error ("restore: --target is for a group repository; %s holds "
                 "one disk: REPO POINT TARGET", r.dir);
  else
    restore_point (&r, argv[optind + 1], argv[optind + 2]);
  free (targets.ptr);
  repo_close (&r);
  return EXIT_SUCCESS;
}

int
cmd_serve (int argc, char **argv)
{
  CLEANUP_FREE char *path = NULL;
  const char *sock;
  struct args a = { 0 };
  struct point *p;
  struct qimg q;
  struct repo r;

  sock = read_options (argc, argv, "ks");
  if (argc - optind != 2 || sock == NULL)
    usage_error ("serve: expected REPO POINT --socket PATH");
  repo_open (&r, argv[optind], REPO_READ);
  if (r.ndisks)
    die ("%s is a group repository: serve one disk's point, 'fleece-backup "
         "serve %s/disks/DISK %s --socket PATH'", r.dir, r.dir,
         argv[optind + 1]);
  p = find_readable (&r, argv[optind + 1]);
  repo_qimg (&r, p, &q, &path);
  qemu_key_check (&q, p->name);
  /* qemu-nbd keeps the readers' lock while it serves. */
  if (fcntl (r.readers_fd, F_SETFD, 0) == -1)
    die ("fcntl: %s/readers: %m", r.dir);
  args_add (&a, "qemu-nbd");
  args_add (&a, "--read-only");
  args_add (&a, "--persistent");
  args_add (&a, "--shared=16");
  args_add (&a, "--socket");
  args_add (&a, sock);
  qemu_image_args (&a, &q);
  args_push (&a, NULL);
  fflush (NULL);
  execvp ("qemu-nbd", a.v.ptr);
  die ("exec: qemu-nbd: %m");
}
