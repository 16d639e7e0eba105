/* libfleececlient: the coordinator of a consistency group (group.c):
 * one snapshot or checkpoint of several servers at one instant, or of
 * none, with quiesce hooks.  Used by fleecectl (-s S1 -s S2 ...
 * checkpoint NAME), fleece-backup (backup REPO with several disks) and
 * fleece-colod (each epoch of a replicated group, on its own
 * connections, without hooks).
 *
 * Errors follow ctl-client.h's convention: group_run never prints; it
 * returns -1 with one message in err (every server's failure, joined by
 * "; ", then what became of the group) and tells in *outcome what was
 * created, so that a caller can report what exists even on failure.
 */

#ifndef FLEECE_LIB_GROUP_H
#define FLEECE_LIB_GROUP_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "ctl-client.h"

struct group_member {
  const char *path;             /* the control socket, or its name in
                                 * messages when ctl is given */
  struct ctlc *ctl;             /* connected by the caller (kept open),
                                 * or NULL: group_run connects to path
                                 * and closes the connection */
  json_t *reply;                /* out: group-commit's return value, a
                                 * reference the caller drops, or NULL */
  bool broken;                  /* out: a request could not be sent or
                                 * its reply not read: the connection is
                                 * out of step and must be reopened */
};

struct group_opts {
  struct group_member *members;
  size_t n;
  const char *id_prefix;        /* the group id is PREFIX-PID-NS */
  const char *pre_hook;         /* NULL: none */
  const char *post_hook;
  int hook_timeout;             /* seconds */
  int deadline_ms;              /* group-prepare's deadline-ms */
  int timeout;                  /* seconds to wait for a reply */
  /* Connects a member given with no connection, once the pre-hook is
   * done (a server drops a connection that made no request for 10 s,
   * and a pre-hook may take longer); NULL: ctlc_connect to path, a
   * Unix socket.  fleece-backup passes its ssh-aware connect.
   */
  struct ctlc *(*connect) (const char *path, char *err, size_t errlen);
  /* Called once every server holds its writes, before the commit (the
   * tests stop the coordinator there); NULL: nothing.
   */
  void (*on_prepared) (void);
};

enum group_outcome {
  GROUP_ABORTED,                /* created on no server */
  GROUP_PARTIAL,                /* a commit failed after others succeeded */
  GROUP_CREATED,                /* created on every server */
};

/* Create snapshot (or checkpoint) name on every server of o at one
 * instant, or on none.  0 when it was created on every server and both
 * hooks succeeded; else -1 with the message in err.  *outcome says
 * which servers have it whatever the result.  The hooks are told the
 * group through the process's environment, which this sets when o has
 * a hook (and leaves alone otherwise): FLEECE_GROUP (the group id),
 * FLEECE_GROUP_NAME and, for the post-hook, FLEECE_GROUP_RESULT
 * (created, partial or aborted).  A member's reply says whether its
 * commit succeeded: with GROUP_PARTIAL, which servers have it.
 */
extern int group_run (struct group_opts *o, const char *name,
                      bool checkpoint, enum group_outcome *outcome,
                      char *err, size_t errlen);

#endif /* FLEECE_LIB_GROUP_H */
