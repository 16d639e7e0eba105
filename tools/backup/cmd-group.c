/* fleece-backup: group repositories, the restore points of several disks
 * taken at one instant (a VM's system and data disks, a database's data
 * and log volumes), restorable together.
 *
 * Layout.  A group repository REPO has no points of its own: its
 * manifest (version 2) names its disks and its group points, and each
 * disk NAME is an ordinary repository, REPO/disks/NAME, whose manifest
 * says "member-of": NAME.  A group point G is the point named G in every
 * disk's repository; the group's record lists the disks with their
 * identity (the server's disk and size, as each point records it).  So
 * every point stays a plain qcow2 chain that QEMU opens, and every
 * single-disk reader (list, verify, restore, serve of REPO/disks/NAME)
 * works on one disk of a group unchanged.
 *
 * Backup, all or nothing:
 *   1. the group point goes into REPO's manifest, incomplete;
 *   2. lib/group.c creates checkpoint G on every server at one instant
 *      (pre-hook, prepare, commit, post-hook); if nothing was created,
 *      the record is removed again;
 *   3. each disk's point G is pulled by the --control cycle
 *      (cmd-control.c) of that disk, told that G exists already:
 *      incremental since the disk's newest point, or full saying why;
 *   4. the record is marked complete, with each disk's identity.
 * A run that stops before 4 (a pull failed, a server died, a kill)
 * leaves the record incomplete: never listed as restorable, skipped by
 * verify, refused by restore.  The disks whose point G is complete keep
 * it as a link of their chain; the next run's cycle on the other disks
 * finishes G from the snapshot G still on their server when it can (as
 * for one disk), and a record whose every disk then has its point
 * becomes complete; one none of whose disks has a point is removed.
 * Prune drops what is older than the oldest group point it keeps.
 *
 * Mixing is refused, so that each disk's chain is the chain of its group
 * points: a repository with points of its own takes no group, a group
 * repository takes only backups of all its disks, and a disk's
 * repository takes no write of its own (repo_open).
 *
 * Locks: REPO's, then each disk's, in the order of REPO's disks.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "cleanup.h"
#include "group.h"
#include "repo.h"

/* REPO/disks/NAME */
static char *
disk_dir (const struct repo *r, const char *disk)
{
  char *p;

  if (asprintf (&p, "%s/disks/%s", r->dir, disk) == -1)
    die ("asprintf: %m");
  return p;
}

/* Open every disk's repository of r, in r's order. */
static struct repo *
open_disks (struct repo *r, enum repo_mode m)
{
  struct repo *d = xcalloc (r->ndisks, sizeof *d);
  size_t i;

  repo_group_writer = true;
  for (i = 0; i < r->ndisks; i++) {
    CLEANUP_FREE char *dir = disk_dir (r, r->disks[i]);
    repo_open (&d[i], dir, m);
  }
  return d;
}

static void
close_disks (struct repo *r, struct repo *d)
{
  size_t i;

  for (i = 0; i < r->ndisks; i++)
    repo_close (&d[i]);
  free (d);
}

static size_t
disk_index (const struct repo *r, const char *disk)
{
  size_t i;

  for (i = 0; i < r->ndisks; i++)
    if (strcmp (r->disks[i], disk) == 0)
      return i;
  return r->ndisks;
}

/* ---- backup ---- */

/* SOURCE or NAME=SOURCE: the disk's name in the repository, by default
 * disk1, disk2, ... in the order of the command line.
 */
static char *
disk_name (char **source, size_t i)
{
  const char *s = *source, *eq = strchr (s, '='), *scheme = strstr (s, "://");
  char *name;
  size_t k;

  if (eq && scheme && eq < scheme) {
    if ((name = strndup (s, eq - s)) == NULL)
      die ("strndup: %m");
    for (k = 0; name[k]; k++)
      if (!strchr ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                   "0123456789._-", name[k]))
        usage_error ("backup: '%s': a disk's name has letters, digits and "
                     "'._-' only", s);
    if (*name == '\0' || *name == '.' || k > 64)
      usage_error ("backup: '%s': a disk's name has 1 to 64 characters "
                   "and does not start with '.'", s);
    *source = (char *) eq + 1;
    return name;
  }
  if (asprintf (&name, "disk%zu", i + 1) == -1)
    die ("asprintf: %m");
  return name;
}

