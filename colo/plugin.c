/* fleece-colod primary: the plugin it ships from, seen through the
 * plugin's control socket (docs/control-protocol.md): its geometry and
 * its colo-N checkpoints (primary.c's note says what they mean).
 *
 * The connection is opened on first use and subscribed to events, so
 * that the plugin keeps it however long it is idle; a failure that
 * names the control socket closes it, and the next call reconnects.
 * Nothing here is removed that an epoch may still need: plugin_prune is
 * told what to keep.  Main thread only.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "clock.h"
#include "colod.h"
#include "log.h"
#include "plugin.h"
#include "source.h"

struct primary_plugin plugin;

json_t *
plugin_ctl (const char *cmd, json_t *args, char *err, size_t errlen)
{
  json_t *r;

  if (plugin.ctl == NULL) {
    plugin.ctl = ctlc_connect (colod.opt.fleece_socket, 30000, err, errlen);
    /* Subscribed, the plugin keeps this connection however long it is
     * idle (--interval 0 waits for requests): not subscribed, it would
     * close it after a minute.
     */
    r = plugin.ctl ? ctlc_execute (plugin.ctl, "subscribe-events", NULL,
                                   err, errlen) : NULL;
    if (r == NULL) {
      ctlc_close (plugin.ctl);
      plugin.ctl = NULL;
      json_decref (args);
      return NULL;
    }
    json_decref (r);
  }
  r = ctlc_execute (plugin.ctl, cmd, args, err, errlen);
  if (r == NULL && strstr (err, "control socket")) {
    ctlc_close (plugin.ctl);    /* reconnect next time */
    plugin.ctl = NULL;
  }
  return r;
}

/* N if name is colo-N, else 0 (also for NULL). */
static uint64_t
colo_number (const char *name)
{
  char *end;
  unsigned long long v;

  if (name == NULL ||
      strncmp (name, PLUGIN_PREFIX, strlen (PLUGIN_PREFIX)) != 0)
    return 0;
  errno = 0;
  v = strtoull (name + strlen (PLUGIN_PREFIX), &end, 10);
  return errno || *end || end == name + strlen (PLUGIN_PREFIX) ? 0 : v;
}

/* The colo-N names of query-snapshots or query-bitmaps, as numbers:
 * *out malloc'ed, sorted.
 */
static int
list_colo (const char *cmd, uint64_t **out, size_t *n, char *err,
           size_t errlen)
{
  json_t *r = plugin_ctl (cmd, NULL, err, errlen), *e;
  size_t i;

  *out = NULL;
  *n = 0;
  if (r == NULL)
    return -1;
  *out = calloc (json_array_size (r) + 1, sizeof **out);
  if (*out == NULL) {
    json_decref (r);
    snprintf (err, errlen, "%s: out of memory", cmd);
    return -1;
  }
  json_array_foreach (r, i, e) {
    uint64_t k = colo_number (json_string_value (json_object_get (e,
                                                                  "name")));
    size_t j;
    if (k == 0)
      continue;
    for (j = *n; j > 0 && (*out)[j - 1] > k; j--)
      (*out)[j] = (*out)[j - 1];
    (*out)[j] = k;
    (*n)++;
  }
  json_decref (r);
  return 0;
}

static int
remove_colo (const char *cmd, uint64_t k)
{
  char name[64], err[1024];
  json_t *r;

  snprintf (name, sizeof name, PLUGIN_PREFIX "%" PRIu64, k);
  r = plugin_ctl (cmd, json_pack ("{s:s}", "name", name), err, sizeof err);
  if (r == NULL) {
    colod_warn ("%s %s: %s", cmd, name, err);
    return -1;
  }
  json_decref (r);
  return 0;
}

/* Drop what no epoch will need: snapshots other than keep, bitmaps
 * below below.
 */
