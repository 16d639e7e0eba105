/* fleece-backup: the repository, its manifest and its locks.
 *
 * A repository is a directory: manifest.json, and for each restore
 * point NAME.qcow2 (a full point stands alone; an incremental one has
 * the previous point as its backing file, by relative name) and
 * NAME.sums (sums.c).  The manifest is the only record of what is
 * there; a file it does not name is not a point.
 *
 * Invariants:
 *   - the manifest is replaced atomically (a new file, fsync, rename,
 *     fsync of the directory), so a crash leaves the old or the new one;
 *   - a point is written into the manifest, incomplete, before its file
 *     is created, and marked complete only after its file and its sums
 *     are synced: the next writer deletes an incomplete point (repo_open),
 *     so a crash never leaves a file that looks like a point;
 *   - a complete point's file is never written again, except by prune,
 *     whose every step is journaled in the manifest before it is done
 *     and finished by the next writer (repo_prune_finish);
 *   - one writer at a time: REPO/lock, an exclusive flock held for the
 *     whole command; readers (verify, restore, serve) hold REPO/readers
 *     shared, and prune, which changes files, holds it exclusive.
 *
 * Undocumented, for tests only: FLEECE_BACKUP_CRASH_AT=WHERE makes the
 * program kill itself with SIGKILL at the named step (repo_crash_point),
 * so that a test can stop it at every step of a backup or a prune.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "cleanup.h"
#include "repo.h"

#define MANIFEST_FORMAT "fleece-backup-repository"
/* Version 2 added the group fields ("disks", "groups", "member-of");
 * version 1 manifests load as repositories of one disk.
 */
#define MANIFEST_VERSION 2

bool repo_group_writer;

void
repo_crash_point (const char *where)
{
  const char *at = getenv ("FLEECE_BACKUP_CRASH_AT");

  if (at && strcmp (at, where) == 0)
    raise (SIGKILL);
}

char *
repo_path (const struct repo *r, const char *file)
{
  char *p;

  if (asprintf (&p, "%s/%s", r->dir, file) == -1)
    die ("asprintf: %m");
  return p;
}

void
fsync_path (const char *path, bool dir)
{
  int fd = open (path, (dir ? O_DIRECTORY : 0) | O_RDONLY | O_CLOEXEC);

  if (fd == -1)
    die ("open: %s: %m", path);
  if (fsync (fd) == -1)
    die ("fsync: %s: %m", path);
  close (fd);
}

static char *
xstrdup_or_null (const char *s)
{
  char *p;

  if (s == NULL)
    return NULL;
  if ((p = strdup (s)) == NULL)
    die ("strdup: %m");
  return p;
}

/* ---- The manifest ---- */

/* A point's members in the manifest, in their order there: each field
 * is named once, for writing, reading and freeing alike.
 */
enum field_kind { F_STR, F_U64, F_U32, F_I64, F_BOOL };
static const struct field {
  const char *key;
  enum field_kind kind;
  size_t offset;
} point_fields[] = {
#define F(key, kind, member) { key, kind, offsetof (struct point, member) }
  F ("name", F_STR, name),
  F ("file", F_STR, file),
  F ("parent", F_STR, parent),
  F ("disk", F_STR, disk),
  F ("disk-size", F_U64, disk_size),
  F ("cluster-size", F_U32, cluster_size),
  F ("checkpoint", F_STR, checkpoint),
  F ("since", F_STR, since),
  F ("snapshot-created", F_I64, created),
  F ("started", F_I64, started),
  F ("finished", F_I64, finished),
  F ("bytes-read", F_U64, read),
  F ("bytes-written", F_U64, written),
  F ("bytes-zeroed", F_U64, zeroed),
  F ("complete", F_BOOL, complete),
  F ("compressed", F_BOOL, compressed),
  F ("encrypted", F_BOOL, encrypted),
  F ("sums", F_STR, sums),
  F ("sums-xxh3", F_STR, sums_xxh3),
#undef F
};
#define NR_POINT_FIELDS (sizeof point_fields / sizeof point_fields[0])

