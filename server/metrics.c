/* Metrics in the Prometheus text exposition format (version 0.0.4).
 *
 * The writer (prom_*) is shared with fleece-colod; fleece_metrics renders
 * the engine's counters.  Names follow Prometheus's conventions: a
 * fleece_ prefix, base units (seconds, bytes), counters ending in _total,
 * every metric's HELP and TYPE before its samples, a histogram as
 * cumulative _bucket{le=...} lines ending with +Inf, then _sum and
 * _count (equal to the +Inf bucket by construction here).
 *
 * The copy latency histogram is kept as one relaxed atomic counter per
 * bucket, not cumulative, so that the copy path (cbw.c) pays one
 * increment; the counts are added up when rendered.  A scrape that races
 * copies may see _sum (st_cbw_wait_ns) a copy ahead of the buckets, never
 * a bucket that decreases.
 */

#include <config.h>

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "fleece-metrics.h"

/* ---- The writer ---- */

static void __attribute__ ((format (printf, 2, 3)))
prom_printf (struct prom *p, const char *fmt, ...)
{
  va_list ap;
  int n;

  for (;;) {
    if (p->failed)
      return;
    va_start (ap, fmt);
    n = vsnprintf (p->buf ? p->buf + p->len : NULL,
                   p->buf ? p->cap - p->len : 0, fmt, ap);
    va_end (ap);
    if (n < 0) {
      p->failed = true;
      return;
    }
    if (p->buf && p->len + n < p->cap) {
      p->len += n;
      return;
    }
    size_t cap = p->cap ? p->cap : 4096;
    while (cap <= p->len + n)
      cap *= 2;
    char *b = realloc (p->buf, cap);
    if (b == NULL) {
      p->failed = true;
      return;
    }
    p->buf = b;
    p->cap = cap;
  }
}

