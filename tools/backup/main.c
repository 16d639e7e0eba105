/* fleece-backup: pull a snapshot export onto a file or an NBD target
 * (fleece-backup(1), docs/design.md "Pulls").
 *
 * One thread and one poll loop drive the source handle and, when the
 * target is NBD, the target handle, with libnbd's asynchronous API.  The
 * source and the target are each a struct rw reached through an
 * operations table (rw.h: an NBD export, or a file or block device), so
 * that nothing else in the program asks which kind it has.  The work is a
 * queue of jobs:
 *
 *   STATUS  base:allocation of the next span of the source (the planner;
 *           at most one out).  Its extents, cut by the dirty bitmap for
 *           --sync=incremental, become COPY and ZERO jobs of at most
 *           --request-size bytes, split at multiples of that size.
 *   COPY    read the source into a buffer, then write it to the target.
 *   ZERO    write zeroes to the target (NBD write-zeroes, fallocate).
 *   FLUSH   flush the target; VERIFY and TRIM come after it.
 *   VERIFY  read a range from the source and from the target, compare.
 *   TRIM    trim a range of the source (--discard-source).
 *
 * COPY, ZERO and VERIFY jobs hold one of --requests slots from their
 * start to their end, so memory is bounded by requests * request-size
 * (twice that with --verify).  Completion callbacks only record the
 * result and queue the job on the done list; every decision is made in
 * the loop, so no callback ever calls into libnbd.
 *
 * Finished ranges collect as "unflushed" until a batch is cut: the target
 * is flushed (after every write of the batch completed), then the batch is
 * verified (--verify), then trimmed on the source (--discard-source).
 * Hence the invariants:
 *   - a range of the source is trimmed only after its data was written,
 *     flushed and, with --verify, compared;
 *   - the pull succeeds only when every byte of the plan was written,
 *     zeroed or is known zero on a fresh file, and flushed: the progress
 *     counters must meet the total at the end;
 *   - after a failed flush or a lost NBD target, every range not yet
 *     flushed is copied again: a lost write is never assumed to have
 *     reached the disk.
 *
 * --on-error=retry retries a failed job 5 times, 100 ms apart doubling,
 * and replaces a dead connection with a new one to the same URI; jobs
 * that were in flight on it fail and are retried.  A mismatch found by
 * --verify is never retried.
 *
 * Start-up of --sync=incremental: the bitmap is loaded on a thread while
 * the source connects, and the first block status is asked for before
 * the bitmap is known, so that the server works on it meanwhile.  Before
 * the final flush of a file target, the source connection is closed
 * (when nothing more can be asked of it), so that the server's goodbye
 * overlaps the flush.
 *
 * Deliberately ignored: multi-conn (one connection per side is enough to
 * fill a link with 16 requests in flight), structured reads with holes
 * (base:allocation already finds them), target extents (an NBD target
 * is always zeroed where the source is zero, a fresh file never).
 *
 * Undocumented, for tests only: FLEECE_BACKUP_BITMAP_URI replaces the
 * bitmap URI derived from SOURCE, so that a test can serve a crafted
 * bitmap (bad checksum, not frozen...) with nbdkit file.
 *
 * The files, each with its own design note, are listed in backup.h; this
 * one holds the command line and main; its messages are lib/messages.c's.
 */

#include <config.h>

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "backup.h"
#include "repo.h"

const char *const sync_names[] = { "full", "top", "incremental" };

struct config cfg = {
  .sync = SYNC_FULL,
  .requests = 16,
  .request_size = 1u << 20,
};

/* ---- Memory ---- */

void *
xmalloc (size_t n)
{
  void *p = malloc (n);

  if (p == NULL)
    die ("malloc: %m");
  return p;
}

void *
xcalloc (size_t n, size_t size)
{
  void *p = calloc (n, size);

  if (p == NULL)
    die ("calloc: %m");
  return p;
}

void
sleep_ms (unsigned ms)
{
  struct timespec ts = { .tv_sec = ms / 1000,
                         .tv_nsec = (ms % 1000) * 1000000L };

  while (nanosleep (&ts, &ts) == -1 && errno == EINTR)
    ;
}

/* ---- Command line ---- */

