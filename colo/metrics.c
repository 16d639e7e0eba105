/* fleece-colod: its metrics, in the Prometheus text format that the
 * plugin's use (libfleece's prom_* writer, docs/monitoring.md): the
 * status that `status' reports, as gauges and counters, and two
 * histograms of the durable epochs (bytes, duration) that events.c
 * feeds.  Served by the control socket's `metrics' command (fleece-colod
 * metrics) and by the HTTP endpoint of --metrics-listen.
 */

#include <config.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fleece-metrics.h"

#include "clock.h"
#include "colod.h"
#include "log.h"
#include "metrics.h"

#define DURATION_N 14
#define BYTES_N 8

static const double duration_bounds[DURATION_N] = {
  0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
};
static const double bytes_bounds[BYTES_N] = {
  0, 65536, 1048576, 16777216, 268435456, 1073741824, 17179869184.0,
  274877906944.0,
};

/* Under hist_lock: observations per bucket, not cumulative. */
static pthread_mutex_t hist_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t duration_counts[DURATION_N + 1], bytes_counts[BYTES_N + 1];
static uint64_t duration_sum_ms, bytes_sum;

/* Set by colod_metrics_start, then constant until colod_metrics_stop. */
static struct metrics_http *http;

static void
observe (const double *bounds, uint64_t *counts, size_t n, double v)
{
  size_t i = 0;

  while (i < n && v > bounds[i])
    i++;
  counts[i]++;
}

void
colod_metrics_epoch (uint64_t bytes, uint64_t ms)
{
  pthread_mutex_lock (&hist_lock);
  observe (duration_bounds, duration_counts, DURATION_N, ms / 1000.0);
  observe (bytes_bounds, bytes_counts, BYTES_N, bytes);
  duration_sum_ms += ms;
  bytes_sum += bytes;
  pthread_mutex_unlock (&hist_lock);
}

/* The status, under colod.lock. */
static void
status_metrics (struct prom *p)
{
  const struct colod_status *st = &colod.st;
  static const enum colod_failover states[] = {
    FAILOVER_NONE, FAILOVER_REQUIRE, FAILOVER_ACTIVE, FAILOVER_COMPLETED,
  };
  char labels[64];
  size_t i;

  prom_metric (p, "fleece_colod_info", "gauge",
               "Always 1: the daemon's role and version as labels.");
  snprintf (labels, sizeof labels, "role=\"%s\",version=\"%s\"",
            st->role, PACKAGE_VERSION);
  prom_u64 (p, "fleece_colod_info", labels, 1);
  prom_one (p, "fleece_colod_last_committed_epoch", "gauge",
            "The last epoch durable on the secondary.", st->last_committed);
  prom_metric (p, "fleece_colod_rpo_lag_seconds", "gauge",
               "Age of the last committed epoch's checkpoint (primary) or "
               "arrival (secondary): the data a failover now would lose; "
               "no sample before the first epoch.");
  if (st->committed_at_ms)
    prom_double (p, "fleece_colod_rpo_lag_seconds", NULL,
                 (colod_wall_ms () - (int64_t) st->committed_at_ms) / 1e3);
  prom_one (p, "fleece_colod_resync_remaining_bytes", "gauge",
            "Bytes a resync (full or catch-up epoch) has still to send.",
            st->resync_remaining);
  prom_one (p, "fleece_colod_peer_connected", "gauge",
            "1 while paired with the peer, else 0.",
            strcmp (st->connection, "connected") == 0);
  prom_metric (p, "fleece_colod_failover_state", "gauge",
               "1 for the current failover state, 0 for the others.");
  for (i = 0; i < sizeof states / sizeof states[0]; i++) {
    snprintf (labels, sizeof labels, "state=\"%s\"",
              colod_failover_name (states[i]));
    prom_u64 (p, "fleece_colod_failover_state", labels,
              st->failover == states[i]);
  }
  prom_one (p, "fleece_colod_epochs_refused_total", "counter",
            "Epochs the secondary refused (each is sent again).",
            st->epochs_refused);
  prom_one (p, "fleece_colod_reconnects_total", "counter",
            "Times the connection to the peer was lost.", st->reconnects);
  prom_one (p, "fleece_colod_group_disks", "gauge",
            "Disks in the replicated group (1: a single disk).",
            colod_ndisks ());
  prom_metric (p, "fleece_colod_disk_last_epoch_bytes", "gauge",
               "Bytes of each disk of the group in the last durable epoch.");
  for (i = 0; i < colod_ndisks (); i++) {
    snprintf (labels, sizeof labels, "disk=\"%zu\"", i);
    prom_u64 (p, "fleece_colod_disk_last_epoch_bytes", labels,
              st->disk_epoch_bytes[i]);
  }
}

char *
colod_metrics_render (void *opaque)
{
  struct prom p = { 0 };

  (void) opaque;
  pthread_mutex_lock (&colod.lock);
  status_metrics (&p);
  pthread_mutex_unlock (&colod.lock);
  pthread_mutex_lock (&hist_lock);
  prom_histogram (&p, "fleece_colod_epoch_duration_seconds",
                  "Time from an epoch's checkpoint to its durability on "
                  "the secondary (primary), or its transfer (secondary).",
                  duration_bounds, duration_counts, DURATION_N,
                  duration_sum_ms / 1e3);
  prom_histogram (&p, "fleece_colod_epoch_bytes",
                  "Bytes each durable epoch carried.", bytes_bounds,
                  bytes_counts, BYTES_N, bytes_sum);
  pthread_mutex_unlock (&hist_lock);
  return prom_finish (&p);
}

int
colod_metrics_start (const char *listen)
{
  http = metrics_http_open (listen, colod_metrics_render, NULL);
  if (http == NULL || metrics_http_start (http) == -1) {
    colod_err ("%s", fleece_last_error ());
    metrics_http_close (http);
    http = NULL;
    return -1;
  }
  colod_notice ("metrics: http://%s/metrics", metrics_http_address (http));
  return 0;
}

void
colod_metrics_stop (void)
{
  metrics_http_close (http);
  http = NULL;
}
