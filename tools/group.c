/* fleecectl's consistency groups: `fleecectl -s S1 -s S2 ... snapshot
 * create NAME` (or `checkpoint NAME`), the coordinator of the two-phase
 * protocol of docs/control-protocol.md ("Consistency groups").
 *
 * Order: the pre-hook; connect to every server; group-prepare on each in
 * turn (each drains and holds its writes); once all hold, group-commit on
 * each; the post-hook.  Anything that fails before the first commit
 * (the pre-hook, a connection, a prepare) aborts the servers already
 * prepared, so nothing is created.  The post-hook runs whatever
 * happened, once the servers are released, told the outcome in
 * FLEECE_GROUP_RESULT.  Should this process die or stall between the
 * phases, every server releases at its deadline (--deadline) or when
 * the connection closes, and refuses a later commit.
 *
 * Hooks run through /bin/sh -c in a process group of their own, so that
 * a hook that outlives --hook-timeout is killed with everything it
 * started; a hook that timed out has failed.
 *
 * FLEECECTL_GROUP_STOP=prepared (for the tests): once every server is
 * prepared, say so on stderr and stop (SIGSTOP), so that a test can kill
 * it, as a coordinator that died between the phases, or continue it
 * later, as one that stalled.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>

#include <jansson.h>

#include "monotonic.h"
#include "ctl-client.h"
#include "messages.h"
#include "group.h"

/* Run hook cmd (which says what it is) with /bin/sh, killed after
 * timeout seconds.  0 if it exited with status 0, else -1 after a
 * message.
 */
static int
run_hook (const char *what, const char *cmd, int timeout)
{
  int64_t deadline = monotonic_ms () + (int64_t) timeout * 1000;
  const struct timespec tick = { .tv_nsec = 5 * 1000 * 1000 };
  int status;
  pid_t pid, r;

  fflush (NULL);
  pid = fork ();
  if (pid == -1) {
    warn ("%s: fork: %m", what);
    return -1;
  }
  if (pid == 0) {
    setpgid (0, 0);
    execl ("/bin/sh", "sh", "-c", cmd, (char *) NULL);
    fprintf (stderr, "fleecectl: %s: /bin/sh: %s\n", what, strerror (errno));
    _exit (127);
  }
  setpgid (pid, pid);
  while ((r = waitpid (pid, &status, WNOHANG)) == 0 &&
         monotonic_ms () < deadline)
    nanosleep (&tick, NULL);
  if (r == 0) {
    kill (-pid, SIGKILL);
    waitpid (pid, &status, 0);
    warn ("%s '%s' did not finish within %d seconds: killed", what, cmd,
          timeout);
    return -1;
  }
  if (r == -1) {
    warn ("%s: waitpid: %m", what);
    return -1;
  }
  if (WIFEXITED (status) && WEXITSTATUS (status) == 0)
    return 0;
  if (WIFEXITED (status))
    warn ("%s '%s' failed with exit status %d", what, cmd,
          WEXITSTATUS (status));
  else
    warn ("%s '%s' was killed by signal %d", what, cmd,
          WTERMSIG (status));
  return -1;
}

struct member {
  const char *path;
  struct ctlc *ctl;
  bool prepared;
  json_t *reply;                /* the commit's return value */
};

/* group-prepare on every member in turn; -1 at the first failure. */
static int
prepare_all (const struct group_opts *o, struct member *m, const char *id,
             const char *name, bool checkpoint)
{
  char err[1024];
  json_t *ret;
  size_t i;

  for (i = 0; i < o->nsockets; i++) {
    m[i].ctl = ctlc_connect (m[i].path, (int64_t) o->timeout * 1000, err,
                             sizeof err);
    if (m[i].ctl == NULL) {
      warn ("group '%s': %s", name, err);
      return -1;
    }
  }
  for (i = 0; i < o->nsockets; i++) {
    ret = ctlc_execute (m[i].ctl, "group-prepare",
                        json_pack ("{s:s,s:s,s:b,s:i}", "group", id,
                                   "name", name, "checkpoint", checkpoint,
                                   "deadline-ms", o->deadline_ms),
                        err, sizeof err);
    if (ret == NULL) {
      warn ("group '%s': %s: %s", name, m[i].path, err);
      return -1;
    }
    json_decref (ret);
    m[i].prepared = true;
  }
  return 0;
}

