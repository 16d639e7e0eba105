/* fleece-backup backup --control: the whole nightly cycle in one command.
 *
 * Through the server's control socket (lib/ctl-client.h: a Unix socket,
 * or "ssh -T HOST fleecectl -s PATH relay" for ssh://), the run:
 *   1. tidies up after the newest point: deletes its snapshot and removes
 *      the bitmap frozen by its checkpoint, which only its pull needed
 *      (a run that stopped after completing the point left them);
 *   2. finishes a checkpoint that an interrupted run created but did not
 *      back up: the newest point's bitmap is frozen by checkpoint X and
 *      snapshot X is still there, so X is pulled since the newest point,
 *      as that run would have; then 1 again;
 *   3. creates checkpoint NAME (which freezes the bitmap of the newest
 *      point's checkpoint) and pulls snapshot/NAME: incremental since the
 *      newest point when its bitmap was recording and is consistent,
 *      else full, saying why;
 *   4. once the point is complete and synced (cmd-backup.c), 1 again.
 * So a run stopped at any moment (the test kills it at each step) loses
 * nothing: the changes since the newest complete point are always either
 * in its recording bitmap, or in its frozen bitmap and the snapshot that
 * froze it, which are deleted only after a point holds them.
 *
 * Nothing here writes the repository itself: each point is added by
 * backup_point, with its own checks (the bitmap frozen by the snapshot
 * pulled, the newest point holding the checkpoint it is pulled since).
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "cleanup.h"
#include "ctl-client.h"
#include "repo.h"

#define CONTROL_TIMEOUT_MS 60000

struct control {
  struct ctlc *c;
  const char *where;
};

/* Quote s for the remote shell that ssh runs the command with. */
static char *
shell_quote (const char *s)
{
  size_t n = 3, i;
  char *q, *p;

  for (i = 0; s[i]; i++)
    n += s[i] == '\'' ? 4 : 1;
  p = q = xmalloc (n);
  *p++ = '\'';
  for (i = 0; s[i]; i++) {
    if (s[i] == '\'') {
      memcpy (p, "'\\''", 4);
      p += 4;
    }
    else
      *p++ = s[i];
  }
  *p++ = '\'';
  *p = '\0';
  return q;
}

/* ssh://[USER@]HOST[:PORT]/PATH[?fleecectl=COMMAND]: ssh runs fleecectl
 * relay on HOST (as libvirt's qemu+ssh runs its bridge); the ssh client
 * is $FLEECE_BACKUP_SSH if set, with its usual configuration.
 */
static struct ctlc *
control_ssh (const char *spec, char *err, size_t n)
{
  const char *ssh = getenv ("FLEECE_BACKUP_SSH");
  CLEANUP_FREE char *host = NULL, *path = NULL, *qpath = NULL;
  CLEANUP_FREE char *remote = NULL;
  const char *auth = spec + 6, *slash = strchr (auth, '/'), *q;
  const char *fleecectl = "fleecectl";
  char *argv[8], *port;
  int i = 0;

  if (slash == NULL || slash == auth || slash[1] == '\0')
    usage_error ("--control: '%s' is not ssh://[USER@]HOST[:PORT]/PATH",
                 spec);
  host = strndup (auth, slash - auth);
  q = strchr (slash, '?');
  path = q ? strndup (slash, q - slash) : strdup (slash);
  if (host == NULL || path == NULL)
    die ("strdup: %m");
  if (q && strncmp (q, "?fleecectl=", 11) == 0)
    fleecectl = q + 11;
  else if (q)
    usage_error ("--control: '%s': the only parameter is fleecectl=",
                 spec);
  if ((port = strrchr (host, ':')) != NULL)
    *port++ = '\0';
  qpath = shell_quote (path);
  if (asprintf (&remote, "%s -s %s relay", fleecectl, qpath) == -1)
    die ("asprintf: %m");
  argv[i++] = (char *) (ssh && *ssh ? ssh : "ssh");
  argv[i++] = (char *) "-T";
  if (port) {
    argv[i++] = (char *) "-p";
    argv[i++] = port;
  }
  argv[i++] = (char *) "--";
  argv[i++] = host;             /* [USER@]HOST, as ssh takes it */
  argv[i++] = remote;
  argv[i] = NULL;
  return ctlc_spawn (spec, argv, CONTROL_TIMEOUT_MS, err, n);
}

/* A control socket's path, or ssh://...: the connection, or NULL with
 * the reason in err.
 */
struct ctlc *
control_connect (const char *spec, char *err, size_t errlen)
{
  if (strncmp (spec, "ssh://", 6) == 0)
    return control_ssh (spec, err, errlen);
  return ctlc_connect (spec, CONTROL_TIMEOUT_MS, err, errlen);
}

static void
control_open (struct control *ctl, const char *spec)
{
  char err[1024];

  ctl->where = spec;
  ctl->c = control_connect (spec, err, sizeof err);
  if (ctl->c == NULL)
    die ("--control: %s", err);
}

/* The connection is not kept across a pull: the server closes a control
 * connection idle for a minute (CTL_IDLE_TIMEOUT_MS; 10 s if it never
 * made a request), and a pull takes as long as the disk needs.  Closed
 * before each pull and opened again after it (over ssh, a new session).
 */
static void
control_pause (struct control *ctl)
{
  ctlc_close (ctl->c);
  ctl->c = NULL;
}

static void
control_resume (struct control *ctl)
{
  control_open (ctl, ctl->where);
}

