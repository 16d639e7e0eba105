/* fleece-backup backup: add a restore point to a repository.
 *
 * SOURCE is a snapshot export (snapshot/NAME); --since=CHECKPOINT makes
 * the point an incremental one on top of the repository's newest point,
 * which must hold exactly that checkpoint, of the same disk: the dirty
 * bitmap CHECKPOINT, frozen by NAME (bitmap.c checks that), then names
 * every cluster that differs between the two.  Anything else is refused
 * with both names, never written onto the wrong base.
 *
 * The steps, each after the previous one is durable:
 *   1. the point goes into the manifest, incomplete;
 *   2. qemu-img creates NAME.qcow2 (backing: the parent, relative);
 *   3. the pull writes it through qemu-nbd (qemu.c), hashing what it
 *      reads (sums.c), and flushes; qemu-nbd closes it;
 *   4. the file is fsynced, NAME.sums written and fsynced;
 *   5. the point is marked complete in the manifest.
 * A crash before 5 leaves an incomplete point, which the next writer
 * removes (repo.c); the checkpoint it was to hold is still on the
 * server, so nothing is lost.
 */

#include <config.h>

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "cleanup.h"
#include "repo.h"

/* The disk and the snapshot's creation time, from the export's
 * description ("point-in-time image of PATH at Y-m-d H:M:S UTC
 * (generation N)", nbdkit-fleece-plugin(1)).  A server that says
 * something else leaves disk NULL: only the size identifies the disk.
 */
static void
source_identity (char **disk, int64_t *created)
{
  static const char prefix[] = "point-in-time image of ";
  CLEANUP_FREE char *d = nbd_get_export_description (src.nbd);
  char *at, *gen, *q;
  struct tm tm;

  *disk = NULL;
  *created = -1;
  if (d == NULL || strncmp (d, prefix, sizeof prefix - 1) != 0 ||
      (gen = strstr (d, " UTC (generation ")) == NULL)
    return;
  *gen = '\0';
  at = NULL;                    /* the last " at ": the path may hold one */
  for (q = strstr (d, " at "); q; q = strstr (q + 1, " at "))
    at = q;
  if (at == NULL)
    return;
  memset (&tm, 0, sizeof tm);
  if (strptime (at + 4, "%Y-%m-%d %H:%M:%S", &tm) != NULL)
    *created = timegm (&tm);
  *at = '\0';
  if ((*disk = strdup (d + sizeof prefix - 1)) == NULL)
    die ("strdup: %m");
}

static void
check_name (const char *what, const char *s)
{
  size_t i;

  if (*s == '\0' || *s == '.' || strlen (s) > 128)
    usage_error ("%s: '%s': a point name has 1 to 128 characters and does "
                 "not start with '.'", what, s);
  for (i = 0; s[i]; i++)
    if (!strchr ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                 "0123456789._-+:", s[i]))
      usage_error ("%s: '%s': a point name has letters, digits and "
                   "'._-+:' only", what, s);
}

/* The point must go on top of parent: same disk, parent holds since. */
static void
check_base (struct repo *r, struct point *p, const struct point *newest)
{
  if (newest && newest->disk_size != p->disk_size)
    die ("%s is a disk of %" PRIu64 " bytes; repository %s holds points of "
         "a disk of %" PRIu64 " bytes (point %s): another disk's "
         "repository", source_name (), p->disk_size, r->dir,
         newest->disk_size, newest->name);
  if (newest && newest->disk && p->disk && strcmp (newest->disk, p->disk))
    die ("%s is a snapshot of disk %s; repository %s holds points of disk "
         "%s (point %s): another disk's repository", source_name (), p->disk,
         r->dir, newest->disk, newest->name);
  if (cfg.sync != SYNC_INCREMENTAL)
    return;
  if (newest == NULL)
    die ("--since=%s: repository %s has no point to add an incremental "
         "point to (its first point is a full one: no --since)",
         cfg.since, r->dir);
  if (newest->checkpoint == NULL || strcmp (newest->checkpoint, cfg.since))
    die ("--since=%s: the bitmap of checkpoint '%s' describes changes "
         "since '%s', but the newest point of %s, '%s', holds checkpoint "
         "'%s': refusing to write an incremental point onto the wrong base",
         cfg.since, cfg.since, cfg.since, r->dir, newest->name,
         newest->checkpoint ? newest->checkpoint : "(none)");
}

/* qemu-img create of p's file: 64 KiB clusters, the parent as backing
 * file by relative name (not opened: -u), zstd for compressed clusters,
 * LUKS with the key file.  QEMU's LUKS set-up measures the CPU's speed,
 * and before QEMU 9.2.1 it fails when its first measurement reads no
 * CPU time ("Unable to get accurate CPU usage"), which happens at random:
 * 2 creates in 8 on an idle 2-vCPU VM, and three in a row in one CI run.
 * The create only makes the empty file, so it is tried up to
 * CREATE_TRIES times.
 */
