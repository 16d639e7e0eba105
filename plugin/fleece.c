/* nbdkit-fleece-plugin: a live disk with point-in-time snapshot exports.
 *
 * Thin glue over the engine (server/): this file only maps nbdkit
 * callbacks, in nbdkit's order, onto fleece_* calls.  One nbdkit instance
 * serves several exports, chosen by the export name a client asks for:
 *
 *   ""               the live disk, read-write
 *   "snapshot/NAME"  the disk as it was when snapshot NAME was created;
 *                    read and trim (to release what a backup has read),
 *                    every write refused with EPERM
 *   "bitmap/NAME"    dirty bitmap NAME (docs/bitmap-export.md), read-only
 *
 * The engine and the control socket are opened in .get_ready, before
 * nbdkit forks into the background (or, with --run, forks the server off
 * the process that runs the command), so that a bad disk or store stops
 * nbdkit with a clear error.  No thread may start there: threads do not
 * survive fork, and the process that serves would miss them.  Every
 * thread starts in .after_fork, which nbdkit calls in the process that
 * serves, in every mode (-f, background, --run, socket activation): the
 * engine's (fleece_start), the control service's, then the metrics
 * endpoint's (metrics-listen=, whose socket listens from .get_ready on).  The control socket
 * listens from .get_ready on, so that it is up as soon as nbdkit is,
 * before any NBD client connects.  .cleanup works whether or not
 * .after_fork ran.  Errors are reported once, here, with the engine's
 * message, and errno is what the NBD client sees.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <syslog.h>

#include "fleece.h"
#include "fleece-control.h"
#include "fleece-metrics.h"

#define SNAP_PREFIX "snapshot/"
#define BITMAP_PREFIX "bitmap/"

/* Debug flags: nbdkit -D fleece.FLAG=N. */
NBDKIT_DLL_PUBLIC int fleece_debug_verbose = 0;
NBDKIT_DLL_PUBLIC int fleece_debug_fail_store_write = 0;
NBDKIT_DLL_PUBLIC int fleece_debug_fail_disk_read = 0;
NBDKIT_DLL_PUBLIC int fleece_debug_fail_disk_write = 0;
NBDKIT_DLL_PUBLIC int fleece_debug_skip_isolation_check = 0;
NBDKIT_DLL_PUBLIC int fleece_debug_live_read_delay_us = 0;
NBDKIT_DLL_PUBLIC int fleece_debug_store_write_delay_ms = 0;
NBDKIT_DLL_PUBLIC int fleece_debug_fail_meta_write = 0;
NBDKIT_DLL_PUBLIC int fleece_debug_ctl_idle_timeout_ms = 0;
NBDKIT_DLL_PUBLIC int fleece_debug_punch_delay_ms = 0;
NBDKIT_DLL_PUBLIC int fleece_debug_ctl_max_events = 0;
NBDKIT_DLL_PUBLIC int fleece_debug_create_image_delay_ms = 0;

/* Set by .config, then constant. */
static char *disk_path;
static char *store_path;
static char *control_path;
static char *metrics_listen;    /* metrics-listen=, NULL: no endpoint */
static uint32_t cluster_size;
static enum fleece_cbw_error on_cbw_error = FLEECE_CBW_BREAK_SNAPSHOT;
static int tls_exports_only;    /* snapshot and bitmap exports need TLS */
static uint64_t store_max;      /* bytes, 0: no cap */
static unsigned store_warn;     /* percent of store_max, 0: off */
static int persistent;
static uint32_t cbw_timeout_ms; /* 0: none */
static enum fleece_locking locking = FLEECE_LOCKING_ON;
static int subcluster = -1;     /* -1: not given (true) */

/* Set by .get_ready, then constant until .cleanup. */
static struct fleece *fl;
static struct ctl *ctl;
static struct metrics_http *metrics;

struct handle {
  struct fleece_snap *snap;     /* a snapshot export, or */
  struct fleece_bitmap_export *bitmap;  /* a bitmap export, or both NULL:
                                         * the live disk */
};

