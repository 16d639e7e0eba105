/* fleece-colod: the pairing of a primary and a secondary: generation
 * histories, their relation, the HELLO (pairing.c).
 */

#ifndef COLO_PAIRING_H
#define COLO_PAIRING_H

#include <stdint.h>

#include "state.h"
#include "wire.h"

/* The generation history relation of two sides. */
enum colod_relation {
  REL_SAME,            /* same current generation */
  REL_BEHIND,          /* ours is an older entry of theirs */
  REL_AHEAD,           /* theirs is an older entry of ours */
  REL_DIVERGED,        /* a common generation, then each its own */
  REL_UNRELATED,       /* nothing in common */
};
/* How `ours' relates to `theirs'; *fork is the first epoch of the
 * generation after the common one on the longer side (REL_BEHIND: on
 * theirs; REL_AHEAD: on ours).
 */
extern enum colod_relation
colod_relate (const struct colo_generation *ours, uint32_t nours,
              const struct colo_generation *theirs, uint32_t ntheirs,
              uint64_t *fork);
extern const char *colod_relation_name (enum colod_relation r);
/* A journal's generation history as the wire has it: its length. */
extern uint32_t colod_history_from_journal (const struct journal_state *js,
                                            struct colo_generation *out);
/* The max_version this side's HELLO says (--debug max-version=N makes
 * it an older fleece-colod's), and the version both sides speak: the
 * lower of that and the peer's.
 */
extern uint16_t colod_max_version (void);
extern uint16_t colod_pair_version (uint16_t peer);
/* Start a HELLO from this side: zeroed, then what both roles send
 * alike (type, role, version, channel).
 */
extern struct colo_msg_hello *colod_hello_init (struct colo_msg *m,
                                                uint16_t role,
                                                uint32_t channel);

#endif /* COLO_PAIRING_H */
