/* libfleececlient: the command line programs' messages (messages.h).
 *
 * One program per process, so the name and the hooks are file-scope
 * state, set once by main before any message.
 */

#include <config.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "messages.h"

static const char *program = "fleece";
static void (*before_print) (void);
static void (*before_exit) (void);

void
messages_init (const char *name, void (*print_hook) (void),
               void (*exit_hook) (void))
{
  program = name;
  before_print = print_hook;
  before_exit = exit_hook;
}

static void
vmessage (const char *fmt, va_list ap)
{
  int e = errno;

  if (before_print)
    before_print ();
  fprintf (stderr, "%s: ", program);
  errno = e;                    /* for a "%m" in fmt */
  vfprintf (stderr, fmt, ap);
  fprintf (stderr, "\n");
}

void
warn (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vmessage (fmt, ap);
  va_end (ap);
}

void
die (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vmessage (fmt, ap);
  va_end (ap);
  if (before_exit)
    before_exit ();
  exit (EXIT_FAILURE);
}

void
usage_error (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vmessage (fmt, ap);
  va_end (ap);
  fprintf (stderr, "Try '%s --help' for more information.\n", program);
  exit (2);
}

int
seterr (char *err, size_t errlen, const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (err, errlen, fmt, ap);
  va_end (ap);
  return -1;
}