/* Pass the engine's error to nbdkit and keep errno for the client.  An
 * error the engine already reported for the same snapshot (every read of
 * a broken one fails) is only a debug message: a pull would otherwise
 * log a line per request.
 */
static int
engine_error (void)
{
  int err = errno;

  if (fleece_last_error_is_repeat ())
    nbdkit_debug ("%s (reported before)", fleece_last_error ());
  else
    nbdkit_error ("%s", fleece_last_error ());
  nbdkit_set_error (err);
  errno = err;
  return -1;
}

static void
log_to_nbdkit (const char *msg)
{
  nbdkit_debug ("%s", msg);
}

static void
warn_to_nbdkit (const char *msg)
{
  nbdkit_error ("%s", msg);
}

/* Every event is logged, so that an alert is not lost when no client of
 * the control socket listens.  Under systemd (stderr is the journal) as
 * a journal record with its priority and fields FLEECE_EVENT,
 * FLEECE_SNAPSHOT and FLEECE_REASON; else through nbdkit_error, because
 * nbdkit has no level between error and debug, and debug is off without
 * -v.  Called from the control service's thread.
 */
static int
journal_event (int pri, const char *msg, const char *event,
               const char *snapshot, const char *reason)
{
  char *f[3] = { NULL, NULL, NULL };
  int r = -1;

  if (asprintf (&f[0], "FLEECE_EVENT=%s", event) != -1 &&
      asprintf (&f[1], "FLEECE_SNAPSHOT=%s", snapshot) != -1 &&
      asprintf (&f[2], "FLEECE_REASON=%s", reason) != -1)
    r = fleece_journal_send (pri, msg, (const char *const *) f, 3);
  free (f[0]);
  free (f[1]);
  free (f[2]);
  return r;
}

static void
log_event (const char *event, const char *snapshot, const char *reason)
{
  int pri = strcmp (event, "SNAPSHOT_BROKEN") == 0 ? LOG_ERR
    : strcmp (event, "STORE_HIGH_WATER") == 0 ||
      strcmp (event, "EVENTS_DROPPED") == 0 ? LOG_WARNING : LOG_NOTICE;
  char *msg;

  if (asprintf (&msg, "event %s%s%s%s: %s", event,
                *snapshot ? ": snapshot '" : "", snapshot,
                *snapshot ? "'" : "", reason) == -1) {
    nbdkit_error ("event %s: %s", event, reason);
    return;
  }
  if (!fleece_stderr_is_journal () ||
      journal_event (pri, msg, event, snapshot, reason) == -1)
    nbdkit_error ("%s", msg);
  free (msg);
}

static char *
render_metrics (void *opaque)
{
  return fleece_metrics (opaque);
}

static void
plug_unload (void)
{
  free (disk_path);
  free (store_path);
  free (control_path);
  free (metrics_listen);
}

static int
set_path (char **dst, const char *key, const char *value)
{
  if (*dst) {
    nbdkit_error ("%s: parameter given twice", key);
    return -1;
  }
  *dst = nbdkit_absolute_path (value);
  return *dst ? 0 : -1;
}