void
prom_metric (struct prom *p, const char *name, const char *type,
             const char *help)
{
  prom_printf (p, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void
prom_u64 (struct prom *p, const char *name, const char *labels, uint64_t v)
{
  prom_printf (p, "%s%s%s%s %" PRIu64 "\n", name, labels ? "{" : "",
               labels ? labels : "", labels ? "}" : "", v);
}

void
prom_one (struct prom *p, const char *name, const char *type,
          const char *help, uint64_t v)
{
  prom_metric (p, name, type, help);
  prom_u64 (p, name, NULL, v);
}

void
prom_double (struct prom *p, const char *name, const char *labels, double v)
{
  prom_printf (p, "%s%s%s%s %.9g\n", name, labels ? "{" : "",
               labels ? labels : "", labels ? "}" : "", v);
}

void
prom_histogram (struct prom *p, const char *name, const char *help,
                const double *bounds, const uint64_t *counts, size_t n,
                double sum)
{
  uint64_t total = 0;
  size_t i;

  prom_metric (p, name, "histogram", help);
  for (i = 0; i < n; i++) {
    total += counts[i];
    prom_printf (p, "%s_bucket{le=\"%.9g\"} %" PRIu64 "\n", name, bounds[i],
                 total);
  }
  total += counts[n];
  prom_printf (p, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, total);
  prom_printf (p, "%s_sum %.9g\n", name, sum);
  prom_printf (p, "%s_count %" PRIu64 "\n", name, total);
}

char *
prom_finish (struct prom *p)
{
  if (p->buf == NULL)
    prom_printf (p, "%s", "");
  if (p->failed) {
    free (p->buf);
    return NULL;
  }
  return p->buf;
}

/* ---- The engine's metrics ---- */

static const uint64_t copy_bounds_ns[FL_COPY_HIST_N] = {
  50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000,
  25000000, 50000000, 100000000, 250000000, 500000000, 1000000000,
  2500000000, 10000000000,
};

/* One copy-before-write took ns (cbw.c). */
void
fl_observe_copy (struct fleece *fl, uint64_t ns)
{
  size_t i = 0;

  while (i < FL_COPY_HIST_N && ns > copy_bounds_ns[i])
    i++;
  atomic_fetch_add_explicit (&fl->st_copy_hist[i], 1, memory_order_relaxed);
  atomic_fetch_add_explicit (&fl->st_cbw_wait_ns, ns, memory_order_relaxed);
}

struct snap_count {
  uint64_t ok, broken;
};

static void
count_snap (void *opaque, const struct fleece_snap_info *info)
{
  struct snap_count *n = opaque;

  if (info->broken)
    n->broken++;
  else
    n->ok++;
}

static void
count_bitmap (void *opaque, const struct fleece_bitmap_info *info)
{
  uint64_t *n = opaque;

  (*n)++;
  (void) info;
}

/* The counters and the copy latency histogram. */
static void
engine_counters (struct prom *p, struct fleece *fl,
                 const struct fleece_stats *st)
{
  double bounds[FL_COPY_HIST_N];
  uint64_t counts[FL_COPY_HIST_N + 1];
  size_t i;

  prom_one (p, "fleece_written_bytes_total", "counter",
            "Bytes written, zeroed or trimmed on the live disk.",
            st->bytes_written);
  prom_one (p, "fleece_copies_total", "counter",
            "Clusters whose old data copy-before-write preserved.",
            st->cbw_clusters);
  prom_one (p, "fleece_copied_bytes_total", "counter",
            "Bytes of old data written to the store.", st->bytes_copied);
  prom_one (p, "fleece_copy_errors_total", "counter",
            "Copy-before-write failures (a snapshot broken or a write "
            "failed).", st->cbw_errors);
  for (i = 0; i < FL_COPY_HIST_N; i++)
    bounds[i] = copy_bounds_ns[i] / 1e9;
  for (i = 0; i <= FL_COPY_HIST_N; i++)
    counts[i] = atomic_load_explicit (&fl->st_copy_hist[i],
                                      memory_order_relaxed);
  prom_histogram (p, "fleece_copy_duration_seconds",
                  "Time a live write waited for its copy-before-write.",
                  bounds, counts, FL_COPY_HIST_N, st->cbw_wait_ns / 1e9);
}

char *
fleece_metrics (struct fleece *fl)
{
  struct prom p = { 0 };
  struct fleece_stats st;
  struct snap_count snaps = { 0 };
  uint64_t bitmaps = 0;

  fleece_get_stats (fl, &st);
  fleece_list_snapshots (fl, count_snap, &snaps);
  fleece_list_bitmaps (fl, count_bitmap, &bitmaps);
  engine_counters (&p, fl, &st);
  prom_one (&p, "fleece_disk_size_bytes", "gauge", "Size of the live disk.",
            st.disk_size);
  prom_one (&p, "fleece_store_used_bytes", "gauge",
            "Copied data the store holds for the snapshots.",
            st.store_bytes_used);
  prom_one (&p, "fleece_store_max_bytes", "gauge",
            "The store's cap (store-max); 0 when it has none.",
            st.store_max_bytes);
  prom_one (&p, "fleece_store_file_bytes", "gauge",
            "Space the store file occupies on its file system.",
            st.store_file_bytes);
  prom_metric (&p, "fleece_snapshots", "gauge",
               "Snapshots, by state (a broken one fails every read).");
  prom_u64 (&p, "fleece_snapshots", "state=\"ok\"", snaps.ok);
  prom_u64 (&p, "fleece_snapshots", "state=\"broken\"", snaps.broken);
  prom_one (&p, "fleece_bitmaps", "gauge", "Dirty bitmaps.", bitmaps);
  prom_metric (&p, "fleece_last_drain_seconds", "gauge",
               "How long the last snapshot or checkpoint creation held "
               "the writers.");
  prom_double (&p, "fleece_last_drain_seconds", NULL,
               st.last_drain_ns / 1e9);
  prom_metric (&p, "fleece_max_drain_seconds", "gauge",
               "The longest writer stall of a snapshot or checkpoint "
               "creation.");
  prom_double (&p, "fleece_max_drain_seconds", NULL, st.max_drain_ns / 1e9);
  return prom_finish (&p);
}
