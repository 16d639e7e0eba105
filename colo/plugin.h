/* fleece-colod primary: the plugin it ships from (plugin.c). */

#ifndef COLO_PLUGIN_H
#define COLO_PLUGIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "colod.h"
#include "ctl-client.h"

/* Checkpoints, snapshots and bitmaps of the plugin named PREFIX N
 * belong to fleece-colod, N the epoch.
 */
#define PLUGIN_PREFIX "colo-"

/* One plugin of the group (one disk).  Main thread only. */
struct primary_plugin {
  const char *socket, *nbd_uri;   /* --fleece, --nbd: set by plugin_start */
  struct ctlc *ctl;               /* NULL: not connected */
  uint64_t disk_size;             /* set by plugin_start */
  uint32_t cluster_size;
  uint64_t last_checkpoint;       /* highest colo-N on the plugin */
};

/* The group, in the order of the command line: nplugins of them (one
 * for a single disk).
 */
extern struct primary_plugin plugins[COLOD_MAX_DISKS];
extern unsigned nplugins;

/* Run a control command (args is stolen): its "return" value, or NULL
 * with err.
 */
extern json_t *plugin_ctl (struct primary_plugin *pl, const char *cmd,
                           json_t *args, char *err, size_t errlen);
/* Every plugin's geometry and last checkpoint: 0, or -1 (logged).  A
 * plugin that is not up yet is waited for (wait: the daemon), or not
 * (demote).  The group's plugins must have one cluster size.
 */
extern int plugin_start (bool wait);
/* Drop what no epoch will need: snapshots other than keep_snapshot,
 * bitmaps below below.
 */
extern void plugin_prune (struct primary_plugin *pl, uint64_t keep_snapshot,
                          uint64_t below);
/* The bitmaps colo-base .. colo-(epoch-1), as *names (*n of them,
 * freed with plugin_free_names): 0, 1 if colo-base is gone (then only a
 * full copy will do), or -1 with err.
 */
extern int plugin_chain (struct primary_plugin *pl, uint64_t base,
                         uint64_t epoch, char ***names, size_t *n,
                         char *err, size_t errlen);
extern void plugin_free_names (char **names, size_t n);
/* The snapshot of the last checkpoint if it is still on the plugin and
 * the secondary does not have it: its epoch number, or 0.
 */
extern uint64_t plugin_unsent_snapshot (struct primary_plugin *pl);
/* Checkpoint name on every plugin of the group at one instant
 * (group-prepare on all, within deadline_ms, then group-commit on all;
 * group-abort on all if a prepare failed).  0 when every plugin has it;
 * -1 with err otherwise, and then no epoch may use it (a commit that
 * failed after others succeeded leaves it on some: their last_checkpoint
 * moves, so that the next epoch takes the next number).  *hold_ns: the
 * longest time a plugin held its writers.
 */
extern int plugin_group_checkpoint (const char *name, int deadline_ms,
                                    int64_t *hold_ns, char *err,
                                    size_t errlen);

#endif /* COLO_PLUGIN_H */
