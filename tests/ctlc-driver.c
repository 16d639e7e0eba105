/* ctlc-driver: test-ctl-client.sh's driver of lib/ctl-client.c (not
 * installed, not a test itself).
 *
 *   ctlc-driver socket PATH CMD [JSON-ARGS]
 *   ctlc-driver spawn NAME CMD JSON-ARGS|- ARGV...
 *       run CMD on the server reached through the socket, or through the
 *       command ARGV (ctlc_spawn), and print its "return" value as JSON
 *   ctlc-driver events NAME N ARGV...
 *       subscribe through ARGV, print "subscribed", then the lines of N
 *       events as they came
 *
 * Every wait lasts at most $CTLC_TIMEOUT_MS (default 10000).  A failure
 * prints "ctlc-driver: MESSAGE" (the library's message) and exits 1.
 * After ctlc_close, the driver checks that no child is left to reap:
 * ctlc_close must have reaped the one ctlc_spawn started.  The driver
 * ignores SIGPIPE, as fleece-colod does, so that a test can check that
 * the child does not inherit that.
 */

#include <config.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <jansson.h>

#include "ctl-client.h"

static int
finish (struct ctlc *c, int status)
{
  ctlc_close (c);
  if (waitpid (-1, NULL, WNOHANG) != -1 || errno != ECHILD) {
    fprintf (stderr, "ctlc-driver: a child is left after ctlc_close\n");
    return 1;
  }
  return status;
}

static int
run_cmd (struct ctlc *c, const char *cmd, const char *jargs)
{
  char err[1024], *s;
  json_t *args = NULL, *ret;

  if (jargs && strcmp (jargs, "-") != 0) {
    json_error_t je;
    args = json_loads (jargs, 0, &je);
    if (args == NULL) {
      fprintf (stderr, "ctlc-driver: arguments: %s\n", je.text);
      return finish (c, 1);
    }
  }
  ret = ctlc_execute (c, cmd, args, err, sizeof err);
  if (ret == NULL) {
    fprintf (stderr, "ctlc-driver: %s\n", err);
    return finish (c, 1);
  }
  s = json_dumps (ret, JSON_COMPACT | JSON_ENCODE_ANY);
  printf ("%s\n", s ? s : "");
  free (s);
  json_decref (ret);
  return finish (c, 0);
}

static int
run_events (struct ctlc *c, int n)
{
  char err[1024], *line;
  json_t *ev;

  if (ctlc_subscribe (c, err, sizeof err) == -1) {
    fprintf (stderr, "ctlc-driver: %s\n", err);
    return finish (c, 1);
  }
  printf ("subscribed\n");
  fflush (stdout);
  for (; n > 0; n--) {
    if (ctlc_next_event (c, -1, &ev, &line, err, sizeof err) != 1) {
      fprintf (stderr, "ctlc-driver: %s\n", err);
      return finish (c, 1);
    }
    printf ("%s\n", line);
    fflush (stdout);
    json_decref (ev);
    free (line);
  }
  return finish (c, 0);
}

int
main (int argc, char *argv[])
{
  const char *t = getenv ("CTLC_TIMEOUT_MS");
  int64_t timeout = t ? atoll (t) : 10000;
  char err[1024];
  struct ctlc *c;

  signal (SIGPIPE, SIG_IGN);
  if (argc >= 4 && strcmp (argv[1], "socket") == 0) {
    c = ctlc_connect (argv[2], timeout, err, sizeof err);
    if (c == NULL)
      goto fail;
    return run_cmd (c, argv[3], argc > 4 ? argv[4] : NULL);
  }
  if (argc >= 6 && strcmp (argv[1], "spawn") == 0) {
    c = ctlc_spawn (argv[2], argv + 5, timeout, err, sizeof err);
    if (c == NULL)
      goto fail;
    return run_cmd (c, argv[3], argv[4]);
  }
  if (argc >= 5 && strcmp (argv[1], "events") == 0) {
    c = ctlc_spawn (argv[2], argv + 4, timeout, err, sizeof err);
    if (c == NULL)
      goto fail;
    return run_events (c, atoi (argv[3]));
  }
  fprintf (stderr, "ctlc-driver: see the comment at the top of "
           "tests/ctlc-driver.c for the usage\n");
  return 2;
 fail:
  fprintf (stderr, "ctlc-driver: %s\n", err);
  if (waitpid (-1, NULL, WNOHANG) != -1 || errno != ECHILD) {
    fprintf (stderr, "ctlc-driver: a child is left after a failed "
             "ctlc_spawn\n");
    return 1;
  }
  return 1;
}
