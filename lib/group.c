/* libfleececlient: the coordinator of a consistency group, the two-phase
 * protocol of docs/control-protocol.md ("Consistency groups"), shared by
 * fleecectl (-s S1 -s S2 ... checkpoint NAME), fleece-backup (backup
 * REPO with several disks) and fleece-colod (each epoch's checkpoint of
 * a replicated group, colo/plugin.c).
 *
 * Order: the pre-hook; connect to every server (unless the caller did);
 * group-prepare to all of them at once (each drains and holds its
 * writes), then wait for every reply; once all hold, group-commit to all
 * at once; the post-hook.  Sending to all before reading any reply keeps
 * each server's hold to about one round trip of the slowest, whatever
 * the number of servers.  Anything that fails before the first commit
 * (the pre-hook, a connection, a prepare) aborts the servers already
 * prepared, so nothing is created.  The post-hook runs whatever
 * happened, once the servers are released, told the outcome in
 * FLEECE_GROUP_RESULT.  Should this process die or stall between the
 * phases, every server releases at its deadline or when the connection
 * closes, and refuses a later commit.
 *
 * Hooks run through /bin/sh -c in a process group of their own, so that
 * a hook that outlives hook_timeout is killed with everything it
 * started; a hook that timed out has failed.  Their output is theirs:
 * they inherit stdout and stderr.
 *
 * Errors (group.h): nothing here prints; every failure is appended to
 * the caller's buffer, so that one message names every server that
 * failed and what became of the group.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>

#include <jansson.h>

#include "monotonic.h"
#include "ctl-client.h"
#include "group.h"
#include "slice.h"

/* The caller's message buffer, filled one failure after another. */
struct errs {
  char *buf;
  size_t len;
  size_t used;
  bool any;                     /* something failed */
};

static void __attribute__ ((format (printf, 2, 3)))
add_error (struct errs *e, const char *fmt, ...)
{
  va_list ap;
  int n;

  e->any = true;
  if (e->len == 0 || e->used + 1 >= e->len)
    return;
  if (e->used > 0) {
    n = snprintf (e->buf + e->used, e->len - e->used, "; ");
    e->used += n;
    if (e->used >= e->len) {
      e->used = e->len - 1;
      return;
    }
  }
  va_start (ap, fmt);
  n = vsnprintf (e->buf + e->used, e->len - e->used, fmt, ap);
  va_end (ap);
  e->used += n > 0 ? (size_t) n : 0;
  if (e->used >= e->len)
    e->used = e->len - 1;
}

/* Run hook cmd (which says what it is) with /bin/sh, killed after
 * timeout seconds.  0 if it exited with status 0, else -1 after adding
 * why to e.
 */
static int
run_hook (const char *what, const char *cmd, int timeout, struct errs *e)
{
  int64_t deadline = monotonic_ms () + (int64_t) timeout * 1000;
  const struct timespec tick = { .tv_nsec = 5 * 1000 * 1000 };
  int status;
  pid_t pid, r;

  fflush (NULL);
  pid = fork ();
  if (pid == -1) {
    add_error (e, "%s: fork: %s", what, strerror (errno));
    return -1;
  }
  if (pid == 0) {
    setpgid (0, 0);
    execl ("/bin/sh", "sh", "-c", cmd, (char *) NULL);
    _exit (127);                /* the parent says "exit status 127" */
  }
  setpgid (pid, pid);
  while ((r = waitpid (pid, &status, WNOHANG)) == 0 &&
         monotonic_ms () < deadline)
    nanosleep (&tick, NULL);
  if (r == 0) {
    kill (-pid, SIGKILL);
    waitpid (pid, &status, 0);
    add_error (e, "%s '%s' did not finish within %d seconds: killed", what,
               cmd, timeout);
    return -1;
  }
  if (r == -1) {
    add_error (e, "%s: waitpid: %s", what, strerror (errno));
    return -1;
  }
  if (WIFEXITED (status) && WEXITSTATUS (status) == 0)
    return 0;
  if (WIFEXITED (status))
    add_error (e, "%s '%s' failed with exit status %d", what, cmd,
               WEXITSTATUS (status));
  else
    add_error (e, "%s '%s' was killed by signal %d", what, cmd,
               WTERMSIG (status));
  return -1;
}

