/* fleece-backup prune: drop the oldest points, keeping the newest N.
 *
 * The oldest point is always a full one (a chain starts with a full
 * point, and each prune step makes the next point full).  Dropping it:
 *   - with no point on top of it: its files are deleted;
 *   - with a point C on top: qemu-img commit -d writes C's clusters into
 *     the oldest point's file, which is then renamed over C's file, so
 *     that C becomes a full point with the same content.
 * Each step is journaled in the manifest ("prune": drop, into) before
 * it starts, and finished by whoever opens the repository for writing
 * next (repo_open), from wherever it stopped:
 *   - before the rename, C's file is untouched (-d: commit leaves the
 *     overlay as it is) and shadows every cluster the commit writes, so
 *     C reads exactly as before whatever the commit had done; the
 *     commit is simply run again (after qemu-img check -r leaks, for
 *     clusters a killed commit may have leaked);
 *   - the rename is atomic: after it, C's name holds the merged file,
 *     which reads the same; the oldest file is gone, which is how a
 *     resumed step knows that only the manifest is left to update.
 * Points other than the dropped one are never written, so every kept
 * point stays restorable and exact at every moment, and its checksum
 * list stays valid.
 */

#include <config.h>

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cleanup.h"
#include "repo.h"

static void
unlink_point_file (struct repo *r, const char *file)
{
  CLEANUP_FREE char *path = NULL;

  if (file == NULL)
    return;
  path = repo_path (r, file);
  if (unlink (path) == -1 && errno != ENOENT)
    die ("unlink: %s: %m", path);
}

/* Merge the oldest file into its child (see above); idempotent. */
static void
prune_merge (struct repo *r, struct point *drop, struct point *into)
{
  static const char *const repair[] = { "-q", "-r", "leaks", NULL };
  static const char *const commit[] = { "-q", "-d", NULL };
  CLEANUP_FREE char *dpath = NULL, *ipath = NULL;
  struct qimg dq, iq;

  repo_qimg (r, drop, &dq, &dpath);
  repo_qimg (r, into, &iq, &ipath);
  if (access (dpath, F_OK) == 0) {
    qemu_key_check (&iq, into->name);
    if (qemu_img ("check", repair, &dq, QUIET_OUT) != 0)
      die ("qemu-img check -r leaks %s failed", dpath);
    if (qemu_img ("commit", commit, &iq, QUIET_OUT) != 0)
      die ("qemu-img commit -d %s (into %s) failed", ipath, dpath);
    repo_crash_point ("prune-committed");
    fsync_path (dpath, false);
    if (rename (dpath, ipath) == -1)
      die ("rename: %s to %s: %m", dpath, ipath);
    fsync_path (r->dir, true);
    repo_crash_point ("prune-renamed");
  }
  free (into->parent);
  free (into->since);
  into->parent = into->since = NULL;
}

void
repo_prune_finish (struct repo *r)
{
  struct point *drop = repo_find (r, r->prune_drop);
  struct point *into = r->prune_into ? repo_find (r, r->prune_into) : NULL;

  if (drop == NULL || (r->prune_into && into == NULL))
    die ("%s: the prune journal names a point that is not there (%s, %s)",
         r->dir, r->prune_drop, r->prune_into ? r->prune_into : "-");
  if (into)
    prune_merge (r, drop, into);
  else
    unlink_point_file (r, drop->file);
  unlink_point_file (r, drop->sums);
  repo_remove (r, drop);
  free (r->prune_drop);
  free (r->prune_into);
  r->prune_drop = r->prune_into = NULL;
  repo_save (r);
}

/* Drop the oldest points of r until keep remain, one journaled step
 * at a time.
 */
void
prune_keep (struct repo *r, size_t keep)
{
  size_t i;

  while (r->n > keep) {
    struct point *p0 = &r->points[0], *child = NULL;

    if (p0->parent)
      die ("%s: the oldest point %s has a parent (%s): the manifest is "
           "inconsistent", r->dir, p0->name, p0->parent);
    for (i = 1; i < r->n; i++)
      if (r->points[i].parent && strcmp (r->points[i].parent, p0->name) == 0)
        child = &r->points[i];
    if ((r->prune_drop = strdup (p0->name)) == NULL ||
        (child && (r->prune_into = strdup (child->name)) == NULL))
      die ("strdup: %m");
    repo_save (r);
    repo_crash_point ("prune-journaled");
    printf ("dropping point %s%s%s%s%s\n", r->member_of ? r->member_of : "",
            r->member_of ? "/" : "", p0->name,
            child ? ": merged into " : "", child ? child->name : "");
    repo_prune_finish (r);
  }
}

int
cmd_prune (int argc, char **argv)
{
  static const struct option opts[] = {
    { "keep-last", required_argument, NULL, 'k' },
    { "encrypt-key-file", required_argument, NULL, 'e' },
    { NULL }
  };
  long keep = -1;
  struct repo r;
  char *end;
  int c;

  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    if (c == 'e') {
      repo_key_file = optarg;
      continue;
    }
    if (c != 'k')
      usage_error ("prune: bad option");
    keep = strtol (optarg, &end, 10);
    if (*end || keep < 1 || keep > 100000)
      usage_error ("--keep-last: '%s' is not a number from 1 to 100000",
                   optarg);
  }
  if (argc - optind != 1 || keep < 0)
    usage_error ("prune: expected REPO --keep-last N");
  repo_open (&r, argv[optind], REPO_PRUNE);
  if (r.ndisks)
    group_prune (&r, keep);
  else
    prune_keep (&r, keep);
  repo_close (&r);
  return EXIT_SUCCESS;
}
