/* fleece-backup: the repository commands' dispatcher, init and list.
 *
 * "fleece-backup COMMAND ..." with COMMAND one of the table below runs
 * a repository command; any other first argument is the old form
 * "fleece-backup [OPTIONS] SOURCE TARGET" (main.c), which a command name
 * can never be mistaken for: a SOURCE is an NBD URI.
 */

#include <config.h>

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <jansson.h>

#include "cleanup.h"
#include "repo.h"

static const struct {
  const char *name;
  int (*run) (int argc, char **argv);
} commands[] = {
  { "init", cmd_init },
  { "backup", cmd_backup },
  { "list", cmd_list },
  { "verify", cmd_verify },
  { "restore", cmd_restore },
  { "serve", cmd_serve },
  { "prune", cmd_prune },
};

/* Returns -1 if argv[1] is not a command: the old form. */
int
repo_main (int argc, char **argv)
{
  size_t i;

  if (argc < 2)
    return -1;
  for (i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (strcmp (argv[1], commands[i].name) == 0) {
      argv[1] = (char *) "fleece-backup";       /* getopt's messages */
      return commands[i].run (argc - 1, argv + 1);
    }
  return -1;
}

int
cmd_init (int argc, char **argv)
{
  if (argc != 2 || argv[1][0] == '-')
    usage_error ("init: expected REPO");
  repo_init (argv[1], NULL);
  return EXIT_SUCCESS;
}

static uint64_t
file_bytes (struct repo *r, const struct point *p)
{
  CLEANUP_FREE char *path = repo_path (r, p->file);
  struct stat st;

  return stat (path, &st) == 0 ? (uint64_t) st.st_blocks * 512 : 0;
}

static const char *
when (int64_t t, char *buf, size_t n)
{
  time_t tt = t;
  struct tm tm;

  if (t < 0)
    return "-";
  strftime (buf, n, "%Y-%m-%dT%H:%M:%SZ", gmtime_r (&tt, &tm));
  return buf;
}

int
cmd_list (int argc, char **argv)
{
  bool json = argc == 3 && strcmp (argv[2], "--json") == 0;
  json_t *a = NULL;
  struct repo r;
  char t[32];
  size_t i;

  if (argc != 2 && !json)
    usage_error ("list: expected REPO [--json]");
  repo_open (&r, argv[1], REPO_READ);
  if (r.ndisks) {
    group_list (&r, json);
    repo_close (&r);
    return EXIT_SUCCESS;
  }
  if (json && (a = json_array ()) == NULL)
    die ("json_array: out of memory");
  if (!json)
    printf ("%-20s %-20s %-20s %-20s %12s %s\n", "POINT", "PARENT",
            "CHECKPOINT", "SNAPSHOT-TIME", "FILE-BYTES", "STATE");
  for (i = 0; i < r.n; i++) {
    const struct point *p = &r.points[i];
    if (json) {
      json_t *o = point_json (p);
      if (json_object_set_new (o, "file-bytes",
                               json_integer (file_bytes (&r, p))) == -1)
        die ("json_object_set: out of memory");
      if (o == NULL || json_array_append_new (a, o) == -1)
        die ("json_pack: out of memory");
    }
    else
      printf ("%-20s %-20s %-20s %-20s %12" PRIu64 " %s\n", p->name,
              p->parent ? p->parent : "-",
              p->checkpoint ? p->checkpoint : "-",
              when (p->created, t, sizeof t), file_bytes (&r, p),
              p->complete ? (p->parent ? "incremental" : "full")
              : "incomplete");
  }
  if (json) {
    if (json_dumpf (a, stdout, JSON_COMPACT) == -1)
      die ("json_dumpf: stdout: %m");
    printf ("\n");
    json_decref (a);
  }
  if (!json && r.prune_drop)
    printf ("(an interrupted prune of %s is finished by the next prune "
            "or backup)\n", r.prune_drop);
  repo_close (&r);
  return EXIT_SUCCESS;
}
