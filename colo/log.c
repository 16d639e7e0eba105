/* fleece-colod: the log.  The daemons run in the foreground and log
 * to stderr, one line at a time (a line is formatted whole, then written
 * with one fprintf, so that threads do not interleave within a line).
 */

#include <config.h>

#include <stdarg.h>
#include <stdio.h>
#include <time.h>

#include "colod.h"
#include "log.h"

static void
vlog (const char *fmt, va_list ap)
{
  char line[2048];
  struct timespec ts;
  struct tm tm;

  clock_gettime (CLOCK_REALTIME, &ts);
  localtime_r (&ts.tv_sec, &tm);
  vsnprintf (line, sizeof line, fmt, ap);
  fprintf (stderr, "%02d:%02d:%02d.%03ld fleece-colod: %s: %s\n",
           tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
           colod.opt.role ? colod.opt.role : "-", line);
}

void
colod_log (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vlog (fmt, ap);
  va_end (ap);
}

void
colod_debug (const char *fmt, ...)
{
  va_list ap;

  if (!colod.opt.verbose)
    return;
  va_start (ap, fmt);
  vlog (fmt, ap);
  va_end (ap);
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
    vlog (fmt, ap);
}
