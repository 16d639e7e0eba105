/* fleecectl: the command line client of the control socket
 * (docs/control-protocol.md, fleecectl(1)).
 *
 * One connection per run: read the greeting, send one request, print its
 * reply.  The connection, its greeting, replies and events are
 * lib/ctl-client.c's (this file holds the command line and the output):
 * every read skips event lines until the reply comes; "events" does the
 * opposite and prints only those.  Every wait is bounded by --timeout
 * (the events command's own --timeout bounds how long it listens), so a
 * wedged server never hangs a script.  "relay" does not parse at all: it
 * copies stdin and stdout to and from the socket, so that a client on
 * another host reaches the socket through ssh.
 *
 * Output is for people unless --json is given, in which case the reply's
 * "return" value is printed as compact JSON on one line, for scripts.
 * Exit status: 0 success, 1 the request or the connection failed, 2 the
 * command line is wrong.
 */

#include <config.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "cleanup.h"
#include "monotonic.h"
#include "vector.h"
#include "ctl-client.h"
#include "messages.h"
#include "group.h"

struct conn {
  const char *path;
  const char *label;            /* the command, for error messages */
  int timeout;                  /* seconds */
  struct ctlc *ctl;             /* NULL until conn_greeting */
};

static bool json_output;

/* Several -s, or a hook: snapshot create and checkpoint make a
 * consistency group (lib/group.c, the coordinator fleece-backup shares).
 */
static struct group_opts group = { .id_prefix = "fleecectl",
                                   .hook_timeout = 30,
                                   .deadline_ms = 1000 };

static bool
grouped (void)
{
  return group.n > 1 || group.pre_hook || group.post_hook;
}

/* FLEECECTL_GROUP_STOP=prepared (for the tests): once every server is
 * prepared, say so and stop (SIGSTOP), so that a test can kill the
 * coordinator, as one that died between the phases, or continue it
 * later, as one that stalled.
 */
static void
group_debug_stop (void)
{
  const char *stop = getenv ("FLEECECTL_GROUP_STOP");

  if (stop == NULL || strcmp (stop, "prepared") != 0)
    return;
  fprintf (stderr, "fleecectl: FLEECECTL_GROUP_STOP=prepared: every "
           "server is prepared, stopping here\n");
  raise (SIGSTOP);
}

/* The group's commit replies: a line per server, or one JSON array. */
static void
group_print (const char *name, bool checkpoint)
{
  json_t *all = json_array ();
  char *s;
  size_t i;

  for (i = 0; i < group.n; i++) {
    json_t *r = group.members[i].reply;
    if (r == NULL)
      continue;
    if (json_output) {
      json_object_set_new (r, "socket", json_string (group.members[i].path));
      json_array_append (all, r);
      continue;
    }
    printf ("%s '%s' created on %s: generation %" JSON_INTEGER_FORMAT
            ", writers held %.3f ms\n", checkpoint ? "checkpoint"
            : "snapshot", name, group.members[i].path,
            json_integer_value (json_object_get (r, "generation")),
            json_integer_value (json_object_get (r, "hold-ns")) / 1e6);
  }
  if (json_output) {
    s = json_dumps (all, JSON_COMPACT);
    printf ("%s\n", s ? s : "[]");
    free (s);
  }
  json_decref (all);
}

/* Snapshot (or checkpoint) name on every -s at one instant, or on none:
 * the exit status.
 */
static int
run_group (const char *name, bool checkpoint)
{
  enum group_outcome outcome;
  char err[4096];
  int r = group_run (&group, name, checkpoint, &outcome, err, sizeof err);
  size_t i;

  if (outcome != GROUP_ABORTED)
    group_print (name, checkpoint);
  if (r == -1)
    warn ("%s", err);
  for (i = 0; i < group.n; i++)
    json_decref (group.members[i].reply);
  return r == -1 ? EXIT_FAILURE : EXIT_SUCCESS;
}