static void __attribute__ ((noreturn))
usage (void)
{
  printf ("fleece-backup: pull a snapshot of a Fleece server to a file or "
          "an NBD target\n"
          "\n"
          "Usage:\n"
          "  fleece-backup [OPTIONS] SOURCE TARGET\n"
          "  fleece-backup init|backup|list|verify|restore|prune|serve "
          "REPO ...\n"
          "      (restore points: see fleece-backup(1), REPOSITORY)\n"
          "\n"
          "SOURCE is an NBD URI of a snapshot export, for example\n"
          "  'nbd+unix:///snapshot/nightly?socket=/run/fleece.sock'\n"
          "TARGET is a local file or an NBD URI.\n"
          "\n"
          "Options:\n"
          "  --sync=full|top|incremental  what to copy (default full)\n"
          "  --since=CHECKPOINT     the checkpoint the target holds "
          "(incremental)\n"
          "  --fallback-full        pull everything if the bitmap cannot "
          "be used\n"
          "  --progress             show a progress bar on a terminal\n"
          "  --rate=BYTES           read at most BYTES per second (K, M, G)\n"
          "  --requests=N           requests in flight (default 16)\n"
          "  --request-size=SIZE    bytes per request (default 1M)\n"
          "  --verify               compare the target with the source\n"
          "  --discard-source       trim the source once a range is safe\n"
          "  --on-error=report|retry  fail at once, or retry and reconnect\n"
          "  --quiet                no summary line\n"
          "  -h, --help             show this help\n"
          "  -V, --version          show the version\n");
  exit (EXIT_SUCCESS);
}

/* A size: a decimal number, optionally followed by K, M, G or T
 * (powers of 1024).
 */
uint64_t
parse_size (const char *opt, const char *s, uint64_t min, uint64_t max)
{
  unsigned long long v;
  unsigned shift = 0;
  char *end;

  errno = 0;
  if (!isdigit ((unsigned char) *s))
    goto bad;
  v = strtoull (s, &end, 10);
  if (errno && errno != ERANGE)
    goto bad;
  switch (*end) {
  case 'k': case 'K': shift = 10; end++; break;
  case 'm': case 'M': shift = 20; end++; break;
  case 'g': case 'G': shift = 30; end++; break;
  case 't': case 'T': shift = 40; end++; break;
  }
  if (*end)
    goto bad;
  /* A number too big for 64 bits, before or after its suffix. */
  if (errno == ERANGE || (shift && v > (UINT64_MAX >> shift)))
    usage_error ("%s: '%s' is out of range (%" PRIu64 " to %" PRIu64 ")",
                 opt, s, min, max);
  v <<= shift;
  if (v < min || v > max)
    usage_error ("%s: '%s' is out of range (%" PRIu64 " to %" PRIu64 ")",
                 opt, s, min, max);
  return v;

 bad:
  usage_error ("%s: '%s' is not a size (a number, optionally followed "
               "by K, M, G or T)", opt, s);
}

/* The export name of URI argument s, or a usage error. */
static char *
check_uri_arg (const char *what, const char *s)
{
  char err[1024], *export = uri_export (s, err, sizeof err);

  if (export == NULL)
    usage_error ("%s: %s", what, err);
  return export;
}