void
plugin_prune (uint64_t keep_snapshot, uint64_t below)
{
  uint64_t *v;
  size_t n, i;
  char err[1024];

  if (list_colo ("query-snapshots", &v, &n, err, sizeof err) == 0)
    for (i = 0; i < n; i++)
      if (v[i] != keep_snapshot)
        remove_colo ("snapshot-delete", v[i]);
  free (v);
  if (list_colo ("query-bitmaps", &v, &n, err, sizeof err) == 0)
    for (i = 0; i < n; i++)
      if (v[i] < below)
        remove_colo ("bitmap-remove", v[i]);
  free (v);
}

/* The plugin's geometry and checkpoints.  A plugin that is not up yet
 * is waited for (wait: the daemon), or not (demote).
 */
int
plugin_start (bool wait)
{
  char err[1024];
  json_int_t size, cs;
  uint64_t *v;
  size_t n;
  json_t *r;
  bool said = false;

  while ((r = plugin_ctl ("query-status", NULL, err, sizeof err)) == NULL) {
    if (!wait || colod.stop || strstr (err, "control socket") == NULL) {
      colod_err ("%s", err);
      return -1;
    }
    if (!said)
      colod_log ("%s: waiting for the plugin", err);
    said = true;
    colod_sleep_ms (500);
  }
  if (json_unpack (r, "{s:I,s:I}", "disk-size", &size, "cluster-size",
                   &cs) == -1) {
    colod_err ("control socket %s: query-status lacks disk-size or "
               "cluster-size", colod.opt.fleece_socket);
    json_decref (r);
    return -1;
  }
  json_decref (r);
  plugin.disk_size = size;
  plugin.cluster_size = cs;
  if (list_colo ("query-bitmaps", &v, &n, err, sizeof err) == -1) {
    colod_err ("%s", err);
    return -1;
  }
  plugin.last_checkpoint = n ? v[n - 1] : 0;
  free (v);
  colod_log ("plugin %s: disk of %" PRIu64 " bytes, clusters of %" PRIu32
             ", last checkpoint %" PRIu64, colod.opt.fleece_socket,
             plugin.disk_size, plugin.cluster_size, plugin.last_checkpoint);
  return 0;
}

/* The bitmaps colo-base .. colo-(epoch-1), or -1 if colo-base is gone
 * (then only a full copy will do).
 */
int
plugin_chain (uint64_t base, uint64_t epoch, char ***names, size_t *n,
              char *err, size_t errlen)
{
  CLEANUP_FREE uint64_t *v = NULL;
  size_t cnt, i;
  bool have_base = false;

  *names = NULL;
  *n = 0;
  if (list_colo ("query-bitmaps", &v, &cnt, err, errlen) == -1)
    return -1;
  *names = calloc (cnt + 1, sizeof **names);
  for (i = 0; *names && i < cnt; i++) {
    if (v[i] == base)
      have_base = true;
    if (v[i] >= base && v[i] < epoch &&
        asprintf (&(*names)[(*n)++], PLUGIN_PREFIX "%" PRIu64, v[i]) == -1) {
      (*names)[--(*n)] = NULL;
      break;
    }
  }
  if (*names == NULL || i < cnt) {
    /* A bitmap left out of the union would lose its clusters. */
    snprintf (err, errlen, "query-bitmaps: out of memory");
    return -1;
  }
  return have_base ? 0 : 1;
}

void
plugin_free_names (char **names, size_t n)
{
  size_t i;

  for (i = 0; i < n; i++)
    free (names[i]);
  free (names);
}

/* The snapshot of the last checkpoint if it is still on the plugin and
 * the secondary does not have it: its epoch number, or 0.
 */
uint64_t
plugin_unsent_snapshot (void)
{
  uint64_t *v, r = 0;
  size_t n, i;
  char err[1024];

  if (list_colo ("query-snapshots", &v, &n, err, sizeof err) == 0)
    for (i = 0; i < n; i++)
      if (v[i] == plugin.last_checkpoint)
        r = v[i];
  free (v);
  return r;
}