static void __attribute__ ((noreturn))
usage (void)
{
  printf ("fleecectl: control a Fleece server through its control "
          "socket\n"
          "\n"
          "Usage:\n"
          "  fleecectl [OPTIONS] status\n"
          "  fleecectl [OPTIONS] stats\n"
          "  fleecectl [OPTIONS] metrics\n"
          "  fleecectl [OPTIONS] snapshot create NAME\n"
          "  fleecectl [OPTIONS] snapshot delete NAME\n"
          "  fleecectl [OPTIONS] snapshot list\n"
          "  fleecectl [OPTIONS] checkpoint NAME\n"
          "  fleecectl [OPTIONS] bitmap add NAME [--disabled]\n"
          "  fleecectl [OPTIONS] bitmap remove|clear|enable|disable NAME\n"
          "  fleecectl [OPTIONS] bitmap merge TARGET SOURCE...\n"
          "  fleecectl [OPTIONS] bitmap list\n"
          "  fleecectl [OPTIONS] raw JSON-LINE\n"
          "  fleecectl [OPTIONS] events [--timeout SECONDS]\n"
          "  fleecectl [OPTIONS] relay\n"
          "\n"
          "Options (before the command):\n"
          "  -s, --socket PATH     control socket (default: $FLEECE_SOCKET);\n"
          "                        several: snapshot create and checkpoint\n"
          "                        make one group over all of them\n"
          "  --pre-hook CMD        run CMD (/bin/sh -c) before the group\n"
          "  --post-hook CMD       run CMD after the group, whatever happened\n"
          "  --hook-timeout SECONDS  kill a hook after this long (default 30)\n"
          "  --deadline MS         servers hold writes at most this long\n"
          "                        (default 1000)\n"
          "  -j, --json            print the reply's return value as JSON\n"
          "  -t, --timeout SECONDS wait at most this long for a reply "
          "(default 30)\n"
          "  -h, --help            show this help\n"
          "  -V, --version         show the version\n");
  exit (EXIT_SUCCESS);
}

static int
parse_seconds (const char *opt, const char *s)
{
  char *end;
  long v;

  errno = 0;
  v = strtol (s, &end, 10);
  if (errno || end == s || *end || v <= 0 || v > 86400 * 365)
    usage_error ("%s: '%s' is not a number of seconds between 1 and "
                 "31536000", opt, s);
  return v;
}

/* ---- The connection (lib/ctl-client.c) ---- */

/* Connect and read the greeting.  Called once the command line has been
 * checked: a usage error exits 2 whether or not the server is there.
 */
static void
conn_greeting (struct conn *c)
{
  char err[1024];

  c->ctl = ctlc_connect (c->path, (int64_t) c->timeout * 1000, err,
                         sizeof err);
  if (c->ctl == NULL)
    die ("%s", err);
  ctlc_set_label (c->ctl, c->label);
}

/* Run cmd and return its "return" value; exit on an error reply. */
static json_t *
execute (struct conn *c, const char *cmd, json_t *args)
{
  char err[1024];
  json_t *ret = ctlc_execute (c->ctl, cmd, args, err, sizeof err);

  if (ret == NULL)
    die ("%s", err);
  return ret;
}

/* ---- Human output ---- */

