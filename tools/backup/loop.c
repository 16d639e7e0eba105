/* fleece-backup: the loop, and finishing jobs.
 *
 * One thread and one poll loop drive the source and, when the target is
 * NBD, the target.  Each round: plan more, cut a batch, start what may
 * start (fill: retries whose time has come, then ready jobs while there
 * are slots and, for reads, tokens), poll, finish the jobs on the done
 * list, look at the connections.  Every decision is made here, never in
 * a completion callback.
 *
 * --on-error=retry retries a failed job 5 times, 100 ms apart doubling,
 * and replaces a dead connection with a new one to the same URI; jobs
 * that were in flight on it fail and are retried.  A mismatch found by
 * --verify is never retried.  The pull succeeds only when the bytes
 * covered meet the plan's total at the end (pull_end).
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "monotonic.h"
#include "backup.h"
#include "repo.h"

/* ---- Finishing jobs ---- */

static void
describe_failure (const struct job *j, char *msg, size_t n)
{
  static const char *const what[] = {
    [JOB_COPY] = "read", [JOB_ZERO] = "write", [JOB_VERIFY] = "read",
    [JOB_STATUS] = "block status", [JOB_FLUSH] = "flush",
    [JOB_TRIM] = "trim",
  };
  const char *lost = j->err_target ? tgt.lost : src.lost;
  const char *w = j->kind == JOB_COPY && j->step ? "write" : what[j->kind];
  int len;

  len = snprintf (msg, n, "%s of %s failed", w,
                  j->err_target ? cfg.target : cfg.source);
  if (j->kind != JOB_FLUSH)
    len += snprintf (msg + len, n - len, " at offset %" PRIu64
                     " length %" PRIu64, j->offset, j->length);
  len += snprintf (msg + len, n - len, ": %s%s%s%s", strerror (j->err),
                   lost ? " (" : "", lost ? lost : "", lost ? ")" : "");
  /* A broken Fleece snapshot fails every request with EIO: say where the
   * reason is.
   */
  if (!j->err_target && j->err == EIO && lost == NULL &&
      (size_t) len < n && strstr (cfg.source, "snapshot/"))
    snprintf (msg + len, n - len, "; if the snapshot is broken, "
              "'fleecectl snapshot list' on its server says why");
  /* ... and a deleted one with EINVAL (NBD has no ENOENT). */
  else if (!j->err_target && j->err == EINVAL && lost == NULL &&
           (size_t) len < n && strstr (cfg.source, "snapshot/"))
    snprintf (msg + len, n - len, "; the snapshot may have been deleted "
              "meanwhile: its server's log says so");
}

static void
job_failed (struct job *j)
{
  char msg[1024];

  describe_failure (j, msg, sizeof msg);
  if (j->kind == JOB_FLUSH) {
    P.others--;
    job_free (j);
    flush_failed (msg);
    return;
  }
  if (!cfg.retry || j->attempts >= MAX_RETRIES)
    die ("%s", msg);
  if (j->err == ESHUTDOWN)      /* this connection will not recover */
    *(j->err_target ? &tgt.reset : &src.reset) = true;
  j->attempts++;
  warn ("%s: retrying (%d of %d)", msg, j->attempts, MAX_RETRIES);
  j->not_before = monotonic_us () +
    (int64_t) (RETRY_DELAY_MS << (j->attempts - 1)) * 1000;
  j->next = P.retry;
  P.retry = j;
}

static void
verify_compare (const struct job *j)
{
  uint64_t i;

  if (memcmp (j->buf, j->buf2, j->length) == 0)
    return;
  for (i = 0; j->buf[i] == j->buf2[i]; i++)
    ;
  die ("verify: target differs from source at offset %" PRIu64,
       j->offset + i);
}