static json_t *
jstr (const char *s)
{
  return s ? json_string (s) : json_null ();
}

static char *
jget_str (json_t *o, const char *key)
{
  return xstrdup_or_null (json_string_value (json_object_get (o, key)));
}

static int64_t
jget_int (json_t *o, const char *key)
{
  return json_integer_value (json_object_get (o, key));
}

void
point_free (struct point *p)
{
  size_t i;

  for (i = 0; i < NR_POINT_FIELDS; i++)
    if (point_fields[i].kind == F_STR)
      free (*(char **) ((char *) p + point_fields[i].offset));
}

json_t *
point_json (const struct point *p)
{
  json_t *o = json_object (), *v = NULL;
  size_t i;

  for (i = 0; o && i < NR_POINT_FIELDS; i++) {
    const void *f = (const char *) p + point_fields[i].offset;

    switch (point_fields[i].kind) {
    case F_STR: v = jstr (*(char *const *) f); break;
    case F_U64: v = json_integer ((json_int_t) *(const uint64_t *) f); break;
    case F_U32: v = json_integer (*(const uint32_t *) f); break;
    case F_I64: v = json_integer (*(const int64_t *) f); break;
    case F_BOOL: v = json_boolean (*(const bool *) f); break;
    }
    if (json_object_set_new (o, point_fields[i].key, v) == -1) {
      json_decref (o);
      o = NULL;
    }
  }
  if (o == NULL)
    die ("json: point %s: out of memory or not UTF-8", p->name);
  return o;
}

static void
point_from_json (json_t *o, struct point *p, const char *path)
{
  size_t i;

  for (i = 0; i < NR_POINT_FIELDS; i++) {
    const char *key = point_fields[i].key;
    void *f = (char *) p + point_fields[i].offset;

    switch (point_fields[i].kind) {
    case F_STR: *(char **) f = jget_str (o, key); break;
    case F_U64: *(uint64_t *) f = jget_int (o, key); break;
    case F_U32: *(uint32_t *) f = jget_int (o, key); break;
    case F_I64: *(int64_t *) f = jget_int (o, key); break;
    case F_BOOL:
      *(bool *) f = json_is_true (json_object_get (o, key));
      break;
    }
  }
  if (p->name == NULL || p->file == NULL || strchr (p->file, '/') ||
      (p->sums && strchr (p->sums, '/')))
    die ("%s: a point without a name or with a bad file name", path);
  if (p->cluster_size != REPO_CLUSTER)
    die ("%s: point %s has cluster size %" PRIu32 ", this fleece-backup "
         "uses %u", path, p->name, p->cluster_size, REPO_CLUSTER);
}

void
gpoint_free (struct gpoint *g)
{
  size_t i;

  for (i = 0; i < g->n; i++) {
    free (g->d[i].disk);
    free (g->d[i].id);
  }
  free (g->d);
  free (g->name);
}

json_t *
gpoint_json (const struct gpoint *g)
{
  json_t *o, *a = json_array ();
  size_t i;

  for (i = 0; a && i < g->n; i++)
    if (json_array_append_new (a, json_pack ("{s:s,s:o,s:I}", "disk",
                                             g->d[i].disk, "disk-id",
                                             jstr (g->d[i].id), "disk-size",
                                             (json_int_t) g->d[i].size))
        == -1) {
      json_decref (a);
      a = NULL;
    }
  o = a ? json_pack ("{s:s,s:b,s:I,s:I,s:o}", "name", g->name,
                     "complete", g->complete, "started",
                     (json_int_t) g->started, "finished",
                     (json_int_t) g->finished, "disks", a) : NULL;
  if (o == NULL)
    die ("json: group point %s: out of memory or not UTF-8", g->name);
  return o;
}

