/* fleecectl's consistency groups (group.c): one snapshot or checkpoint
 * of several servers at one instant, with quiesce hooks.
 */

#ifndef FLEECE_TOOLS_GROUP_H
#define FLEECE_TOOLS_GROUP_H

#include <stdbool.h>
#include <stddef.h>

struct group_opts {
  const char *const *sockets;   /* the servers' control sockets */
  size_t nsockets;
  const char *pre_hook;         /* NULL: none */
  const char *post_hook;
  int hook_timeout;             /* seconds */
  int deadline_ms;              /* group-prepare's deadline-ms */
  int timeout;                  /* seconds to wait for a reply */
  bool json;                    /* print the commit replies as JSON */
};

/* Create snapshot (or checkpoint) NAME on every server of o at one
 * instant, or on none.  Returns the exit status: 0, or 1 after saying
 * why on stderr.
 */
extern int group_run (const struct group_opts *o, const char *name,
                      bool checkpoint);

#endif /* FLEECE_TOOLS_GROUP_H */
