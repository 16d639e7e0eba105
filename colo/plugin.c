/* fleece-colod primary: the plugins it ships from, one per disk of the
 * group, seen through their control sockets (docs/control-protocol.md):
 * their geometry and their colo-N checkpoints (primary.c's note says
 * what they mean).  Of a group of several disks, checkpoint colo-N is
 * taken on all at one instant by lib/group.c's coordinator, the one
 * fleecectl and fleece-backup use, on the connections kept here.
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
#include "group.h"
#include "clock.h"
#include "colod.h"
#include "log.h"
#include "plugin.h"
#include "source.h"

struct primary_plugin plugins[COLOD_MAX_DISKS];
unsigned nplugins;

/* Connected and subscribed: 0, or -1 with err. */
static int
plugin_connect (struct primary_plugin *pl, char *err, size_t errlen)
{
  json_t *r;

  if (pl->ctl == NULL) {
    pl->ctl = ctlc_connect (pl->socket, 30000, err, errlen);
    /* Subscribed, the plugin keeps this connection however long it is
     * idle (--interval 0 waits for requests): not subscribed, it would
     * close it after a minute.
     */
    r = pl->ctl ? ctlc_execute (pl->ctl, "subscribe-events", NULL,
                                err, errlen) : NULL;
    if (r == NULL) {
      ctlc_close (pl->ctl);
      pl->ctl = NULL;
      return -1;
    }
    json_decref (r);
  }
  return 0;
}

/* After a failure that names the control socket: reconnect next time. */
static void
plugin_check_closed (struct primary_plugin *pl, const char *err)
{
  if (strstr (err, "control socket")) {
    ctlc_close (pl->ctl);
    pl->ctl = NULL;
  }
}

json_t *
plugin_ctl (struct primary_plugin *pl, const char *cmd, json_t *args,
            char *err, size_t errlen)
{
  json_t *r;

  if (plugin_connect (pl, err, errlen) == -1) {
    json_decref (args);
    return NULL;
  }
  r = ctlc_execute (pl->ctl, cmd, args, err, errlen);
  if (r == NULL)
    plugin_check_closed (pl, err);
  return r;
}

