/* fleece-colod: the log.
 *
 * Three destinations (--log): stderr, one line at a time ("HH:MM:SS.mmm
 * fleece-colod: ROLE: message", formatted whole and written with one
 * fprintf, so that threads do not interleave within a line); syslog(3),
 * facility daemon, with the message's priority; the journal
 * (sd_journal_send), with the priority and fields FLEECE_ROLE, and for
 * an event FLEECE_EVENT, FLEECE_DATA (its data as JSON) and one
 * FLEECE_KEY per member of its data.  Without --log: stderr when it is a
 * terminal, the journal when it is the journal's stream (JOURNAL_STREAM,
 * as a systemd unit has it), else syslog.  A record the journal does
 * not take goes to stderr rather than nowhere; with syslog, errors go to
 * stderr as well, so that whoever started the daemon sees why it
 * stopped (syslog may have no reader: no /dev/log).
 *
 * Priorities: errors (LOG_ERR), anomalies (LOG_WARNING: a lost peer, a
 * refused or resent epoch, a failover state change), service changes
 * (LOG_NOTICE), the rest LOG_INFO, and -v's LOG_DEBUG.  An anomaly is
 * logged at once.  The steady state is not: each durable epoch (one a
 * second by default) only adds to a summary, logged once a
 * --log-summary-interval (60 s) with the count, bytes, average and
 * longest duration and the longest lag, and before any anomaly (so the
 * log reads in order) and at exit.  With -v each epoch is logged too.
 */

#include <config.h>

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "fleece-metrics.h"

#include "clock.h"
#include "colod.h"
#include "log.h"

/* Set by colod_log_open, then constant. */
static enum colod_log_to log_to = COLOD_LOG_STDERR;

/* The epochs not yet summarised, under summary_lock. */
static pthread_mutex_t summary_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
  int64_t since_ms;             /* monotonic: the window's start */
  uint64_t count, first, last, bytes, total_ms, max_ms;
  int64_t max_lag_ms;
} sum;

int
colod_log_open (const char *spec)
{
  if (spec == NULL)
    log_to = isatty (2) ? COLOD_LOG_STDERR
      : fleece_stderr_is_journal () ? COLOD_LOG_JOURNAL : COLOD_LOG_SYSLOG;
  else if (strcmp (spec, "stderr") == 0)
    log_to = COLOD_LOG_STDERR;
  else if (strcmp (spec, "syslog") == 0)
    log_to = COLOD_LOG_SYSLOG;
  else if (strcmp (spec, "journal") == 0)
    log_to = COLOD_LOG_JOURNAL;
  else
    return -1;
  if (log_to == COLOD_LOG_SYSLOG)
    openlog ("fleece-colod", LOG_PID | LOG_NDELAY, LOG_DAEMON);
  return 0;
}

static void
to_stderr (const char *line)
{
  struct timespec ts;
  struct tm tm;

  clock_gettime (CLOCK_REALTIME, &ts);
  localtime_r (&ts.tv_sec, &tm);
  fprintf (stderr, "%02d:%02d:%02d.%03ld fleece-colod: %s: %s\n",
           tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
           colod.opt.role ? colod.opt.role : "-", line);
}

/* Log line at priority, with extra journal fields. */
static void
emit (int priority, const char *line, const char *const *fields, size_t n)
{
  const char *f[FLEECE_JOURNAL_MAX_FIELDS];
  char role[64];
  size_t i;

  switch (log_to) {
  case COLOD_LOG_SYSLOG:
    syslog (priority, "%s: %s", colod.opt.role ? colod.opt.role : "-", line);
    if (priority <= LOG_ERR)
      to_stderr (line);         /* whoever started it sees why it failed */
    return;
  case COLOD_LOG_JOURNAL:
    snprintf (role, sizeof role, "FLEECE_ROLE=%s",
              colod.opt.role ? colod.opt.role : "-");
    f[0] = role;
    for (i = 0; i < n && i + 1 < FLEECE_JOURNAL_MAX_FIELDS; i++)
      f[i + 1] = fields[i];
    if (fleece_journal_send (priority, line, f, i + 1) == 0)
      return;
    /* The journal did not take it: not lost for that. */
    __attribute__ ((fallthrough));
  case COLOD_LOG_STDERR:
    to_stderr (line);
  }
}

static void
vlog (int priority, const char *fmt, va_list ap)
{
  char line[2048];

  vsnprintf (line, sizeof line, fmt, ap);
  emit (priority, line, NULL, 0);
}