#define CREATE_TRIES 12
static void
point_create (const char *path, const struct point *p, const char *parent)
{
  struct args a = { 0 };
  char size[32], opts[256];
  int st = 0, i;

  snprintf (size, sizeof size, "%" PRIu64, p->disk_size);
  snprintf (opts, sizeof opts, "cluster_size=%u%s%s", REPO_CLUSTER,
            p->compressed ? ",compression_type=zstd" : "",
            p->encrypted ? ",encrypt.format=luks,encrypt.key-secret="
            "fleecekey,encrypt.iter-time=100" : "");
  args_add (&a, "qemu-img");
  args_add (&a, "create");
  args_add (&a, "-q");
  if (p->encrypted) {
    args_add (&a, "--object");
    args_push (&a, qemu_secret ());
  }
  args_add (&a, "-f");
  args_add (&a, "qcow2");
  args_add (&a, "-o");
  args_add (&a, opts);
  if (parent) {
    args_add (&a, "-u");
    args_add (&a, "-b");
    args_add (&a, parent);
    args_add (&a, "-F");
    args_add (&a, "qcow2");
  }
  args_add (&a, path);
  args_add (&a, size);
  args_push (&a, NULL);
  for (i = 0; i < CREATE_TRIES; i++)
    if ((st = qemu_run ((const char *const *) a.v.ptr, QUIET_OUT)) == 0)
      break;
  args_free (&a);
  if (st != 0)
    die ("qemu-img create %s failed with status %d", path, st);
}

/* Steps 1 and 2: the incomplete point in the manifest, then its file. */
static struct point *
point_begin (struct repo *r, struct point *p, const char *parent_file)
{
  CLEANUP_FREE char *path = NULL;

  p->cluster_size = REPO_CLUSTER;
  p->started = time (NULL);
  if (asprintf (&p->file, "%s.qcow2", p->name) == -1 ||
      asprintf (&p->sums, "%s.sums", p->name) == -1)
    die ("asprintf: %m");
  r->points = realloc (r->points, (r->n + 1) * sizeof *r->points);
  if (r->points == NULL)
    die ("realloc: %m");
  r->points[r->n++] = *p;
  p = &r->points[r->n - 1];
  repo_save (r);
  repo_crash_point ("backup-journaled");
  path = repo_path (r, p->file);
  point_create (path, p, parent_file);
  return p;
}

/* Steps 3 to 5. */
static void
point_pull (struct repo *r, struct point *p, struct sums *s)
{
  CLEANUP_FREE char *path = NULL, *uri = NULL;
  CLEANUP_FREE char *spath = repo_path (r, p->sums);
  struct qimg q;

  repo_qimg (r, p, &q, &path);
  q.compress = p->compressed;
  uri = qemu_nbd_start (&q, false);

  cfg.target = uri;
  target_open ();
  qemu_nbd_connected ();
  /* A new qcow2 without a backing file reads as zeroes: a full point
   * writes no zeroes (an incremental one must, over its parent's data).
   */
  tgt.known_zero = p->parent == NULL;
  pull_setup ();
  pull_run ();
  repo_crash_point ("backup-pulled");
  pull_end ();
  qemu_nbd_wait ();
  fsync_path (path, false);
  sums_write (spath, s, &p->sums_xxh3);
  repo_crash_point ("backup-synced");
  p->read = P.read;
  p->written = P.written;
  p->zeroed = P.zeroed;
  p->finished = time (NULL);
  p->complete = true;
  repo_save (r);
}

static void
print_point (const struct point *p, bool json)
{
  if (json) {
    json_t *o = point_json (p);
    if (json_dumpf (o, stdout, JSON_COMPACT) == -1)
      die ("json_dumpf: stdout: %m");
    printf ("\n");
    json_decref (o);
    return;
  }
  if (!cfg.quiet)
    fprintf (stderr, "fleece-backup: sync=%s read=%" PRIu64 " written=%"
             PRIu64 " zeroed=%" PRIu64 " granules=%" PRIu64 " seconds=%.2f"
             " point=%s parent=%s\n", sync_names[cfg.sync], p->read,
             p->written, p->zeroed,
             cfg.sync == SYNC_INCREMENTAL ? bm.dirty : 0,
             progress_seconds (), p->name, p->parent ? p->parent : "-");
}

/* A fresh pull state for each point: --control may add several points
 * in one run (an interrupted checkpoint, then its own).
 */
