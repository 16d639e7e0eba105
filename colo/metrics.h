/* fleece-colod: its metrics (metrics.c). */

#ifndef COLO_METRICS_H
#define COLO_METRICS_H

#include <stdint.h>

/* A durable epoch of bytes that took ms: into the histograms. */
extern void colod_metrics_epoch (uint64_t bytes, uint64_t ms);

/* The metrics as Prometheus text, malloc'd; NULL if out of memory.
 * opaque is unused (a metrics_render_fn for the HTTP endpoint).
 */
extern char *colod_metrics_render (void *opaque);

/* --metrics-listen: open and start the HTTP endpoint (-1 after logging
 * why), and stop it.
 */
extern int colod_metrics_start (const char *listen);
extern void colod_metrics_stop (void);

#endif /* COLO_METRICS_H */