static void
job_finish (struct job *j)
{
  if (j->err) {
    job_failed (j);
    return;
  }
  switch (j->kind) {
  case JOB_COPY:
    if (j->step == 0) {         /* now write what was read */
      P.read += j->length;
      if (sums_on)
        sums_data (j->offset, j->length, j->buf);
      j->step = 1;
      j->attempts = 0;
      job_start (j);
      return;
    }
    P.written += j->length;
    range_done (j->offset, j->length, false);
    break;
  case JOB_ZERO:
    P.zeroed += j->length;
    range_done (j->offset, j->length, true);
    break;
  case JOB_VERIFY:
    verify_compare (j);
    P.verified += j->length;
    P.covered += j->length;
    break;
  case JOB_STATUS:
    plan_status (j);
    break;
  case JOB_FLUSH:
    break;
  case JOB_TRIM:
    P.trimmed += j->length;
    break;
  }
  if (job_has_slot (j))
    P.slots--;
  else
    P.others--;
  if (j->kind == JOB_VERIFY && --P.batch_verify == 0)
    batch_verified ();
  if (j->kind == JOB_FLUSH)
    batch_flushed ();
  job_free (j);
}

/* ---- The loop ---- */

/* Start what may start: retries whose time has come (they hold their
 * slot already), then ready jobs while there are slots and, for reads,
 * tokens.  Returns how many microseconds until the next may start, or
 * -1 if only a completion can help.
 */
static int64_t
fill (void)
{
  int64_t t = monotonic_us (), wait = -1, w;
  struct job *j, **pp;

  for (pp = &P.retry; (j = *pp) != NULL; ) {
    if (j->not_before > t) {
      w = j->not_before - t;
      wait = wait == -1 || w < wait ? w : wait;
      pp = &j->next;
      continue;
    }
    *pp = j->next;
    if (job_reads_source (j))
      rate_take (j->length, true, NULL);
    job_start (j);
  }
  while (P.slots < cfg.requests && P.ready.head) {
    j = P.ready.head;
    if (job_reads_source (j) && !rate_take (j->length, false, &w)) {
      wait = wait == -1 || w < wait ? w : wait;
      break;
    }
    jl_pop (&P.ready);
    P.slots++;
    job_start (j);
  }
  return wait;
}