/* The first group backup of an empty repository makes it a group
 * repository of these disks; later ones must name the same disks.
 */
static void
group_disks (struct repo *r, char **names, size_t n)
{
  CLEANUP_FREE char *have = NULL, *want = NULL;
  size_t i, j, hl = 0, wl = 0;
  FILE *f;

  if (r->n)
    die ("repository %s holds the points of one disk (its newest: %s): a "
         "group of disks needs a repository of its own (fleece-backup init "
         "NEWREPO); mixing both would leave each disk's chain with points "
         "no group has", r->dir, r->points[r->n - 1].name);
  for (i = 0; i < n; i++)
    for (j = i + 1; j < n; j++)
      if (strcmp (names[i], names[j]) == 0)
        usage_error ("backup: disk '%s' is named twice", names[i]);
  if (r->ndisks == 0) {
    CLEANUP_FREE char *top = repo_path (r, "disks");

    if (mkdir (top, 0755) == -1 && errno != EEXIST)
      die ("mkdir: %s: %m", top);
    free (r->disks);            /* repo_open's empty list */
    r->disks = xcalloc (n + 1, sizeof *r->disks);
    for (i = 0; i < n; i++) {
      CLEANUP_FREE char *dir = disk_dir (r, names[i]);
      CLEANUP_FREE char *m = NULL;

      if (asprintf (&m, "%s/" REPO_MANIFEST, dir) == -1)
        die ("asprintf: %m");
      /* A run that stopped between here and repo_save made it. */
      if (access (m, F_OK) == -1)
        repo_init (dir, names[i]);
      if ((r->disks[i] = strdup (names[i])) == NULL)
        die ("strdup: %m");
    }
    r->ndisks = n;
    repo_save (r);
    return;
  }
  for (i = 0; i < n; i++)
    if (disk_index (r, names[i]) == r->ndisks)
      break;
  if (i == n && n == r->ndisks)
    return;
  f = open_memstream (&have, &hl);
  for (j = 0; f && j < r->ndisks; j++)
    fprintf (f, "%s%s", j ? ", " : "", r->disks[j]);
  if (f == NULL || fclose (f) == EOF)
    die ("open_memstream: %m");
  f = open_memstream (&want, &wl);
  for (j = 0; f && j < n; j++)
    fprintf (f, "%s%s", j ? ", " : "", names[j]);
  if (f == NULL || fclose (f) == EOF)
    die ("open_memstream: %m");
  die ("repository %s is a group of disks %s; this backup names %s: every "
       "group point holds every disk of the group (name each SOURCE as "
       "NAME=URI)", r->dir, have, want);
}

/* After the pulls: a record whose every disk has its complete point is
 * complete; one without any point is removed.
 */
static void
settle_groups (struct repo *r, struct repo *d)
{
  size_t g = 0, i, have;

  while (g < r->ngroups) {
    struct gpoint *gp = &r->groups[g];

    if (gp->complete) {
      g++;
      continue;
    }
    for (i = have = 0; i < gp->n; i++) {
      size_t k = disk_index (r, gp->d[i].disk);
      struct point *p = k < r->ndisks ? repo_find (&d[k], gp->name) : NULL;
      if (p && p->complete) {
        have++;
        free (gp->d[i].id);
        gp->d[i].id = p->disk ? strdup (p->disk) : NULL;
        gp->d[i].size = p->disk_size;
      }
    }
    if (have == gp->n) {
      gp->complete = true;
      gp->finished = time (NULL);
      g++;
    }
    else if (have == 0 && g + 1 < r->ngroups) {
      warn ("removing group point %s: a backup that did not finish left "
            "no point of it", gp->name);
      gpoint_free (gp);
      memmove (gp, gp + 1, (r->ngroups - g - 1) * sizeof *gp);
      r->ngroups--;
    }
    else
      g++;
  }
}

