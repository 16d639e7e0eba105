/* Group holds: the live writes of one server held across the two phases
 * of a consistency group (server/group.c, docs/control-protocol.md).
 *
 * A hold is one closure of the write gate that outlives the call that
 * made it: fleece_hold_writes closes and drains it, bounded by a
 * deadline, and leaves it closed; fleece_release_writes opens it.  The
 * snapshot or checkpoint a group commit creates in between closes the
 * gate again inside the hold (closures nest, gate.c), so it sees exactly
 * the writes acknowledged before the drain ended, on every server of the
 * group at one instant.
 *
 * The caller (the control service, one thread) decides when a hold ends:
 * at commit, at abort, when its coordinator's connection closes, or at
 * the deadline.  admin_lock is taken for each step, never across them,
 * so every other command runs normally while writes are held.
 */

#include <config.h>

#include <errno.h>

#include "cleanup.h"
#include "internal.h"

int
fleece_hold_writes (struct fleece *fl, uint64_t deadline_ns,
                    uint64_t *drain_ns)
{
  uint64_t t0;
  int r;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fl->admin_lock);
  if (fl->held)
    return fl_error (EBUSY, "hold writes: the writes of %s are already "
                     "held by a group", fl->disk.path);
  t0 = monotonic_ns ();         /* writers wait from here */
  r = gate_close_until (&fl->gate, deadline_ns);
  *drain_ns = monotonic_ns () - t0;
  if (r == -1)
    return fl_error (ETIMEDOUT, "hold writes: the writes in flight on %s "
                     "did not drain within the deadline (%" PRIu64
                     " us waited)", fl->disk.path, *drain_ns / 1000);
  fl->held = true;
  fl->hold_t0 = t0;
  return 0;
}

uint64_t
fleece_release_writes (struct fleece *fl)
{
  uint64_t held;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fl->admin_lock);
  if (!fl->held)
    return 0;
  fl->held = false;
  /* The hold ends as the gate opens.  Measured before: the writers the
   * opening wakes may take the CPU from this thread, and that time is
   * theirs, not the hold's.
   */
  held = monotonic_ns () - fl->hold_t0;
  gate_open (&fl->gate);
  snap_record_drain (fl, held);
  return held;
}