static int
plug_config (const char *key, const char *value)
{
  if (strcmp (key, "disk") == 0)
    return set_path (&disk_path, key, value);
  if (strcmp (key, "store") == 0)
    return set_path (&store_path, key, value);
  if (strcmp (key, "control") == 0)
    return set_path (&control_path, key, value);
  if (strcmp (key, "cluster-size") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1)
      return -1;
    if (r < FLEECE_CLUSTER_SIZE_MIN || r > FLEECE_CLUSTER_SIZE_MAX ||
        (r & (r - 1)) != 0) {
      nbdkit_error ("cluster-size=%s: must be a power of two between 4K "
                    "and 4M", value);
      return -1;
    }
    cluster_size = r;
    return 0;
  }
  if (strcmp (key, "on-cbw-error") == 0) {
    if (strcmp (value, "break-snapshot") == 0)
      on_cbw_error = FLEECE_CBW_BREAK_SNAPSHOT;
    else if (strcmp (value, "fail-write") == 0)
      on_cbw_error = FLEECE_CBW_FAIL_WRITE;
    else {
      nbdkit_error ("on-cbw-error=%s: expected break-snapshot or "
                    "fail-write", value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "store-max") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1)
      return -1;
    store_max = r;
    return 0;
  }
  if (strcmp (key, "store-warn") == 0) {
    if (nbdkit_parse_unsigned ("store-warn", value, &store_warn) == -1)
      return -1;
    if (store_warn < 1 || store_warn > 100) {
      nbdkit_error ("store-warn=%s: expected a percentage from 1 to 100",
                    value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "tls-exports-only") == 0) {
    tls_exports_only = nbdkit_parse_bool (value);
    return tls_exports_only == -1 ? -1 : 0;
  }
  if (strcmp (key, "persistent") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1) {
      nbdkit_error ("persistent=%s: expected true or false", value);
      return -1;
    }
    persistent = r;
    return 0;
  }
  if (strcmp (key, "subcluster") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1) {
      nbdkit_error ("subcluster=%s: expected true or false", value);
      return -1;
    }
    subcluster = r;
    return 0;
  }
  if (strcmp (key, "cbw-timeout") == 0) {
    char *end;
    double secs;
    errno = 0;
    secs = strtod (value, &end);
    if (errno || end == value || *end || !(secs >= 0.001 && secs <= 3600)) {
      nbdkit_error ("cbw-timeout=%s: expected seconds, from 0.001 to 3600 "
                    "(decimals allowed)", value);
      return -1;
    }
    cbw_timeout_ms = secs * 1000 + 0.5;
    return 0;
  }
  if (strcmp (key, "metrics-listen") == 0) {
    if (metrics_listen) {
      nbdkit_error ("%s: parameter given twice", key);
      return -1;
    }
    metrics_listen = strdup (value);
    if (metrics_listen == NULL) {
      nbdkit_error ("strdup: %m");
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "locking") == 0) {
    int r;
    if (strcmp (value, "auto") == 0) {
      locking = FLEECE_LOCKING_AUTO;
      return 0;
    }
    r = nbdkit_parse_bool (value);     /* on, off, true, false, ... */
    if (r == -1) {
      nbdkit_error ("locking=%s: expected on, off or auto", value);
      return -1;
    }
    locking = r ? FLEECE_LOCKING_ON : FLEECE_LOCKING_OFF;
    return 0;
  }
  nbdkit_error ("unknown parameter '%s' (see nbdkit fleece --help)", key);
  return -1;
}

static int
plug_config_complete (void)
{
  if (disk_path == NULL || store_path == NULL) {
    nbdkit_error ("the disk and store parameters are required: "
                  "nbdkit fleece disk=DISK store=STORE");
    return -1;
  }
  if (control_path == NULL) {
    if (asprintf (&control_path, "%s.sock", store_path) == -1) {
      nbdkit_error ("asprintf: %m");
      return -1;
    }
  }
  return 0;
}

#define plug_config_help \
  "disk=<FILENAME>      (required) The live disk: a file or block device.\n" \
  "store=<FILENAME>     (required) The copy-before-write store file.\n" \
  "cluster-size=<SIZE>  Granularity of bitmaps and of the store, a power\n" \
  "                     of two from 4K to 4M (default 64K).\n" \
  "subcluster=true|false  Copy-before-write copies only the 4K blocks a\n" \
  "                     write covers (default true; false: whole\n" \
  "                     clusters).\n" \
  "control=<SOCKET>     Control socket (default STORE.sock).\n" \
  "store-max=<SIZE>     Cap on the store's copied data (default none).\n" \
  "store-warn=<PERCENT> STORE_HIGH_WATER event at this fill of store-max.\n" \
  "on-cbw-error=break-snapshot|fail-write\n" \
  "                     What a failed copy-before-write does (default\n" \
  "                     break-snapshot).\n" \
  "cbw-timeout=<SECONDS> Give up a copy the store has not taken in this\n" \
  "                     time: break the snapshot, or with fail-write fail\n" \
  "                     the write (default: wait).\n" \
  "tls-exports-only=true  Snapshot and bitmap exports only over TLS.\n" \
  "persistent=true|false  Snapshots and bitmaps survive restarts and\n" \
  "                     crashes (default false: they last as long as\n" \
  "                     nbdkit).\n" \
  "metrics-listen=[ADDR:]PORT  Serve Prometheus metrics over HTTP at\n" \
  "                     /metrics (ADDR default 127.0.0.1).\n" \
  "locking=on|auto|off  Lock the disk and the store against a second\n" \
  "                     writer, as QEMU does (default on; auto: where the\n" \
  "                     file system can; off: never, at your risk)."

