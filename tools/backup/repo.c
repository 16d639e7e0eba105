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
#define MANIFEST_VERSION 1

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

void
point_free (struct point *p)
{
  free (p->name);
  free (p->file);
  free (p->parent);
  free (p->disk);
  free (p->checkpoint);
  free (p->since);
  free (p->sums);
  free (p->sums_xxh3);
}

/* ---- The manifest ---- */

static json_t *
jstr (const char *s)
{
  return s ? json_string (s) : json_null ();
}

json_t *
point_json (const struct point *p)
{
  json_t *o = json_pack ("{s:s,s:s,s:o,s:o,s:I,s:I,s:o,s:o,s:I,s:I,s:I,"
                         "s:I,s:I,s:I,s:b,s:b,s:b,s:o,s:o}",
                         "name", p->name, "file", p->file,
                         "parent", jstr (p->parent), "disk", jstr (p->disk),
                         "disk-size", (json_int_t) p->disk_size,
                         "cluster-size", (json_int_t) p->cluster_size,
                         "checkpoint", jstr (p->checkpoint),
                         "since", jstr (p->since),
                         "snapshot-created", (json_int_t) p->created,
                         "started", (json_int_t) p->started,
                         "finished", (json_int_t) p->finished,
                         "bytes-read", (json_int_t) p->read,
                         "bytes-written", (json_int_t) p->written,
                         "bytes-zeroed", (json_int_t) p->zeroed,
                         "complete", p->complete,
                         "compressed", p->compressed,
                         "encrypted", p->encrypted,
                         "sums", jstr (p->sums),
                         "sums-xxh3", jstr (p->sums_xxh3));

  if (o == NULL)
    die ("json_pack: point %s: out of memory", p->name);
  return o;
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

static void
point_from_json (json_t *o, struct point *p, const char *path)
{
  p->name = jget_str (o, "name");
  p->file = jget_str (o, "file");
  p->sums = jget_str (o, "sums");
  if (p->name == NULL || p->file == NULL || strchr (p->file, '/') ||
      (p->sums && strchr (p->sums, '/')))
    die ("%s: a point without a name or with a bad file name", path);
  p->parent = jget_str (o, "parent");
  p->disk = jget_str (o, "disk");
  p->disk_size = jget_int (o, "disk-size");
  p->cluster_size = jget_int (o, "cluster-size");
  p->checkpoint = jget_str (o, "checkpoint");
  p->since = jget_str (o, "since");
  p->created = jget_int (o, "snapshot-created");
  p->started = jget_int (o, "started");
  p->finished = jget_int (o, "finished");
  p->read = jget_int (o, "bytes-read");
  p->written = jget_int (o, "bytes-written");
  p->zeroed = jget_int (o, "bytes-zeroed");
  p->complete = json_is_true (json_object_get (o, "complete"));
  p->compressed = json_is_true (json_object_get (o, "compressed"));
  p->encrypted = json_is_true (json_object_get (o, "encrypted"));
  p->sums_xxh3 = jget_str (o, "sums-xxh3");
  if (p->cluster_size != REPO_CLUSTER)
    die ("%s: point %s has cluster size %" PRIu32 ", this fleece-backup "
         "uses %u", path, p->name, p->cluster_size, REPO_CLUSTER);
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
      jget_int (m, "version") != MANIFEST_VERSION)
    die ("%s: not a version %d fleece-backup manifest", path,
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

void
repo_init (const char *dir)
{
  struct repo r = { .dir = (char *) dir };
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