/* What the coordinator keeps of each member during the run. */
struct state {
  bool connected;               /* by us: we close it */
  bool prepared;
  bool sent;                    /* the request of this round is sent */
  json_t *reply;                /* this round's return value */
};

/* Send cmd (with args, not consumed) to every member that wants it,
 * then read every reply: the servers work at once, so that each holds
 * its writes for the slowest round trip rather than for the sum of all.
 * Each return value lands in st[i].reply; returns how many failed.
 */
static size_t
round_all (struct group_opts *o, struct state *st, const char *cmd,
           json_t *args, bool prepared_only, const char *name,
           struct errs *e)
{
  json_t *req = json_pack ("{s:s,s:O}", "execute", cmd, "arguments", args);
  char *line = req ? json_dumps (req, JSON_COMPACT) : NULL;
  char err[1024];
  size_t i, failed = 0;
  const char *desc;
  json_t *reply;

  json_decref (req);
  if (line == NULL) {
    add_error (e, "group '%s': %s: out of memory", name, cmd);
    return o->n;
  }
  for (i = 0; i < o->n; i++) {
    st[i].sent = false;
    if (prepared_only && !st[i].prepared)
      continue;
    ctlc_set_label (o->members[i].ctl, cmd);
    if (ctlc_send_line (o->members[i].ctl, line, err, sizeof err) == -1) {
      add_error (e, "group '%s': %s: %s", name, o->members[i].path, err);
      o->members[i].broken = true;
      failed++;
      continue;
    }
    st[i].sent = true;
  }
  free (line);
  for (i = 0; i < o->n; i++) {
    const char *path = o->members[i].path;

    if (!st[i].sent)
      continue;
    reply = ctlc_reply (o->members[i].ctl, NULL, err, sizeof err);
    ctlc_set_label (o->members[i].ctl, NULL);
    if (reply == NULL) {
      add_error (e, "group '%s': %s: %s", name, path, err);
      o->members[i].broken = true;
    }
    else if (json_unpack (reply, "{s:{s:s}}", "error", "desc", &desc) == 0)
      add_error (e, "group '%s': %s: %s: %s", name, path, cmd, desc);
    else if ((st[i].reply = json_object_get (reply, "return")) != NULL)
      json_incref (st[i].reply);
    else
      add_error (e, "group '%s': %s: %s: a reply with neither \"return\" "
                 "nor \"error\"", name, path, cmd);
    failed += st[i].reply == NULL;
    json_decref (reply);
  }
  return failed;
}

/* Connect to every member the caller did not, then group-prepare on
 * all; -1 if any failed (st[i].prepared says which hold their writes).
 */
static int
prepare_all (struct group_opts *o, struct state *st, const char *id,
             const char *name, bool checkpoint, struct errs *e)
{
  char err[1024];
  json_t *args;
  size_t i, failed;

  for (i = 0; i < o->n; i++) {
    if (o->members[i].ctl)
      continue;
    o->members[i].ctl =
      o->connect ? o->connect (o->members[i].path, err, sizeof err)
      : ctlc_connect (o->members[i].path, (int64_t) o->timeout * 1000, err,
                      sizeof err);
    if (o->members[i].ctl == NULL) {
      add_error (e, "group '%s': %s", name, err);
      return -1;
    }
    st[i].connected = true;
  }
  args = json_pack ("{s:s,s:s,s:b,s:i}", "group", id, "name", name,
                    "checkpoint", checkpoint, "deadline-ms", o->deadline_ms);
  if (args == NULL) {
    add_error (e, "group '%s': the name is not valid UTF-8", name);
    return -1;
  }
  failed = round_all (o, st, "group-prepare", args, false, name, e);
  json_decref (args);
  for (i = 0; i < o->n; i++) {
    st[i].prepared = st[i].reply != NULL;
    json_decref (st[i].reply);
    st[i].reply = NULL;
  }
  return failed ? -1 : 0;
}