static void
plug_dump_plugin (void)
{
  printf ("fleece_version=%s\n", PACKAGE_VERSION);
  printf ("fleece_cluster_size_default=%u\n", FLEECE_CLUSTER_SIZE_DEFAULT);
  printf ("fleece_cluster_size_min=%u\n", FLEECE_CLUSTER_SIZE_MIN);
  printf ("fleece_cluster_size_max=%u\n", FLEECE_CLUSTER_SIZE_MAX);
  printf ("fleece_subcluster_default=true\n");
  printf ("fleece_subcluster_block_size=%u\n", FLEECE_CLUSTER_SIZE_MIN);
  printf ("fleece_snapshots_max=%d\n", FLEECE_SNAPSHOTS_MAX);
  printf ("fleece_exports=\"\" " SNAP_PREFIX "NAME " BITMAP_PREFIX "NAME\n");
  printf ("fleece_control_protocol=qmp-json\n");
}

static int
plug_get_ready (void)
{
  const struct fleece_config cfg = {
    .disk = disk_path,
    .store = store_path,
    .cluster_size = cluster_size,
    .on_cbw_error = on_cbw_error,
    .store_max = store_max,
    .store_warn = store_warn,
    .persistent = persistent,
    .cbw_timeout_ms = cbw_timeout_ms,
    .locking = locking,
    .whole_clusters = subcluster == 0,
  };
  const struct ctl_info info = {
    .on_cbw_error = on_cbw_error == FLEECE_CBW_FAIL_WRITE
      ? "fail-write" : "break-snapshot",
    .persistent = persistent,
    .log_event = log_event,
  };

  fleece_debug.verbose = fleece_debug_verbose;
  fleece_debug.fail_store_write = fleece_debug_fail_store_write;
  fleece_debug.fail_disk_read = fleece_debug_fail_disk_read;
  fleece_debug.fail_disk_write = fleece_debug_fail_disk_write;
  fleece_debug.skip_isolation_check = fleece_debug_skip_isolation_check;
  fleece_debug.live_read_delay_us = fleece_debug_live_read_delay_us;
  fleece_debug.store_write_delay_ms = fleece_debug_store_write_delay_ms;
  fleece_debug.fail_meta_write = fleece_debug_fail_meta_write;
  fleece_debug.ctl_idle_timeout_ms = fleece_debug_ctl_idle_timeout_ms;
  fleece_debug.punch_delay_ms = fleece_debug_punch_delay_ms;
  fleece_debug.ctl_max_events = fleece_debug_ctl_max_events;
  fleece_debug.create_image_delay_ms = fleece_debug_create_image_delay_ms;
  fleece_set_log (log_to_nbdkit);
  fleece_set_warn (warn_to_nbdkit);
  fl = fleece_open (&cfg);
  if (fl == NULL)
    return engine_error ();
  if (locking == FLEECE_LOCKING_OFF)
    nbdkit_debug ("locking=off: the disk %s and the store %s are not "
                  "locked: nothing stops a second writer from corrupting "
                  "every snapshot", disk_path, store_path);
  else if (strcmp (fleece_locking_state (fl), "on") != 0)
    nbdkit_debug ("locking=auto: the file system has no OFD locks, so of "
                  "the disk %s and the store %s %s: nothing stops a second "
                  "writer from corrupting every snapshot", disk_path,
                  store_path,
                  strcmp (fleece_locking_state (fl), "disk only") == 0
                  ? "only the disk is locked"
                  : strcmp (fleece_locking_state (fl), "store only") == 0
                  ? "only the store is locked" : "neither is locked");
  ctl = ctl_open (fl, control_path, &info);
  if (ctl == NULL)
    goto out_close_engine;
  if (metrics_listen) {
    metrics = metrics_http_open (metrics_listen, render_metrics, fl);
    if (metrics == NULL)
      goto out_close_ctl;
    nbdkit_debug ("metrics: http://%s/metrics",
                  metrics_http_address (metrics));
  }
  return 0;

 out_close_ctl:
  engine_error ();
  ctl_close (ctl);
  ctl = NULL;
  goto out_free_engine;
 out_close_engine:
  engine_error ();
 out_free_engine:
  fleece_close (fl);
  fl = NULL;
  return -1;
}

