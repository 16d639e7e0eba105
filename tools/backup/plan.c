/* fleece-backup: the planner, which turns the source's extents (and,
 * for --sync=incremental, the dirty bitmap) into COPY and ZERO jobs.
 *
 * One STATUS job at most is out, for at most 1024 requests' worth of the
 * source, and only while fewer than two rounds of requests are ready, so
 * that the ready list stays small whatever the size of the disk.  Jobs
 * are cut at multiples of their chunk (copy_chunk, zero_chunk), so that
 * a retried or redone range is the same job again.  Zero extents cost
 * nothing on a fresh file target (known zero); holes are left untouched
 * by --sync=top; an incremental pull plans only the dirty runs.
 */

#include <config.h>

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>

#include "backup.h"
#include "repo.h"

/* A range of the source is finished: it is on the target (or known zero
 * there) but not yet flushed.
 */
void
range_done (uint64_t offset, uint64_t length, bool zero)
{
  P.covered += length;
  if (sums_on && zero)
    sums_zero (offset, length);
  rvec_add (&P.unflushed, offset, length, zero ? LIBNBD_STATE_ZERO : 0,
            true);
}

void
plan_piece (uint64_t offset, uint64_t length, uint32_t flags)
{
  bool zero = flags & LIBNBD_STATE_ZERO;

  if (cfg.sync == SYNC_TOP && (flags & LIBNBD_STATE_HOLE))
    P.covered += cfg.verify ? 2 * length : length;  /* left untouched */
  else if (zero && tgt.known_zero)
    range_done (offset, length, true);
  else if (zero)
    add_jobs (&P.ready, JOB_ZERO, offset, length, P.zero_chunk);
  else
    add_jobs (&P.ready, JOB_COPY, offset, length, P.copy_chunk);
}

/* Plan an extent: all of it, or for an incremental pull the dirty runs
 * inside it.
 */
static void
plan_extent (uint64_t offset, uint64_t length, uint32_t flags)
{
  uint64_t end = offset + length, i, run_end;

  if (cfg.sync != SYNC_INCREMENTAL) {
    plan_piece (offset, length, flags);
    return;
  }
  while (offset < end) {
    i = offset / bm.granularity;
    if (!bit_test (i)) {
      i = bit_find (i, true);
      if (i >= bm.nbits || i * bm.granularity >= end)
        return;
      offset = i * bm.granularity;
      continue;
    }
    run_end = bit_find (i, false) * bm.granularity;
    if (run_end > end)
      run_end = end;
    plan_piece (offset, run_end - offset, flags);
    offset = run_end;
  }
}

/* Move P.pos to the next byte to copy; false at the end. */
static bool
plan_next (void)
{
  uint64_t i;

  if (P.pos >= src.size)
    return false;
  if (cfg.sync != SYNC_INCREMENTAL)
    return true;
  i = P.pos / bm.granularity;
  if (bit_test (i))
    return true;
  i = bit_find (i, true);
  if (i >= bm.nbits)
    return false;
  P.pos = i * bm.granularity;
  return true;
}

/* Keep about two rounds of requests ready.  One block status covers at
 * most 1024 requests, so that the ready list stays small whatever the
 * request size.
 */
void
plan_more (void)
{
  uint64_t end, span = (uint64_t) cfg.request_size * 1024;

  if (P.planned || P.status_out || P.ready.len >= 2 * cfg.requests)
    return;
  if (!plan_next ()) {
    P.planned = true;
    return;
  }
  if (span > STATUS_SPAN)
    span = STATUS_SPAN;
  end = src.size - P.pos > span ? P.pos + span : src.size;
  if (!src.can_extents) {
    plan_extent (P.pos, end - P.pos, 0);
    P.pos = end;
    return;
  }
  P.status_out = true;
  job_start_other (job_new (JOB_STATUS, P.pos, end - P.pos));
}

/* An incremental pull asks for the first extents from offset 0 before it
 * has the bitmap, so that the server works on them while the bitmap is
 * loaded; plan_status then keeps only the dirty runs (or everything, if
 * --fallback-full gave up on the bitmap).
 */
void
plan_first (void)
{
  uint64_t span = (uint64_t) cfg.request_size * 1024;

  if (!src.can_extents || src.size == 0)
    return;
  if (span > STATUS_SPAN)
    span = STATUS_SPAN;
  P.status_out = true;
  job_start_other (job_new (JOB_STATUS, 0,
                            src.size > span ? span : src.size));
}

/* The server may describe less than was asked: plan what it said and
 * ask again from there.
 */
void
plan_status (struct job *j)
{
  uint64_t pos = j->offset, end = j->offset + j->length, skip, len;
  size_t i;

  if (sums_on)                  /* whole clusters only: sums.c */
    sums_align (j);
  for (i = 0; i < j->ext.v.len && pos < end; i++) {
    struct extent *e = &j->ext.v.ptr[i];

    if (e->offset > pos || e->offset + e->length <= pos)
      break;                    /* not contiguous: ask again */
    skip = pos - e->offset;
    len = e->length - skip < end - pos ? e->length - skip : end - pos;
    plan_extent (pos, len, e->flags);
    pos += len;
  }
  if (pos == j->offset)
    die ("block status of %s at offset %" PRIu64 ": the server described "
         "nothing", cfg.source, j->offset);
  P.pos = pos;
  P.status_out = false;
}
