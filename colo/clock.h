/* fleece-colod: time (clock.c). */

#ifndef COLO_CLOCK_H
#define COLO_CLOCK_H

#include <stdint.h>

#include "monotonic.h"

/* The wall clock, in milliseconds and microseconds; the monotonic clock
 * is monotonic_ms (common/include).
 */
extern int64_t colod_wall_ms (void);
extern int64_t colod_wall_us (void);
/* With colod.lock held: wait on colod.cond for at most ms. */
extern void colod_wait_ms (int ms);
/* Sleep up to ms, returning early when the daemon stops. */
extern void colod_sleep_ms (int ms);

#endif /* COLO_CLOCK_H */
