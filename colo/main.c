/* fleece-colod: the command line, and the dispatch to a role (primary.c,
 * secondary.c, or demote) or to a client of a running daemon's control
 * socket (ctl.c).  colod.h lists the files and how they depend on each
 * other; docs/replication.md is the operator's description.
 */

#include <config.h>

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "colod.h"
#include "ctl.h"
#include "demote.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"
#include "messages.h"
#include "primary.h"
#include "secondary.h"

/* ---- the command line ---- */

static void
usage (FILE *f)
{
  fprintf (f,
"usage:\n"
"  fleece-colod secondary --listen ADDR:PORT --disk PATH [--disk PATH...]\n"
"                --state DIR TLS\n"
"                [--hb-interval MS] [--hb-timeout MS] [--auto-failover]\n"
"                [--on-promote CMD] [--promote-store PATH...]\n"
"                [--discard-diverged] [--handshake-timeout MS]\n"
"                [--control PATH] [LOG] [-v]\n"
"  fleece-colod primary --fleece SOCKET --nbd URI [--fleece S --nbd U...]\n"
"                --peer ADDR:PORT\n"
"                --state DIR TLS [--interval MS] [--hb-interval MS]\n"
"                [--hb-timeout MS] [--handshake-timeout MS]\n"
"                [--max-extent BYTES] [--control PATH] [LOG] [-v]\n"
"  fleece-colod demote --fleece SOCKET --nbd URI [--fleece S --nbd U...]\n"
"                --state DIR\n"
"  fleece-colod status --state DIR [--json]\n"
"  fleece-colod checkpoint --state DIR [--no-wait]\n"
"  fleece-colod promote --state DIR [--force]\n"
"  fleece-colod events --state DIR\n"
"  fleece-colod metrics --state DIR\n"
"TLS is one of: --tls-certificates DIR | --tls-psk FILE [--tls-username U]\n"
"  | --insecure; with --tls-no-verify-hostname, --tls-priority STRING.\n"
"LOG: --log stderr|syslog|journal, --log-summary-interval SECONDS,\n"
"  --metrics-listen [ADDR:]PORT.\n"
"  fleece-colod --help | --version\n"
"See fleece-colod(1).\n");
}

static int
parse_ms (const char *opt, const char *s, int min, int *out)
{
  char *end;
  long v;

  errno = 0;
  v = strtol (s, &end, 10);
  if (errno || *end || end == s || v < min || v > 86400000) {
    fprintf (stderr, "fleece-colod: %s: '%s' is not a number of "
             "milliseconds from %d to 86400000\n", opt, s, min);
    return -1;
  }
  *out = v;
  return 0;
}

enum {
  OPT_LISTEN = 256, OPT_DISK, OPT_STATE, OPT_FLEECE, OPT_NBD, OPT_PEER,
  OPT_INTERVAL, OPT_HB_INTERVAL, OPT_HB_TIMEOUT, OPT_AUTO_FAILOVER,
  OPT_ON_PROMOTE, OPT_PROMOTE_STORE, OPT_DISCARD, OPT_CONTROL, OPT_MAX_EXTENT,
  OPT_TLS_CERTS, OPT_TLS_PSK, OPT_TLS_USER, OPT_INSECURE, OPT_NO_VERIFY,
  OPT_PRIORITY, OPT_JSON, OPT_NO_WAIT, OPT_FORCE, OPT_DEBUG,
  OPT_HANDSHAKE_TIMEOUT, OPT_LOG, OPT_LOG_SUMMARY, OPT_METRICS_LISTEN,
};