static void
gpoint_from_json (json_t *o, struct gpoint *g, const char *path)
{
  json_t *a = json_object_get (o, "disks"), *v;
  size_t i;

  g->name = jget_str (o, "name");
  g->complete = json_is_true (json_object_get (o, "complete"));
  g->started = jget_int (o, "started");
  g->finished = jget_int (o, "finished");
  if (g->name == NULL || !json_is_array (a))
    die ("%s: a group point without a name or a \"disks\" array", path);
  g->n = json_array_size (a);
  g->d = xcalloc (g->n + 1, sizeof *g->d);
  json_array_foreach (a, i, v) {
    g->d[i].disk = jget_str (v, "disk");
    g->d[i].id = jget_str (v, "disk-id");
    g->d[i].size = jget_int (v, "disk-size");
    if (g->d[i].disk == NULL)
      die ("%s: group point %s: a disk without a name", path, g->name);
  }
}

/* The group fields of version 2 (absent in version 1: one disk). */
static void
manifest_load_groups (struct repo *r, json_t *m, const char *path)
{
  json_t *disks = json_object_get (m, "disks");
  json_t *groups = json_object_get (m, "groups");
  size_t i;

  r->member_of = jget_str (m, "member-of");
  if (disks && !json_is_array (disks))
    die ("%s: \"disks\" is not an array", path);
  if (groups && !json_is_array (groups))
    die ("%s: \"groups\" is not an array", path);
  r->ndisks = json_array_size (disks);
  r->disks = xcalloc (r->ndisks + 1, sizeof *r->disks);
  for (i = 0; i < r->ndisks; i++) {
    const char *d = json_string_value (json_array_get (disks, i));
    if (d == NULL || *d == '\0' || *d == '.' || strchr (d, '/'))
      die ("%s: disk %zu has no name or a bad one", path, i);
    r->disks[i] = xstrdup_or_null (d);
  }
  r->ngroups = json_array_size (groups);
  r->groups = xcalloc (r->ngroups + 1, sizeof *r->groups);
  for (i = 0; i < r->ngroups; i++)
    gpoint_from_json (json_array_get (groups, i), &r->groups[i], path);
  if (r->ndisks && r->n)
    die ("%s: a group repository with points of its own: the manifest is "
         "inconsistent", path);
}

struct gpoint *
repo_find_group (struct repo *r, const char *name)
{
  size_t i;

  for (i = 0; i < r->ngroups; i++)
    if (strcmp (r->groups[i].name, name) == 0)
      return &r->groups[i];
  return NULL;
}

static void
manifest_load (struct repo *r)
{
  CLEANUP_FREE char *path = repo_path (r, REPO_MANIFEST);
  json_error_t e;
  json_t *m, *pts, *pr;
  const char *fmt;
  size_t i;

  m = json_load_file (path, 0, &e);
  if (m == NULL)
    die ("%s: not a fleece-backup repository (%s, line %d: %s); "
         "'fleece-backup init %s' makes one", r->dir, path, e.line, e.text,
         r->dir);
  fmt = json_string_value (json_object_get (m, "format"));
  if (fmt == NULL || strcmp (fmt, MANIFEST_FORMAT) != 0 ||
      jget_int (m, "version") < 1 ||
      jget_int (m, "version") > MANIFEST_VERSION)
    die ("%s: not a fleece-backup manifest of version 1 to %d", path,
         MANIFEST_VERSION);
  pts = json_object_get (m, "points");
  if (!json_is_array (pts))
    die ("%s: no \"points\" array", path);
  r->n = json_array_size (pts);
  r->points = xcalloc (r->n + 1, sizeof *r->points);
  for (i = 0; i < r->n; i++)
    point_from_json (json_array_get (pts, i), &r->points[i], path);
  pr = json_object_get (m, "prune");
  r->prune_drop = jget_str (pr, "drop");
  r->prune_into = jget_str (pr, "into");
  manifest_load_groups (r, m, path);
  json_decref (m);
}