void
poll_handles (int timeout)
{
  struct nbd_handle *h[2] = { src.nbd, tgt.nbd };
  char **lost[2] = { &src.lost, &tgt.lost };
  struct nbd_handle *ph[2];
  char **plost[2];
  struct pollfd fds[2];
  unsigned dir[2];
  int i, n = 0, r;

  for (i = 0; i < 2; i++) {
    if (h[i] == NULL || nbd_lost (h[i]) ||
        (fds[n].fd = nbd_aio_get_fd (h[i])) == -1)
      continue;
    dir[n] = nbd_aio_get_direction (h[i]);
    fds[n].events = (dir[n] & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
      (dir[n] & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0);
    fds[n].revents = 0;
    ph[n] = h[i];
    plost[n] = lost[i];
    n++;
  }
  if (poll (fds, n, timeout) == -1) {
    if (errno == EINTR)
      return;
    die ("poll: %m");
  }
  for (i = 0; i < n; i++) {
    r = 0;
    if ((dir[i] & LIBNBD_AIO_DIRECTION_READ) &&
        (fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
      r = nbd_aio_notify_read (ph[i]);
    else if ((dir[i] & LIBNBD_AIO_DIRECTION_WRITE) &&
             (fds[i].revents & (POLLOUT | POLLHUP | POLLERR)))
      r = nbd_aio_notify_write (ph[i]);
    if (r == -1 && *plost[i] == NULL &&
        (*plost[i] = strdup (nbd_get_error ())) == NULL)
      die ("strdup: %m");
  }
}

/* A dead connection: fail, or reconnect.  Jobs that were on it have
 * already failed and wait on the retry list.  Returns whether rw was
 * reconnected.
 */
static bool
replace_if_lost (struct rw *rw)
{
  if (!rw_lost (rw))
    return false;
  if (!cfg.retry)
    die ("connection to %s lost: %s", rw->uri,
         rw->lost ? rw->lost : "closed by the server");
  rw->ops->reconnect (rw);
  return true;
}

static void
check_connections (void)
{
  if (replace_if_lost (&src))
    source_check (true);
  if (replace_if_lost (&tgt)) {
    target_check (true);
    /* Writes completed but not flushed may be lost with the server. */
    redo_ranges (&P.unflushed);
  }
}

/* Leaving with replies in flight makes some servers (nbdkit 1.32
 * aborts in raw_send_socket) fall over; so on a fatal error or a signal
 * let what is in flight land, for a few seconds at most, then say
 * goodbye.
 */
void
disconnect_all (void)
{
  static bool once;
  int64_t deadline = monotonic_us () + 5000000;
  struct nbd_handle *h[2] = { src.nbd, tgt.nbd };
  int i;

  if (once)
    return;
  once = true;
  while (monotonic_us () < deadline) {
    for (i = 0; i < 2; i++)
      if (h[i] && !nbd_lost (h[i]) && nbd_aio_in_flight (h[i]) > 0)
        break;
    if (i == 2)
      break;
    poll_handles (100);
  }
  for (i = 0; i < 2; i++)
    if (h[i] && !nbd_lost (h[i]))
      nbd_shutdown (h[i], LIBNBD_SHUTDOWN_ABANDON_PENDING);
}

static volatile sig_atomic_t signalled;

static void
on_signal (int sig)
{
  signalled = sig;
}

void
catch_signals (void)
{
  struct sigaction sa = { .sa_handler = on_signal };
  static const int sigs[] = { SIGINT, SIGTERM, SIGHUP };
  size_t i;

  sigemptyset (&sa.sa_mask);
  for (i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
    if (sigaction (sigs[i], &sa, NULL) == -1)
      die ("sigaction: %m");
}

static bool
pull_finished (void)
{
  return pull_idle () && P.others == 0 && !P.batch_out &&
    P.unflushed.v.len == 0;
}

void
pull_run (void)
{
  int64_t wait;
  struct job *j;
  int timeout;

  while (!pull_finished ()) {
    plan_more ();
    batch_maybe_start ();
    wait = fill ();
    if (pull_finished ())       /* the last batch may end synchronously */
      break;
    if (P.done.head == NULL) {
      timeout = progress_bar () ? PROGRESS_MS : 1000;
      if (wait >= 0 && wait / 1000 + 1 < timeout)
        timeout = wait / 1000 + 1;
      poll_handles (timeout);
    }
    while ((j = jl_pop (&P.done)) != NULL)
      job_finish (j);
    if (signalled)
      die ("interrupted by SIG%s: the pull is incomplete",
           signalled == SIGINT ? "INT" : signalled == SIGTERM ? "TERM"
           : "HUP");
    check_connections ();
    progress_show ();
  }
}

void
pull_setup (void)
{
  uint64_t rs = cfg.request_size;

  P.copy_chunk = rs;
  if (cfg.sync == SYNC_INCREMENTAL && rs >= bm.granularity)
    P.copy_chunk = rs - rs % bm.granularity;    /* runs stay aligned */
  P.zero_chunk = tgt.can_zero ? ZERO_MAX : rs;
  zero_buf = xcalloc (1, rs);
  P.total = cfg.sync == SYNC_INCREMENTAL ? bm.dirty_bytes : src.size;
  if (cfg.verify)
    P.total *= 2;
  rate_start ();
}

void
pull_end (void)
{
  progress_clear ();
  /* Never a silently short copy. */
  if (P.covered != P.total)
    die ("internal error: %" PRIu64 " of %" PRIu64 " bytes done",
         P.covered, P.total);
  src.ops->close (&src);
  bitmap_close ();
  tgt.ops->close (&tgt);
  free (src.lost);
  free (tgt.lost);
  extent_vector_reset (&P.unflushed.v);
  extent_vector_reset (&P.batch.v);
  free (zero_buf);
  free (bm.bits);
}

