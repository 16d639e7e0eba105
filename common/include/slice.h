/* Fleece: a short scheduler slice for a thread that must answer at once
 * (header only).
 *
 * A consistency group holds the writers of every server from its
 * group-prepare to its group-commit, and most of that time is threads
 * waiting for a CPU: the control service thread of each server and the
 * coordinator's thread wake up on a message while the CPUs run writers
 * (docs/design.md, "Consistency groups").  Linux's EEVDF scheduler
 * (6.12 and later) takes sched_attr's sched_runtime of a SCHED_OTHER
 * thread as the length of its slice: a short slice gives the thread an
 * earlier deadline, so it preempts a writer when it wakes instead of
 * waiting for the writer's slice (about 1.5 ms on 2 CPUs) to end.  It
 * does not give the thread more CPU time than its share.  Unprivileged;
 * older kernels accept and ignore it.  Only a SCHED_OTHER or SCHED_BATCH
 * thread is changed, its nice value and flags kept.
 *
 * The struct is declared here with the kernel's layout (version 1, 48
 * bytes) because glibc declares it only from 2.41.
 */

#ifndef FLEECE_COMMON_SLICE_H
#define FLEECE_COMMON_SLICE_H

#include <stdint.h>
#include <sched.h>
#include <unistd.h>
#include <sys/syscall.h>

/* The slice of the threads that answer a group's messages. */
#define SLICE_GROUP_NS (100 * 1000)

struct slice_sched_attr {
  uint32_t size;
  uint32_t sched_policy;
  uint64_t sched_flags;
  int32_t sched_nice;
  uint32_t sched_priority;
  uint64_t sched_runtime;
  uint64_t sched_deadline;
  uint64_t sched_period;
};

/* Set the calling thread's slice to ns (0: the default) and return the
 * one it had, or -1 if it was not changed (another policy, a kernel
 * without sched_setattr, a seccomp filter): the thread then keeps
 * running as before, which is only slower to wake.
 */
static inline int64_t
slice_set (uint64_t ns)
{
  struct slice_sched_attr a = { 0 };
  uint64_t old;

#if defined (SYS_sched_getattr) && defined (SYS_sched_setattr)
  if (syscall (SYS_sched_getattr, 0, &a, sizeof a, 0) == -1 ||
      (a.sched_policy != SCHED_OTHER && a.sched_policy != SCHED_BATCH))
    return -1;
  old = a.sched_runtime;
  a.size = sizeof a;
  a.sched_runtime = ns;
  a.sched_flags &= 1;           /* SCHED_FLAG_RESET_ON_FORK, kept */
  if (syscall (SYS_sched_setattr, 0, &a, 0) == -1)
    return -1;
  return old;
#else
  (void) a; (void) old; (void) ns;
  return -1;
#endif
}

#endif /* FLEECE_COMMON_SLICE_H */