static int
plug_after_fork (void)
{
  if (fleece_start (fl) == -1 || ctl_start (ctl) == -1 ||
      (metrics && metrics_http_start (metrics) == -1))
    return engine_error ();
  return 0;
}

static void
plug_cleanup (void)
{
  metrics_http_close (metrics);
  metrics = NULL;
  ctl_close (ctl);
  ctl = NULL;
  fleece_close (fl);
  fl = NULL;
}

static const char *
snap_description (const struct fleece_snap_info *info)
{
  char when[64];
  struct tm tm;
  time_t t = info->created;

  strftime (when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", gmtime_r (&t, &tm));
  return nbdkit_printf_intern ("point-in-time image of %s at %s "
                               "(generation %" PRIu32 ")%s",
                               fleece_disk_path (fl), when, info->generation,
                               info->broken ? ", BROKEN" : "");
}

struct list_ctx {
  struct nbdkit_exports *exports;
  int r;
};

static void
list_one (void *opaque, const struct fleece_snap_info *info)
{
  struct list_ctx *lc = opaque;
  const char *name = nbdkit_printf_intern (SNAP_PREFIX "%s", info->name);
  const char *desc = snap_description (info);

  if (lc->r == 0 && (name == NULL || desc == NULL ||
                     nbdkit_add_export (lc->exports, name, desc) == -1))
    lc->r = -1;
}

static const char *
bitmap_description (const struct fleece_bitmap_info *info)
{
  return nbdkit_printf_intern ("dirty bitmap %s of %s: %" PRIu64 " of %"
                               PRIu64 " granules of %" PRIu32 " bytes, %s%s%s",
                               info->name, fleece_disk_path (fl), info->count,
                               info->bit_count, info->granularity,
                               info->frozen ? "frozen by checkpoint "
                               : info->enabled ? "recording" : "disabled",
                               info->frozen ? info->frozen_by : "",
                               info->inconsistent ? ", INCONSISTENT" : "");
}

static void
list_bitmap (void *opaque, const struct fleece_bitmap_info *info)
{
  struct list_ctx *lc = opaque;
  const char *name = nbdkit_printf_intern (BITMAP_PREFIX "%s", info->name);
  const char *desc = bitmap_description (info);

  if (lc->r == 0 && (name == NULL || desc == NULL ||
                     nbdkit_add_export (lc->exports, name, desc) == -1))
    lc->r = -1;
}

static int
plug_list_exports (int readonly, int is_tls,
                     struct nbdkit_exports *exports)
{
  struct list_ctx lc = { .exports = exports, .r = 0 };
  const char *desc = nbdkit_printf_intern ("live disk %s (read-write)",
                                           fleece_disk_path (fl));

  if (desc == NULL || nbdkit_add_export (exports, "", desc) == -1)
    return -1;
  if (tls_exports_only && !is_tls)
    return 0;                   /* the others are invisible without TLS */
  fleece_list_snapshots (fl, list_one, &lc);
  fleece_list_bitmaps (fl, list_bitmap, &lc);
  return lc.r;
}

static const char *
plug_default_export (int readonly, int is_tls)
{
  return "";
}

static void *
plug_open (int readonly)
{
  const char *name = nbdkit_export_name ();
  struct handle *h;

  if (name == NULL)
    return NULL;
  h = calloc (1, sizeof *h);
  if (h == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  if (name[0] != '\0' && tls_exports_only && !nbdkit_is_tls ()) {
    nbdkit_error ("export '%s' is only served over TLS "
                  "(tls-exports-only=true)", name);
    free (h);
    return NULL;
  }
  if (strncmp (name, SNAP_PREFIX, strlen (SNAP_PREFIX)) == 0) {
    h->snap = fleece_snap_get (fl, name + strlen (SNAP_PREFIX));
    if (h->snap == NULL) {
      engine_error ();
      free (h);
      return NULL;
    }
  }
  else if (strncmp (name, BITMAP_PREFIX, strlen (BITMAP_PREFIX)) == 0) {
    h->bitmap = fleece_bitmap_export_open (fl, name + strlen (BITMAP_PREFIX));
    if (h->bitmap == NULL) {
      engine_error ();
      free (h);
      return NULL;
    }
  }
  else if (name[0] != '\0') {
    nbdkit_error ("unknown export '%s': the live disk is \"\", snapshots "
                  "are " SNAP_PREFIX "NAME, bitmaps " BITMAP_PREFIX "NAME",
                  name);
    free (h);
    return NULL;
  }
  return h;
}

static void
plug_close_handle (void *handle)
{
  struct handle *h = handle;

  fleece_snap_put (h->snap);
  fleece_bitmap_export_close (h->bitmap);
  free (h);
}

static const char *
plug_export_description (void *handle)
{
  struct handle *h = handle;
  struct fleece_snap_info info;

  if (h->bitmap) {
    struct fleece_bitmap_info binfo;
    const char *name = nbdkit_export_name ();
    if (name == NULL || fleece_bitmap_info (fl, name + strlen (BITMAP_PREFIX),
                                            &binfo) == -1)
      return NULL;
    return bitmap_description (&binfo);
  }
  if (h->snap == NULL)
    return nbdkit_printf_intern ("live disk %s (read-write)",
                                 fleece_disk_path (fl));
  if (fleece_snapshot_info (fl, fleece_snap_name (h->snap), &info) == -1)
    return NULL;
  return snap_description (&info);
}

static int64_t
plug_get_size (void *handle)
{
  struct handle *h = handle;

  return h->bitmap ? (int64_t) fleece_bitmap_export_size (h->bitmap)
    : (int64_t) fleece_disk_size (fl);
}

static int
plug_block_size (void *handle, uint32_t *minimum, uint32_t *preferred,
                   uint32_t *maximum)
{
  *minimum = 1;
  *preferred = fleece_cluster_size (fl);
  *maximum = 0xffffffff;
  return 0;
}

/* A snapshot is writable in NBD's sense only so that clients may trim
 * it (docs/design.md, Exports); .pwrite refuses every write.
 */
static int
plug_can_write (void *handle)
{
  struct handle *h = handle;

  return h->bitmap == NULL;
}

static int
plug_can_flush (void *handle)
{
  return 1;
}

static int
plug_is_rotational (void *handle)
{
  return 0;
}

static int
plug_can_trim (void *handle)
{
  struct handle *h = handle;

  return h->bitmap == NULL;
}

static int
plug_can_zero (void *handle)
{
  struct handle *h = handle;

  return h->snap == NULL && h->bitmap == NULL;
}

static int
plug_can_fast_zero (void *handle)
{
  struct handle *h = handle;

  return h->snap == NULL && h->bitmap == NULL;
}

static int
plug_can_fua (void *handle)
{
  struct handle *h = handle;

  return h->snap || h->bitmap ? NBDKIT_FUA_NONE : NBDKIT_FUA_NATIVE;
}

static int
plug_can_multi_conn (void *handle)
{
  return 1;
}

static int
plug_can_extents (void *handle)
{
  return 1;
}

static int
plug_thread_model (void)
{
  return NBDKIT_THREAD_MODEL_PARALLEL;
}

static int
plug_pread (void *handle, void *buf, uint32_t count, uint64_t offset,
              uint32_t flags)
{
  struct handle *h = handle;
  int r = h->bitmap ? fleece_bitmap_export_pread (h->bitmap, buf, count,
                                                  offset)
    : h->snap ? fleece_snap_pread (h->snap, buf, count, offset)
    : fleece_live_pread (fl, buf, count, offset);

  return r == -1 ? engine_error () : 0;
}

static int
refuse_write (struct handle *h)
{
  nbdkit_error ("export " SNAP_PREFIX "%s is a read-only point-in-time "
                "image: writes are refused", fleece_snap_name (h->snap));
  nbdkit_set_error (EPERM);
  errno = EPERM;
  return -1;
}

static int
plug_pwrite (void *handle, const void *buf, uint32_t count,
               uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;

  if (h->snap)
    return refuse_write (h);
  if (fleece_live_pwrite (fl, buf, count, offset, flags & NBDKIT_FLAG_FUA)
      == -1)
    return engine_error ();
  return 0;
}

static int
plug_flush (void *handle, uint32_t flags)
{
  struct handle *h = handle;

  if (h->snap == NULL && h->bitmap == NULL && fleece_live_flush (fl) == -1)
    return engine_error ();
  return 0;
}

static int
plug_trim (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  int r = h->snap ? fleece_snap_trim (h->snap, count, offset)
    : fleece_live_trim (fl, count, offset, flags & NBDKIT_FLAG_FUA);

  return r == -1 ? engine_error () : 0;
}

static int
plug_zero (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  uint32_t f = 0;

  if (h->snap)
    return refuse_write (h);
  if (flags & NBDKIT_FLAG_MAY_TRIM)
    f |= FLEECE_F_MAY_TRIM;
  if (flags & NBDKIT_FLAG_FUA)
    f |= FLEECE_F_FUA;
  if (flags & NBDKIT_FLAG_FAST_ZERO)
    f |= FLEECE_F_FAST_ZERO;
  if (fleece_live_zero (fl, count, offset, f) == -1) {
    if (errno == ENOTSUP && (flags & NBDKIT_FLAG_FAST_ZERO)) {
      nbdkit_set_error (ENOTSUP);   /* expected: not an error to log */
      return -1;
    }
    return engine_error ();
  }
  return 0;
}

static int
add_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t type)
{
  return nbdkit_add_extent (opaque, offset, length, type);
}

static int
plug_extents (void *handle, uint32_t count, uint64_t offset,
                uint32_t flags, struct nbdkit_extents *extents)
{
  struct handle *h = handle;
  int r = h->bitmap ? nbdkit_add_extent (extents, offset, count, 0)
    : h->snap
    ? fleece_snap_extents (h->snap, count, offset, add_extent, extents)
    : fleece_live_extents (fl, count, offset, add_extent, extents);

  return r == -1 ? engine_error () : 0;
}

static struct nbdkit_plugin plugin = {
  .name               = "fleece",
  .longname           = "Fleece live disk with point-in-time snapshots",
  .version            = PACKAGE_VERSION,
  .description        = "Serve a live disk and copy-before-write snapshot "
                        "exports of it",
  .unload             = plug_unload,
  .config             = plug_config,
  .config_complete    = plug_config_complete,
  .config_help        = plug_config_help,
  .magic_config_key   = "disk",
  .dump_plugin        = plug_dump_plugin,
  .thread_model       = plug_thread_model,
  .get_ready          = plug_get_ready,
  .after_fork         = plug_after_fork,
  .cleanup            = plug_cleanup,
  .list_exports       = plug_list_exports,
  .default_export     = plug_default_export,
  .open               = plug_open,
  .close              = plug_close_handle,
  .export_description = plug_export_description,
  .get_size           = plug_get_size,
  .block_size         = plug_block_size,
  .can_write          = plug_can_write,
  .can_flush          = plug_can_flush,
  .is_rotational      = plug_is_rotational,
  .can_trim           = plug_can_trim,
  .can_zero           = plug_can_zero,
  .can_fast_zero      = plug_can_fast_zero,
  .can_fua            = plug_can_fua,
  .can_multi_conn     = plug_can_multi_conn,
  .can_extents        = plug_can_extents,
  .pread              = plug_pread,
  .pwrite             = plug_pwrite,
  .flush              = plug_flush,
  .trim               = plug_trim,
  .zero               = plug_zero,
  .extents            = plug_extents,
  .errno_is_preserved = 1,
};

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
NBDKIT_REGISTER_PLUGIN (plugin)