/* Run cmd; NULL args for none.  Dies on any error. */
static json_t *
control_run (struct control *ctl, const char *cmd, json_t *args)
{
  char err[1024];
  json_t *ret = ctlc_execute (ctl->c, cmd, args, err, sizeof err);

  if (ret == NULL)
    die ("--control %s: %s", ctl->where, err);
  return ret;
}

static void
control_named (struct control *ctl, const char *cmd, const char *name)
{
  json_t *args = json_pack ("{s:s}", "name", name);

  if (args == NULL)
    die ("json_pack: out of memory");
  json_decref (control_run (ctl, cmd, args));
}

/* The member of query-CMD's array named name (a new reference), or
 * NULL.
 */
static json_t *
control_find (struct control *ctl, const char *query, const char *name)
{
  json_t *all = control_run (ctl, query, NULL), *v, *r = NULL;
  size_t i;

  json_array_foreach (all, i, v) {
    const char *n = json_string_value (json_object_get (v, "name"));
    if (n && strcmp (n, name) == 0) {
      r = json_incref (v);
      break;
    }
  }
  json_decref (all);
  return r;
}

/* Step 1: what only the newest point's pull needed. */
static void
control_tidy (struct control *ctl, const struct point *newest)
{
  json_t *all, *v, *s;
  size_t i;

  if (newest == NULL || newest->checkpoint == NULL)
    return;
  if ((s = control_find (ctl, "query-snapshots", newest->checkpoint))) {
    json_decref (s);
    control_named (ctl, "snapshot-delete", newest->checkpoint);
    repo_crash_point ("control-snapshot-deleted");
  }
  all = control_run (ctl, "query-bitmaps", NULL);
  json_array_foreach (all, i, v) {
    const char *by = json_string_value (json_object_get (v, "frozen-by"));
    const char *n = json_string_value (json_object_get (v, "name"));
    if (n && by && strcmp (by, newest->checkpoint) == 0)
      control_named (ctl, "bitmap-remove", n);
  }
  json_decref (all);
}

/* Why the next point cannot be incremental, or NULL; *resume: the
 * checkpoint of an interrupted run to finish first.
 */
static const char *
control_plan (struct control *ctl, const struct point *newest, bool full,
              char **resume)
{
  CLEANUP_FREE char *sname = NULL;
  json_t *b, *s;
  const char *by, *why = NULL;

  *resume = NULL;
  if (newest == NULL)
    return "the repository has no point yet";
  b = control_find (ctl, "query-bitmaps", newest->checkpoint);
  if (b == NULL)
    return "the server has no bitmap of the newest point's checkpoint";
  by = json_string_value (json_object_get (b, "frozen-by"));
  if (json_is_true (json_object_get (b, "inconsistent")))
    why = "the bitmap of the newest point's checkpoint is inconsistent";
  else if (by && (s = control_find (ctl, "query-snapshots", by))) {
    json_decref (s);
    if ((*resume = strdup (by)) == NULL)
      die ("strdup: %m");
  }
  else if (by)
    why = "the bitmap of the newest point's checkpoint was frozen by a "
      "checkpoint whose snapshot is gone";
  else if (full)
    why = "--full";
  json_decref (b);
  return why;
}

/* The export of snapshot name, opened by name on the server's URI. */
static char *
snapshot_export (const char *name)
{
  char *r;

  if (asprintf (&r, "snapshot/%s", name) == -1)
    die ("asprintf: %m");
  return r;
}

/* made: checkpoint name is on the server already, created at one
 * instant with the other disks of a group (cmd-group.c), so that step 3
 * only pulls it.
 */
void
control_cycle (struct repo *r, const char *control, const char *server_uri,
               const char *name, bool made, bool full, bool compress,
               bool json)
{
  char stamp[32];
  struct control ctl;
  const char *why;
  char *resume;
  time_t t = time (NULL);
  struct tm tm;

  if (name == NULL) {
    strftime (stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", gmtime_r (&t, &tm));
    name = stamp;
  }
  control_open (&ctl, control);
  if (repo_find (r, name) && repo_find (r, name) == repo_newest (r)) {
    /* A run that stopped after completing its point. */
    warn ("point %s is already in the repository", name);
    control_tidy (&ctl, repo_newest (r));
    ctlc_close (ctl.c);
    return;
  }
  if (repo_find (r, name))
    die ("repository %s already has a point named '%s' (--name)",
         r->dir, name);
  if (!made)
    backup_key_precheck (r, full);
  for (;;) {
    struct point *newest = repo_newest (r);
    CLEANUP_FREE char *export = NULL;

    control_tidy (&ctl, newest);
    why = control_plan (&ctl, newest, full, &resume);
    if (resume) {
      warn ("finishing checkpoint %s, created by a run that did not "
            "complete: incremental since %s", resume, newest->checkpoint);
      export = snapshot_export (resume);
      control_pause (&ctl);
      backup_point (r, server_uri, export, resume, newest->checkpoint,
                    resume, compress, json);
      control_resume (&ctl);
      repo_crash_point ("control-complete");
      if (strcmp (resume, name) == 0) {
        free (resume);
        break;                  /* it was this run's own checkpoint */
      }
      free (resume);
      continue;
    }
    if (!made) {
      control_named (&ctl, "checkpoint-create", name);
      repo_crash_point ("control-checkpointed");
    }
    export = snapshot_export (name);
    if (why)
      warn ("a full point: %s", why);
    control_pause (&ctl);
    backup_point (r, server_uri, export, name,
                  why ? NULL : newest->checkpoint, name, compress, json);
    control_resume (&ctl);
    repo_crash_point ("control-complete");
    break;
  }
  control_tidy (&ctl, repo_newest (r));
  ctlc_close (ctl.c);
}
