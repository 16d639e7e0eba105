/* Fleece: the monotonic clock (header only).
 *
 * Deadlines, timeouts and rates are measured on CLOCK_MONOTONIC, which
 * the wall clock's jumps (NTP, an operator) do not move.  CLOCK_MONOTONIC
 * cannot fail on Linux for a valid timespec, so the result is not checked.
 */

#ifndef FLEECE_COMMON_MONOTONIC_H
#define FLEECE_COMMON_MONOTONIC_H

#include <stdint.h>
#include <time.h>

static inline int64_t
monotonic_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline int64_t
monotonic_us (void)
{
  return monotonic_ns () / 1000;
}

static inline int64_t
monotonic_ms (void)
{
  return monotonic_us () / 1000;
}

#endif /* FLEECE_COMMON_MONOTONIC_H */
