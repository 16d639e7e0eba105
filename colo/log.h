/* fleece-colod: the log (log.c says where it goes and at which
 * priorities).
 */

#ifndef COLO_LOG_H
#define COLO_LOG_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <syslog.h>

#include <jansson.h>

enum colod_log_to { COLOD_LOG_STDERR, COLOD_LOG_SYSLOG, COLOD_LOG_JOURNAL };

/* --log=stderr|syslog|journal, or NULL for the default; -1 if spec is
 * none of those.  Before any other thread starts.
 */
extern int colod_log_open (const char *spec);

/* A message at a syslog priority (LOG_DEBUG only with -v). */
extern void colod_logp (int priority, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
#define colod_err(...)    colod_logp (LOG_ERR, __VA_ARGS__)
#define colod_warn(...)   colod_logp (LOG_WARNING, __VA_ARGS__)
#define colod_notice(...) colod_logp (LOG_NOTICE, __VA_ARGS__)
#define colod_log(...)    colod_logp (LOG_INFO, __VA_ARGS__)
#define colod_debug(...)  colod_logp (LOG_DEBUG, __VA_ARGS__)

/* An event ("event NAME {data}"), with its fields in the journal.  One
 * at LOG_WARNING or worse logs the pending epoch summary first.
 */
extern void colod_log_event (int priority, const char *name, json_t *data);

/* A durable epoch, for the summary (logged once an interval). */
extern void colod_log_epoch (uint64_t epoch, uint64_t bytes, uint64_t ms,
                             int64_t lag_ms);
/* Log the summary of the epochs not yet summarised, if any. */
extern void colod_log_flush (void);

/* colod_debug's va_list form, for colo_tls_set_log. */
extern void colod_vdebug (const char *fmt, va_list ap);

/* n bytes of id in hex, NUL-terminated: out has 2 * n + 1 bytes. */
extern void colod_hex (const uint8_t *id, size_t n, char *out);

#endif /* COLO_LOG_H */