static void
abort_all (struct member *m, size_t n, const char *id)
{
  char err[1024];
  json_t *ret;
  size_t i;

  for (i = 0; i < n; i++) {
    if (!m[i].prepared)
      continue;
    ret = ctlc_execute (m[i].ctl, "group-abort",
                        json_pack ("{s:s}", "group", id), err, sizeof err);
    if (ret == NULL)
      warn ("group abort: %s: %s", m[i].path, err);
    json_decref (ret);
  }
}

/* group-commit on every member; the number that failed. */
static size_t
commit_all (struct member *m, size_t n, const char *id, const char *name)
{
  char err[1024];
  size_t i, failed = 0;

  for (i = 0; i < n; i++) {
    m[i].reply = ctlc_execute (m[i].ctl, "group-commit",
                               json_pack ("{s:s}", "group", id),
                               err, sizeof err);
    if (m[i].reply == NULL) {
      warn ("group '%s': %s: %s", name, m[i].path, err);
      failed++;
    }
  }
  return failed;
}

static void
print_result (const struct group_opts *o, struct member *m, const char *name,
              bool checkpoint)
{
  json_t *all = json_array ();
  char *s;
  size_t i;

  for (i = 0; i < o->nsockets; i++) {
    json_t *r = m[i].reply;
    if (r == NULL)
      continue;
    if (o->json) {
      json_object_set_new (r, "socket", json_string (m[i].path));
      json_array_append (all, r);
      continue;
    }
    printf ("%s '%s' created on %s: generation %" JSON_INTEGER_FORMAT
            ", writers held %.3f ms\n", checkpoint ? "checkpoint"
            : "snapshot", name, m[i].path,
            json_integer_value (json_object_get (r, "generation")),
            json_integer_value (json_object_get (r, "hold-ns")) / 1e6);
  }
  if (o->json) {
    s = json_dumps (all, JSON_COMPACT);
    printf ("%s\n", s ? s : "[]");
    free (s);
  }
  json_decref (all);
}

/* Stop (SIGSTOP) between the phases: killed, a coordinator that died;
 * continued, one that stalled.
 */
static void
debug_stop (void)
{
  const char *stop = getenv ("FLEECECTL_GROUP_STOP");

  if (stop == NULL || strcmp (stop, "prepared") != 0)
    return;
  fprintf (stderr, "fleecectl: FLEECECTL_GROUP_STOP=prepared: every "
           "server is prepared, stopping here\n");
  raise (SIGSTOP);
}

int
group_run (const struct group_opts *o, const char *name, bool checkpoint)
{
  struct member *m = calloc (o->nsockets, sizeof *m);
  char id[64];
  size_t i, failed = 0;
  bool created = false;
  int status = EXIT_FAILURE;

  if (m == NULL)
    die ("group: out of memory");
  snprintf (id, sizeof id, "fleecectl-%ld-%" PRIi64, (long) getpid (),
            monotonic_ns ());
  for (i = 0; i < o->nsockets; i++)
    m[i].path = o->sockets[i];
  setenv ("FLEECE_GROUP", id, 1);
  setenv ("FLEECE_GROUP_NAME", name, 1);
  if (o->pre_hook && run_hook ("pre-hook", o->pre_hook,
                               o->hook_timeout) == -1)
    warn ("group '%s': the pre-hook failed: nothing was created", name);
  else if (prepare_all (o, m, id, name, checkpoint) == -1) {
    abort_all (m, o->nsockets, id);
    warn ("group '%s': aborted: nothing was created", name);
  }
  else {
    debug_stop ();
    failed = commit_all (m, o->nsockets, id, name);
    created = failed < o->nsockets;
    if (failed && created)
      warn ("group '%s': created on %zu of %zu servers only", name,
            o->nsockets - failed, o->nsockets);
    if (created)
      print_result (o, m, name, checkpoint);
    status = failed ? EXIT_FAILURE : EXIT_SUCCESS;
  }
  for (i = 0; i < o->nsockets; i++) {
    ctlc_close (m[i].ctl);
    json_decref (m[i].reply);
  }
  free (m);
  setenv ("FLEECE_GROUP_RESULT", status == EXIT_SUCCESS ? "created"
          : created ? "partial" : "aborted", 1);
  if (o->post_hook && run_hook ("post-hook", o->post_hook,
                                o->hook_timeout) == -1)
    status = EXIT_FAILURE;
  return status;
}
