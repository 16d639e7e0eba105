/* fleece-colod primary: the plugin it ships from (plugin.c). */

#ifndef COLO_PLUGIN_H
#define COLO_PLUGIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "ctl-client.h"

/* Checkpoints, snapshots and bitmaps of the plugin named PREFIX N
 * belong to fleece-colod, N the epoch.
 */
#define PLUGIN_PREFIX "colo-"

/* Main thread only. */
struct primary_plugin {
  struct ctlc *ctl;               /* NULL: not connected */
  uint64_t disk_size;             /* set by plugin_start */
  uint32_t cluster_size;
  uint64_t last_checkpoint;       /* highest colo-N on the plugin */
};

extern struct primary_plugin plugin;

/* Run a control command (args is stolen): its "return" value, or NULL
 * with err.
 */
extern json_t *plugin_ctl (const char *cmd, json_t *args, char *err,
                           size_t errlen);
/* The plugin's geometry and last checkpoint: 0, or -1 (logged).  A
 * plugin that is not up yet is waited for (wait: the daemon), or not
 * (demote).
 */
extern int plugin_start (bool wait);
/* Drop what no epoch will need: snapshots other than keep_snapshot,
 * bitmaps below below.
 */
extern void plugin_prune (uint64_t keep_snapshot, uint64_t below);
/* The bitmaps colo-base .. colo-(epoch-1), as *names (*n of them,
 * freed with plugin_free_names): 0, 1 if colo-base is gone (then only a
 * full copy will do), or -1 with err.
 */
extern int plugin_chain (uint64_t base, uint64_t epoch, char ***names,
                         size_t *n, char *err, size_t errlen);
extern void plugin_free_names (char **names, size_t n);
/* The snapshot of the last checkpoint if it is still on the plugin and
 * the secondary does not have it: its epoch number, or 0.
 */
extern uint64_t plugin_unsent_snapshot (void);

#endif /* COLO_PLUGIN_H */