static const struct option long_options[] = {
  { "listen", required_argument, NULL, OPT_LISTEN },
  { "disk", required_argument, NULL, OPT_DISK },
  { "state", required_argument, NULL, OPT_STATE },
  { "fleece", required_argument, NULL, OPT_FLEECE },
  { "nbd", required_argument, NULL, OPT_NBD },
  { "peer", required_argument, NULL, OPT_PEER },
  { "interval", required_argument, NULL, OPT_INTERVAL },
  { "hb-interval", required_argument, NULL, OPT_HB_INTERVAL },
  { "hb-timeout", required_argument, NULL, OPT_HB_TIMEOUT },
  { "handshake-timeout", required_argument, NULL, OPT_HANDSHAKE_TIMEOUT },
  { "auto-failover", no_argument, NULL, OPT_AUTO_FAILOVER },
  { "on-promote", required_argument, NULL, OPT_ON_PROMOTE },
  { "promote-store", required_argument, NULL, OPT_PROMOTE_STORE },
  { "discard-diverged", no_argument, NULL, OPT_DISCARD },
  { "control", required_argument, NULL, OPT_CONTROL },
  { "max-extent", required_argument, NULL, OPT_MAX_EXTENT },
  { "tls-certificates", required_argument, NULL, OPT_TLS_CERTS },
  { "tls-psk", required_argument, NULL, OPT_TLS_PSK },
  { "tls-username", required_argument, NULL, OPT_TLS_USER },
  { "insecure", no_argument, NULL, OPT_INSECURE },
  { "tls-no-verify-hostname", no_argument, NULL, OPT_NO_VERIFY },
  { "tls-priority", required_argument, NULL, OPT_PRIORITY },
  { "json", no_argument, NULL, OPT_JSON },
  { "no-wait", no_argument, NULL, OPT_NO_WAIT },
  { "force", no_argument, NULL, OPT_FORCE },
  { "debug", required_argument, NULL, OPT_DEBUG },
  { "log", required_argument, NULL, OPT_LOG },
  { "log-summary-interval", required_argument, NULL, OPT_LOG_SUMMARY },
  { "metrics-listen", required_argument, NULL, OPT_METRICS_LISTEN },
  { "verbose", no_argument, NULL, 'v' },
  { "help", no_argument, NULL, 'h' },
  { "version", no_argument, NULL, 'V' },
  { NULL, 0, NULL, 0 },
};

/* A repeatable option (one value per disk of the group). */
static int
add_disk_option (const char *opt, const char *value, const char **v,
                 unsigned *n, const char **first)
{
  if (*n == COLOD_MAX_DISKS) {
    fprintf (stderr, "fleece-colod: %s %s: a group has at most %d disks\n",
             opt, value, COLOD_MAX_DISKS);
    return -1;
  }
  v[(*n)++] = value;
  *first = v[0];
  return 0;
}

/* --debug NAME=VALUE: fault injection for the tests. */
static int
parse_debug (const char *s)
{
  unsigned long long v;

  if (sscanf (s, "corrupt-epoch=%llu", &v) == 1)
    colod.opt.debug_corrupt_epoch = v;
  else if (sscanf (s, "extent-delay-ms=%llu", &v) == 1 && v < 60000)
    colod.opt.debug_extent_delay_ms = v;
  else if (sscanf (s, "max-version=%llu", &v) == 1 &&
           v >= COLO_WIRE_VERSION && v <= COLO_WIRE_MAX_VERSION)
    colod.opt.debug_max_version = v;
  else {
    fprintf (stderr, "fleece-colod: --debug %s: the flags are "
             "corrupt-epoch=N, extent-delay-ms=N, max-version=%d..%d\n", s,
             COLO_WIRE_VERSION, COLO_WIRE_MAX_VERSION);
    return -1;
  }
  return 0;
}

