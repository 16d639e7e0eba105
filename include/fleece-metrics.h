/* What an operator watches: metrics in the Prometheus text exposition
 * format (version 0.0.4), for the plugin (`metrics' on the control
 * socket) and fleece-colod, the HTTP endpoint that serves them
 * (metrics-listen=, --metrics-listen), and structured journal records.
 * Part of libfleece.  docs/monitoring.md lists every metric and field.
 */

#ifndef FLEECE_METRICS_H
#define FLEECE_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fleece.h"

/* ---- Writing the exposition (metrics.c) ---- */

/* A text being built.  On out of memory it stops growing and
 * prom_finish returns NULL.
 */
struct prom {
  char *buf;
  size_t len, cap;
  bool failed;
};

/* "# HELP" and "# TYPE" of metric name; type is "counter", "gauge" or
 * "histogram".  A counter's name ends in _total.
 */
extern void prom_metric (struct prom *p, const char *name, const char *type,
                         const char *help);
/* A metric of one sample without labels: prom_metric and prom_u64. */
extern void prom_one (struct prom *p, const char *name, const char *type,
                      const char *help, uint64_t v);
/* A sample; labels is NULL or the inside of the braces (key="value",...). */
extern void prom_u64 (struct prom *p, const char *name, const char *labels,
                      uint64_t v);
extern void prom_double (struct prom *p, const char *name,
                         const char *labels, double v);
/* A whole histogram: HELP, TYPE, the cumulative _bucket lines from
 * counts[i] (the observations <= bounds[i] and > bounds[i-1]; counts[n]
 * those above bounds[n-1]), +Inf, _sum and _count (the +Inf bucket).
 */
extern void prom_histogram (struct prom *p, const char *name,
                            const char *help, const double *bounds,
                            const uint64_t *counts, size_t n, double sum);
/* The text, malloc'd (NUL-terminated), or NULL if out of memory. */
extern char *prom_finish (struct prom *p);

/* The plugin's metrics (fleece_ prefix), or NULL if out of memory. */
extern char *fleece_metrics (struct fleece *fl);

/* ---- The HTTP endpoint (metrics-http.c, libmicrohttpd) ---- */

/* Renders the metrics for one scrape: malloc'd text, NULL on failure. */
typedef char *(*metrics_render_fn) (void *opaque);

struct metrics_http;

/* Parse ADDR:PORT or PORT (ADDR then 127.0.0.1; [IPv6]:PORT too), bind
 * and listen, without starting any thread (the plugin opens it before
 * nbdkit forks).  NULL with fleece_last_error() set.
 */
extern struct metrics_http *metrics_http_open (const char *listen,
                                               metrics_render_fn render,
                                               void *opaque);
/* Start serving GET /metrics (libmicrohttpd's thread). */
extern int metrics_http_start (struct metrics_http *h);
/* The address it listens on ("127.0.0.1:9187"). */
extern const char *metrics_http_address (const struct metrics_http *h);
/* Stop the thread, close the socket, free.  NULL is a no-op. */
extern void metrics_http_close (struct metrics_http *h);

/* ---- The journal (journal.c) ---- */

/* True if stderr is the journal stream systemd gave (JOURNAL_STREAM). */
extern bool fleece_stderr_is_journal (void);

#define FLEECE_JOURNAL_MAX_FIELDS 32
/* One record: MESSAGE=message, PRIORITY=priority (syslog's LOG_*) and
 * up to FLEECE_JOURNAL_MAX_FIELDS "NAME=value" fields.  -1 if it could
 * not be sent.
 */
extern int fleece_journal_send (int priority, const char *message,
                                const char *const *fields, size_t n);

#endif /* FLEECE_METRICS_H */