/* cmd {"group": id} to every member (or every prepared one). */
static size_t
round_id (struct group_opts *o, struct state *st, const char *cmd,
          const char *id, bool prepared_only, const char *name,
          struct errs *e)
{
  json_t *args = json_pack ("{s:s}", "group", id);
  size_t failed;

  if (args == NULL) {
    add_error (e, "group '%s': %s: out of memory", name, cmd);
    return o->n;
  }
  failed = round_all (o, st, cmd, args, prepared_only, name, e);
  json_decref (args);
  return failed;
}

/* Prepare all, then commit all, or abort those prepared. */
static enum group_outcome
two_phases (struct group_opts *o, struct state *st, const char *id,
            const char *name, bool checkpoint, struct errs *e)
{
  enum group_outcome outcome;
  size_t failed;

  if (prepare_all (o, st, id, name, checkpoint, e) == -1) {
    round_id (o, st, "group-abort", id, true, name, e);
    add_error (e, "group '%s': aborted: nothing was created", name);
    return GROUP_ABORTED;
  }
  if (o->on_prepared)
    o->on_prepared ();
  failed = round_id (o, st, "group-commit", id, false, name, e);
  outcome = failed == 0 ? GROUP_CREATED
    : failed < o->n ? GROUP_PARTIAL : GROUP_ABORTED;
  if (outcome == GROUP_PARTIAL)
    add_error (e, "group '%s': created on %zu of %zu servers only",
               name, o->n - failed, o->n);
  return outcome;
}

int
group_run (struct group_opts *o, const char *name, bool checkpoint,
           enum group_outcome *outcome, char *err, size_t errlen)
{
  struct errs e = { .buf = err, .len = errlen };
  struct state *st = calloc (o->n, sizeof *st);
  char id[64];
  size_t i;
  bool hooks;

  *outcome = GROUP_ABORTED;
  if (errlen)
    err[0] = '\0';
  for (i = 0; i < o->n; i++) {
    o->members[i].reply = NULL;
    o->members[i].broken = false;
  }
  if (st == NULL) {
    add_error (&e, "group '%s': calloc: %s", name, strerror (errno));
    return -1;
  }
  snprintf (id, sizeof id, "%s-%ld-%" PRIi64, o->id_prefix,
            (long) getpid (), monotonic_ns ());
  /* The environment is the hooks' only: without them it stays as it
   * is, so that a caller with other threads (fleece-colod) never has it
   * changed under a getenv.
   */
  hooks = o->pre_hook || o->post_hook;
  if (hooks) {
    setenv ("FLEECE_GROUP", id, 1);
    setenv ("FLEECE_GROUP_NAME", name, 1);
  }
  if (o->pre_hook && run_hook ("pre-hook", o->pre_hook, o->hook_timeout,
                               &e) == -1)
    add_error (&e, "group '%s': the pre-hook failed: nothing was created",
               name);
  else {
    /* Between the phases every server holds its writes until this
     * thread has read the last reply and sent the commits: it must not
     * wait for a CPU behind them (slice.h).  The hooks keep the slice
     * they had.
     */
    int64_t slice = slice_set (SLICE_GROUP_NS);

    *outcome = two_phases (o, st, id, name, checkpoint, &e);
    if (slice >= 0)
      slice_set (slice);
  }
  for (i = 0; i < o->n; i++) {
    o->members[i].reply = st[i].reply;
    if (st[i].connected) {
      ctlc_close (o->members[i].ctl);
      o->members[i].ctl = NULL;
    }
  }
  free (st);
  if (hooks)
    setenv ("FLEECE_GROUP_RESULT", *outcome == GROUP_CREATED ? "created"
            : *outcome == GROUP_PARTIAL ? "partial" : "aborted", 1);
  if (o->post_hook)
    run_hook ("post-hook", o->post_hook, o->hook_timeout, &e);
  return e.any ? -1 : 0;
}