static int
parse_options (int argc, char *argv[], bool *json, bool *no_wait,
               bool *force)
{
  struct colod_options *o = &colod.opt;
  int c, tls_modes = 0;

  o->interval_ms = COLOD_DEFAULT_INTERVAL_MS;
  o->hb_interval_ms = COLOD_DEFAULT_HB_INTERVAL_MS;
  o->hb_timeout_ms = COLOD_DEFAULT_HB_TIMEOUT_MS;
  o->tls.handshake_timeout_ms = COLOD_DEFAULT_HANDSHAKE_TIMEOUT_MS;
  o->max_extent = COLOD_DEFAULT_MAX_EXTENT;
  o->log_summary_s = COLOD_DEFAULT_LOG_SUMMARY_S;
  while ((c = getopt_long (argc, argv, "vhV", long_options, NULL)) != -1) {
    switch (c) {
    case OPT_LISTEN: o->listen = optarg; break;
    case OPT_DISK:
      if (add_disk_option ("--disk", optarg, o->disks, &o->ndisks,
                           &o->disk) == -1)
        return -1;
      break;
    case OPT_STATE: o->state_dir = optarg; break;
    case OPT_FLEECE:
      if (add_disk_option ("--fleece", optarg, o->fleece_sockets,
                           &o->nfleece, &o->fleece_socket) == -1)
        return -1;
      break;
    case OPT_NBD:
      if (add_disk_option ("--nbd", optarg, o->nbd_uris, &o->nnbd,
                           &o->nbd_uri) == -1)
        return -1;
      break;
    case OPT_PEER: o->peer = optarg; break;
    case OPT_INTERVAL:
      if (parse_ms ("--interval", optarg, 0, &o->interval_ms) == -1)
        return -1;
      break;
    case OPT_HB_INTERVAL:
      if (parse_ms ("--hb-interval", optarg, 10, &o->hb_interval_ms) == -1)
        return -1;
      break;
    case OPT_HB_TIMEOUT:
      if (parse_ms ("--hb-timeout", optarg, 50, &o->hb_timeout_ms) == -1)
        return -1;
      break;
    case OPT_HANDSHAKE_TIMEOUT:
      if (parse_ms ("--handshake-timeout", optarg, 100,
                    &o->tls.handshake_timeout_ms) == -1)
        return -1;
      break;
    case OPT_AUTO_FAILOVER: o->auto_failover = true; break;
    case OPT_ON_PROMOTE: o->on_promote = optarg; break;
    case OPT_PROMOTE_STORE:
      if (add_disk_option ("--promote-store", optarg, o->promote_stores,
                           &o->npromote_stores, &o->promote_store) == -1)
        return -1;
      break;
    case OPT_DISCARD: o->discard_diverged = true; break;
    case OPT_CONTROL: o->control = optarg; break;
    case OPT_MAX_EXTENT: {
      char *end;
      unsigned long v = strtoul (optarg, &end, 0);
      if (*end || v < 4096 || v > COLO_WIRE_MAX_EXTENT || (v & (v - 1))) {
        fprintf (stderr, "fleece-colod: --max-extent: '%s' is not a power "
                 "of two from 4096 to %u\n", optarg, COLO_WIRE_MAX_EXTENT);
        return -1;
      }
      o->max_extent = v;
      break;
    }
    case OPT_TLS_CERTS: o->tls.certificates = optarg; tls_modes++; break;
    case OPT_TLS_PSK: o->tls.psk_file = optarg; tls_modes++; break;
    case OPT_TLS_USER: o->tls.psk_username = optarg; break;
    case OPT_INSECURE: o->tls.insecure = true; tls_modes++; break;
    case OPT_NO_VERIFY: o->tls.no_verify_hostname = true; break;
    case OPT_PRIORITY: o->tls.priority = optarg; break;
    case OPT_JSON: *json = true; break;
    case OPT_NO_WAIT: *no_wait = true; break;
    case OPT_FORCE: *force = true; break;
    case OPT_DEBUG:
      if (parse_debug (optarg) == -1)
        return -1;
      break;
    case OPT_LOG:
      if (strcmp (optarg, "stderr") && strcmp (optarg, "syslog") &&
          strcmp (optarg, "journal")) {
        fprintf (stderr, "fleece-colod: --log: '%s' is not stderr, syslog "
                 "or journal\n", optarg);
        return -1;
      }
      o->log = optarg;
      break;
    case OPT_LOG_SUMMARY: {
      char *end;
      long v = strtol (optarg, &end, 10);
      if (*end || end == optarg || v < 1 || v > 86400) {
        fprintf (stderr, "fleece-colod: --log-summary-interval: '%s' is "
                 "not a number of seconds from 1 to 86400\n", optarg);
        return -1;
      }
      o->log_summary_s = v;
      break;
    }
    case OPT_METRICS_LISTEN: o->metrics_listen = optarg; break;
    case 'v': o->verbose = true; break;
    case 'h': usage (stdout); exit (0);
    case 'V': printf ("fleece-colod %s\n", PACKAGE_VERSION); exit (0);
    default:                    /* getopt said what */
      fprintf (stderr, "Try 'fleece-colod --help' for more "
               "information.\n");
      return -1;
    }
  }
  if (optind != argc) {
    fprintf (stderr, "fleece-colod: unexpected argument '%s'\n",
             argv[optind]);
    return -1;
  }
  if (o->state_dir == NULL) {
    fprintf (stderr, "fleece-colod %s: --state DIR is required\n", o->role);
    return -1;
  }
  if ((strcmp (o->role, "primary") == 0 ||
       strcmp (o->role, "secondary") == 0) && tls_modes != 1) {
    fprintf (stderr, "fleece-colod %s: give exactly one of "
             "--tls-certificates DIR, --tls-psk FILE and --insecure (the "
             "last one only on a network you trust: it sends the disk in "
             "the clear)\n", o->role);
    return -1;
  }
  if (o->nfleece != o->nnbd) {
    fprintf (stderr, "fleece-colod %s: %u --fleece and %u --nbd: give one "
             "--nbd for each --fleece, in the same order\n", o->role,
             o->nfleece, o->nnbd);
    return -1;
  }
  if (o->npromote_stores && o->npromote_stores != o->ndisks) {
    fprintf (stderr, "fleece-colod %s: %u --promote-store for %u --disk: "
             "give one for each disk, in the same order\n", o->role,
             o->npromote_stores, o->ndisks);
    return -1;
  }
  if (o->hb_timeout_ms <= o->hb_interval_ms) {
    fprintf (stderr, "fleece-colod: --hb-timeout (%d ms) must be longer "
             "than --hb-interval (%d ms)\n", o->hb_timeout_ms,
             o->hb_interval_ms);
    return -1;
  }
  return 0;
}