/* N if name is colo-N, else 0 (also for NULL). */
static uint64_t
colo_plugin_number (const char *name)
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
list_colo (struct primary_plugin *pl, const char *cmd, uint64_t **out,
           size_t *n, char *err, size_t errlen)
{
  json_t *r = plugin_ctl (pl, cmd, NULL, err, errlen), *e;
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
    uint64_t k = colo_plugin_number (json_string_value (json_object_get (e,
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
remove_colo (struct primary_plugin *pl, const char *cmd, uint64_t k)
{
  char name[64], err[1024];
  json_t *r;

  snprintf (name, sizeof name, PLUGIN_PREFIX "%" PRIu64, k);
  r = plugin_ctl (pl, cmd, json_pack ("{s:s}", "name", name), err,
                  sizeof err);
  if (r == NULL) {
    colod_warn ("%s: %s %s: %s", pl->socket, cmd, name, err);
    return -1;
  }
  json_decref (r);
  return 0;
}

/* Drop what no epoch will need: snapshots other than keep, bitmaps
 * below below.
 */
void
plugin_prune (struct primary_plugin *pl, uint64_t keep_snapshot,
              uint64_t below)
{
  uint64_t *v;
  size_t n, i;
  char err[1024];

  if (list_colo (pl, "query-snapshots", &v, &n, err, sizeof err) == 0)
    for (i = 0; i < n; i++)
      if (v[i] != keep_snapshot)
        remove_colo (pl, "snapshot-delete", v[i]);
  free (v);
  if (list_colo (pl, "query-bitmaps", &v, &n, err, sizeof err) == 0)
    for (i = 0; i < n; i++)
      if (v[i] < below)
        remove_colo (pl, "bitmap-remove", v[i]);
  free (v);
}

/* The plugin's geometry and checkpoints.  A plugin that is not up yet
 * is waited for (wait: the daemon), or not (demote).
 */
static int
start_one (struct primary_plugin *pl, bool wait)
{
  char err[1024];
  json_int_t size, cs;
  uint64_t *v;
  size_t n;
  json_t *r;
  bool said = false;

  while ((r = plugin_ctl (pl, "query-status", NULL, err,
                          sizeof err)) == NULL) {
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
               "cluster-size", pl->socket);
    json_decref (r);
    return -1;
  }
  json_decref (r);
  pl->disk_size = size;
  pl->cluster_size = cs;
  if (list_colo (pl, "query-bitmaps", &v, &n, err, sizeof err) == -1) {
    colod_err ("%s", err);
    return -1;
  }
  pl->last_checkpoint = n ? v[n - 1] : 0;
  free (v);
  colod_log ("plugin %s: disk of %" PRIu64 " bytes, clusters of %" PRIu32
             ", last checkpoint %" PRIu64, pl->socket, pl->disk_size,
             pl->cluster_size, pl->last_checkpoint);
  return 0;
}

int
plugin_start (bool wait)
{
  unsigned i;

  nplugins = colod.opt.nfleece;
  for (i = 0; i < nplugins; i++) {
    plugins[i].socket = colod.opt.fleece_sockets[i];
    plugins[i].nbd_uri = colod.opt.nbd_uris[i];
    if (start_one (&plugins[i], wait) == -1)
      return -1;
    /* One cluster size, so that the secondary's journal has one. */
    if (plugins[i].cluster_size != plugins[0].cluster_size) {
      colod_err ("plugin %s: clusters of %" PRIu32 " bytes, but %s has %"
                 PRIu32 ": the disks of a group need one cluster size",
                 plugins[i].socket, plugins[i].cluster_size,
                 plugins[0].socket, plugins[0].cluster_size);
      return -1;
    }
  }
  return 0;
}

/* The bitmaps colo-base .. colo-(epoch-1), or -1 if colo-base is gone
 * (then only a full copy will do).
 */
int
plugin_chain (struct primary_plugin *pl, uint64_t base, uint64_t epoch,
              char ***names, size_t *n, char *err, size_t errlen)
{
  CLEANUP_FREE uint64_t *v = NULL;
  size_t cnt, i;
  bool have_base = false;

  *names = NULL;
  *n = 0;
  if (list_colo (pl, "query-bitmaps", &v, &cnt, err, errlen) == -1)
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
plugin_unsent_snapshot (struct primary_plugin *pl)
{
  uint64_t *v, r = 0;
  size_t n, i;
  char err[1024];

  if (list_colo (pl, "query-snapshots", &v, &n, err, sizeof err) == 0)
    for (i = 0; i < n; i++)
      if (v[i] == pl->last_checkpoint)
        r = v[i];
  free (v);
  return r;
}

/* ---- the group checkpoint ----
 *
 * lib/group.c's coordinator runs the protocol (docs/control-protocol.md,
 * "Consistency groups") on the connections this file keeps, without
 * hooks.  A plugin whose deadline passes releases its writers and
 * creates nothing by itself.
 */

int
plugin_group_checkpoint (const char *name, int deadline_ms, int64_t *hold_ns,
                         char *err, size_t errlen)
{
  struct group_member m[COLOD_MAX_DISKS];
  struct group_opts o = {
    .members = m, .n = nplugins, .id_prefix = "colod",
    .deadline_ms = deadline_ms, .timeout = 30,
  };
  enum group_outcome outcome;
  json_int_t v;
  unsigned i;
  int r;

  *hold_ns = 0;
  for (i = 0; i < nplugins; i++) {
    if (plugin_connect (&plugins[i], err, errlen) == -1)
      return -1;
    m[i] = (struct group_member) { .path = plugins[i].socket,
                                   .ctl = plugins[i].ctl };
  }
  r = group_run (&o, name, true, &outcome, err, errlen);
  for (i = 0; i < nplugins; i++) {
    /* A commit that succeeded leaves colo-N on this plugin, even when
     * another failed: the next epoch must take the next number.
     */
    if (m[i].reply) {
      plugins[i].last_checkpoint = colo_plugin_number (name);
      if (json_unpack (m[i].reply, "{s:I}", "hold-ns", &v) == 0 &&
          v > *hold_ns)
        *hold_ns = v;
      json_decref (m[i].reply);
    }
    /* A connection out of step: open another next time. */
    if (m[i].broken) {
      ctlc_close (plugins[i].ctl);
      plugins[i].ctl = NULL;
    }
  }
  return r;
}
