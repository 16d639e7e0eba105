/* fleece-colod: the secondary (secondary.c). */

#ifndef COLO_SECONDARY_H
#define COLO_SECONDARY_H

/* fleece-colod secondary: run until stopped; an exit status. */
extern int colod_run_secondary (void);

#include <stdbool.h>
#include <stdint.h>
#include "wire.h"
extern int colod_write_diverged (const char *state_dir, uint64_t base,
                                 uint64_t disk_size, uint32_t cs,
                                 const uint8_t *bits, uint64_t nbits);

#endif /* COLO_SECONDARY_H */