static const char *
human_size (uint64_t v, char *buf, size_t size)
{
  static const char *units[] = { "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
  double d = v;
  int u = -1;

  if (v < 1024) {
    snprintf (buf, size, "%" PRIu64 " bytes", v);
    return buf;
  }
  while (d >= 1024 && u < 5) {
    d /= 1024;
    u++;
  }
  if (d < 1000 && d == (uint64_t) d)
    snprintf (buf, size, "%d %s", (int) d, units[u]);
  else
    snprintf (buf, size, "%.1f %s", d, units[u]);
  return buf;
}

static const char *
human_ns (uint64_t ns, char *buf, size_t size)
{
  if (ns < 1000)
    snprintf (buf, size, "%" PRIu64 " ns", ns);
  else if (ns < 1000000)
    snprintf (buf, size, "%.1f us", ns / 1e3);
  else if (ns < UINT64_C (1000000000))
    snprintf (buf, size, "%.1f ms", ns / 1e6);
  else
    snprintf (buf, size, "%.2f s", ns / 1e9);
  return buf;
}

static const char *
human_duration (uint64_t s, char *buf, size_t size)
{
  if (s < 60)
    snprintf (buf, size, "%" PRIu64 "s", s);
  else if (s < 3600)
    snprintf (buf, size, "%" PRIu64 "m %" PRIu64 "s", s / 60, s % 60);
  else if (s < 86400)
    snprintf (buf, size, "%" PRIu64 "h %" PRIu64 "m", s / 3600,
              s / 60 % 60);
  else
    snprintf (buf, size, "%" PRIu64 "d %" PRIu64 "h", s / 86400,
              s / 3600 % 24);
  return buf;
}

static bool
ends_with (const char *s, const char *suffix)
{
  size_t ls = strlen (s), lx = strlen (suffix);

  return ls >= lx && strcmp (s + ls - lx, suffix) == 0;
}

/* An integer member, with what it means to a person in brackets. */
static void
print_integer (const char *key, json_int_t v)
{
  char buf[64];

  printf ("%" JSON_INTEGER_FORMAT, v);
  if (v < 0)
    ;
  else if ((strstr (key, "bytes") || ends_with (key, "-size")) && v >= 1024)
    printf (" (%s)", human_size (v, buf, sizeof buf));
  else if (ends_with (key, "-ns") && v > 0)
    printf (" (%s)", human_ns (v, buf, sizeof buf));
  else if (strcmp (key, "uptime") == 0)
    printf (" (%s)", human_duration (v, buf, sizeof buf));
}

/* The scalar members of obj as "key: value" lines, values aligned. */
static void
print_members (json_t *obj)
{
  const char *key;
  json_t *v;
  int width = 0;

  json_object_foreach (obj, key, v)
    if (!json_is_array (v) && !json_is_object (v) &&
        (int) strlen (key) > width)
      width = strlen (key);
  json_object_foreach (obj, key, v) {
    if (json_is_array (v) || json_is_object (v))
      continue;
    printf ("%s:%*s", key, width + 2 - (int) strlen (key), "");
    if (json_is_string (v))
      printf ("%s", json_string_value (v));
    else if (json_is_integer (v))
      print_integer (key, json_integer_value (v));
    else if (json_is_boolean (v))
      printf ("%s", json_is_true (v) ? "yes" : "no");
    else
      printf ("%s", json_is_null (v) ? "-" : "?");
    printf ("\n");
  }
}

static void
print_json (json_t *v)
{
  CLEANUP_FREE char *s = json_dumps (v, JSON_COMPACT | JSON_ENCODE_ANY);

  if (s == NULL)
    die ("out of memory");
  printf ("%s\n", s);
}

/* ---- Tables ---- */

#define MAX_COLS 7

DEFINE_VECTOR_TYPE (string_vector, char *);

struct table {
  int ncols;
  const char *head[MAX_COLS];
  bool right[MAX_COLS];         /* right-aligned (numbers) */
  string_vector cell;           /* nrows * ncols, malloc'd strings */
  size_t nrows;
};

static void
table_add (struct table *t, ...)
{
  va_list ap;
  int i;

  if (string_vector_reserve (&t->cell, t->ncols) == -1)
    die ("out of memory");
  va_start (ap, t);
  for (i = 0; i < t->ncols; i++) {
    char *s = strdup (va_arg (ap, const char *));
    if (s == NULL)
      die ("out of memory");
    t->cell.ptr[t->cell.len++] = s;
  }
  va_end (ap);
  t->nrows++;
}

static void
table_print_row (const struct table *t, const int *w, const char **row)
{
  int i;

  for (i = 0; i < t->ncols; i++) {
    const char *sep = i + 1 < t->ncols ? "  " : "";
    if (t->right[i])
      printf ("%*s%s", w[i], row[i], sep);
    else if (i + 1 < t->ncols)
      printf ("%-*s%s", w[i], row[i], sep);
    else
      printf ("%s", row[i]);
  }
  printf ("\n");
}

/* Print and free. */
static void
table_print (struct table *t)
{
  int w[MAX_COLS], i;
  size_t r;

  for (i = 0; i < t->ncols; i++) {
    w[i] = strlen (t->head[i]);
    for (r = 0; r < t->nrows; r++)
      if ((int) strlen (t->cell.ptr[r * t->ncols + i]) > w[i])
        w[i] = strlen (t->cell.ptr[r * t->ncols + i]);
  }
  table_print_row (t, w, t->head);
  for (r = 0; r < t->nrows; r++)
    table_print_row (t, w, (const char **) &t->cell.ptr[r * t->ncols]);
  for (r = 0; r < t->cell.len; r++)
    free (t->cell.ptr[r]);
  string_vector_reset (&t->cell);
}

static const char *
int_member (json_t *obj, const char *key, char *buf, size_t size)
{
  json_t *v = json_object_get (obj, key);

  if (!json_is_integer (v))
    return "-";
  snprintf (buf, size, "%" JSON_INTEGER_FORMAT, json_integer_value (v));
  return buf;
}

static const char *
str_member (json_t *obj, const char *key)
{
  const char *s = json_string_value (json_object_get (obj, key));

  return s ? s : "-";
}

/* ---- Commands ---- */

/* Run a query.  With --json its value is printed here and NULL
 * returned: nothing is left to do.  Otherwise the value is returned for
 * the human output.
 */
static json_t *
query (struct conn *c, const char *cmd)
{
  json_t *ret = execute (c, cmd, NULL);

  if (!json_output)
    return ret;
  print_json (ret);
  json_decref (ret);
  return NULL;
}

static void
do_status (struct conn *c)
{
  json_t *ret = query (c, "query-status");

  if (ret)
    print_members (ret);
  json_decref (ret);
}

/* metrics: the Prometheus text as it is (with --json, the reply). */
static void
do_metrics (struct conn *c)
{
  json_t *ret = query (c, "metrics");

  if (ret)
    fputs (json_string_value (json_object_get (ret, "text")) ?: "", stdout);
  json_decref (ret);
}

static void
do_stats (struct conn *c)
{
  json_t *ret = query (c, "query-stats");
  struct table t = { .ncols = 3, .head = { "SNAPSHOT", "HELD", "RELEASED" },
                     .right = { false, true, true } };
  char b1[32], b2[32];
  json_t *snaps, *s;
  size_t i;

  if (ret == NULL)
    return;
  print_members (ret);
  snaps = json_object_get (ret, "snapshot-clusters");
  if (json_array_size (snaps) > 0) {
    printf ("\n");
    json_array_foreach (snaps, i, s)
      table_add (&t, str_member (s, "name"),
                 int_member (s, "clusters-held", b1, sizeof b1),
                 int_member (s, "clusters-released", b2, sizeof b2));
    table_print (&t);
  }
  json_decref (ret);
}

/* After a table: why each element of list whose member state is true
 * is so, from its member "STATE-reason".
 */
static void
print_reasons (json_t *list, const char *what, const char *state)
{
  char reason[64];
  json_t *e;
  size_t i;

  snprintf (reason, sizeof reason, "%s-reason", state);
  json_array_foreach (list, i, e)
    if (json_is_true (json_object_get (e, state)))
      printf ("%s '%s' is %s: %s\n", what, str_member (e, "name"), state,
              str_member (e, reason));
}

static const char *
created_time (json_t *snap, char *buf, size_t size)
{
  json_t *v = json_object_get (snap, "created");
  time_t t = json_integer_value (v);
  struct tm tm;

  if (!json_is_integer (v) || localtime_r (&t, &tm) == NULL ||
      strftime (buf, size, "%Y-%m-%d %H:%M:%S", &tm) == 0)
    return "-";
  return buf;
}

static void
snapshot_list (struct conn *c)
{
  json_t *ret = query (c, "query-snapshots"), *s;
  struct table t = { .ncols = 6,
                     .head = { "NAME", "GEN", "CREATED", "STATE", "HELD",
                               "RELEASED" },
                     .right = { false, true, false, false, true, true } };
  char b1[32], b2[32], b3[32], b4[32];
  size_t i;

  if (ret == NULL)
    return;
  json_array_foreach (ret, i, s)
    table_add (&t, str_member (s, "name"),
               int_member (s, "generation", b1, sizeof b1),
               created_time (s, b2, sizeof b2),
               json_is_true (json_object_get (s, "broken")) ? "broken" : "ok",
               int_member (s, "clusters-held", b3, sizeof b3),
               int_member (s, "clusters-released", b4, sizeof b4));
  table_print (&t);
  print_reasons (ret, "snapshot", "broken");
  json_decref (ret);
}

static void
snapshot_change (struct conn *c, const char *cmd, const char *name)
{
  json_t *args = json_pack ("{s:s}", "name", name), *ret, *gen;

  if (args == NULL)
    die ("%s: the name is not valid UTF-8", c->label);
  ret = execute (c, cmd, args);
  gen = json_object_get (ret, "generation");

  if (json_output)
    print_json (ret);
  else if (gen)
    printf ("snapshot '%s' created, generation %" JSON_INTEGER_FORMAT "\n",
            name, json_integer_value (gen));
  else
    printf ("snapshot '%s' deleted\n", name);
  json_decref (ret);
}

/* Send line as it is, print the reply line as it is. */
static int
do_raw (struct conn *c, const char *line)
{
  CLEANUP_FREE char *text = NULL;
  char err[1024];
  json_t *reply;
  int status;

  if (ctlc_send_line (c->ctl, line, err, sizeof err) == -1 ||
      (reply = ctlc_reply (c->ctl, &text, err, sizeof err)) == NULL)
    die ("%s", err);
  printf ("%s\n", text);
  status = json_object_get (reply, "return") ? EXIT_SUCCESS : EXIT_FAILURE;
  json_decref (reply);
  return status;
}

/* An event line for a person: time, name, then the data members. */
static void
print_event (json_t *ev)
{
  json_int_t sec = 0, usec = 0;
  const char *name = "?", *key;
  char when[64] = "-";
  json_t *data, *v;
  struct tm tm;
  time_t t;

  json_unpack (ev, "{s:s,s?{s:I,s:I}}", "event", &name, "timestamp",
               "seconds", &sec, "microseconds", &usec);
  t = sec;
  if (localtime_r (&t, &tm))
    strftime (when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
  printf ("%s.%06d %s", when, (int) usec, name);
  data = json_object_get (ev, "data");
  json_object_foreach (data, key, v) {
    if (json_is_string (v))
      printf (" %s=%s", key, json_string_value (v));
    else {
      char *s = json_dumps (v, JSON_COMPACT | JSON_ENCODE_ANY);
      printf (" %s=%s", key, s ? s : "?");
      free (s);
    }
  }
  printf ("\n");
}

/* Subscribe (so that the server keeps the connection however long no
 * event comes), then print events as they come, including any that come
 * before the reply, until duration seconds (-1: forever) have passed.
 */
static int
do_events (struct conn *c, int duration)
{
  int64_t deadline = duration < 0 ? -1
    : monotonic_ms () + (int64_t) duration * 1000;
  char err[1024];
  json_t *ev;
  char *line;
  int r;

  ctlc_set_label (c->ctl, NULL);        /* errors name subscribe-events */
  if (ctlc_subscribe (c->ctl, err, sizeof err) == -1)
    die ("%s", err);
  while ((r = ctlc_next_event (c->ctl, deadline, &ev, &line, err,
                               sizeof err)) == 1) {
    if (json_output)
      printf ("%s\n", line);
    else
      print_event (ev);
    fflush (stdout);
    json_decref (ev);
    free (line);
  }
  if (r == -1)
    die ("%s", err);
  return EXIT_SUCCESS;
}

/* Copy stdin to the socket and the socket to stdout (for ssh; see
 * fleecectl(1)).  The greeting and every line pass untouched.
 */
static int
do_relay (struct conn *c)
{
  char err[1024];

  signal (SIGPIPE, SIG_IGN);    /* a reader gone is the end, not a kill */
  if (ctlc_relay (c->path, STDIN_FILENO, STDOUT_FILENO, err,
                  sizeof err) == -1)
    die ("%s", err);
  return EXIT_SUCCESS;
}

/* ---- Command line ---- */

static void
want_args (const char *cmd, int argc, char **argv, int n, const char *what)
{
  if (argc < n)
    usage_error ("%s: missing %s", cmd, what);
  if (argc > n)
    usage_error ("%s: unexpected argument '%s'", cmd, argv[n]);
}

static int
run_snapshot (struct conn *c, int argc, char **argv)
{
  const char *sub = argc > 1 ? argv[1] : "";

  if (strcmp (sub, "list") == 0) {
    c->label = "snapshot list";
    want_args (c->label, argc, argv, 2, "");
    conn_greeting (c);
    snapshot_list (c);
  }
  else if (strcmp (sub, "create") == 0 || strcmp (sub, "delete") == 0) {
    c->label = strcmp (sub, "create") == 0 ? "snapshot create"
      : "snapshot delete";
    want_args (c->label, argc, argv, 3, "NAME");
    if (grouped ())
      return run_group (argv[2], false);
    conn_greeting (c);
    snapshot_change (c, strcmp (sub, "create") == 0 ? "snapshot-create"
                     : "snapshot-delete", argv[2]);
  }
  else
    usage_error ("snapshot: expected 'create NAME', 'delete NAME' or "
                 "'list'");
  return EXIT_SUCCESS;
}

/* ---- Bitmaps and checkpoints ---- */

static void
bitmap_list (struct conn *c)
{
  json_t *ret = query (c, "query-bitmaps"), *b;
  struct table t = { .ncols = 6,
                     .head = { "NAME", "STATE", "DIRTY", "OF", "GRANULE",
                               "FROZEN-BY" },
                     .right = { false, false, true, true, true, false } };
  char b1[32], b2[32], b3[32];
  size_t i;

  if (ret == NULL)
    return;
  json_array_foreach (ret, i, b) {
    const char *state =
      json_is_true (json_object_get (b, "inconsistent")) ? "inconsistent"
      : json_is_true (json_object_get (b, "frozen")) ? "frozen"
      : json_is_true (json_object_get (b, "enabled")) ? "recording"
      : "disabled";
    const char *by = str_member (b, "frozen-by");
    table_add (&t, str_member (b, "name"), state,
               int_member (b, "count", b1, sizeof b1),
               int_member (b, "bit-count", b2, sizeof b2),
               int_member (b, "granularity", b3, sizeof b3),
               by && *by ? by : "-");
  }
  table_print (&t);
  print_reasons (ret, "bitmap", "inconsistent");
  json_decref (ret);
}

/* Run cmd with args (consumed) and report it done. */
static void
change (struct conn *c, const char *cmd, json_t *args, const char *done)
{
  json_t *ret;

  if (args == NULL)
    die ("%s: the arguments are not valid UTF-8", c->label);
  ret = execute (c, cmd, args);
  if (json_output)
    print_json (ret);
  else
    printf ("%s\n", done);
  json_decref (ret);
}

static int
run_bitmap (struct conn *c, int argc, char **argv)
{
  static const char *const simple[][2] = {
    { "remove", "bitmap-remove" }, { "clear", "bitmap-clear" },
    { "enable", "bitmap-enable" }, { "disable", "bitmap-disable" },
  };
  const char *sub = argc > 1 ? argv[1] : "";
  char label[64], done[512];
  size_t i;

  snprintf (label, sizeof label, "bitmap %s", sub);
  c->label = label;
  if (strcmp (sub, "list") == 0) {
    want_args (label, argc, argv, 2, "");
    conn_greeting (c);
    bitmap_list (c);
    return EXIT_SUCCESS;
  }
  if (strcmp (sub, "add") == 0) {
    bool disabled = argc == 4 && strcmp (argv[3], "--disabled") == 0;
    want_args (label, argc - disabled, argv, 3, "NAME");
    conn_greeting (c);
    snprintf (done, sizeof done, "bitmap '%s' added%s", argv[2],
              disabled ? ", disabled" : "");
    change (c, "bitmap-add", json_pack ("{s:s,s:b}", "name", argv[2],
                                        "disabled", disabled), done);
    return EXIT_SUCCESS;
  }
  if (strcmp (sub, "merge") == 0) {
    json_t *sources = json_array ();
    if (argc < 4)
      usage_error ("bitmap merge: expected TARGET SOURCE...");
    for (i = 3; sources && i < (size_t) argc; i++)
      if (json_array_append_new (sources, json_string (argv[i])) == -1)
        die ("bitmap merge: '%s' is not valid UTF-8", argv[i]);
    conn_greeting (c);
    snprintf (done, sizeof done, "merged %d bitmap(s) into '%s'", argc - 3,
              argv[2]);
    change (c, "bitmap-merge", json_pack ("{s:s,s:o}", "target", argv[2],
                                          "sources", sources), done);
    return EXIT_SUCCESS;
  }
  for (i = 0; i < sizeof simple / sizeof simple[0]; i++) {
    if (strcmp (sub, simple[i][0]) == 0) {
      want_args (label, argc, argv, 3, "NAME");
      conn_greeting (c);
      snprintf (done, sizeof done, "bitmap '%s': %s done", argv[2], sub);
      change (c, simple[i][1], json_pack ("{s:s}", "name", argv[2]), done);
      return EXIT_SUCCESS;
    }
  }
  usage_error ("bitmap: expected add, remove, clear, enable, disable, "
               "merge or list");
}

static int
run_checkpoint (struct conn *c, int argc, char **argv)
{
  char done[512];

  c->label = "checkpoint";
  want_args ("checkpoint", argc, argv, 2, "NAME");
  if (grouped ())
    return run_group (argv[1], true);
  conn_greeting (c);
  snprintf (done, sizeof done, "checkpoint '%s' created: snapshot/%s, "
            "bitmap '%s' recording", argv[1], argv[1], argv[1]);
  change (c, "checkpoint-create", json_pack ("{s:s}", "name", argv[1]),
          done);
  return EXIT_SUCCESS;
}

/* The command's words are argv[0..argc).  Returns the exit status. */
static int
run (struct conn *c, int argc, char **argv)
{
  const char *cmd = argv[0];

  if (strcmp (cmd, "snapshot") == 0)
    return run_snapshot (c, argc, argv);
  if (strcmp (cmd, "bitmap") == 0)
    return run_bitmap (c, argc, argv);
  if (strcmp (cmd, "checkpoint") == 0)
    return run_checkpoint (c, argc, argv);
  c->label = cmd;
  if (strcmp (cmd, "raw") == 0) {
    want_args ("raw", argc, argv, 2, "JSON-LINE");
    if (strchr (argv[1], '\n'))
      usage_error ("raw: the request must be one line");
    conn_greeting (c);
    return do_raw (c, argv[1]);
  }
  if (strcmp (cmd, "relay") == 0) {
    want_args ("relay", argc, argv, 1, "");
    return do_relay (c);
  }
  if (strcmp (cmd, "events") == 0) {
    int duration = argc == 3 ? parse_seconds ("events --timeout", argv[2])
      : -1;
    conn_greeting (c);
    return do_events (c, duration);
  }
  want_args (cmd, argc, argv, 1, "");
  conn_greeting (c);
  if (strcmp (cmd, "status") == 0)
    do_status (c);
  else if (strcmp (cmd, "metrics") == 0)
    do_metrics (c);
  else
    do_stats (c);
  return EXIT_SUCCESS;
}

/* Check the command line before connecting: usage errors exit 2. */
static void
check_command (int argc, char **argv)
{
  static const char *const known[] = {
    "status", "stats", "metrics", "snapshot", "bitmap", "checkpoint", "raw",
    "events", "relay", NULL
  };
  int i;

  for (i = 0; known[i]; i++)
    if (strcmp (argv[0], known[i]) == 0)
      break;
  if (known[i] == NULL)
    usage_error ("unknown command '%s'", argv[0]);
  if (strcmp (argv[0], "events") == 0 &&
      !(argc == 1 || (argc == 3 && (strcmp (argv[1], "--timeout") == 0 ||
                                     strcmp (argv[1], "-t") == 0))))
    usage_error ("events: expected nothing or '--timeout SECONDS'");
  if (grouped () && strcmp (argv[0], "checkpoint") != 0 &&
      !(strcmp (argv[0], "snapshot") == 0 && argc > 1 &&
        strcmp (argv[1], "create") == 0))
    usage_error ("several -s, --pre-hook and --post-hook are only for "
                 "'snapshot create' and 'checkpoint'");
}

int
main (int argc, char **argv)
{
  static const struct option long_options[] = {
    { "socket", required_argument, NULL, 's' },
    { "json", no_argument, NULL, 'j' },
    { "timeout", required_argument, NULL, 't' },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { "pre-hook", required_argument, NULL, 'P' },
    { "post-hook", required_argument, NULL, 'Q' },
    { "hook-timeout", required_argument, NULL, 'H' },
    { "deadline", required_argument, NULL, 'D' },
    { NULL }
  };
  const char *path = getenv ("FLEECE_SOCKET");
  struct conn c = { .ctl = NULL };
  int opt, timeout = 30, status;
  /* Every -s, for a group: at most one per argument. */
  struct group_member *members = calloc (argc, sizeof *members);

  if (members == NULL)
    die ("out of memory");
  argv[0] = (char *) "fleecectl";       /* for getopt's messages */
  messages_init ("fleecectl", NULL, NULL);
  while ((opt = getopt_long (argc, argv, "+s:jt:hV", long_options,
                             NULL)) != -1) {
    switch (opt) {
    case 's': path = members[group.n++].path = optarg; break;
    case 'P': group.pre_hook = optarg; break;
    case 'Q': group.post_hook = optarg; break;
    case 'H':
      group.hook_timeout = parse_seconds ("--hook-timeout", optarg);
      break;
    case 'D': {
      char *end;
      long v = strtol (optarg, &end, 10);
      if (end == optarg || *end || v < 1 || v > 60000)
        usage_error ("--deadline: '%s' is not a number of milliseconds "
                     "between 1 and 60000", optarg);
      group.deadline_ms = v;
      break;
    }
    case 'j': json_output = true; break;
    case 't': timeout = parse_seconds ("--timeout", optarg); break;
    case 'h': usage ();
    case 'V':
      printf ("fleecectl %s\n", PACKAGE_VERSION);
      exit (EXIT_SUCCESS);
    default:
      fprintf (stderr, "Try 'fleecectl --help' for more information.\n");
      exit (2);
    }
  }
  if (optind >= argc)
    usage_error ("no command given");
  check_command (argc - optind, argv + optind);
  if (path == NULL || *path == '\0')
    usage_error ("no control socket: use -s SOCKET or set FLEECE_SOCKET");
  c.path = path;
  c.timeout = timeout;
  if (group.n == 0)
    members[group.n++].path = path;
  group.members = members;
  group.timeout = timeout;
  group.on_prepared = group_debug_stop;
  status = run (&c, argc - optind, argv + optind);
  ctlc_close (c.ctl);
  free (members);
  return status;
}
