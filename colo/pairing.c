/* fleece-colod: the pairing's common ground.  Each side has a
 * generation history (a new generation each time a secondary is
 * promoted, with the epoch it starts at); how the primary's relates to
 * the secondary's decides what the secondary does with the primary's
 * HELLO (secondary.c, "the pairing rules"; docs/replication.md
 * "Pairing"): go on, catch up from the fork, or refuse a split brain.
 */

#include <config.h>

#include <string.h>

#include "colod.h"
#include "pairing.h"

static int
find_gen (const struct colo_generation *h, uint32_t n, const uint8_t *id)
{
  uint32_t i;

  for (i = 0; i < n; i++)
    if (memcmp (h[i].id, id, 16) == 0)
      return i;
  return -1;
}

enum colod_relation
colod_relate (const struct colo_generation *ours, uint32_t nours,
              const struct colo_generation *theirs, uint32_t ntheirs,
              uint64_t *fork)
{
  int i;

  *fork = 0;
  if (nours == 0 || ntheirs == 0)
    return REL_UNRELATED;
  if (memcmp (ours[nours - 1].id, theirs[ntheirs - 1].id, 16) == 0)
    return REL_SAME;
  i = find_gen (theirs, ntheirs, ours[nours - 1].id);
  if (i >= 0) {
    *fork = theirs[i + 1].start_epoch;
    return REL_BEHIND;
  }
  i = find_gen (ours, nours, theirs[ntheirs - 1].id);
  if (i >= 0) {
    *fork = ours[i + 1].start_epoch;
    return REL_AHEAD;
  }
  for (i = nours - 1; i >= 0; i--)
    if (find_gen (theirs, ntheirs, ours[i].id) >= 0)
      return REL_DIVERGED;
  return REL_UNRELATED;
}

uint32_t
colod_history_from_journal (const struct journal_state *js,
                            struct colo_generation *out)
{
  uint32_t i;

  for (i = 0; i < js->history_len; i++) {
    memcpy (out[i].id, js->history[i].id, 16);
    out[i].start_epoch = js->history[i].first_epoch;
  }
  return js->history_len;
}

uint16_t
colod_max_version (void)
{
  return colod.opt.debug_max_version ? colod.opt.debug_max_version
    : COLO_WIRE_MAX_VERSION;
}

uint16_t
colod_pair_version (uint16_t peer)
{
  uint16_t own = colod_max_version ();

  return peer < own ? peer : own;
}

struct colo_msg_hello *
colod_hello_init (struct colo_msg *m, uint16_t role, uint32_t channel)
{
  memset (m, 0, sizeof *m);
  m->type = COLO_MSG_HELLO;
  m->hello.role = role;
  m->hello.max_version = colod_max_version ();
  m->hello.channel = channel;
  return &m->hello;
}

const char *
colod_relation_name (enum colod_relation r)
{
  switch (r) {
  case REL_SAME: return "same generation";
  case REL_BEHIND: return "behind";
  case REL_AHEAD: return "ahead";
  case REL_DIVERGED: return "diverged";
  case REL_UNRELATED: return "unrelated";
  }
  return "unknown";
}
