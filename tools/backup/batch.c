/* fleece-backup: batches: flush the target, then verify, then trim the
 * source.
 *
 * Finished ranges collect as "unflushed" until a batch is cut (every
 * BATCH_DEFAULT bytes, BATCH_DISCARD with --discard-source, and at the
 * end): the target is flushed (after every write of the batch completed),
 * then the batch is verified (--verify), then trimmed on the source
 * (--discard-source).  Hence a range of the source is trimmed only after
 * its data was written, flushed and, with --verify, compared; and after
 * a failed flush every range of the batch is copied again, since a lost
 * write is never assumed to have reached the disk.  One batch at most is
 * out.
 */

#include <config.h>

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

#include "backup.h"

/* Copy again what may not have reached the target's disk. */
void
redo_ranges (struct rvec *r)
{
  size_t i;

  for (i = 0; i < r->v.len; i++) {
    struct extent *e = &r->v.ptr[i];

    P.covered -= e->length;
    plan_piece (e->offset, e->length, e->flags);
  }
  rvec_clear (r);
}

/* The batch is safe on the target: trim it on the source, coalescing
 * what was copied with what was zeroed.
 */
void
batch_verified (void)
{
  const struct extent *v = P.batch.v.ptr;
  struct jlist trims = { NULL };
  uint64_t off, len;
  size_t i;

  for (i = 0; cfg.discard_source && i < P.batch.v.len; ) {
    off = v[i].offset;
    len = 0;
    for (; i < P.batch.v.len && v[i].offset == off + len; i++)
      len += v[i].length;
    add_jobs (&trims, JOB_TRIM, off, len, ZERO_MAX);
  }
  while (trims.head)
    job_start_other (jl_pop (&trims));
  rvec_clear (&P.batch);
  P.batch_out = false;
}

void
batch_flushed (void)
{
  struct jlist verify = { NULL };
  size_t i;

  if (!cfg.verify) {
    batch_verified ();
    return;
  }
  for (i = 0; i < P.batch.v.len; i++)
    add_jobs (&verify, JOB_VERIFY, P.batch.v.ptr[i].offset,
              P.batch.v.ptr[i].length, cfg.request_size);
  P.batch_verify = verify.len;
  jl_prepend (&P.ready, &verify);
  if (P.batch_verify == 0)
    batch_verified ();
}

void
flush_failed (const char *msg)
{
  if (!cfg.retry || ++P.flush_failures > MAX_RETRIES)
    die ("%s", msg);
  warn ("%s: writing the last %" PRIu64 " bytes again", msg,
        P.batch.bytes);
  redo_ranges (&P.batch);
  P.batch_out = false;
}

static int
extent_cmp (const void *a, const void *b)
{
  const struct extent *x = a, *y = b;

  return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Ranges finish out of order: sort them and merge neighbours, so that
 * verify reads and trims are few and sequential.
 */
static void
rvec_sort (struct rvec *r)
{
  size_t i, n = 0;

  if (r->v.len == 0)
    return;
  qsort (r->v.ptr, r->v.len, sizeof *r->v.ptr, extent_cmp);
  for (i = 1; i < r->v.len; i++) {
    struct extent *last = &r->v.ptr[n];

    if (last->offset + last->length == r->v.ptr[i].offset &&
        last->flags == r->v.ptr[i].flags)
      last->length += r->v.ptr[i].length;
    else
      r->v.ptr[++n] = r->v.ptr[i];
  }
  r->v.len = n + 1;
}

bool
pull_idle (void)
{
  return P.planned && !P.status_out && P.ready.head == NULL &&
    P.retry == NULL && P.done.head == NULL && P.slots == 0;
}

/* Cut a batch every BATCH_* bytes, and at the end. */
void
batch_maybe_start (void)
{
  struct rvec t;

  if (P.batch_out || P.unflushed.v.len == 0)
    return;
  if (P.unflushed.bytes < (cfg.discard_source ? BATCH_DISCARD
                           : BATCH_DEFAULT) && !pull_idle ())
    return;
  t = P.batch;
  P.batch = P.unflushed;
  P.unflushed = t;
  rvec_clear (&P.unflushed);
  rvec_sort (&P.batch);
  P.batch_out = true;
  if (!tgt.can_flush) {
    batch_flushed ();
    return;
  }
  /* A file's flush blocks the loop: let the source's goodbye overlap it. */
  if (tgt.nbd == NULL)
    source_release ();
  job_start_other (job_new (JOB_FLUSH, 0, 0));
}
