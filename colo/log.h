/* fleece-colod: the log (log.c). */

#ifndef COLO_LOG_H
#define COLO_LOG_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* Log a line to stderr: "HH:MM:SS.mmm fleece-colod: ROLE: message". */
extern void colod_log (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));
/* The same, with -v only. */
extern void colod_debug (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));

/* colod_debug's va_list form, for colo_tls_set_log. */
extern void colod_vdebug (const char *fmt, va_list ap);

/* n bytes of id in hex, NUL-terminated: out has 2 * n + 1 bytes. */
extern void colod_hex (const uint8_t *id, size_t n, char *out);

#endif /* COLO_LOG_H */
