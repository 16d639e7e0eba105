/* fleece-backup: pull a snapshot export onto a file or an NBD target
 * (fleece-backup(1), docs/design.md "Pulls").
 *
 * One thread and one poll loop drive the source handle and, when the
 * target is NBD, the target handle, with libnbd's asynchronous API.  The
 * work is a queue of jobs:
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
 */

#include <config.h>

#include <assert.h>
#include <ctype.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/falloc.h>
#include <linux/fs.h>

#include <libnbd.h>
#include <xxhash.h>

#include "fleece-wire.h"

#define MAX_RETRIES      5
#define RETRY_DELAY_MS   100             /* doubled after each failure */
#define STATUS_SPAN      (1ull << 30)    /* most bytes per block status */
#define ZERO_MAX         (256ull << 20)  /* largest zero or trim */
#define BATCH_DISCARD    (64ull << 20)   /* flush + trim this often */
#define BATCH_DEFAULT    (1ull << 30)    /* flush this often */
#define MAX_REQUEST_SIZE (32u << 20)
#define PROGRESS_MS      100

enum sync_mode { SYNC_FULL, SYNC_TOP, SYNC_INCREMENTAL };
static const char *const sync_names[] = { "full", "top", "incremental" };

/* The command line; constant once parsed, except that --fallback-full
 * may turn an incremental pull into a full one before it starts.
 */
static struct {
  enum sync_mode sync;
  const char *since;
  bool progress, verify, discard_source, fallback_full, quiet, retry;
  uint64_t rate;                /* bytes per second; 0: unlimited */
  unsigned requests;
  uint32_t request_size;
  const char *source, *target;
} cfg = {
  .sync = SYNC_FULL,
  .requests = 16,
  .request_size = 1u << 20,
};

/* ---- Messages ---- */

static void progress_clear (void);
static void disconnect_all (void);

static void
vwarn (const char *fmt, va_list ap)
{
  progress_clear ();
  fprintf (stderr, "fleece-backup: ");
  vfprintf (stderr, fmt, ap);
  fprintf (stderr, "\n");
}

static void __attribute__ ((format (printf, 1, 2)))
warn (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vwarn (fmt, ap);
  va_end (ap);
}

static void __attribute__ ((noreturn, format (printf, 1, 2)))
die (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vwarn (fmt, ap);
  va_end (ap);
  disconnect_all ();
  exit (EXIT_FAILURE);
}

static void __attribute__ ((noreturn, format (printf, 1, 2)))
usage_error (const char *fmt, ...)
{
  va_list ap;

  fprintf (stderr, "fleece-backup: ");
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fprintf (stderr, "\nTry 'fleece-backup --help' for more information.\n");
  exit (2);
}

static void *
xmalloc (size_t n)
{
  void *p = malloc (n);

  if (p == NULL)
    die ("malloc: %m");
  return p;
}

static void *
xcalloc (size_t n, size_t size)
{
  void *p = calloc (n, size);

  if (p == NULL)
    die ("calloc: %m");
  return p;
}

