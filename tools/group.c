/* fleecectl's consistency groups: `fleecectl -s S1 -s S2 ... snapshot
 * create NAME` (or `checkpoint NAME`), the coordinator of the two-phase
 * protocol of docs/control-protocol.md ("Consistency groups").
 *
 * Order: the pre-hook; connect to every server; group-prepare to all of
 * them at once (each drains and holds its writes), then wait for every
 * reply; once all hold, group-commit to all at once; the post-hook.
 * Sending to all before reading any reply keeps each server's hold to
 * about one round trip of the slowest, whatever the number of servers.  Anything that fails before the first commit
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
  bool sent;                    /* the request of this round is sent */
  json_t *reply;                /* this round's return value */
};

/* Send cmd (with args, not consumed) to every member that wants it,
 * then read every reply: the servers work at once, so that each holds
 * its writes for the slowest round trip rather than for the sum of all.
 * Each return value lands in m[i].reply; returns how many failed.
 */
static size_t
round_all (struct member *m, size_t n, const char *cmd, json_t *args,
           bool prepared_only, const char *name)
{
  json_t *req = json_pack ("{s:s,s:O}", "execute", cmd, "arguments", args);
  char *line = req ? json_dumps (req, JSON_COMPACT) : NULL;
  char err[1024];
  size_t i, failed = 0;
  const char *desc;
  json_t *reply;

  json_decref (req);
  if (line == NULL)
    die ("group '%s': %s: out of memory", name, cmd);
  for (i = 0; i < n; i++) {
    m[i].sent = false;
    if (prepared_only && !m[i].prepared)
      continue;
    ctlc_set_label (m[i].ctl, cmd);
    if (ctlc_send_line (m[i].ctl, line, err, sizeof err) == -1) {
      warn ("group '%s': %s: %s", name, m[i].path, err);
      failed++;
      continue;
    }
    m[i].sent = true;
  }
  free (line);
  for (i = 0; i < n; i++) {
    if (!m[i].sent)
      continue;
    reply = ctlc_reply (m[i].ctl, NULL, err, sizeof err);
    if (reply == NULL)
      warn ("group '%s': %s: %s", name, m[i].path, err);
    else if (json_unpack (reply, "{s:{s:s}}", "error", "desc", &desc) == 0)
      warn ("group '%s': %s: %s: %s", name, m[i].path, cmd, desc);
    else if ((m[i].reply = json_object_get (reply, "return")) != NULL)
      json_incref (m[i].reply);
    else
      warn ("group '%s': %s: %s: a reply with neither \"return\" nor "
            "\"error\"", name, m[i].path, cmd);
    failed += m[i].reply == NULL;
    json_decref (reply);
  }
  return failed;
}

/* Connect to every member, then group-prepare on all; -1 if any
 * failed (m[i].prepared says which hold their writes).
 */
static int
prepare_all (const struct group_opts *o, struct member *m, const char *id,
             const char *name, bool checkpoint)
{
  char err[1024];
  json_t *args;
  size_t i, failed;

  for (i = 0; i < o->nsockets; i++) {
    m[i].ctl = ctlc_connect (m[i].path, (int64_t) o->timeout * 1000, err,
                             sizeof err);
    if (m[i].ctl == NULL) {
      warn ("group '%s': %s", name, err);
      return -1;
    }
  }
  args = json_pack ("{s:s,s:s,s:b,s:i}", "group", id, "name", name,
                    "checkpoint", checkpoint, "deadline-ms", o->deadline_ms);
  if (args == NULL)
    die ("group '%s': the name is not valid UTF-8", name);
  failed = round_all (m, o->nsockets, "group-prepare", args, false, name);
  json_decref (args);
  for (i = 0; i < o->nsockets; i++) {
    m[i].prepared = m[i].reply != NULL;
    json_decref (m[i].reply);
    m[i].reply = NULL;
  }
  return failed ? -1 : 0;
}

/* cmd {"group": id} to every member (or every prepared one). */
static size_t
round_id (struct member *m, size_t n, const char *cmd, const char *id,
          bool prepared_only, const char *name)
{
  json_t *args = json_pack ("{s:s}", "group", id);
  size_t failed;

  if (args == NULL)
    die ("group '%s': %s: out of memory", name, cmd);
  failed = round_all (m, n, cmd, args, prepared_only, name);
  json_decref (args);
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
    round_id (m, o->nsockets, "group-abort", id, true, name);
    warn ("group '%s': aborted: nothing was created", name);
  }
  else {
    debug_stop ();
    failed = round_id (m, o->nsockets, "group-commit", id, false, name);
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