/* Write the manifest: a new file, fsync, rename, fsync the directory. */
void
repo_save (struct repo *r)
{
  CLEANUP_FREE char *path = repo_path (r, REPO_MANIFEST);
  CLEANUP_FREE char *tmp = repo_path (r, REPO_MANIFEST ".new");
  json_t *m, *pts = json_array (), *pr = json_null ();
  size_t i;
  int fd;

  if (pts == NULL)
    die ("json_array: out of memory");
  for (i = 0; i < r->n; i++)
    if (json_array_append_new (pts, point_json (&r->points[i])) == -1)
      die ("json_array_append: out of memory");
  if (r->prune_drop)
    pr = json_pack ("{s:s,s:o}", "drop", r->prune_drop,
                    "into", jstr (r->prune_into));
  m = json_pack ("{s:s,s:i,s:o,s:o}", "format", MANIFEST_FORMAT,
                 "version", MANIFEST_VERSION, "points", pts, "prune", pr);
  if (m == NULL)
    die ("json_pack: manifest: out of memory");
  if (r->member_of &&
      json_object_set_new (m, "member-of", json_string (r->member_of)) == -1)
    die ("json_object_set: manifest: out of memory");
  if (r->ndisks) {
    json_t *d = json_array (), *g = json_array ();
    for (i = 0; d && i < r->ndisks; i++)
      json_array_append_new (d, json_string (r->disks[i]));
    for (i = 0; g && i < r->ngroups; i++)
      json_array_append_new (g, gpoint_json (&r->groups[i]));
    if (d == NULL || g == NULL ||
        json_object_set_new (m, "disks", d) == -1 ||
        json_object_set_new (m, "groups", g) == -1)
      die ("json_object_set: manifest: out of memory");
  }
  fd = open (tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd == -1)
    die ("open: %s: %m", tmp);
  if (json_dumpfd (m, fd, JSON_INDENT (2)) == -1 || write (fd, "\n", 1) != 1)
    die ("write: %s: %m", tmp);
  if (fsync (fd) == -1 || close (fd) == -1)
    die ("fsync: %s: %m", tmp);
  json_decref (m);
  if (rename (tmp, path) == -1)
    die ("rename: %s to %s: %m", tmp, path);
  fsync_path (r->dir, true);
}

/* ---- Locks ---- */

static int
lock_file (struct repo *r, const char *name, int op, const char *who)
{
  CLEANUP_FREE char *path = repo_path (r, name);
  int fd = open (path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);

  if (fd == -1)
    die ("open: %s: %m", path);
  if (flock (fd, op | LOCK_NB) == -1) {
    if (errno == EWOULDBLOCK)
      die ("repository %s is in use: %s (%s is locked)", r->dir, who, path);
    die ("flock: %s: %m", path);
  }
  return fd;
}

/* A new repository; member_of: its disk's name, for a disk of a group
 * repository.
 */
void
repo_init (const char *dir, const char *member_of)
{
  struct repo r = { .dir = (char *) dir, .member_of = (char *) member_of };
  CLEANUP_FREE char *path = repo_path (&r, REPO_MANIFEST);

  if (mkdir (dir, 0755) == -1 && errno != EEXIST)
    die ("mkdir: %s: %m", dir);
  if (access (path, F_OK) == 0)
    die ("%s is already a repository (%s exists)", dir, path);
  r.lock_fd = lock_file (&r, "lock", LOCK_EX, "another fleece-backup "
                         "writes it");
  repo_save (&r);
  close (r.lock_fd);
}

/* A point that is not complete was being written when its backup
 * stopped: nothing refers to it, so it goes.
 */