static int64_t
now_us (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void
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
static uint64_t
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

/* ---- URIs ----
 *
 * libnbd parses the URI itself; this parser only checks the scheme, finds
 * the export name (percent-decoded, as libnbd decodes it) and builds the
 * bitmap URI from the source URI by replacing its path, keeping the
 * scheme, the authority (PSK user, host, port) and the query (socket,
 * TLS parameters) byte for byte.
 */

struct uri {
  char *scheme;                 /* "nbd", "nbds+unix", ... */
  char *authority;              /* [user@]host[:port], may be empty */
  char *rest;                   /* "?query#fragment", may be empty */
  char *export;                 /* the path without '/', decoded */
};

static const char *const uri_schemes[] = {
  "nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock", NULL
};

static void
uri_free (struct uri *u)
{
  free (u->scheme);
  free (u->authority);
  free (u->rest);
  free (u->export);
  memset (u, 0, sizeof *u);
}

static int
hex_value (char c)
{
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* Decode n bytes of s; NULL if an escape is malformed or decodes to NUL. */
static char *
pct_decode (const char *s, size_t n)
{
  char *r = xmalloc (n + 1), *p = r;
  size_t i;

  for (i = 0; i < n; i++) {
    if (s[i] != '%') {
      *p++ = s[i];
      continue;
    }
    if (i + 2 >= n || hex_value (s[i+1]) < 0 ||
        hex_value (s[i+2]) < 0 ||
        (hex_value (s[i+1]) == 0 && hex_value (s[i+2]) == 0)) {
      free (r);
      return NULL;
    }
    *p++ = hex_value (s[i+1]) * 16 + hex_value (s[i+2]);
    i += 2;
  }
  *p = '\0';
  return r;
}

/* Escape everything but RFC 3986 unreserved characters. */
static char *
pct_encode (const char *s)
{
  static const char hex[] = "0123456789ABCDEF";
  char *r = xmalloc (strlen (s) * 3 + 1), *p = r;

  for (; *s; s++) {
    unsigned char c = *s;
    if (isalnum (c) || c == '-' || c == '.' || c == '_' || c == '~')
      *p++ = c;
    else {
      *p++ = '%';
      *p++ = hex[c >> 4];
      *p++ = hex[c & 15];
    }
  }
  *p = '\0';
  return r;
}

/* Split an NBD URI.  On error returns -1 with a message in err. */
static int
uri_parse (const char *s, struct uri *u, char *err, size_t errlen)
{
  const char *sep = strstr (s, "://"), *auth, *path, *rest;
  size_t i;

  memset (u, 0, sizeof *u);
  if (sep == NULL) {
    snprintf (err, errlen, "'%s' is not a URI", s);
    return -1;
  }
  for (i = 0; uri_schemes[i]; i++)
    if (strlen (uri_schemes[i]) == (size_t) (sep - s) &&
        strncmp (s, uri_schemes[i], sep - s) == 0)
      break;
  if (uri_schemes[i] == NULL) {
    snprintf (err, errlen, "'%s': unsupported URI scheme '%.*s' (use "
              "nbd, nbds, nbd+unix or nbds+unix)", s, (int) (sep - s), s);
    return -1;
  }
  auth = sep + 3;
  path = auth + strcspn (auth, "/?#");
  rest = path + strcspn (path, "?#");
  u->export = pct_decode (*path == '/' ? path + 1 : path,
                          *path == '/' ? (size_t) (rest - path - 1) : 0);
  if (u->export == NULL) {
    snprintf (err, errlen, "'%s': bad percent-encoding in the export "
              "name", s);
    return -1;
  }
  u->scheme = strndup (s, sep - s);
  u->authority = strndup (auth, path - auth);
  u->rest = strdup (rest);
  if (!u->scheme || !u->authority || !u->rest)
    die ("strdup: %m");
  return 0;
}

/* The URI of export "bitmap/NAME" on the server of source_uri. */
static char *
bitmap_uri (const char *source_uri, const char *name)
{
  struct uri u;
  char err[512], *enc, *r;

  if (uri_parse (source_uri, &u, err, sizeof err) == -1)
    return NULL;
  enc = pct_encode (name);
  if (asprintf (&r, "%s://%s/bitmap/%s%s", u.scheme, u.authority, enc,
                u.rest) == -1)
    die ("asprintf: %m");
  free (enc);
  uri_free (&u);
  return r;
}

static void
check_uri_arg (const char *what, const char *s, struct uri *u)
{
  char err[1024];

  if (uri_parse (s, u, err, sizeof err) == -1)
    usage_error ("%s: %s", what, err);
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
  struct uri u;
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

  check_uri_arg ("SOURCE", cfg.source, &u);
  if (strncmp (u.export, "snapshot/", 9) == 0 && u.export[9]) {
    if ((*snapshot = strdup (u.export + 9)) == NULL)
      die ("strdup: %m");
  }
  else if (cfg.sync == SYNC_INCREMENTAL)
    usage_error ("--sync=incremental pulls a snapshot export "
                 "(snapshot/NAME), not '%s'", u.export);
  uri_free (&u);
  if (strstr (cfg.target, "://")) {
    check_uri_arg ("TARGET", cfg.target, &u);
    uri_free (&u);
  }
}


/* ---- Connections ---- */

/* Connect to uri.  On failure returns NULL and the reason in *msg (to
 * free); *refused tells a server that refused the export (it does not
 * have it, or not for us) from a connection that failed.  Option mode
 * makes the two steps separate.
 */
/* The files a URI's TLS query parameters name must exist: libnbd only
 * says "connection is closed" when they do not.  Returns false with the
 * reason in *msg (to free).
 */
static bool
uri_tls_files_exist (const char *uri, char **msg)
{
  static const struct { const char *key; bool dir; } keys[] = {
    { "tls-certificates", true }, { "tls-psk-file", false },
  };
  const char *q = strchr (uri, '?');
  size_t i;

  while (q && *q && *q != '#') {
    size_t len;
    q++;                                /* past '?', '&' or ';' */
    len = strcspn (q, "&;#");
    for (i = 0; i < sizeof keys / sizeof keys[0]; i++) {
      size_t klen = strlen (keys[i].key);
      struct stat st;
      char *path;
      int err = 0;

      if (len <= klen || strncmp (q, keys[i].key, klen) != 0 ||
          q[klen] != '=')
        continue;
      path = pct_decode (q + klen + 1, len - klen - 1);
      if (path == NULL)
        err = EINVAL;
      else if (stat (path, &st) == -1)
        err = errno;
      else if (keys[i].dir && !S_ISDIR (st.st_mode))
        err = ENOTDIR;
      if (err && asprintf (msg, "%s=%.*s: %s", keys[i].key,
                           (int) (len - klen - 1), q + klen + 1,
                           strerror (err)) == -1)
        die ("asprintf: %m");
      free (path);
      if (err)
        return false;
    }
    q += len;
  }
  return true;
}

/* A plaintext connection was refused an export: does the server offer
 * TLS?  Then the export may be served only over TLS (nbdkit-fleece-
 * plugin's tls-exports-only=true).  A probe connection lets libnbd try
 * STARTTLS: 1 yes, 0 no, -1 unknown.
 */
static int
server_offers_tls (const char *uri)
{
  struct nbd_handle *h = nbd_create ();
  int r = -1;

  if (h == NULL)
    return -1;
  if (nbd_set_opt_mode (h, true) == 0 &&
      nbd_set_tls (h, LIBNBD_TLS_ALLOW) == 0 &&
      nbd_set_uri_allow_local_file (h, true) == 0 &&
      nbd_connect_uri (h, uri) == 0)
    r = nbd_get_tls_negotiated (h);
  if (r != -1)
    nbd_opt_abort (h);
  nbd_close (h);
  return r;
}

static struct nbd_handle *
nbd_open_uri (const char *uri, const char *name, bool extents, char **msg,
              bool *refused)
{
  struct nbd_handle *h;

  *refused = false;
  if (!uri_tls_files_exist (uri, msg))
    return NULL;
  h = nbd_create ();
  if (h == NULL)
    die ("nbd_create: %s", nbd_get_error ());
  if (nbd_set_handle_name (h, name) == -1 ||
      nbd_set_uri_allow_local_file (h, true) == -1 ||
      nbd_set_opt_mode (h, true) == -1 ||
      (extents &&
       nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1))
    die ("%s: %s", uri, nbd_get_error ());
  if (nbd_connect_uri (h, uri) == 0) {
    if (!nbd_aio_is_negotiating (h))    /* an oldstyle server */
      return h;
    if (nbd_opt_go (h) == 0)
      return h;
    *refused = true;
  }
  if ((*msg = strdup (nbd_get_error ())) == NULL)
    die ("strdup: %m");
  nbd_close (h);
  /* A server that only serves its snapshots over TLS refuses them to a
   * plain connection without saying why: say what to try, but only to
   * a server that offers TLS.
   */
  if (*refused && (strncmp (uri, "nbd://", 6) == 0 ||
                   strncmp (uri, "nbd+unix://", 11) == 0)) {
    int tls = server_offers_tls (uri);
    char *m;
    if (asprintf (&m, "%s (%s)", *msg,
                  tls == 0 ? "the server does not serve this export, "
                  "and it offers no TLS"
                  : tls == 1 ? "the server offers TLS and may serve this "
                  "export only over TLS: use nbds:// or nbds+unix:// with "
                  "tls-certificates= or tls-psk-file="
                  : "if the server requires TLS, use nbds:// or "
                  "nbds+unix:// with tls-certificates= or "
                  "tls-psk-file=") == -1)
      die ("asprintf: %m");
    free (*msg);
    *msg = m;
  }
  return NULL;
}

static bool nbd_lost (struct nbd_handle *h);

/* Say goodbye and wait for the server to close the connection (so that
 * whatever follows sees the export released), then free the handle.
 * After nbd_aio_disconnect, only wait.
 */
static void
nbd_finish (struct nbd_handle *h, bool disconnected)
{
  int64_t deadline = now_us () + 5000000;

  if (!disconnected && !nbd_lost (h))
    nbd_shutdown (h, 0);
  while (disconnected && !nbd_lost (h) && now_us () < deadline &&
         nbd_poll (h, 100) != -1)
    ;
  nbd_close (h);
}

static bool
nbd_lost (struct nbd_handle *h)
{
  return nbd_aio_is_dead (h) || nbd_aio_is_closed (h);
}

/* The source.  The handle is replaced when --on-error=retry reconnects. */
static struct {
  struct nbd_handle *nbd;
  uint64_t size;
  bool can_extents;
  char *lost;                   /* why the connection died, or NULL */
  bool reset;                   /* the server is going away: reconnect */
  bool released;                /* disconnect sent before the last flush */
} src;

/* Limit the request size to what a server accepts. */
static void
limit_request_size (struct nbd_handle *h)
{
  int64_t max = nbd_get_block_size (h, LIBNBD_SIZE_MAXIMUM);

  if (max >= 512 && (uint64_t) max < cfg.request_size)
    cfg.request_size = max;
}

/* Check the source after a connection; a reconnection must find the
 * same export.
 */
static void
source_check (bool again)
{
  int64_t size = nbd_get_size (src.nbd);

  if (size == -1)
    die ("%s: %s", cfg.source, nbd_get_error ());
  if (again && (uint64_t) size != src.size)
    die ("%s: the export is now %" PRIi64 " bytes, it was %" PRIu64,
         cfg.source, size, src.size);
  src.size = size;
  src.can_extents =
    nbd_can_meta_context (src.nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  if (cfg.discard_source && nbd_can_trim (src.nbd) != 1)
    die ("source cannot trim: %s does not support trim, which "
         "--discard-source needs", cfg.source);
  if (!again)
    limit_request_size (src.nbd);
}

static void
source_connect (void)
{
  bool refused;
  char *msg;

  src.nbd = nbd_open_uri (cfg.source, "source", true, &msg, &refused);
  if (src.nbd == NULL)
    die ("%s: %s", cfg.source, msg);
  source_check (false);
}

static void poll_handles (int timeout);

/* Replace a handle by a new connection to the same URI, trying
 * MAX_RETRIES times.  A dead handle has already failed every command
 * that was on it; a live one (a server going away answers everything
 * with ESHUTDOWN) is drained first, because nbd_close drops commands
 * without calling their completion callbacks.  The failed jobs are then
 * retried as usual.
 */
static void
reconnect (struct nbd_handle **hp, const char *uri, const char *name,
           bool extents, char **lost)
{
  int64_t deadline = now_us () + 5000000;
  bool refused;
  char *msg;
  unsigned i;

  warn ("connection to %s lost (%s): reconnecting", uri,
        *lost ? *lost : nbd_lost (*hp) ? "closed" : "server shutting down");
  while (!nbd_lost (*hp) && nbd_aio_in_flight (*hp) > 0 &&
         now_us () < deadline)
    poll_handles (100);
  if (nbd_aio_in_flight (*hp) > 0)
    die ("%s: requests still in flight on a connection that must be "
         "replaced", uri);
  nbd_close (*hp);
  *hp = NULL;
  for (i = 0; ; i++) {
    sleep_ms (RETRY_DELAY_MS << i);
    *hp = nbd_open_uri (uri, name, extents, &msg, &refused);
    if (*hp)
      break;
    if (i + 1 >= MAX_RETRIES)
      die ("cannot reconnect to %s: %s", uri, msg);
    warn ("reconnecting to %s failed: %s", uri, msg);
    free (msg);
  }
  free (*lost);
  *lost = NULL;
}

/* ---- The dirty bitmap (--sync=incremental) ---- */

static struct {
  uint64_t granularity;
  uint64_t nbits;
  uint8_t *bits;
  uint64_t dirty;               /* granules set */
  uint64_t dirty_bytes;         /* bytes of the disk they cover */
} bm;

static bool
bit_test (uint64_t i)
{
  return bm.bits[i >> 3] & (1u << (i & 7));
}

/* The first bit at or after i that is set (or clear), or bm.nbits. */
static uint64_t
bit_find (uint64_t i, bool set)
{
  const uint8_t skip = set ? 0 : 0xff;

  while (i < bm.nbits) {
    if ((i & 7) == 0 && bm.bits[i >> 3] == skip)
      i += 8;
    else if (bit_test (i) == set)
      return i;
    else
      i++;
  }
  return bm.nbits;
}

static bool
field_is (const char *field, const char *s)
{
  return memchr (field, '\0', FLEECE_BITMAP_NAME_SIZE) &&
    strcmp (field, s) == 0;
}

/* Check a bitmap header against the pull: the bitmap 'name' must
 * describe exactly the changes up to 'snapshot' of a disk of disk_size
 * bytes.  Returns -1 with the reason in err.
 */
static int
bitmap_check_header (const struct fleece_bitmap_header *h,
                     const char *name, const char *snapshot,
                     uint64_t disk_size, uint64_t export_size,
                     char *err, size_t n)
{
  uint32_t gran = le32toh (h->granularity), flags = le32toh (h->flags);
  uint64_t size = le64toh (h->disk_size), bits = le64toh (h->bit_count);
  const char *by = h->frozen_by;

  if (memcmp (h->magic, FLEECE_BITMAP_MAGIC, 8) != 0)
    snprintf (err, n, "bitmap '%s' has a bad header: no FLEECEBM magic",
              name);
  else if (le32toh (h->version) != FLEECE_BITMAP_VERSION)
    snprintf (err, n, "bitmap '%s' has version %" PRIu32 ", this "
              "fleece-backup reads version %d", name,
              le32toh (h->version), FLEECE_BITMAP_VERSION);
  else if (XXH64 (h, offsetof (struct fleece_bitmap_header, checksum), 0)
           != le64toh (h->checksum))
    snprintf (err, n, "bitmap '%s' has a bad header: wrong checksum",
              name);
  else if (le32toh (h->header_size) != FLEECE_BITMAP_HEADER_SIZE)
    snprintf (err, n, "bitmap '%s' has a bad header: header size "
              "%" PRIu32, name, le32toh (h->header_size));
  else if (gran == 0 || (gran & (gran - 1)) != 0)
    snprintf (err, n, "bitmap '%s' has a bad header: granularity "
              "%" PRIu32 " is not a power of two", name, gran);
  else if (!field_is (h->name, name))
    snprintf (err, n, "bitmap '%s' has a bad header: it is not named "
              "'%s'", name, name);
  else if (bits != size / gran + (size % gran != 0))
    snprintf (err, n, "bitmap '%s' has a bad header: %" PRIu64 " bits "
              "for %" PRIu64 " bytes at granularity %" PRIu32,
              name, bits, size, gran);
  else if (export_size < FLEECE_BITMAP_HEADER_SIZE + (bits + 7) / 8)
    snprintf (err, n, "bitmap '%s' is truncated: the export has "
              "%" PRIu64 " bytes, its bits need %" PRIu64, name,
              export_size, FLEECE_BITMAP_HEADER_SIZE + (bits + 7) / 8);
  else if (flags & FLEECE_BM_INCONSISTENT)
    snprintf (err, n, "bitmap '%s' is marked inconsistent: do a full "
              "pull", name);
  else if (!(flags & FLEECE_BM_FROZEN))
    snprintf (err, n, "bitmap '%s' is not frozen: it is still recording "
              "writes; create a checkpoint and pull its snapshot", name);
  else if (!field_is (by, snapshot))
    snprintf (err, n, "bitmap '%s' was frozen by checkpoint '%.*s', not "
              "by '%s': it does not describe the changes up to "
              "snapshot/%s", name, (int) strnlen (by, 128), by,
              snapshot, snapshot);
  else if (size != disk_size)
    snprintf (err, n, "bitmap '%s' is for a disk of %" PRIu64 " bytes, "
              "the source is %" PRIu64 " bytes", name, size, disk_size);
  else
    return 0;
  return -1;
}

/* Loading the bitmap runs on a thread of its own, started before the
 * source connection, so that the two handshakes overlap: the thread
 * connects to bitmap/CHECKPOINT and reads the header and, in the same
 * request, the first BITMAP_PREFETCH bytes of bits.  It only uses its
 * own handle and the fields below (nbd_get_error is per thread) and
 * reports its errors there; the checks that need the source (its size)
 * are made by the main thread after joining it, in the same order and
 * with the same messages as when the load came after the connection.
 */
#define BITMAP_PREFETCH (1u << 20)

static struct {
  pthread_t thread;
  /* Written by the thread, read after the join. */
  struct nbd_handle *h;         /* NULL: it could not connect */
  int64_t size;                 /* of the export */
  union {
    struct fleece_bitmap_header h;
    char raw[FLEECE_BITMAP_HEADER_SIZE];
  } hdr;
  char *prefix;                 /* bytes of bits after the header */
  uint64_t have;                /* ... how many */
  char err[1024];               /* why the load failed, or "" */
} bl;

static void *
bitmap_thread (void *arg)
{
  const char *override = getenv ("FLEECE_BACKUP_BITMAP_URI");
  const char *name = cfg.since;
  uint64_t want = FLEECE_BITMAP_HEADER_SIZE;
  int64_t max;
  char *uri, *msg;
  bool refused;

  uri = override ? strdup (override) : bitmap_uri (cfg.source, name);
  if (uri == NULL) {
    snprintf (bl.err, sizeof bl.err, "strdup: %m");
    return NULL;
  }
  bl.h = nbd_open_uri (uri, "bitmap", false, &msg, &refused);
  free (uri);
  if (bl.h == NULL) {
    snprintf (bl.err, sizeof bl.err, refused
              ? "bitmap '%s' does not exist on the server: %s"
              : "bitmap '%s' cannot be opened: %s", name, msg);
    free (msg);
    return NULL;
  }
  bl.size = nbd_get_size (bl.h);
  max = nbd_get_block_size (bl.h, LIBNBD_SIZE_MAXIMUM);
  /* The header and the first bits in one request when the export allows;
   * a short export fails the header read as it did before.
   */
  if (bl.size > (int64_t) want) {
    want = (uint64_t) bl.size < want + BITMAP_PREFETCH ? (uint64_t) bl.size
      : want + BITMAP_PREFETCH;
    if (max >= FLEECE_BITMAP_HEADER_SIZE && (uint64_t) max < want)
      want = max;
  }
  bl.prefix = malloc (want);
  if (bl.prefix == NULL) {
    snprintf (bl.err, sizeof bl.err, "malloc: %m");
    return NULL;
  }
  if (bl.size == -1 || nbd_pread (bl.h, bl.prefix, want, 0, 0) == -1) {
    snprintf (bl.err, sizeof bl.err, "bitmap '%s': %s", name,
              nbd_get_error ());
    return NULL;
  }
  memcpy (bl.hdr.raw, bl.prefix, FLEECE_BITMAP_HEADER_SIZE);
  bl.have = want - FLEECE_BITMAP_HEADER_SIZE;
  memmove (bl.prefix, bl.prefix + FLEECE_BITMAP_HEADER_SIZE, bl.have);
  return NULL;
}

static void
bitmap_start (void)
{
  int e = pthread_create (&bl.thread, NULL, bitmap_thread, NULL);

  if (e != 0) {
    errno = e;
    die ("pthread_create: %m");
  }
}

/* The bits: those the thread read, then the rest; then count them. */
static int
bitmap_read_bits (const char *name, char *err, size_t n)
{
  uint64_t nbytes = (bm.nbits + 7) / 8, off, count = 0, dirty;
  size_t len;

  bm.bits = xcalloc (1, nbytes + 1);
  off = bl.have < nbytes ? bl.have : nbytes;
  memcpy (bm.bits, bl.prefix, off);
  for (; off < nbytes; off += len) {
    len = nbytes - off < cfg.request_size ? nbytes - off : cfg.request_size;
    if (nbd_pread (bl.h, bm.bits + off, len,
                   FLEECE_BITMAP_HEADER_SIZE + off, 0) == -1) {
      snprintf (err, n, "bitmap '%s': %s", name, nbd_get_error ());
      return -1;
    }
  }
  if (bm.nbits & 7)             /* bits past the end do not count */
    bm.bits[nbytes - 1] &= (1u << (bm.nbits & 7)) - 1;
  for (off = 0; off < nbytes; off++)
    count += __builtin_popcount (bm.bits[off]);
  dirty = le64toh (bl.hdr.h.dirty_count);
  if (count != dirty) {
    snprintf (err, n, "bitmap '%s' is damaged: its header counts "
              "%" PRIu64 " dirty granules, its bits %" PRIu64,
              name, dirty, count);
    return -1;
  }
  bm.dirty = count;
  bm.dirty_bytes = count * bm.granularity;
  if (count && bit_test (bm.nbits - 1) &&
      src.size % bm.granularity)
    bm.dirty_bytes -= bm.granularity - src.size % bm.granularity;
  return 0;
}

/* Wait for the thread and check what it read against the source.  Any
 * problem with the bitmap is returned as -1 and a message, so that
 * --fallback-full can say why it pulls everything.
 */
static int
bitmap_load (const char *snapshot, char *err, size_t n)
{
  int e, r = -1;

  e = pthread_join (bl.thread, NULL);
  if (e != 0) {
    errno = e;
    die ("pthread_join: %m");
  }
  if (bl.err[0]) {
    snprintf (err, n, "%s", bl.err);
    goto out;
  }
  if (bitmap_check_header (&bl.hdr.h, cfg.since, snapshot, src.size,
                           bl.size, err, n) == -1)
    goto out;
  bm.granularity = le32toh (bl.hdr.h.granularity);
  bm.nbits = le64toh (bl.hdr.h.bit_count);
  r = bitmap_read_bits (cfg.since, err, n);
 out:
  /* Say goodbye without waiting for the server to close: pull_end
   * closes the handle.
   */
  if (bl.h && !nbd_lost (bl.h) && nbd_aio_disconnect (bl.h, 0) == -1) {
    nbd_close (bl.h);
    bl.h = NULL;
  }
  free (bl.prefix);
  bl.prefix = NULL;
  if (r == -1) {
    free (bm.bits);
    bm.bits = NULL;
  }
  return r;
}

static void
incremental_prepare (const char *snapshot)
{
  char err[1024];

  if (bitmap_load (snapshot, err, sizeof err) == 0)
    return;
  if (!cfg.fallback_full)
    die ("%s", err);
  warn ("%s: doing a full pull instead (--fallback-full)", err);
  cfg.sync = SYNC_FULL;
}

/* ---- The target ---- */

enum { ZM_PUNCH, ZM_ZERO_RANGE, ZM_WRITE };

static struct {
  /* Set when opened, then constant. */
  bool is_nbd;
  int fd;                       /* a file or a block device */
  bool known_zero;              /* a new sparse file: holes are zero */
  /* NBD; the handle is replaced when --on-error=retry reconnects. */
  struct nbd_handle *nbd;
  bool can_zero, can_flush;
  char *lost;
  bool reset;
  /* File: how zeroes are written, downgraded when unsupported. */
  int zero_method;
} tgt = { .fd = -1 };

static char *zero_buf;          /* request_size zero bytes */

static void
target_check (bool again)
{
  int64_t size = nbd_get_size (tgt.nbd);

  if (size == -1)
    die ("%s: %s", cfg.target, nbd_get_error ());
  if (nbd_is_read_only (tgt.nbd) == 1)
    die ("target %s is read-only", cfg.target);
  if ((uint64_t) size < src.size)
    die ("target too small: %s is %" PRIi64 " bytes, the source is "
         "%" PRIu64 " bytes", cfg.target, size, src.size);
  tgt.can_zero = nbd_can_zero (tgt.nbd) == 1;
  tgt.can_flush = nbd_can_flush (tgt.nbd) == 1;
  if (!again)
    limit_request_size (tgt.nbd);
}

/* Full and top pulls start from an empty sparse file, so that holes need
 * no writes; an incremental pull writes onto the previous image.  A
 * block device is used as it is.
 */
static void
target_open_file (void)
{
  bool fresh = cfg.sync != SYNC_INCREMENTAL;
  struct stat st;
  uint64_t size;

  if (stat (cfg.target, &st) == 0 && S_ISBLK (st.st_mode)) {
    tgt.fd = open (cfg.target, O_RDWR | O_CLOEXEC);
    if (tgt.fd == -1)
      die ("open: %s: %m", cfg.target);
    if (ioctl (tgt.fd, BLKGETSIZE64, &size) == -1)
      die ("ioctl BLKGETSIZE64: %s: %m", cfg.target);
    if (size < src.size)
      die ("target too small: %s is %" PRIu64 " bytes, the source is "
           "%" PRIu64 " bytes", cfg.target, size, src.size);
    return;
  }
  tgt.fd = open (cfg.target, O_RDWR | O_CLOEXEC |
                 (fresh ? O_CREAT | O_TRUNC : 0), 0666);
  if (tgt.fd == -1 && errno == ENOENT && !fresh)
    die ("target %s does not exist: an incremental pull writes onto the "
         "image of checkpoint '%s'", cfg.target, cfg.since);
  if (tgt.fd == -1)
    die ("open: %s: %m", cfg.target);
  if (fstat (tgt.fd, &st) == -1)
    die ("fstat: %s: %m", cfg.target);
  if (!S_ISREG (st.st_mode))
    die ("target %s is not a regular file or a block device", cfg.target);
  if (fresh) {
    if (ftruncate (tgt.fd, src.size) == -1)
      die ("ftruncate: %s: %m", cfg.target);
    tgt.known_zero = true;
  }
  else if ((uint64_t) st.st_size != src.size)
    die ("target %s is %" PRIi64 " bytes, the source is %" PRIu64 " bytes",
         cfg.target, (int64_t) st.st_size, src.size);
}

static void
target_open (void)
{
  bool refused;
  char *msg;

  tgt.is_nbd = strstr (cfg.target, "://") != NULL;
  if (!tgt.is_nbd) {
    target_open_file ();
    return;
  }
  tgt.nbd = nbd_open_uri (cfg.target, "target", false, &msg, &refused);
  if (tgt.nbd == NULL)
    die ("%s: %s", cfg.target, msg);
  target_check (false);
}

/* Read or write all of [off, off+len) of the target file, retrying
 * short transfers; a file that shrank under us is an I/O error.
 */
static int
file_io (bool write, char *buf, uint64_t len, uint64_t off)
{
  ssize_t r;

  while (len > 0) {
    r = write ? pwrite (tgt.fd, buf, len, off) : pread (tgt.fd, buf, len, off);
    if (r == -1 && errno == EINTR)
      continue;
    if (r <= 0) {
      if (r == 0)
        errno = EIO;
      return -1;
    }
    buf += r;
    len -= r;
    off += r;
  }
  return 0;
}

static int
file_pwrite (const char *buf, uint64_t len, uint64_t off)
{
  if (file_io (true, (char *) buf, len, off) == -1)
    return -1;
  /* Start writing it back now, so that the flush at the end of the
   * batch overlaps the copy rather than following it.  Best effort: the
   * flush (fdatasync) is what makes the data stable.
   */
  (void) sync_file_range (tgt.fd, off, len, SYNC_FILE_RANGE_WRITE);
  return 0;
}

static int
file_pread (char *buf, uint64_t len, uint64_t off)
{
  return file_io (false, buf, len, off);
}

/* Zero a range of the target file: punch a hole, else zero the range,
 * else write zeroes.
 */
static int
file_zero (uint64_t len, uint64_t off)
{
  uint64_t n;

  if (tgt.zero_method == ZM_PUNCH) {
    if (fallocate (tgt.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   off, len) == 0)
      return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
      return -1;
    tgt.zero_method = ZM_ZERO_RANGE;
  }
  if (tgt.zero_method == ZM_ZERO_RANGE) {
    if (fallocate (tgt.fd, FALLOC_FL_ZERO_RANGE, off, len) == 0)
      return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
      return -1;
    tgt.zero_method = ZM_WRITE;
  }
  for (; len > 0; len -= n, off += n) {
    n = len < cfg.request_size ? len : cfg.request_size;
    if (file_pwrite (zero_buf, n, off) == -1)
      return -1;
  }
  return 0;
}

/* ---- Jobs ---- */

enum job_kind { JOB_COPY, JOB_ZERO, JOB_VERIFY, JOB_STATUS, JOB_FLUSH,
                JOB_TRIM };

/* An extent of the source (flags: LIBNBD_STATE_*), or a finished range
 * (flags: LIBNBD_STATE_ZERO if it was zeroed).
 */
struct extent {
  uint64_t offset, length;
  uint32_t flags;
};

struct rvec {
  struct extent *v;
  size_t n, cap;
  uint64_t bytes;
};

struct job {
  struct job *next;             /* in one of the lists of P */
  enum job_kind kind;
  unsigned step;                /* COPY: 0 reading, 1 writing */
  uint64_t offset, length;
  int attempts;                 /* failures of this step so far */
  int64_t not_before;           /* retry list: when to start again */
  char *buf;                    /* COPY, VERIFY: source data */
  char *buf2;                   /* VERIFY: target data */
  struct rvec ext;              /* STATUS: the server's extents */
  /* Written by the completion callbacks, read by the loop. */
  int pending;                  /* commands not yet completed */
  int err;                      /* the first error */
  bool err_target;              /* ... was on the target */
};

struct jlist {
  struct job *head, *tail;
  size_t len;
};

/* The state of the pull, all of it owned by the loop. */
static struct {
  /* Jobs.  Retried jobs keep their slot while they wait. */
  struct jlist ready;           /* not started */
  struct jlist done;            /* completed, not yet looked at */
  struct job *retry;            /* failed, waiting for not_before */
  unsigned slots;               /* COPY, ZERO, VERIFY jobs started */
  unsigned others;              /* STATUS, FLUSH, TRIM jobs started */
  /* The planner: everything before pos has become jobs. */
  uint64_t pos;
  bool planned;                 /* pos reached the end */
  bool status_out;              /* a STATUS job is out */
  uint64_t copy_chunk, zero_chunk;
  /* Finished ranges: not yet flushed; the batch being flushed, verified
   * and trimmed (batch_out).
   */
  struct rvec unflushed, batch;
  bool batch_out;
  size_t batch_verify;          /* VERIFY jobs of the batch still out */
  unsigned flush_failures;
  /* What was done, for the summary and the progress bar. */
  uint64_t read, written, zeroed, verified, trimmed;
  uint64_t total, covered;
} P;

static void
jl_push (struct jlist *l, struct job *j)
{
  j->next = NULL;
  if (l->tail)
    l->tail->next = j;
  else
    l->head = j;
  l->tail = j;
  l->len++;
}

static struct job *
jl_pop (struct jlist *l)
{
  struct job *j = l->head;

  if (j) {
    l->head = j->next;
    if (l->head == NULL)
      l->tail = NULL;
    l->len--;
  }
  return j;
}

/* Put all of l2 in front of l. */
static void
jl_prepend (struct jlist *l, struct jlist *l2)
{
  if (l2->head == NULL)
    return;
  l2->tail->next = l->head;
  if (l->tail == NULL)
    l->tail = l2->tail;
  l->head = l2->head;
  l->len += l2->len;
  memset (l2, 0, sizeof *l2);
}

/* Append a range, merged with the last one if it continues it.  Returns
 * -1 if out of memory (the extent callback must not die: it runs with
 * the handle locked).
 */
static int
rvec_append (struct rvec *r, uint64_t offset, uint64_t length,
             uint32_t flags, bool merge)
{
  struct extent *last = r->n ? &r->v[r->n - 1] : NULL;

  if (merge && last && last->offset + last->length == offset &&
      last->flags == flags) {
    last->length += length;
    r->bytes += length;
    return 0;
  }
  if (r->n == r->cap) {
    size_t cap = r->cap ? r->cap * 2 : 64;
    struct extent *v = realloc (r->v, cap * sizeof *v);

    if (v == NULL)
      return -1;
    r->v = v;
    r->cap = cap;
  }
  r->v[r->n++] = (struct extent) { offset, length, flags };
  r->bytes += length;
  return 0;
}

static void
rvec_add (struct rvec *r, uint64_t offset, uint64_t length, uint32_t flags,
          bool merge)
{
  if (rvec_append (r, offset, length, flags, merge) == -1)
    die ("realloc: %m");
}

static void
rvec_clear (struct rvec *r)
{
  r->n = 0;
  r->bytes = 0;
}

static struct job *
job_new (enum job_kind kind, uint64_t offset, uint64_t length)
{
  struct job *j = xcalloc (1, sizeof *j);

  j->kind = kind;
  j->offset = offset;
  j->length = length;
  return j;
}

static void
job_free (struct job *j)
{
  free (j->buf);
  free (j->buf2);
  free (j->ext.v);
  free (j);
}

static bool
job_has_slot (const struct job *j)
{
  return j->kind == JOB_COPY || j->kind == JOB_ZERO ||
    j->kind == JOB_VERIFY;
}

static bool
job_reads_source (const struct job *j)
{
  return (j->kind == JOB_COPY && j->step == 0) || j->kind == JOB_VERIFY;
}

/* Add jobs for [offset, offset+length), split at multiples of chunk. */
static void
add_jobs (struct jlist *l, enum job_kind kind, uint64_t offset,
          uint64_t length, uint64_t chunk)
{
  uint64_t n;

  for (; length > 0; offset += n, length -= n) {
    n = chunk - offset % chunk;
    if (n > length)
      n = length;
    jl_push (l, job_new (kind, offset, n));
  }
}

/* ---- Completion callbacks: record, queue, nothing else ---- */

static void
job_completed (struct job *j, int err, bool target)
{
  if (err && j->err == 0) {
    j->err = err;
    j->err_target = target;
  }
  assert (j->pending > 0);
  if (--j->pending == 0)
    jl_push (&P.done, j);
}

static int
source_done (void *opaque, int *error)
{
  job_completed (opaque, *error, false);
  return 1;
}

static int
target_done (void *opaque, int *error)
{
  job_completed (opaque, *error, true);
  return 1;
}

static int
status_extent (void *opaque, const char *context, uint64_t offset,
               uint32_t *entries, size_t nr_entries, int *error)
{
  struct job *j = opaque;
  size_t i;

  if (strcmp (context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  for (i = 0; i + 1 < nr_entries; i += 2) {
    if (rvec_append (&j->ext, offset, entries[i], entries[i+1], false)
        == -1) {
      *error = ENOMEM;
      return -1;
    }
    offset += entries[i];
  }
  return 0;
}

#define SOURCE_CB(j) \
  ((nbd_completion_callback) { .callback = source_done, .user_data = (j) })
#define TARGET_CB(j) \
  ((nbd_completion_callback) { .callback = target_done, .user_data = (j) })

/* After an asynchronous call: if it could not be issued because the
 * connection is gone, the job fails (and may be retried); any other
 * refusal is a bug or a bad argument, and fatal.
 */
static void
issued (int64_t cookie, struct job *j, bool target)
{
  struct nbd_handle *h = target ? tgt.nbd : src.nbd;

  if (cookie != -1)
    return;
  if (!nbd_lost (h))
    die ("%s: %s", target ? cfg.target : cfg.source, nbd_get_error ());
  job_completed (j, ENOTCONN, target);
}

/* A synchronous file operation: complete the job now. */
static void
file_done (struct job *j, int r)
{
  j->pending = 1;
  job_completed (j, r == -1 ? errno : 0, true);
}

static void
start_copy (struct job *j)
{
  if (j->step == 0) {
    if (j->buf == NULL)
      j->buf = xmalloc (j->length);
    j->pending = 1;
    issued (nbd_aio_pread (src.nbd, j->buf, j->length, j->offset,
                           SOURCE_CB (j), 0), j, false);
  }
  else if (!tgt.is_nbd)
    file_done (j, file_pwrite (j->buf, j->length, j->offset));
  else {
    j->pending = 1;
    issued (nbd_aio_pwrite (tgt.nbd, j->buf, j->length, j->offset,
                            TARGET_CB (j), 0), j, true);
  }
}

static void
start_zero (struct job *j)
{
  if (!tgt.is_nbd) {
    file_done (j, file_zero (j->length, j->offset));
    return;
  }
  j->pending = 1;
  if (tgt.can_zero)
    issued (nbd_aio_zero (tgt.nbd, j->length, j->offset, TARGET_CB (j), 0),
            j, true);
  else                          /* zero_chunk is request_size */
    issued (nbd_aio_pwrite (tgt.nbd, zero_buf, j->length, j->offset,
                            TARGET_CB (j), 0), j, true);
}

static void
start_verify (struct job *j)
{
  if (j->buf == NULL) {
    j->buf = xmalloc (j->length);
    j->buf2 = xmalloc (j->length);
  }
  j->pending = tgt.is_nbd ? 2 : 1;
  if (!tgt.is_nbd && file_pread (j->buf2, j->length, j->offset) == -1) {
    j->err = errno;
    j->err_target = true;
  }
  issued (nbd_aio_pread (src.nbd, j->buf, j->length, j->offset,
                         SOURCE_CB (j), 0), j, false);
  if (tgt.is_nbd)
    issued (nbd_aio_pread (tgt.nbd, j->buf2, j->length, j->offset,
                           TARGET_CB (j), 0), j, true);
}

static void
job_start (struct job *j)
{
  j->err = 0;
  switch (j->kind) {
  case JOB_COPY:
    start_copy (j);
    break;
  case JOB_ZERO:
    start_zero (j);
    break;
  case JOB_VERIFY:
    start_verify (j);
    break;
  case JOB_STATUS:
    rvec_clear (&j->ext);
    j->pending = 1;
    issued (nbd_aio_block_status (src.nbd, j->length, j->offset,
                                  (nbd_extent_callback) {
                                    .callback = status_extent,
                                    .user_data = j },
                                  SOURCE_CB (j), 0), j, false);
    break;
  case JOB_FLUSH:
    j->pending = 1;
    issued (nbd_aio_flush (tgt.nbd, TARGET_CB (j), 0), j, true);
    break;
  case JOB_TRIM:
    j->pending = 1;
    issued (nbd_aio_trim (src.nbd, j->length, j->offset, SOURCE_CB (j), 0),
            j, false);
    break;
  }
}

/* Start a job that needs no slot (STATUS, FLUSH, TRIM). */
static void
job_start_other (struct job *j)
{
  P.others++;
  job_start (j);
}

/* ---- Rate limit (--rate): a token bucket of bytes read ---- */

static struct {
  double tokens;
  int64_t last;                 /* microseconds */
} bucket;

/* Take n bytes from the bucket, or say in *wait how many microseconds
 * until they are there.  force takes them anyway (a retry).
 */
static bool
rate_take (uint64_t n, bool force, int64_t *wait)
{
  double cap, rate = cfg.rate;
  int64_t t;

  if (cfg.rate == 0)
    return true;
  t = now_us ();
  cap = rate / 10 > cfg.request_size ? rate / 10 : cfg.request_size;
  bucket.tokens += (t - bucket.last) * rate / 1e6;
  bucket.last = t;
  if (bucket.tokens > cap)
    bucket.tokens = cap;
  if (!force && bucket.tokens < n) {
    *wait = (n - bucket.tokens) * 1e6 / rate + 1;
    return false;
  }
  bucket.tokens -= n;
  return true;
}

/* ---- Progress ---- */

#define PROGRESS_SAMPLES 20     /* the speed is measured over 2 s */

static struct {
  bool bar;                     /* --progress, and stderr is a terminal */
  int width;                    /* of the line on screen; 0: none */
  int64_t start, last;
  int64_t when[PROGRESS_SAMPLES];
  uint64_t covered[PROGRESS_SAMPLES];
  unsigned n;
} prog;

static void
human (uint64_t v, char *buf, size_t n)
{
  static const char *const units[] = { "KiB", "MiB", "GiB", "TiB", "PiB" };
  double d = v;
  int i = -1;

  if (v < 1024) {
    snprintf (buf, n, "%" PRIu64 " B", v);
    return;
  }
  while (d >= 1024 && i < 4) {
    d /= 1024;
    i++;
  }
  snprintf (buf, n, "%.1f %s", d, units[i]);
}

static void
progress_clear (void)
{
  if (prog.width > 0)
    fprintf (stderr, "\r%*s\r", prog.width, "");
  prog.width = 0;
}

static void
progress_show (void)
{
  unsigned pct, oldest;
  char line[160], done[32], total[32], speed[32], eta[32] = "-:--";
  double secs, bps = 0;
  int64_t t = now_us ();
  uint64_t eta_s;
  int w;

  if (!prog.bar || t - prog.last < PROGRESS_MS * 1000)
    return;
  prog.last = t;
  oldest = prog.n < PROGRESS_SAMPLES ? 0 : prog.n % PROGRESS_SAMPLES;
  prog.when[prog.n % PROGRESS_SAMPLES] = t;
  prog.covered[prog.n % PROGRESS_SAMPLES] = P.covered;
  prog.n++;
  secs = (t - prog.when[oldest]) / 1e6;
  if (secs > 0)
    bps = (P.covered - prog.covered[oldest]) / secs;
  if (bps >= 1) {
    eta_s = (P.total - P.covered) / bps;
    if (eta_s >= 3600)
      snprintf (eta, sizeof eta, "%" PRIu64 ":%02u:%02u", eta_s / 3600,
                (unsigned) (eta_s / 60 % 60), (unsigned) (eta_s % 60));
    else
      snprintf (eta, sizeof eta, "%u:%02u", (unsigned) (eta_s / 60),
                (unsigned) (eta_s % 60));
  }
  pct = P.total ? P.covered * 100 / P.total : 100;
  human (P.covered, done, sizeof done);
  human (P.total, total, sizeof total);
  human (bps, speed, sizeof speed);
  w = snprintf (line, sizeof line, "%3u%% %s / %s  %s/s  ETA %s",
                pct, done, total, speed, eta);
  fprintf (stderr, "\r%s%*s", line, prog.width > w ? prog.width - w : 0,
           "");
  prog.width = w > prog.width ? w : prog.width;
}

/* ---- The planner: source extents (and the bitmap) become jobs ---- */

/* A range of the source is finished: it is on the target (or known zero
 * there) but not yet flushed.
 */
static void
range_done (uint64_t offset, uint64_t length, bool zero)
{
  P.covered += length;
  rvec_add (&P.unflushed, offset, length, zero ? LIBNBD_STATE_ZERO : 0,
            true);
}

static void
plan_piece (uint64_t offset, uint64_t length, uint32_t flags)
{
  bool zero = flags & LIBNBD_STATE_ZERO;

  if (cfg.sync == SYNC_TOP && (flags & LIBNBD_STATE_HOLE))
    P.covered += cfg.verify ? 2 * length : length;  /* left untouched */
  else if (zero && tgt.known_zero)
    range_done (offset, length, true);
  else if (zero)
    add_jobs (&P.ready, JOB_ZERO, offset, length, P.zero_chunk);
  else
    add_jobs (&P.ready, JOB_COPY, offset, length, P.copy_chunk);
}

/* Plan an extent: all of it, or for an incremental pull the dirty runs
 * inside it.
 */
static void
plan_extent (uint64_t offset, uint64_t length, uint32_t flags)
{
  uint64_t end = offset + length, i, run_end;

  if (cfg.sync != SYNC_INCREMENTAL) {
    plan_piece (offset, length, flags);
    return;
  }
  while (offset < end) {
    i = offset / bm.granularity;
    if (!bit_test (i)) {
      i = bit_find (i, true);
      if (i >= bm.nbits || i * bm.granularity >= end)
        return;
      offset = i * bm.granularity;
      continue;
    }
    run_end = bit_find (i, false) * bm.granularity;
    if (run_end > end)
      run_end = end;
    plan_piece (offset, run_end - offset, flags);
    offset = run_end;
  }
}

/* Move P.pos to the next byte to copy; false at the end. */
static bool
plan_next (void)
{
  uint64_t i;

  if (P.pos >= src.size)
    return false;
  if (cfg.sync != SYNC_INCREMENTAL)
    return true;
  i = P.pos / bm.granularity;
  if (bit_test (i))
    return true;
  i = bit_find (i, true);
  if (i >= bm.nbits)
    return false;
  P.pos = i * bm.granularity;
  return true;
}

/* Keep about two rounds of requests ready.  One block status covers at
 * most 1024 requests, so that the ready list stays small whatever the
 * request size.
 */
static void
plan_more (void)
{
  uint64_t end, span = (uint64_t) cfg.request_size * 1024;

  if (P.planned || P.status_out || P.ready.len >= 2 * cfg.requests)
    return;
  if (!plan_next ()) {
    P.planned = true;
    return;
  }
  if (span > STATUS_SPAN)
    span = STATUS_SPAN;
  end = src.size - P.pos > span ? P.pos + span : src.size;
  if (!src.can_extents) {
    plan_extent (P.pos, end - P.pos, 0);
    P.pos = end;
    return;
  }
  P.status_out = true;
  job_start_other (job_new (JOB_STATUS, P.pos, end - P.pos));
}

/* An incremental pull asks for the first extents from offset 0 before it
 * has the bitmap, so that the server works on them while the bitmap is
 * loaded; plan_status then keeps only the dirty runs (or everything, if
 * --fallback-full gave up on the bitmap).
 */
static void
plan_first (void)
{
  uint64_t span = (uint64_t) cfg.request_size * 1024;

  if (!src.can_extents || src.size == 0)
    return;
  if (span > STATUS_SPAN)
    span = STATUS_SPAN;
  P.status_out = true;
  job_start_other (job_new (JOB_STATUS, 0,
                            src.size > span ? span : src.size));
}

/* The server may describe less than was asked: plan what it said and
 * ask again from there.
 */
static void
plan_status (struct job *j)
{
  uint64_t pos = j->offset, end = j->offset + j->length, skip, len;
  size_t i;

  for (i = 0; i < j->ext.n && pos < end; i++) {
    struct extent *e = &j->ext.v[i];

    if (e->offset > pos || e->offset + e->length <= pos)
      break;                    /* not contiguous: ask again */
    skip = pos - e->offset;
    len = e->length - skip < end - pos ? e->length - skip : end - pos;
    plan_extent (pos, len, e->flags);
    pos += len;
  }
  if (pos == j->offset)
    die ("block status of %s at offset %" PRIu64 ": the server described "
         "nothing", cfg.source, j->offset);
  P.pos = pos;
  P.status_out = false;
}

/* ---- Batches: flush the target, then verify, then trim the source ---- */

/* Copy again what may not have reached the target's disk. */
static void
redo_ranges (struct rvec *r)
{
  size_t i;

  for (i = 0; i < r->n; i++) {
    struct extent *e = &r->v[i];

    P.covered -= e->length;
    plan_piece (e->offset, e->length, e->flags);
  }
  rvec_clear (r);
}

/* The batch is safe on the target: trim it on the source, coalescing
 * what was copied with what was zeroed.
 */
static void
batch_verified (void)
{
  struct jlist trims = { NULL };
  uint64_t off, len;
  size_t i;

  for (i = 0; cfg.discard_source && i < P.batch.n; ) {
    off = P.batch.v[i].offset;
    len = 0;
    for (; i < P.batch.n && P.batch.v[i].offset == off + len; i++)
      len += P.batch.v[i].length;
    add_jobs (&trims, JOB_TRIM, off, len, ZERO_MAX);
  }
  while (trims.head)
    job_start_other (jl_pop (&trims));
  rvec_clear (&P.batch);
  P.batch_out = false;
}

static void
batch_flushed (void)
{
  struct jlist verify = { NULL };
  size_t i;

  if (!cfg.verify) {
    batch_verified ();
    return;
  }
  for (i = 0; i < P.batch.n; i++)
    add_jobs (&verify, JOB_VERIFY, P.batch.v[i].offset,
              P.batch.v[i].length, cfg.request_size);
  P.batch_verify = verify.len;
  jl_prepend (&P.ready, &verify);
  if (P.batch_verify == 0)
    batch_verified ();
}

static void
flush_failed (const char *msg)
{
  if (!cfg.retry || ++P.flush_failures > MAX_RETRIES)
    die ("%s", msg);
  warn ("%s: writing the last %" PRIu64 " bytes again", msg,
        P.batch.bytes);
  redo_ranges (&P.batch);
  P.batch_out = false;
}

static int
extent_cmp (const void *a, const void *b)
{
  const struct extent *x = a, *y = b;

  return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Ranges finish out of order: sort them and merge neighbours, so that
 * verify reads and trims are few and sequential.
 */
static void
rvec_sort (struct rvec *r)
{
  size_t i, n = 0;

  if (r->n == 0)
    return;
  qsort (r->v, r->n, sizeof *r->v, extent_cmp);
  for (i = 1; i < r->n; i++) {
    struct extent *last = &r->v[n];

    if (last->offset + last->length == r->v[i].offset &&
        last->flags == r->v[i].flags)
      last->length += r->v[i].length;
    else
      r->v[++n] = r->v[i];
  }
  r->n = n + 1;
}

static bool
pull_idle (void)
{
  return P.planned && !P.status_out && P.ready.head == NULL &&
    P.retry == NULL && P.done.head == NULL && P.slots == 0;
}

/* Before the last flush of a file target: if nothing more can be asked
 * of the source (no verify, no trim, no retry after a failed flush),
 * say goodbye now, so that the server closes the connection while the
 * target is flushed rather than after; pull_end waits for it.
 */
static void
source_release (void)
{
  if (!pull_idle () || cfg.verify || cfg.discard_source || cfg.retry ||
      P.others > 0 || nbd_lost (src.nbd) ||
      nbd_aio_in_flight (src.nbd) > 0)
    return;
  src.released = nbd_aio_disconnect (src.nbd, 0) == 0;
}

/* Cut a batch every BATCH_* bytes, and at the end. */
static void
batch_maybe_start (void)
{
  struct rvec t;
  char msg[1024];

  if (P.batch_out || P.unflushed.n == 0)
    return;
  if (P.unflushed.bytes < (cfg.discard_source ? BATCH_DISCARD
                           : BATCH_DEFAULT) && !pull_idle ())
    return;
  t = P.batch;
  P.batch = P.unflushed;
  P.unflushed = t;
  rvec_clear (&P.unflushed);
  rvec_sort (&P.batch);
  P.batch_out = true;
  if (tgt.is_nbd && tgt.can_flush)
    job_start_other (job_new (JOB_FLUSH, 0, 0));
  else if (!tgt.is_nbd && (source_release (), fdatasync (tgt.fd) == -1)) {
    snprintf (msg, sizeof msg, "flush of %s failed: %m", cfg.target);
    flush_failed (msg);
  }
  else
    batch_flushed ();
}

/* ---- Finishing jobs ---- */

static void
describe_failure (const struct job *j, char *msg, size_t n)
{
  static const char *const what[] = {
    [JOB_COPY] = "read", [JOB_ZERO] = "write", [JOB_VERIFY] = "read",
    [JOB_STATUS] = "block status", [JOB_FLUSH] = "flush",
    [JOB_TRIM] = "trim",
  };
  const char *lost = j->err_target ? tgt.lost : src.lost;
  const char *w = j->kind == JOB_COPY && j->step ? "write" : what[j->kind];
  int len;

  len = snprintf (msg, n, "%s of %s failed", w,
                  j->err_target ? cfg.target : cfg.source);
  if (j->kind != JOB_FLUSH)
    len += snprintf (msg + len, n - len, " at offset %" PRIu64
                     " length %" PRIu64, j->offset, j->length);
  len += snprintf (msg + len, n - len, ": %s%s%s%s", strerror (j->err),
                   lost ? " (" : "", lost ? lost : "", lost ? ")" : "");
  /* A broken Fleece snapshot fails every request with EIO: say where the
   * reason is.
   */
  if (!j->err_target && j->err == EIO && lost == NULL &&
      (size_t) len < n && strstr (cfg.source, "snapshot/"))
    snprintf (msg + len, n - len, "; if the snapshot is broken, "
              "'fleecectl snapshot list' on its server says why");
  /* ... and a deleted one with EINVAL (NBD has no ENOENT). */
  else if (!j->err_target && j->err == EINVAL && lost == NULL &&
           (size_t) len < n && strstr (cfg.source, "snapshot/"))
    snprintf (msg + len, n - len, "; the snapshot may have been deleted "
              "meanwhile: its server's log says so");
}

static void
job_failed (struct job *j)
{
  char msg[1024];

  describe_failure (j, msg, sizeof msg);
  if (j->kind == JOB_FLUSH) {
    P.others--;
    job_free (j);
    flush_failed (msg);
    return;
  }
  if (!cfg.retry || j->attempts >= MAX_RETRIES)
    die ("%s", msg);
  if (j->err == ESHUTDOWN)      /* this connection will not recover */
    *(j->err_target ? &tgt.reset : &src.reset) = true;
  j->attempts++;
  warn ("%s: retrying (%d of %d)", msg, j->attempts, MAX_RETRIES);
  j->not_before = now_us () +
    (int64_t) (RETRY_DELAY_MS << (j->attempts - 1)) * 1000;
  j->next = P.retry;
  P.retry = j;
}

static void
verify_compare (const struct job *j)
{
  uint64_t i;

  if (memcmp (j->buf, j->buf2, j->length) == 0)
    return;
  for (i = 0; j->buf[i] == j->buf2[i]; i++)
    ;
  die ("verify: target differs from source at offset %" PRIu64,
       j->offset + i);
}

static void
job_finish (struct job *j)
{
  if (j->err) {
    job_failed (j);
    return;
  }
  switch (j->kind) {
  case JOB_COPY:
    if (j->step == 0) {         /* now write what was read */
      P.read += j->length;
      j->step = 1;
      j->attempts = 0;
      job_start (j);
      return;
    }
    P.written += j->length;
    range_done (j->offset, j->length, false);
    break;
  case JOB_ZERO:
    P.zeroed += j->length;
    range_done (j->offset, j->length, true);
    break;
  case JOB_VERIFY:
    verify_compare (j);
    P.verified += j->length;
    P.covered += j->length;
    break;
  case JOB_STATUS:
    plan_status (j);
    break;
  case JOB_FLUSH:
    break;
  case JOB_TRIM:
    P.trimmed += j->length;
    break;
  }
  if (job_has_slot (j))
    P.slots--;
  else
    P.others--;
  if (j->kind == JOB_VERIFY && --P.batch_verify == 0)
    batch_verified ();
  if (j->kind == JOB_FLUSH)
    batch_flushed ();
  job_free (j);
}

/* ---- The loop ---- */

/* Start what may start: retries whose time has come (they hold their
 * slot already), then ready jobs while there are slots and, for reads,
 * tokens.  Returns how many microseconds until the next may start, or
 * -1 if only a completion can help.
 */
static int64_t
fill (void)
{
  int64_t t = now_us (), wait = -1, w;
  struct job *j, **pp;

  for (pp = &P.retry; (j = *pp) != NULL; ) {
    if (j->not_before > t) {
      w = j->not_before - t;
      wait = wait == -1 || w < wait ? w : wait;
      pp = &j->next;
      continue;
    }
    *pp = j->next;
    if (job_reads_source (j))
      rate_take (j->length, true, NULL);
    job_start (j);
  }
  while (P.slots < cfg.requests && P.ready.head) {
    j = P.ready.head;
    if (job_reads_source (j) && !rate_take (j->length, false, &w)) {
      wait = wait == -1 || w < wait ? w : wait;
      break;
    }
    jl_pop (&P.ready);
    P.slots++;
    job_start (j);
  }
  return wait;
}

static void
poll_handles (int timeout)
{
  struct nbd_handle *h[2] = { src.nbd, tgt.is_nbd ? tgt.nbd : NULL };
  char **lost[2] = { &src.lost, &tgt.lost };
  struct nbd_handle *ph[2];
  char **plost[2];
  struct pollfd fds[2];
  unsigned dir[2];
  int i, n = 0, r;

  for (i = 0; i < 2; i++) {
    if (h[i] == NULL || nbd_lost (h[i]) ||
        (fds[n].fd = nbd_aio_get_fd (h[i])) == -1)
      continue;
    dir[n] = nbd_aio_get_direction (h[i]);
    fds[n].events = (dir[n] & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
      (dir[n] & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0);
    fds[n].revents = 0;
    ph[n] = h[i];
    plost[n] = lost[i];
    n++;
  }
  if (poll (fds, n, timeout) == -1) {
    if (errno == EINTR)
      return;
    die ("poll: %m");
  }
  for (i = 0; i < n; i++) {
    r = 0;
    if ((dir[i] & LIBNBD_AIO_DIRECTION_READ) &&
        (fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
      r = nbd_aio_notify_read (ph[i]);
    else if ((dir[i] & LIBNBD_AIO_DIRECTION_WRITE) &&
             (fds[i].revents & (POLLOUT | POLLHUP | POLLERR)))
      r = nbd_aio_notify_write (ph[i]);
    if (r == -1 && *plost[i] == NULL &&
        (*plost[i] = strdup (nbd_get_error ())) == NULL)
      die ("strdup: %m");
  }
}

/* A dead connection: fail, or reconnect.  Jobs that were on it have
 * already failed and wait on the retry list.
 */
static void
check_connections (void)
{
  if (nbd_lost (src.nbd) || src.reset) {
    if (!cfg.retry)
      die ("connection to %s lost: %s", cfg.source,
           src.lost ? src.lost : "closed by the server");
    reconnect (&src.nbd, cfg.source, "source", true, &src.lost);
    src.reset = false;
    source_check (true);
  }
  if (tgt.is_nbd && (nbd_lost (tgt.nbd) || tgt.reset)) {
    if (!cfg.retry)
      die ("connection to %s lost: %s", cfg.target,
           tgt.lost ? tgt.lost : "closed by the server");
    reconnect (&tgt.nbd, cfg.target, "target", false, &tgt.lost);
    tgt.reset = false;
    target_check (true);
    /* Writes completed but not flushed may be lost with the server. */
    redo_ranges (&P.unflushed);
  }
}

/* Leaving with replies in flight makes some servers (nbdkit 1.32
 * aborts in raw_send_socket) fall over; so on a fatal error or a signal
 * let what is in flight land, for a few seconds at most, then say
 * goodbye.
 */
static void
disconnect_all (void)
{
  static bool once;
  int64_t deadline = now_us () + 5000000;
  struct nbd_handle *h[2] = { src.nbd, tgt.is_nbd ? tgt.nbd : NULL };
  int i;

  if (once)
    return;
  once = true;
  while (now_us () < deadline) {
    for (i = 0; i < 2; i++)
      if (h[i] && !nbd_lost (h[i]) && nbd_aio_in_flight (h[i]) > 0)
        break;
    if (i == 2)
      break;
    poll_handles (100);
  }
  for (i = 0; i < 2; i++)
    if (h[i] && !nbd_lost (h[i]))
      nbd_shutdown (h[i], LIBNBD_SHUTDOWN_ABANDON_PENDING);
}

static volatile sig_atomic_t signalled;

static void
on_signal (int sig)
{
  signalled = sig;
}

static void
catch_signals (void)
{
  struct sigaction sa = { .sa_handler = on_signal };
  static const int sigs[] = { SIGINT, SIGTERM, SIGHUP };
  size_t i;

  sigemptyset (&sa.sa_mask);
  for (i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
    if (sigaction (sigs[i], &sa, NULL) == -1)
      die ("sigaction: %m");
}

static bool
pull_finished (void)
{
  return pull_idle () && P.others == 0 && !P.batch_out &&
    P.unflushed.n == 0;
}

static void
pull_run (void)
{
  int64_t wait;
  struct job *j;
  int timeout;

  while (!pull_finished ()) {
    plan_more ();
    batch_maybe_start ();
    wait = fill ();
    if (pull_finished ())       /* the last batch may end synchronously */
      break;
    if (P.done.head == NULL) {
      timeout = prog.bar ? PROGRESS_MS : 1000;
      if (wait >= 0 && wait / 1000 + 1 < timeout)
        timeout = wait / 1000 + 1;
      poll_handles (timeout);
    }
    while ((j = jl_pop (&P.done)) != NULL)
      job_finish (j);
    if (signalled)
      die ("interrupted by SIG%s: the pull is incomplete",
           signalled == SIGINT ? "INT" : signalled == SIGTERM ? "TERM"
           : "HUP");
    check_connections ();
    progress_show ();
  }
}

static void
pull_setup (void)
{
  uint64_t rs = cfg.request_size;

  P.copy_chunk = rs;
  if (cfg.sync == SYNC_INCREMENTAL && rs >= bm.granularity)
    P.copy_chunk = rs - rs % bm.granularity;    /* runs stay aligned */
  P.zero_chunk = tgt.is_nbd && !tgt.can_zero ? rs : ZERO_MAX;
  zero_buf = xcalloc (1, rs);
  P.total = cfg.sync == SYNC_INCREMENTAL ? bm.dirty_bytes : src.size;
  if (cfg.verify)
    P.total *= 2;
  bucket.last = now_us ();
}

static void
pull_end (void)
{
  progress_clear ();
  /* Never a silently short copy. */
  if (P.covered != P.total)
    die ("internal error: %" PRIu64 " of %" PRIu64 " bytes done",
         P.covered, P.total);
  nbd_finish (src.nbd, src.released);
  src.nbd = NULL;
  if (bl.h) {
    nbd_finish (bl.h, true);
    bl.h = NULL;
  }
  if (tgt.is_nbd) {
    nbd_finish (tgt.nbd, false);
    tgt.nbd = NULL;
  }
  else if (close (tgt.fd) == -1)
    die ("close: %s: %m", cfg.target);
  free (src.lost);
  free (tgt.lost);
  free (P.unflushed.v);
  free (P.batch.v);
  free (zero_buf);
  free (bm.bits);
}

int
main (int argc, char **argv)
{
  char *snapshot = NULL;

  parse_args (argc, argv, &snapshot);
  prog.start = now_us ();
  prog.bar = cfg.progress && isatty (STDERR_FILENO);
  catch_signals ();
  if (cfg.sync == SYNC_INCREMENTAL)
    bitmap_start ();
  source_connect ();
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
             (now_us () - prog.start) / 1e6,
             cfg.verify ? " verified=yes" : "");
  free (snapshot);
  return EXIT_SUCCESS;
}
