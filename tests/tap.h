/* A tiny Test Anything Protocol (TAP) helper for the C tests, read by
 * automake's tap-driver.sh.
 *
 *   plan (n);                    "1..n" up front, or none: done () prints
 *                                the plan at the end ("1..count")
 *   ok (cond, fmt, ...);         "ok N - ..." / "not ok N - ..."; returns cond
 *   diag (fmt, ...);             "# ..." (a comment, kept in the log)
 *   skip_all (fmt, ...);         "1..0 # SKIP ..." and exit 0: only for a
 *                                genuinely optional feature (HACKING)
 *   bail_out (fmt, ...);         "Bail out! ..." and exit 1: the test
 *                                cannot go on (setup failed)
 *   return done ();              exit status: 0 if every test passed and
 *                                the plan was met, 1 otherwise
 *
 * Nothing here depends on assert, so it works the same with NDEBUG; the
 * tests themselves #undef NDEBUG before including <assert.h>.  ok () and
 * diag () may be called from several threads.  Everything goes to stdout,
 * flushed, so TAP lines and comments stay in order.
 */

#ifndef FLEECE_TAP_H
#define FLEECE_TAP_H

#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

static pthread_mutex_t tap_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned tap_planned;    /* 0: no plan yet */
static unsigned tap_count;
static unsigned tap_failed;

static inline void
plan (unsigned n)
{
  pthread_mutex_lock (&tap_lock);
  tap_planned = n;
  printf ("1..%u\n", n);
  fflush (stdout);
  pthread_mutex_unlock (&tap_lock);
}

static inline void
tap_vprint (const char *prefix, const char *fmt, va_list ap)
{
  fputs (prefix, stdout);
  vprintf (fmt, ap);
  putchar ('\n');
  fflush (stdout);
}

static inline bool ok (bool cond, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
static inline bool
ok (bool cond, const char *fmt, ...)
{
  va_list ap;

  pthread_mutex_lock (&tap_lock);
  tap_count++;
  if (!cond)
    tap_failed++;
  printf ("%sok %u - ", cond ? "" : "not ", tap_count);
  va_start (ap, fmt);
  tap_vprint ("", fmt, ap);
  va_end (ap);
  pthread_mutex_unlock (&tap_lock);
  return cond;
}

static inline void diag (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));
static inline void
diag (const char *fmt, ...)
{
  va_list ap;

  pthread_mutex_lock (&tap_lock);
  va_start (ap, fmt);
  tap_vprint ("# ", fmt, ap);
  va_end (ap);
  pthread_mutex_unlock (&tap_lock);
}

static inline void skip_all (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2), noreturn));
static inline void
skip_all (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  tap_vprint ("1..0 # SKIP ", fmt, ap);
  va_end (ap);
  exit (EXIT_SUCCESS);
}

static inline void bail_out (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2), noreturn));
static inline void
bail_out (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  tap_vprint ("Bail out! ", fmt, ap);
  va_end (ap);
  exit (EXIT_FAILURE);
}

/* How many tests failed so far. */
static inline unsigned
tap_failures (void)
{
  unsigned n;

  pthread_mutex_lock (&tap_lock);
  n = tap_failed;
  pthread_mutex_unlock (&tap_lock);
  return n;
}

/* Print the plan if none was given, and return the exit status. */
static inline int
done (void)
{
  int r = EXIT_SUCCESS;

  pthread_mutex_lock (&tap_lock);
  if (tap_planned == 0)
    printf ("1..%u\n", tap_count);
  else if (tap_planned != tap_count) {
    printf ("# planned %u tests but ran %u\n", tap_planned, tap_count);
    r = EXIT_FAILURE;
  }
  if (tap_failed > 0) {
    printf ("# failed %u of %u tests\n", tap_failed, tap_count);
    r = EXIT_FAILURE;
  }
  fflush (stdout);
  pthread_mutex_unlock (&tap_lock);
  return r;
}

#endif /* FLEECE_TAP_H */
