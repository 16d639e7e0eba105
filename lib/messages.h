/* libfleececlient: the messages of the command line programs
 * (fleecectl, fleece-backup, fleece-colod): "PROGRAM: what went
 * wrong" on stderr, and the exit statuses 1 (the work failed) and 2 (the
 * command line is wrong).
 *
 * messages_init names the program and, optionally, two hooks:
 * before_print runs before any message is printed (fleece-backup clears
 * its progress bar), before_exit before die exits (fleece-backup
 * disconnects from its servers).  errno is kept across the hooks, so
 * that a message may end in "%m".
 *
 * seterr is the library's side of the same: its functions do not print,
 * they hand the message to the caller, who prints it (or not).
 */

#ifndef FLEECE_LIB_MESSAGES_H
#define FLEECE_LIB_MESSAGES_H

#include <stddef.h>

extern void messages_init (const char *program, void (*before_print) (void),
                           void (*before_exit) (void));

/* A message; the program goes on. */
extern void warn (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));

/* A message, then exit 1. */
extern void die (const char *fmt, ...)
  __attribute__ ((noreturn, format (printf, 1, 2)));

/* A message and where to read more ("Try 'PROGRAM --help'"), then
 * exit 2.
 */
extern void usage_error (const char *fmt, ...)
  __attribute__ ((noreturn, format (printf, 1, 2)));

/* The library's own error convention (ctl-client.h): a function that
 * fails writes one message into the caller's buffer err of errlen bytes
 * and returns -1, which this returns.
 */
extern int seterr (char *err, size_t errlen, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

#endif /* FLEECE_LIB_MESSAGES_H */