static void
on_signal (int sig)
{
  (void) sig;
  colod.stop = 1;
}

static bool
known_role (const char *role)
{
  static const char *const roles[] = {
    "secondary", "primary", "demote", "status", "checkpoint", "promote",
    "events", "metrics", NULL
  };
  size_t i;

  for (i = 0; roles[i]; i++)
    if (strcmp (role, roles[i]) == 0)
      return true;
  return false;
}

static int
require (const char *what, const char *value)
{
  if (value == NULL) {
    fprintf (stderr, "fleece-colod %s: %s is required\n", colod.opt.role,
             what);
    return -1;
  }
  return 0;
}

/* What a role runs beside it: systemd notification, the metrics
 * endpoint.
 */
static int
start_services (void)
{
  if (colod_notify_start () == -1)
    return -1;
  if (colod.opt.metrics_listen &&
      colod_metrics_start (colod.opt.metrics_listen) == -1) {
    colod_notify_stop ();
    return -1;
  }
  return 0;
}

int
main (int argc, char *argv[])
{
  bool json = false, no_wait = false, force = false;
  char ctlpath[PATH_MAX];
  struct sigaction sa = { .sa_handler = on_signal };
  int r;

  argv[0] = (char *) "fleece-colod";    /* for getopt's messages */
  messages_init ("fleece-colod", NULL, NULL);
  if (argc < 2)
    usage_error ("no subcommand given");
  if (argv[1][0] == '-') {
    if (strcmp (argv[1], "--help") == 0 || strcmp (argv[1], "-h") == 0) {
      usage (stdout);
      return 0;
    }
    if (strcmp (argv[1], "--version") == 0 || strcmp (argv[1], "-V") == 0) {
      printf ("fleece-colod %s\n", PACKAGE_VERSION);
      return 0;
    }
    usage_error ("expected a subcommand before '%s'", argv[1]);
  }
  colod.opt.role = argv[1];
  if (!known_role (colod.opt.role))
    usage_error ("unknown subcommand '%s'", colod.opt.role);
  optind = 2;
  if (parse_options (argc, argv, &json, &no_wait, &force) == -1)
    return COLOD_EXIT_USAGE;
  colo_tls_set_log (colod_vdebug);      /* before any connection */
  if (colod.opt.control == NULL) {
    snprintf (ctlpath, sizeof ctlpath, "%s/control.sock",
              colod.opt.state_dir);
    colod.opt.control = ctlpath;
  }
  if (strcmp (colod.opt.role, "status") == 0)
    return colod_ctl_client ("query-status", NULL, !json);
  if (strcmp (colod.opt.role, "checkpoint") == 0)
    return colod_ctl_client ("checkpoint", no_wait
                             ? json_pack ("{s:b}", "wait", 0) : NULL, false);
  if (strcmp (colod.opt.role, "promote") == 0)
    return colod_ctl_client ("promote", force
                             ? json_pack ("{s:b}", "force", 1) : NULL, false);
  if (strcmp (colod.opt.role, "events") == 0)
    return colod_ctl_events ();
  if (strcmp (colod.opt.role, "metrics") == 0)
    return colod_ctl_client ("metrics", NULL, false);

  sigaction (SIGTERM, &sa, NULL);
  sigaction (SIGINT, &sa, NULL);
  signal (SIGPIPE, SIG_IGN);
  colod.st.role = colod.opt.role;
  colod.st.connection = "disconnected";
  colod.st.rtt_us = -1;
  /* The daemons' default depends on where they run (log.c); demote is
   * a command, whose messages its caller reads.
   */
  if (colod_log_open (colod.opt.log ? colod.opt.log
                      : strcmp (colod.opt.role, "demote") == 0 ? "stderr"
                      : NULL) == -1)
    abort ();                   /* parse_options checked it */
  if (strcmp (colod.opt.role, "demote") == 0) {
    if (require ("--fleece SOCKET", colod.opt.fleece_socket) == -1 ||
        require ("--nbd URI", colod.opt.nbd_uri) == -1)
      return COLOD_EXIT_USAGE;
    return colod_demote ();
  }
  if (strcmp (colod.opt.role, "primary") == 0) {
    if (require ("--fleece SOCKET", colod.opt.fleece_socket) == -1 ||
        require ("--nbd URI", colod.opt.nbd_uri) == -1 ||
        require ("--peer ADDR:PORT", colod.opt.peer) == -1)
      return COLOD_EXIT_USAGE;
    colod.opt.tls.role = COLO_TLS_CLIENT;
    if (start_services () == -1)
      return COLOD_EXIT_ERROR;
    r = colod_run_primary ();
  }
  else if (strcmp (colod.opt.role, "secondary") == 0) {
    if (require ("--listen ADDR:PORT", colod.opt.listen) == -1 ||
        require ("--disk PATH", colod.opt.disk) == -1)
      return COLOD_EXIT_USAGE;
    colod.opt.tls.role = COLO_TLS_SERVER;
    if (start_services () == -1)
      return COLOD_EXIT_ERROR;
    r = colod_run_secondary ();
  }
  else
    abort ();                   /* known_role */
  colod_notify_stop ();
  colod_control_stop ();
  colod_metrics_stop ();
  colod_log_flush ();
  return r;
}