static void
repo_drop_incomplete (struct repo *r)
{
  size_t i = 0;

  while (i < r->n) {
    struct point *p = &r->points[i];
    CLEANUP_FREE char *f = NULL, *s = NULL;

    if (p->complete) {
      i++;
      continue;
    }
    warn ("removing point %s, left incomplete by a backup that did not "
          "finish", p->name);
    f = repo_path (r, p->file);
    if (unlink (f) == -1 && errno != ENOENT)
      die ("unlink: %s: %m", f);
    if (p->sums) {
      s = repo_path (r, p->sums);
      if (unlink (s) == -1 && errno != ENOENT)
        die ("unlink: %s: %m", s);
    }
    repo_remove (r, p);
    repo_save (r);
  }
}

void
repo_open (struct repo *r, const char *dir, enum repo_mode m)
{
  memset (r, 0, sizeof *r);
  r->lock_fd = r->readers_fd = -1;
  if ((r->dir = strdup (dir)) == NULL)
    die ("strdup: %m");
  if (m != REPO_READ)
    r->lock_fd = lock_file (r, "lock", LOCK_EX,
                            "another fleece-backup writes it");
  r->readers_fd = lock_file (r, "readers",
                             m == REPO_PRUNE ? LOCK_EX : LOCK_SH,
                             m == REPO_PRUNE
                             ? "a point is being read (verify, restore "
                             "or serve)"
                             : "a prune is changing its points");
  manifest_load (r);
  if (m == REPO_READ)
    return;
  /* Its points must stay those of its group points (cmd-group.c). */
  if (r->member_of && !repo_group_writer)
    die ("%s is disk '%s' of a group repository: it is backed up and "
         "pruned with its group (fleece-backup backup or prune of the "
         "directory above disks/), never alone", r->dir, r->member_of);
  repo_drop_incomplete (r);
  if (r->prune_drop)
    repo_prune_finish (r);
}

void
repo_close (struct repo *r)
{
  size_t i;

  for (i = 0; i < r->n; i++)
    point_free (&r->points[i]);
  free (r->points);
  free (r->prune_drop);
  free (r->prune_into);
  for (i = 0; i < r->ndisks; i++)
    free (r->disks[i]);
  free (r->disks);
  for (i = 0; i < r->ngroups; i++)
    gpoint_free (&r->groups[i]);
  free (r->groups);
  free (r->member_of);
  if (r->lock_fd >= 0)
    close (r->lock_fd);
  if (r->readers_fd >= 0)
    close (r->readers_fd);
  free (r->dir);
  memset (r, 0, sizeof *r);
}

struct point *
repo_find (struct repo *r, const char *name)
{
  size_t i;

  for (i = 0; i < r->n; i++)
    if (strcmp (r->points[i].name, name) == 0)
      return &r->points[i];
  return NULL;
}

/* The newest complete point, or NULL. */
struct point *
repo_newest (struct repo *r)
{
  size_t i;

  for (i = r->n; i > 0; i--)
    if (r->points[i - 1].complete)
      return &r->points[i - 1];
  return NULL;
}

/* How QEMU opens point p: its path (*path, to free), its depth in its
 * chain, whether it needs the key.
 */
void
repo_qimg (struct repo *r, const struct point *p, struct qimg *q,
           char **path)
{
  const struct point *b = p;

  *path = repo_path (r, p->file);
  *q = (struct qimg) { .path = *path, .encrypted = p->encrypted };
  while (b->parent && (b = repo_find (r, b->parent)) != NULL) {
    CLEANUP_FREE char *f = repo_path (r, b->file);

    /* A prune that renamed the merged file and was stopped before it
     * updated the manifest: the point it drops is no backing file now.
     */
    if (r->prune_drop && strcmp (b->name, r->prune_drop) == 0 &&
        access (f, F_OK) == -1)
      break;
    q->depth++;
  }
  if (p->encrypted && repo_key_file == NULL)
    die ("point %s of %s is encrypted: give its key with "
         "--encrypt-key-file", p->name, r->dir);
}

void
repo_remove (struct repo *r, struct point *p)
{
  size_t i = p - r->points;

  point_free (p);
  memmove (&r->points[i], &r->points[i + 1],
           (r->n - i - 1) * sizeof *p);
  r->n--;
}