static void
parse_args (int argc, char **argv, char **snapshot)
{
  enum { OPT_SYNC = 256, OPT_SINCE, OPT_PROGRESS, OPT_RATE, OPT_VERIFY,
         OPT_ON_ERROR, OPT_DISCARD, OPT_FALLBACK, OPT_REQUESTS,
         OPT_REQUEST_SIZE, OPT_QUIET };
  static const struct option long_options[] = {
    { "sync", required_argument, NULL, OPT_SYNC },
    { "since", required_argument, NULL, OPT_SINCE },
    { "progress", no_argument, NULL, OPT_PROGRESS },
    { "rate", required_argument, NULL, OPT_RATE },
    { "verify", no_argument, NULL, OPT_VERIFY },
    { "on-error", required_argument, NULL, OPT_ON_ERROR },
    { "discard-source", no_argument, NULL, OPT_DISCARD },
    { "fallback-full", no_argument, NULL, OPT_FALLBACK },
    { "requests", required_argument, NULL, OPT_REQUESTS },
    { "request-size", required_argument, NULL, OPT_REQUEST_SIZE },
    { "quiet", no_argument, NULL, OPT_QUIET },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL }
  };
  CLEANUP_FREE char *export = NULL;
  int c, i;

  argv[0] = (char *) "fleece-backup";   /* for getopt's messages */
  while ((c = getopt_long (argc, argv, "hqV", long_options, NULL)) != -1) {
    switch (c) {
    case OPT_SYNC:
      for (i = 0; i <= SYNC_INCREMENTAL; i++)
        if (strcmp (optarg, sync_names[i]) == 0)
          break;
      if (i > SYNC_INCREMENTAL)
        usage_error ("--sync: '%s' is not full, top or incremental",
                     optarg);
      cfg.sync = i;
      break;
    case OPT_SINCE:
      if (*optarg == '\0' || strlen (optarg) > 128)
        usage_error ("--since: a checkpoint name has 1 to 128 bytes");
      cfg.since = optarg;
      break;
    case OPT_PROGRESS: cfg.progress = true; break;
    case OPT_RATE:
      cfg.rate = parse_size ("--rate", optarg, 1, UINT64_MAX >> 1);
      break;
    case OPT_VERIFY: cfg.verify = true; break;
    case OPT_ON_ERROR:
      if (strcmp (optarg, "report") == 0)
        cfg.retry = false;
      else if (strcmp (optarg, "retry") == 0)
        cfg.retry = true;
      else
        usage_error ("--on-error: '%s' is not report or retry", optarg);
      break;
    case OPT_DISCARD: cfg.discard_source = true; break;
    case OPT_FALLBACK: cfg.fallback_full = true; break;
    case OPT_REQUESTS:
      cfg.requests = parse_size ("--requests", optarg, 1, 1024);
      break;
    case OPT_REQUEST_SIZE:
      cfg.request_size = parse_size ("--request-size", optarg, 512,
                                     MAX_REQUEST_SIZE);
      break;
    case 'q': case OPT_QUIET: cfg.quiet = true; break;
    case 'h': usage ();
    case 'V':
      printf ("fleece-backup %s\n", PACKAGE_VERSION);
      exit (EXIT_SUCCESS);
    default:
      fprintf (stderr, "Try 'fleece-backup --help' for more "
               "information.\n");
      exit (2);
    }
  }
  if (argc - optind != 2)
    usage_error ("expected SOURCE and TARGET, got %d argument%s",
                 argc - optind, argc - optind == 1 ? "" : "s");
  cfg.source = argv[optind];
  cfg.target = argv[optind + 1];
  if (cfg.sync == SYNC_INCREMENTAL && cfg.since == NULL)
    usage_error ("--sync=incremental needs --since=CHECKPOINT");
  if (cfg.sync != SYNC_INCREMENTAL && cfg.since)
    usage_error ("--since is only for --sync=incremental");
  if (cfg.fallback_full && cfg.sync != SYNC_INCREMENTAL)
    usage_error ("--fallback-full is only for --sync=incremental");

  export = check_uri_arg ("SOURCE", cfg.source);
  if (strncmp (export, "snapshot/", 9) == 0 && export[9]) {
    if ((*snapshot = strdup (export + 9)) == NULL)
      die ("strdup: %m");
  }
  else if (cfg.sync == SYNC_INCREMENTAL)
    usage_error ("--sync=incremental pulls a snapshot export "
                 "(snapshot/NAME), not '%s'", export);
  if (strstr (cfg.target, "://"))
    free (check_uri_arg ("TARGET", cfg.target));
}

int
main (int argc, char **argv)
{
  char *snapshot = NULL;
  int r;

  /* A message clears the progress bar first; die disconnects (loop.c). */
  messages_init ("fleece-backup", progress_clear, disconnect_all);
  if ((r = repo_main (argc, argv)) != -1)       /* a repository command */
    return r;
  parse_args (argc, argv, &snapshot);
  progress_start ();
  catch_signals ();
  if (cfg.sync == SYNC_INCREMENTAL)
    bitmap_start ();
  source_open ();
  if (cfg.sync == SYNC_INCREMENTAL) {
    plan_first ();
    incremental_prepare (snapshot);
  }
  target_open ();
  pull_setup ();
  pull_run ();
  pull_end ();
  if (!cfg.quiet)
    fprintf (stderr, "fleece-backup: sync=%s read=%" PRIu64
             " written=%" PRIu64 " zeroed=%" PRIu64 " granules=%" PRIu64
             " seconds=%.2f%s\n",
             sync_names[cfg.sync], P.read, P.written, P.zeroed,
             cfg.sync == SYNC_INCREMENTAL ? bm.dirty : 0,
             progress_seconds (),
             cfg.verify ? " verified=yes" : "");
  free (snapshot);
  return EXIT_SUCCESS;
}

