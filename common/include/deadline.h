/* Fleece: deadlines on the monotonic clock, and waiting for a file
 * descriptor until one (header only).
 *
 * A deadline is a time of monotonic_ms (), or -1 for none.  A wait that
 * poll ends early (a signal, a rounding of its timeout) looks at the
 * clock again rather than reporting a timeout that has not come.
 */

#ifndef FLEECE_COMMON_DEADLINE_H
#define FLEECE_COMMON_DEADLINE_H

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>

#include "monotonic.h"

/* The deadline timeout_ms from now; -1 (none) for a negative timeout. */
static inline int64_t
deadline_after (int64_t timeout_ms)
{
  return timeout_ms < 0 ? -1 : monotonic_ms () + timeout_ms;
}

/* Wait until fd is ready for events or the deadline passes: 1 ready
 * (or in error: the next call on fd says which), 0 timed out, -1 error
 * (errno set by poll).
 */
static inline int
wait_fd_until (int fd, short events, int64_t deadline)
{
  struct pollfd pfd = { .fd = fd, .events = events };
  int64_t left;
  int r, ms;

  for (;;) {
    if (deadline < 0)
      ms = -1;
    else {
      left = deadline - monotonic_ms ();
      ms = left <= 0 ? 0 : left > INT_MAX ? INT_MAX : (int) left;
    }
    r = poll (&pfd, 1, ms);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == 0 && ms != 0)
      continue;                 /* woke early: look at the clock again */
    return r;
  }
}

#endif /* FLEECE_COMMON_DEADLINE_H */
