/* fleece-colod: the primary (primary.c). */

#ifndef COLO_PRIMARY_H
#define COLO_PRIMARY_H

/* fleece-colod primary: run until stopped; an exit status. */
extern int colod_run_primary (void);
/* fleece-colod demote: record this former primary's diverged clusters
 * for the secondary it becomes; an exit status.
 */
extern int colod_demote (void);

#include <stdbool.h>
#include <stdint.h>
#include "wire.h"
/* primary.json (primary.c): 1 loaded, 0 none, -1 damaged. */
extern int colod_load_primary_identity (uint8_t volume_id[16],
                                        struct colo_generation *history,
                                        uint32_t *history_len,
                                        uint64_t *acked, bool *demoted);

#endif /* COLO_PRIMARY_H */
