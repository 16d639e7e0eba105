/* Consistency groups: the server's side of the two-phase protocol that
 * takes snapshots or checkpoints of several servers at one instant
 * (docs/control-protocol.md, "Consistency groups").
 *
 * A coordinator (fleecectl with several -s) sends group-prepare to every
 * server: each drains its live writes in flight and holds new ones
 * (fleece_hold_writes), then replies.  Once all have replied, every
 * server is held at once, so a write acknowledged on one server before a
 * dependent write was issued to another is in the first server's
 * snapshot whenever the second is in the second's.  Then group-commit
 * creates the snapshot or checkpoint and releases, or group-abort only
 * releases.
 *
 * All or nothing.  The name is checked at prepare, so that a commit only
 * fails on an I/O error.  A hold ends without creating anything when its
 * coordinator aborts, when its connection closes (it died), or at the
 * deadline given to prepare (it stalled): the last two send a
 * GROUP_ABORTED event, and a commit that comes later is refused with the
 * reason, so that the coordinator cannot create half a group.
 *
 * One group at a time per server; the commit and the abort must come on
 * the connection that prepared.  Everything here runs on the service
 * thread (or the caller of ctl_handle_line, in the tests).
 */

#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "control-internal.h"

#define GROUP_DEADLINE_MS_DEFAULT 1000
#define GROUP_DEADLINE_MS_MAX     60000

/* A reply built by jansson: NULL only when out of memory. */
static json_t *
group_reply (json_t *v, const char *cmd)
{
  if (v == NULL)
    fl_error (ENOMEM, "%s: out of memory building the reply", cmd);
  return v;
}

/* End the hold without a commit: remember why, and say so in an event
 * when nobody asked for it (quiet is false).
 */
static void
group_end (struct ctl *ctl, const char *why, bool quiet)
{
  struct ctl_group *g = &ctl->group;
  char reason[320];
  uint64_t held;

  if (!g->held)
    return;
  held = fleece_release_writes (ctl->fl);
  g->held = false;
  g->owner = NULL;
  strcpy (g->ended_id, g->id);
  snprintf (g->ended_why, sizeof g->ended_why, "%s", why);
  if (quiet)
    return;
  snprintf (reason, sizeof reason, "group '%s' released after %" PRIu64
            " us: %s; nothing of it was created", g->id, held / 1000, why);
  ctl_queue_event (ctl, "GROUP_ABORTED", "group", g->id, reason);
}

int
ctl_group_tick (struct ctl *ctl)
{
  struct ctl_group *g = &ctl->group;
  uint64_t now = monotonic_ns ();
  char why[96];

  if (!g->held)
    return -1;
  if (now < g->deadline_ns)
    return (g->deadline_ns - now) / 1000000 + 1;
  snprintf (why, sizeof why, "its deadline of %d ms passed before a commit",
            g->deadline_ms);
  group_end (ctl, why, false);
  return -1;
}

void
ctl_group_client_gone (struct ctl *ctl, struct ctl_client *c)
{
  if (ctl->group.held && ctl->group.owner == c)
    group_end (ctl, "the connection that prepared it closed", false);
}

void
ctl_group_close (struct ctl *ctl)
{
  group_end (ctl, "the server stopped", true);
}

/* The hold of group id, for its commit or abort; NULL after fl_error
 * when there is none (or the deadline has just passed).
 */
static struct ctl_group *
held_group (struct ctl *ctl, const char *id)
{
  struct ctl_group *g = &ctl->group;

  ctl_group_tick (ctl);
  if (g->held && strcmp (g->id, id) == 0) {
    if (g->owner != ctl->current) {
      fl_error (EPERM, "group '%s' was prepared by another connection", id);
      return NULL;
    }
    return g;
  }
  if (strcmp (g->ended_id, id) == 0)
    fl_error (ETIMEDOUT, "group '%s' is no longer prepared: %s; nothing of "
              "it was created", id, g->ended_why);
  else
    fl_error (ENOENT, "group '%s' is not prepared on this server", id);
  return NULL;
}

/* Would the commit's creation fail?  Checked before writes are held. */
static int
check_target (struct ctl *ctl, const char *name, bool checkpoint)
{
  struct fleece_snap_info si;
  struct fleece_bitmap_info bi;

  if (fleece_check_new_name (checkpoint ? "checkpoint" : "snapshot",
                             name) == -1)
    return -1;
  if (fleece_snapshot_info (ctl->fl, name, &si) == 0)
    return fl_error (EEXIST, "snapshot '%s' already exists", name);
  if (checkpoint && fleece_bitmap_info (ctl->fl, name, &bi) == 0)
    return fl_error (EEXIST, "checkpoint '%s': a bitmap of that name "
                     "already exists", name);
  return 0;
}