void
colod_logp (int priority, const char *fmt, ...)
{
  va_list ap;

  if (priority == LOG_DEBUG && !colod.opt.verbose)
    return;
  va_start (ap, fmt);
  vlog (priority, fmt, ap);
  va_end (ap);
}

/* "FLEECE_" and the key in capitals, '-' as '_', "=" and the value. */
static char *
journal_field (const char *key, json_t *v)
{
  char *s = json_dumps (v, JSON_ENCODE_ANY | JSON_COMPACT), *f = NULL;
  size_t i;

  if (s && asprintf (&f, "FLEECE_%s=%s", key,
                     json_is_string (v) ? json_string_value (v) : s) != -1)
    for (i = 7; f[i] != '='; i++)
      f[i] = f[i] == '-' ? '_' : (f[i] >= 'a' && f[i] <= 'z') ? f[i] - 32
        : f[i];
  free (s);
  return f;
}

void
colod_log_event (int priority, const char *name, json_t *data)
{
  char *s = json_dumps (data, JSON_COMPACT), *fields[FLEECE_JOURNAL_MAX_FIELDS];
  char line[2048];
  const char *key;
  json_t *v;
  size_t n = 0, i;

  if (priority == LOG_DEBUG && !colod.opt.verbose)
    goto out;
  if (priority <= LOG_WARNING)
    colod_log_flush ();
  snprintf (line, sizeof line, "event %s %s", name, s ? s : "");
  if (log_to == COLOD_LOG_JOURNAL) {
    if (asprintf (&fields[n], "FLEECE_EVENT=%s", name) != -1)
      n++;
    if (s && asprintf (&fields[n], "FLEECE_DATA=%s", s) != -1)
      n++;
    json_object_foreach (data, key, v)
      if (n < FLEECE_JOURNAL_MAX_FIELDS - 1 &&
          (fields[n] = journal_field (key, v)) != NULL)
        n++;
  }
  emit (priority, line, (const char *const *) fields, n);
  for (i = 0; i < n; i++)
    free (fields[i]);
 out:
  free (s);
}

/* With summary_lock held: the summary as one line, and a new window. */
static void
summary_emit_locked (char *line, size_t len)
{
  snprintf (line, len, "epochs %" PRIu64 "-%" PRIu64 ": %" PRIu64
            " durable in %" PRId64 " s, %" PRIu64 " bytes, duration avg %"
            PRIu64 " ms max %" PRIu64 " ms, lag max %" PRId64 " ms",
            sum.first, sum.last, sum.count,
            (monotonic_ms () - sum.since_ms + 500) / 1000, sum.bytes,
            sum.total_ms / sum.count, sum.max_ms, sum.max_lag_ms);
  memset (&sum, 0, sizeof sum);
}

void
colod_log_epoch (uint64_t epoch, uint64_t bytes, uint64_t ms, int64_t lag_ms)
{
  char line[512] = "";
  int64_t now = monotonic_ms ();

  colod_debug ("epoch %" PRIu64 " durable: %" PRIu64 " bytes in %" PRIu64
               " ms, lag %" PRId64 " ms", epoch, bytes, ms, lag_ms);
  pthread_mutex_lock (&summary_lock);
  if (sum.count == 0) {
    sum.since_ms = now;
    sum.first = epoch;
  }
  sum.count++;
  sum.last = epoch;
  sum.bytes += bytes;
  sum.total_ms += ms;
  if (ms > sum.max_ms)
    sum.max_ms = ms;
  if (lag_ms > sum.max_lag_ms)
    sum.max_lag_ms = lag_ms;
  if (now - sum.since_ms >= colod.opt.log_summary_s * INT64_C (1000))
    summary_emit_locked (line, sizeof line);
  pthread_mutex_unlock (&summary_lock);
  if (line[0])
    emit (LOG_INFO, line, NULL, 0);
}

void
colod_log_flush (void)
{
  char line[512] = "";

  pthread_mutex_lock (&summary_lock);
  if (sum.count)
    summary_emit_locked (line, sizeof line);
  pthread_mutex_unlock (&summary_lock);
  if (line[0])
    emit (LOG_INFO, line, NULL, 0);
}

void
colod_hex (const uint8_t *id, size_t n, char *out)
{
  size_t i;

  for (i = 0; i < n; i++)
    sprintf (out + 2 * i, "%02x", id[i]);
  out[2 * n] = '\0';
}

/* The transport's debug messages (colo_tls_set_log): with -v only. */
void
colod_vdebug (const char *fmt, va_list ap)
{
  if (colod.opt.verbose)
    vlog (LOG_DEBUG, fmt, ap);
}
