/* fleece-colod: time.  Deadlines and ages are on CLOCK_MONOTONIC;
 * the wall clock is only for what is shown (event timestamps, the RPO
 * lag against the commit's wall time).  The waits give up early when
 * the daemon stops (colod.stop), so that no thread outlives a SIGTERM
 * by more than a tick.
 */

#include <config.h>

#include <pthread.h>
#include <time.h>

#include "clock.h"
#include "colod.h"


int64_t
colod_wall_us (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_REALTIME, &ts);
  return ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t
colod_wall_ms (void)
{
  return colod_wall_us () / 1000;
}

void
colod_wait_ms (int ms)
{
  struct timespec ts;

  clock_gettime (CLOCK_REALTIME, &ts);
  ts.tv_sec += ms / 1000;
  ts.tv_nsec += (ms % 1000) * 1000000L;
  if (ts.tv_nsec >= 1000000000) {
    ts.tv_sec++;
    ts.tv_nsec -= 1000000000;
  }
  pthread_cond_timedwait (&colod.cond, &colod.lock, &ts);
}

void
colod_sleep_ms (int ms)
{
  while (ms > 0 && !colod.stop) {
    int n = ms < 50 ? ms : 50;
    struct timespec ts = { 0, n * 1000000L };
    nanosleep (&ts, NULL);
    ms -= n;
  }
}
