/* fleece-backup: an NBD end (the source, or an NBD target).
 *
 * Every operation is one asynchronous libnbd command whose completion
 * callback only records the result and queues the job on the done list
 * (job_completed): no callback ever calls into libnbd, every decision
 * is made in the loop.  A command that cannot be issued because the
 * connection is gone fails its job like a failed command would (it may
 * be retried after a reconnection); any other refusal is a bug or a bad
 * argument, and fatal.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "backup.h"

static int
source_done (void *opaque, int *error)
{
  job_completed (opaque, *error, false);
  return 1;
}

static int
target_done (void *opaque, int *error)
{
  job_completed (opaque, *error, true);
  return 1;
}

/* The completion callback of a command of rw for job j. */
static nbd_completion_callback
done_cb (const struct rw *rw, struct job *j)
{
  return (nbd_completion_callback) {
    .callback = rw->is_target ? target_done : source_done,
    .user_data = j,
  };
}

/* Returns -1 on failure (the extent callback must not die: it runs
 * with the handle locked).
 */
static int
status_extent (void *opaque, const char *context, uint64_t offset,
               uint32_t *entries, size_t nr_entries, int *error)
{
  struct job *j = opaque;
  size_t i;

  if (strcmp (context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  for (i = 0; i + 1 < nr_entries; i += 2) {
    if (rvec_append (&j->ext, offset, entries[i], entries[i+1], false)
        == -1) {
      *error = ENOMEM;
      return -1;
    }
    offset += entries[i];
  }
  return 0;
}

/* After an asynchronous call: if it could not be issued because the
 * connection is gone, the job fails (and may be retried); any other
 * refusal is a bug or a bad argument, and fatal.
 */
static void
issued (struct rw *rw, int64_t cookie, struct job *j)
{
  if (cookie != -1)
    return;
  if (!nbd_lost (rw->nbd))
    die ("%s: %s", rw->what, nbd_get_error ());
  job_completed (j, ENOTCONN, rw->is_target);
}

static void
nbd_rw_pread (struct rw *rw, struct job *j, char *buf)
{
  issued (rw, nbd_aio_pread (rw->nbd, buf, j->length, j->offset,
                             done_cb (rw, j), 0), j);
}

static void
nbd_rw_pwrite (struct rw *rw, struct job *j, const char *buf)
{
  issued (rw, nbd_aio_pwrite (rw->nbd, buf, j->length, j->offset,
                              done_cb (rw, j), 0), j);
}

/* Without NBD write-zeroes, zeroes are written as data: the planner cuts
 * ZERO jobs at request_size then (pull_setup), the size of zero_buf.
 */
static void
nbd_rw_zero (struct rw *rw, struct job *j)
{
  if (rw->can_zero)
    issued (rw, nbd_aio_zero (rw->nbd, j->length, j->offset,
                              done_cb (rw, j), 0), j);
  else
    nbd_rw_pwrite (rw, j, zero_buf);
}

static void
nbd_rw_flush (struct rw *rw, struct job *j)
{
  issued (rw, nbd_aio_flush (rw->nbd, done_cb (rw, j), 0), j);
}

static void
nbd_rw_trim (struct rw *rw, struct job *j)
{
  issued (rw, nbd_aio_trim (rw->nbd, j->length, j->offset,
                            done_cb (rw, j), 0), j);
}

static void
nbd_rw_block_status (struct rw *rw, struct job *j)
{
  issued (rw, nbd_aio_block_status (rw->nbd, j->length, j->offset,
                                    (nbd_extent_callback) {
                                      .callback = status_extent,
                                      .user_data = j },
                                    done_cb (rw, j), 0), j);
}

static void
nbd_rw_reconnect (struct rw *rw)
{
  nbd_reconnect (rw, !rw->is_target);
  rw->reset = false;
}

static void
nbd_rw_close (struct rw *rw)
{
  nbd_finish (rw->nbd, rw->released);
  rw->nbd = NULL;
}

const struct rw_ops nbd_ops = {
  .name = "nbd",
  .pread = nbd_rw_pread,
  .pwrite = nbd_rw_pwrite,
  .zero = nbd_rw_zero,
  .flush = nbd_rw_flush,
  .trim = nbd_rw_trim,
  .block_status = nbd_rw_block_status,
  .reconnect = nbd_rw_reconnect,
  .close = nbd_rw_close,
};

/* Connect to rw->uri (export rw->export when not NULL); extents: ask
 * for base:allocation (the source).
 */
void
nbd_rw_open (struct rw *rw, bool extents)
{
  bool refused;
  char *msg;

  rw->ops = &nbd_ops;
  rw->nbd = nbd_open_uri (rw->uri, rw->export, rw->name, extents, &msg,
                          &refused);
  if (rw->nbd == NULL)
    die ("%s: %s", rw->what, msg);
}