void
group_backup (struct repo *r, char **sources, size_t n,
              const char *const *controls, size_t ncontrols,
              const struct backup_opts *o)
{
  struct group_member *gm = xcalloc (n, sizeof *gm);
  char **names = xcalloc (n, sizeof *names);
  const char **ctl_of = xcalloc (n, sizeof *ctl_of);
  char **src_of = xcalloc (n, sizeof *src_of);
  struct group_opts go = {
    .members = gm, .n = n, .id_prefix = "fleece-backup",
    .pre_hook = o->pre_hook, .post_hook = o->post_hook,
    .hook_timeout = o->hook_timeout, .deadline_ms = o->deadline_ms,
    .timeout = 60, .connect = control_connect,
  };
  enum group_outcome outcome = GROUP_ABORTED;
  struct gpoint *gp;
  struct repo *d;
  char stamp[32], err[4096];
  const char *name = o->name;
  time_t t = time (NULL);
  struct tm tm;
  size_t i, k;

  if (ncontrols != n)
    usage_error ("backup: a group backup needs one --control per SOURCE, "
                 "in the same order (%zu SOURCEs, %zu --control)", n,
                 ncontrols);
  for (i = 0; i < n; i++)
    names[i] = disk_name (&sources[i], i);
  group_disks (r, names, n);
  if (name == NULL) {
    strftime (stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", gmtime_r (&t, &tm));
    name = stamp;
  }
  if (repo_find_group (r, name))
    die ("repository %s already has a group point named '%s' (--name)",
         r->dir, name);
  /* In the repository's order of disks, whatever the command line's. */
  for (i = 0; i < n; i++) {
    k = disk_index (r, names[i]);
    ctl_of[k] = controls[i];
    src_of[k] = sources[i];
  }
  d = open_disks (r, REPO_WRITE);
  for (i = 0; i < r->ndisks; i++) {
    if (repo_find (&d[i], name))
      die ("disk %s of repository %s already has a point named '%s' "
           "(--name)", r->disks[i], r->dir, name);
    backup_key_precheck (&d[i], o->full);
  }

  /* 1. The record, incomplete. */
  r->groups = realloc (r->groups, (r->ngroups + 1) * sizeof *r->groups);
  if (r->groups == NULL)
    die ("realloc: %m");
  gp = &r->groups[r->ngroups++];
  *gp = (struct gpoint) { .name = strdup (name), .started = t,
                          .finished = -1, .n = n };
  gp->d = xcalloc (n, sizeof *gp->d);
  for (i = 0; i < n; i++)
    if ((gp->d[i].disk = strdup (r->disks[i])) == NULL)
      die ("strdup: %m");
  if (gp->name == NULL)
    die ("strdup: %m");
  repo_save (r);
  repo_crash_point ("group-journaled");

  /* 2. The checkpoint on every server at one instant: group_run
   * connects (over ssh too) once the pre-hook is done.
   */
  for (i = 0; i < n; i++)
    gm[i].path = ctl_of[i];
  if (group_run (&go, name, true, &outcome, err, sizeof err) == -1) {
    if (outcome == GROUP_CREATED)
      warn ("%s: the checkpoints were created; backing them up", err);
    else
      warn ("%s", err);
  }
  for (k = 0; k < n; k++)
    json_decref (gm[k].reply);
  if (outcome == GROUP_ABORTED) {
    gpoint_free (&r->groups[--r->ngroups]);
    repo_save (r);
    die ("group point %s: nothing was created: no point is added", name);
  }
  if (outcome == GROUP_PARTIAL)
    die ("group point %s: checkpoint %s is on some servers only: the "
         "group point stays incomplete", name, name);
  repo_crash_point ("group-checkpointed");

  /* 3. Each disk's point. */
  for (i = 0; i < r->ndisks; i++) {
    if (!cfg.quiet)
      fprintf (stderr, "fleece-backup: group point %s: disk %s\n", name,
               r->disks[i]);
    control_cycle (&d[i], ctl_of[i], src_of[i], name, true, o->full,
                   o->compress, o->json);
    repo_crash_point ("group-disk-pulled");
  }

  /* 4. Complete. */
  settle_groups (r, d);
  repo_save (r);
  if (!cfg.quiet)
    fprintf (stderr, "fleece-backup: group point %s complete: %zu disks\n",
             name, r->ndisks);
  close_disks (r, d);
  for (i = 0; i < n; i++)
    free (names[i]);
  free (names);
  free (ctl_of);
  free (src_of);
  free (gm);
}

/* ---- list, verify, restore, prune ---- */

static const char *
point_kind (const struct point *p)
{
  return p == NULL ? "missing" : !p->complete ? "incomplete"
    : p->parent ? "incremental" : "full";
}

void
group_list (struct repo *r, bool json)
{
  struct repo *d = open_disks (r, REPO_READ);
  json_t *a = json ? json_array () : NULL;
  size_t g, i;

  if (json && a == NULL)
    die ("json_array: out of memory");
  if (!json)
    printf ("%-20s %-10s %s\n", "GROUP", "STATE", "DISKS (NAME=POINT:KIND)");
  for (g = 0; g < r->ngroups; g++) {
    struct gpoint *gp = &r->groups[g];
    json_t *o = json ? gpoint_json (gp) : NULL;

    if (!json)
      printf ("%-20s %-10s", gp->name,
              gp->complete ? "complete" : "incomplete");
    for (i = 0; i < gp->n; i++) {
      size_t k = disk_index (r, gp->d[i].disk);
      struct point *p = k < r->ndisks ? repo_find (&d[k], gp->name) : NULL;

      if (json) {
        json_t *dj = json_array_get (json_object_get (o, "disks"), i);
        if (json_object_set_new (dj, "point", p ? point_json (p)
                                 : json_null ()) == -1)
          die ("json_object_set: out of memory");
      }
      else
        printf (" %s=%s:%s", gp->d[i].disk, gp->name, point_kind (p));
    }
    if (json && json_array_append_new (a, o) == -1)
      die ("json_array_append: out of memory");
    if (!json)
      printf ("\n");
  }
  if (json) {
    if (json_dumpf (a, stdout, JSON_COMPACT) == -1)
      die ("json_dumpf: stdout: %m");
    printf ("\n");
    json_decref (a);
  }
  close_disks (r, d);
}

/* A complete group point, or death naming what is wrong. */
static struct gpoint *
find_complete_group (struct repo *r, const char *name)
{
  struct gpoint *gp = repo_find_group (r, name);

  if (gp == NULL)
    die ("repository %s has no group point '%s' ('fleece-backup list %s' "
         "lists them)", r->dir, name, r->dir);
  if (!gp->complete)
    die ("group point %s of %s is incomplete (its backup did not finish "
         "on every disk): it is not a restore point", name, r->dir);
  return gp;
}

/* The point of disk k in group point gp. */
static struct point *
group_member_point (struct repo *r, struct repo *d, struct gpoint *gp,
                    size_t k)
{
  struct point *p = repo_find (&d[k], gp->name);

  if (p == NULL || !p->complete)
    die ("group point %s of %s: disk %s has no complete point %s: the "
         "repository is damaged", gp->name, r->dir, r->disks[k], gp->name);
  return p;
}

int
group_verify (struct repo *r, const char *only)
{
  struct repo *d = open_disks (r, REPO_READ);
  size_t g, i;

  if (only)
    find_complete_group (r, only);
  for (g = 0; g < r->ngroups; g++) {
    struct gpoint *gp = &r->groups[g];

    if (only && strcmp (gp->name, only) != 0)
      continue;
    if (!gp->complete) {
      printf ("%s: not checked: incomplete, not a restore point\n",
              gp->name);
      continue;
    }
    for (i = 0; i < gp->n; i++) {
      size_t k = disk_index (r, gp->d[i].disk);
      if (k == r->ndisks)
        die ("group point %s of %s names disk %s, which the repository "
             "does not have", gp->name, r->dir, gp->d[i].disk);
      verify_point (&d[k], group_member_point (r, d, gp, k));
      printf ("%s: disk %s: ok\n", gp->name, r->disks[k]);
    }
    printf ("%s: ok\n", gp->name);
  }
  close_disks (r, d);
  repo_close (r);
  return EXIT_SUCCESS;
}

/* dir: every disk to dir/NAME; else targets, DISK=TARGET each, only the
 * disks named.
 */
void
group_restore (struct repo *r, const char *name, const char *dir,
               const char *const *targets, size_t ntargets)
{
  struct repo *d = open_disks (r, REPO_READ);
  struct gpoint *gp = find_complete_group (r, name);
  char **to = xcalloc (r->ndisks, sizeof *to);
  size_t i, k;

  for (i = 0; i < ntargets; i++) {
    const char *eq = strchr (targets[i], '=');
    CLEANUP_FREE char *disk = eq ? strndup (targets[i], eq - targets[i])
      : NULL;

    if (disk == NULL || eq[1] == '\0')
      usage_error ("restore: --target '%s' is not DISK=TARGET", targets[i]);
    if ((k = disk_index (r, disk)) == r->ndisks)
      usage_error ("restore: --target %s: repository %s has no disk '%s'",
                   targets[i], r->dir, disk);
    if (to[k])
      usage_error ("restore: disk %s has two --target", disk);
    if ((to[k] = strdup (eq + 1)) == NULL)
      die ("strdup: %m");
  }
  if (dir) {
    struct stat st;
    if (stat (dir, &st) == -1 || !S_ISDIR (st.st_mode))
      usage_error ("restore: %s is not a directory: a group point restores "
                   "into a directory (a file per disk) or with --target "
                   "DISK=TARGET", dir);
    for (k = 0; k < r->ndisks; k++)
      if (asprintf (&to[k], "%s/%s", dir, r->disks[k]) == -1)
        die ("asprintf: %m");
  }
  /* Every disk's point is there before anything is written. */
  for (k = 0; k < r->ndisks; k++)
    if (to[k])
      group_member_point (r, d, gp, k);
  for (k = 0; k < r->ndisks; k++) {
    if (to[k] == NULL)
      continue;
    restore_point (&d[k], gp->name, to[k]);
    free (to[k]);
  }
  free (to);
  close_disks (r, d);
}

/* Keep the newest keep complete group points: every record older than
 * the oldest kept goes from REPO's manifest first (so that a prune
 * stopped at any moment is finished by the next from the same cut),
 * then each disk drops its points older than its point of that group.
 */
void
group_prune (struct repo *r, size_t keep)
{
  size_t g, ncomplete = 0, seen = 0, cut, i, k;
  struct gpoint *oldest = NULL;
  CLEANUP_FREE char *oname = NULL;
  struct repo *d;

  for (g = 0; g < r->ngroups; g++)
    ncomplete += r->groups[g].complete;
  if (ncomplete == 0)
    return;
  /* The oldest of the newest keep complete group points. */
  cut = r->ngroups;
  for (g = r->ngroups; g > 0; g--)
    if (r->groups[g - 1].complete) {
      cut = g - 1;
      if (++seen == keep)
        break;
    }
  oldest = &r->groups[cut];
  if ((oname = strdup (oldest->name)) == NULL)
    die ("strdup: %m");
  for (g = 0; g < cut; g++) {
    printf ("dropping group point %s%s\n", r->groups[g].name,
            r->groups[g].complete ? "" : " (incomplete)");
    gpoint_free (&r->groups[g]);
  }
  memmove (r->groups, r->groups + cut, (r->ngroups - cut) * sizeof *r->groups);
  r->ngroups -= cut;
  repo_save (r);
  repo_crash_point ("group-prune-journaled");
  d = open_disks (r, REPO_PRUNE);
  for (k = 0; k < r->ndisks; k++) {
    for (i = 0; i < d[k].n; i++)
      if (strcmp (d[k].points[i].name, oname) == 0)
        break;
    if (i == d[k].n)
      die ("group point %s of %s: disk %s has no point %s: the repository "
           "is damaged", oname, r->dir, r->disks[k], oname);
    prune_keep (&d[k], d[k].n - i);
  }
  close_disks (r, d);
}