void
pull_reset (void)
{
  memset (&P, 0, sizeof P);
  memset (&bm, 0, sizeof bm);
  src = (struct rw) { .name = "source", .fd = -1 };
  tgt = (struct rw) { .name = "target", .is_target = true, .fd = -1 };
}

/* An incremental point on parent is encrypted with the key this run was
 * given (--encrypt-key-file) if and only if parent is, and the key must
 * open it.  before: checked before anything is created (the newest point
 * is only a likely parent then), so the message offers --full.
 */
static void
parent_key_check (struct repo *r, const struct point *parent, bool before)
{
  CLEANUP_FREE char *ppath = NULL;
  struct qimg q;

  if (parent->encrypted != (repo_key_file != NULL))
    die ("point %s of %s is %s: an incremental point on it must be too "
         "(%s --encrypt-key-file%s)", parent->name, r->dir,
         parent->encrypted ? "encrypted" : "not encrypted",
         parent->encrypted ? "give" : "no",
         before ? ", or --full for a full point" : "");
  repo_qimg (r, parent, &q, &ppath);
  qemu_key_check (&q, parent->name);
}

/* Before a run creates a checkpoint on a server (--control, a group):
 * refuse a key that does not suit the newest point, which the next
 * point will be incremental on, so that a forgotten or wrong key leaves
 * nothing behind on the servers or in the repository.  Not with --full.
 */
void
backup_key_precheck (struct repo *r, bool full)
{
  const struct point *newest = repo_newest (r);

  if (!full && newest)
    parent_key_check (r, newest, true);
}

/* Add point name holding checkpoint (snapshot export source, or export
 * on source's server), full or (since != NULL) incremental on top of the
 * newest point.
 */
struct point *
backup_point (struct repo *r, const char *source, const char *export,
              const char *checkpoint,
              const char *since, const char *name, bool compress, bool json)
{
  struct point np = { .created = -1 }, *p, *newest, *parent = NULL;
  struct sums s = { 0 };

  if (repo_find (r, name))
    die ("repository %s already has a point named '%s' (--name)",
         r->dir, name);
  if ((np.name = strdup (name)) == NULL ||
      (np.checkpoint = strdup (checkpoint)) == NULL)
    die ("strdup: %m");
  newest = repo_newest (r);
  pull_reset ();
  cfg.source = source;
  cfg.source_export = export;
  cfg.since = since;
  cfg.sync = since ? SYNC_INCREMENTAL : SYNC_FULL;
  progress_start ();
  if (cfg.sync == SYNC_INCREMENTAL)
    bitmap_start ();
  source_open ();
  np.disk_size = src.size;
  source_identity (&np.disk, &np.created);
  check_base (r, &np, newest);
  if (cfg.sync == SYNC_INCREMENTAL) {
    parent = newest;
    plan_first ();
    incremental_prepare (np.checkpoint);
    if ((np.parent = strdup (parent->name)) == NULL ||
        (np.since = strdup (cfg.since)) == NULL)
      die ("strdup: %m");
  }
  if (parent) {
    CLEANUP_FREE char *ps = repo_path (r, parent->sums);
    parent_key_check (r, parent, false);
    sums_read (ps, parent->sums_xxh3, &s);
  }
  else
    sums_alloc (&s, src.size);
  s.what = np.name;
  sums_on = &s;
  sums_prepare ();
  np.compressed = compress;
  np.encrypted = repo_key_file != NULL;
  {
    CLEANUP_FREE char *parent_file = parent ? strdup (parent->file) : NULL;
    if (parent && parent_file == NULL)
      die ("strdup: %m");
    p = point_begin (r, &np, parent_file);
  }
  point_pull (r, p, &s);
  print_point (p, json);
  sums_on = NULL;
  free (s.v);
  return p;
}

/* --hook-timeout SECONDS, --deadline MS. */
static int
parse_int (const char *opt, const char *s, long min, long max)
{
  char *end;
  long v = strtol (s, &end, 10);

  if (end == s || *end || v < min || v > max)
    usage_error ("%s: '%s' is not a number from %ld to %ld", opt, s, min,
                 max);
  return v;
}

