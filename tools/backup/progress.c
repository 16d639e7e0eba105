/* fleece-backup: the rate limit (--rate) and the progress bar
 * (--progress).
 *
 * --rate is a token bucket of bytes read from the source, filled at the
 * rate and holding at most a tenth of a second's worth (or one request):
 * a job that reads waits for its tokens, a retried job takes them anyway
 * (it already waited).  The progress bar counts bytes covered (copied,
 * zeroed, known zero, verified) against the plan's total, measures the
 * speed over the last 2 s, and is drawn at most every PROGRESS_MS on
 * stderr when it is a terminal; every message clears it first.
 */

#include <config.h>

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <unistd.h>

#include "monotonic.h"
#include "backup.h"

/* ---- Rate limit (--rate): a token bucket of bytes read ---- */

static struct {
  double tokens;
  int64_t last;                 /* microseconds */
} bucket;

/* Take n bytes from the bucket, or say in *wait how many microseconds
 * until they are there.  force takes them anyway (a retry).
 */
bool
rate_take (uint64_t n, bool force, int64_t *wait)
{
  double cap, rate = cfg.rate;
  int64_t t;

  if (cfg.rate == 0)
    return true;
  t = monotonic_us ();
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

void
rate_start (void)
{
  bucket.last = monotonic_us ();
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

void
progress_clear (void)
{
  if (prog.width > 0)
    fprintf (stderr, "\r%*s\r", prog.width, "");
  prog.width = 0;
}

void
progress_show (void)
{
  unsigned pct, oldest;
  char line[160], done[32], total[32], speed[32], eta[32] = "-:--";
  double secs, bps = 0;
  int64_t t = monotonic_us ();
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

void
progress_start (void)
{
  prog.start = monotonic_us ();
  prog.bar = cfg.progress && isatty (STDERR_FILENO);
}

bool
progress_bar (void)
{
  return prog.bar;
}

/* Seconds since progress_start, for the summary. */
double
progress_seconds (void)
{
  return (monotonic_us () - prog.start) / 1e6;
}
