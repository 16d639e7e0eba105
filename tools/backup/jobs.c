/* fleece-backup: jobs, their lists, and starting them.
 *
 * A job is one step of the pull on a range (kinds: backup.h, main.c's
 * note): it holds its buffers from its start to its end, and a failed
 * job keeps them, and its slot, while it waits to be retried.  Starting
 * a job raises its pending count and calls the operations of the source
 * and the target (rw.h); each command ends in job_completed, which only
 * records the first error and, at the last one, queues the job on the
 * done list for the loop (loop.c) to finish.  Nothing here decides
 * anything.
 */

#include <config.h>

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "backup.h"

struct pull P;

void
jl_push (struct jlist *l, struct job *j)
{
  j->next = NULL;
  if (l->tail)
    l->tail->next = j;
  else
    l->head = j;
  l->tail = j;
  l->len++;
}

struct job *
jl_pop (struct jlist *l)
{
  struct job *j = l->head;

  if (j) {
    l->head = j->next;
    if (l->head == NULL)
      l->tail = NULL;
    l->len--;
  }
  return j;
}

/* Put all of l2 in front of l. */
void
jl_prepend (struct jlist *l, struct jlist *l2)
{
  if (l2->head == NULL)
    return;
  l2->tail->next = l->head;
  if (l->tail == NULL)
    l->tail = l2->tail;
  l->head = l2->head;
  l->len += l2->len;
  memset (l2, 0, sizeof *l2);
}

/* Append a range, merged with the last one if it continues it.  Returns
 * -1 if out of memory (the extent callback must not die: it runs with
 * the handle locked).
 */
int
rvec_append (struct rvec *r, uint64_t offset, uint64_t length,
             uint32_t flags, bool merge)
{
  struct extent *last = r->v.len ? &r->v.ptr[r->v.len - 1] : NULL;
  struct extent e = { offset, length, flags };

  if (merge && last && last->offset + last->length == offset &&
      last->flags == flags) {
    last->length += length;
    r->bytes += length;
    return 0;
  }
  if (extent_vector_append (&r->v, e) == -1)
    return -1;
  r->bytes += length;
  return 0;
}

void
rvec_add (struct rvec *r, uint64_t offset, uint64_t length, uint32_t flags,
          bool merge)
{
  if (rvec_append (r, offset, length, flags, merge) == -1)
    die ("realloc: %m");
}

void
rvec_clear (struct rvec *r)
{
  r->v.len = 0;
  r->bytes = 0;
}

struct job *
job_new (enum job_kind kind, uint64_t offset, uint64_t length)
{
  struct job *j = xcalloc (1, sizeof *j);

  j->kind = kind;
  j->offset = offset;
  j->length = length;
  return j;
}

void
job_free (struct job *j)
{
  free (j->buf);
  free (j->buf2);
  extent_vector_reset (&j->ext.v);
  free (j);
}

bool
job_has_slot (const struct job *j)
{
  return j->kind == JOB_COPY || j->kind == JOB_ZERO ||
    j->kind == JOB_VERIFY;
}

bool
job_reads_source (const struct job *j)
{
  return (j->kind == JOB_COPY && j->step == 0) || j->kind == JOB_VERIFY;
}

/* Add jobs for [offset, offset+length), split at multiples of chunk. */
void
add_jobs (struct jlist *l, enum job_kind kind, uint64_t offset,
          uint64_t length, uint64_t chunk)
{
  uint64_t n;

  for (; length > 0; offset += n, length -= n) {
    n = chunk - offset % chunk;
    if (n > length)
      n = length;
    jl_push (l, job_new (kind, offset, n));
  }
}

/* ---- Completion callbacks: record, queue, nothing else ---- */

void
job_completed (struct job *j, int err, bool target)
{
  if (err && j->err == 0) {
    j->err = err;
    j->err_target = target;
  }
  assert (j->pending > 0);
  if (--j->pending == 0)
    jl_push (&P.done, j);
}

static void
start_copy (struct job *j)
{
  if (j->step == 0) {
    if (j->buf == NULL)
      j->buf = xmalloc (j->length);
    src.ops->pread (&src, j, j->buf);
  }
  else
    tgt.ops->pwrite (&tgt, j, j->buf);
}

/* Two reads, from the source and from the target, then a comparison
 * (verify_compare) when both are done.
 */
static void
start_verify (struct job *j)
{
  if (j->buf == NULL) {
    j->buf = xmalloc (j->length);
    j->buf2 = xmalloc (j->length);
  }
  j->pending = 2;
  src.ops->pread (&src, j, j->buf);
  tgt.ops->pread (&tgt, j, j->buf2);
}

void
job_start (struct job *j)
{
  j->err = 0;
  j->pending = 1;
  switch (j->kind) {
  case JOB_COPY:
    start_copy (j);
    break;
  case JOB_VERIFY:
    start_verify (j);
    break;
  case JOB_ZERO:
    tgt.ops->zero (&tgt, j);
    break;
  case JOB_STATUS:
    rvec_clear (&j->ext);
    src.ops->block_status (&src, j);
    break;
  case JOB_FLUSH:
    tgt.ops->flush (&tgt, j);
    break;
  case JOB_TRIM:
    src.ops->trim (&src, j);
    break;
  }
}

/* Start a job that needs no slot (STATUS, FLUSH, TRIM). */
void
job_start_other (struct job *j)
{
  P.others++;
  job_start (j);
}