int
cmd_backup (int argc, char **argv)
{
  enum { OPT_FULL = 256, OPT_SINCE, OPT_NAME, OPT_PROGRESS, OPT_JSON,
         OPT_CONTROL, OPT_COMPRESS, OPT_KEY, OPT_PRE, OPT_POST,
         OPT_HOOK_TIMEOUT, OPT_DEADLINE, OPT_RATE };
  static const struct option opts[] = {
    { "full", no_argument, NULL, OPT_FULL },
    { "since", required_argument, NULL, OPT_SINCE },
    { "name", required_argument, NULL, OPT_NAME },
    { "control", required_argument, NULL, OPT_CONTROL },
    { "compress", no_argument, NULL, OPT_COMPRESS },
    { "encrypt-key-file", required_argument, NULL, OPT_KEY },
    { "progress", no_argument, NULL, OPT_PROGRESS },
    { "json", no_argument, NULL, OPT_JSON },
    { "quiet", no_argument, NULL, 'q' },
    { "pre-hook", required_argument, NULL, OPT_PRE },
    { "post-hook", required_argument, NULL, OPT_POST },
    { "hook-timeout", required_argument, NULL, OPT_HOOK_TIMEOUT },
    { "deadline", required_argument, NULL, OPT_DEADLINE },
    { "rate", required_argument, NULL, OPT_RATE },
    { NULL }
  };
  struct backup_opts o = { .hook_timeout = 30, .deadline_ms = 1000 };
  const char *since = NULL;
  string_vector controls = { 0 };
  CLEANUP_FREE char *checkpoint = NULL;
  CLEANUP_FREE char *export = NULL;
  const char *eq, *scheme;
  bool grouped;
  struct repo r;
  char err[1024];
  int c;

  while ((c = getopt_long (argc, argv, "q", opts, NULL)) != -1) {
    switch (c) {
    case OPT_FULL: o.full = true; break;
    case OPT_SINCE: check_name ("--since", optarg); since = optarg; break;
    case OPT_NAME: check_name ("--name", optarg); o.name = optarg; break;
    case OPT_CONTROL:
      if (string_vector_append (&controls, optarg) == -1)
        die ("realloc: %m");
      break;
    case OPT_COMPRESS: o.compress = true; break;
    case OPT_KEY: repo_key_file = optarg; break;
    case OPT_PROGRESS: cfg.progress = true; break;
    case OPT_JSON: o.json = true; break;
    case 'q': cfg.quiet = true; break;
    case OPT_PRE: o.pre_hook = optarg; break;
    case OPT_POST: o.post_hook = optarg; break;
    case OPT_HOOK_TIMEOUT:
      o.hook_timeout = parse_int ("--hook-timeout", optarg, 1, 86400);
      break;
    case OPT_DEADLINE:
      o.deadline_ms = parse_int ("--deadline", optarg, 1, 60000);
      break;
    case OPT_RATE:
      cfg.rate = parse_size ("--rate", optarg, 1, UINT64_MAX >> 1);
      break;
    default: usage_error ("backup: bad option");
    }
  }
  if (argc - optind < 2)
    usage_error ("backup: expected REPO and SOURCE (or several SOURCEs, "
                 "each with its --control, for a group of disks)");
  /* NAME=URI names a disk of a group. */
  eq = strchr (argv[optind + 1], '=');
  scheme = strstr (argv[optind + 1], "://");
  grouped = argc - optind > 2 || controls.len > 1 || o.pre_hook ||
    o.post_hook || (eq && scheme && eq < scheme);
  if (o.full && since)
    usage_error ("backup: --full and --since exclude each other");
  /* QEMU writes the compressed clusters of an encrypted qcow2 image in
   * the clear (QEMU 7.2, seen in test-backup-repo-crypt.sh's first
   * version): never both.
   */
  if (o.compress && repo_key_file)
    usage_error ("backup: --compress and --encrypt-key-file exclude each "
                 "other: QEMU does not encrypt qcow2 compressed clusters");
  if (controls.len && since)
    usage_error ("backup: with --control, fleece-backup chooses the "
                 "checkpoint to pull since: no --since");
  if (!grouped) {
    if ((export = uri_export (argv[optind + 1], err, sizeof err)) == NULL)
      usage_error ("SOURCE: %s", err);
    if (!controls.len && (strncmp (export, "snapshot/", 9) != 0 ||
                          export[9] == '\0'))
      usage_error ("backup: SOURCE must be a snapshot export "
                   "(snapshot/NAME), not '%s' (or use --control)", export);
    if (!controls.len && (checkpoint = strdup (export + 9)) == NULL)
      die ("strdup: %m");
  }
  repo_open (&r, argv[optind], REPO_WRITE);
  catch_signals ();
  if (grouped || r.ndisks)
    group_backup (&r, argv + optind + 1, argc - optind - 1,
                  (const char *const *) controls.ptr, controls.len, &o);
  else if (controls.len)
    control_cycle (&r, controls.ptr[0], argv[optind + 1], o.name, false,
                   o.full, o.compress, o.json);
  else
    backup_point (&r, argv[optind + 1], NULL, checkpoint, since,
                  o.name ? o.name : checkpoint, o.compress, o.json);
  repo_close (&r);
  free (controls.ptr);
  return EXIT_SUCCESS;
}