json_t *
ctl_group_prepare (struct ctl *ctl, json_t *args)
{
  struct ctl_group *g = &ctl->group;
  const char *id = json_string_value (json_object_get (args, "group"));
  const char *name = json_string_value (json_object_get (args, "name"));
  json_t *cp = json_object_get (args, "checkpoint");
  json_t *dl = json_object_get (args, "deadline-ms");
  json_int_t ms = dl ? json_integer_value (dl) : GROUP_DEADLINE_MS_DEFAULT;
  bool checkpoint = cp && json_is_true (cp);

  if (fleece_check_name ("group", id) == -1)
    return NULL;
  if (ms < 1 || ms > GROUP_DEADLINE_MS_MAX) {
    fl_error (EINVAL, "group '%s': deadline-ms %"
              JSON_INTEGER_FORMAT " is not between 1 and %d", id, ms,
              GROUP_DEADLINE_MS_MAX);
    return NULL;
  }
  ctl_group_tick (ctl);
  if (g->held) {
    fl_error (EBUSY, "group '%s': this server is already "
              "prepared for group '%s'", id, g->id);
    return NULL;
  }
  if (check_target (ctl, name, checkpoint) == -1)
    return NULL;
  g->deadline_ns = monotonic_ns () + (uint64_t) ms * 1000000;
  if (fleece_hold_writes (ctl->fl, g->deadline_ns, &g->drain_ns) == -1)
    return NULL;
  g->prepared_ns = monotonic_ns ();
  g->held = true;
  g->owner = ctl->current;
  g->checkpoint = checkpoint;
  g->deadline_ms = ms;
  strcpy (g->id, id);
  strcpy (g->name, name);
  g->ended_id[0] = '\0';
  return group_reply (json_pack ("{s:s,s:I,s:i}", "group", id,
                                 "drain-ns", (json_int_t) g->drain_ns,
                                 "deadline-ms", (int) ms), "group-prepare");
}

json_t *
ctl_group_commit (struct ctl *ctl, json_t *args)
{
  const char *id = json_string_value (json_object_get (args, "group"));
  struct ctl_group *g = held_group (ctl, id);
  struct fleece_snap_info info;
  uint64_t held, t0 = monotonic_ns (), wait;
  int r;

  if (g == NULL)
    return NULL;
  wait = t0 - g->prepared_ns;
  r = g->checkpoint ? fleece_checkpoint_create (ctl->fl, g->name)
    : fleece_snapshot_create (ctl->fl, g->name);
  if (r == 0)
    r = fleece_snapshot_info (ctl->fl, g->name, &info);
  held = fleece_release_writes (ctl->fl);
  g->held = false;
  g->owner = NULL;
  if (r == -1)
    return NULL;
  /* What the writers' wait was spent on: the drain, the wait for this
   * commit (the coordinator, the other servers, this thread's wake-up)
   * and the rest, the commit's work, so that the three add up to
   * hold-ns (docs/design.md, "What a hold is made of").
   */
  return group_reply (json_pack ("{s:s,s:s,s:b,s:I,s:I,s:I,s:I,s:I}",
                                 "group", id,
                                 "name", g->name,
                                 "checkpoint", (int) g->checkpoint,
                                 "generation", (json_int_t) info.generation,
                                 "drain-ns", (json_int_t) g->drain_ns,
                                 "wait-ns", (json_int_t) wait,
                                 "commit-ns", (json_int_t)
                                 (held - g->drain_ns - wait),
                                 "hold-ns", (json_int_t) held),
                      "group-commit");
}

json_t *
ctl_group_abort (struct ctl *ctl, json_t *args)
{
  const char *id = json_string_value (json_object_get (args, "group"));
  struct ctl_group *g = held_group (ctl, id);
  uint64_t held;

  if (g == NULL)
    return NULL;
  held = fleece_release_writes (ctl->fl);
  g->held = false;
  g->owner = NULL;
  return group_reply (json_pack ("{s:s,s:I}", "group", id,
                                 "hold-ns", (json_int_t) held),
                      "group-abort");
}
