/* fleece-colod secondary: receiving epochs (secondary.c's note
 * describes the role).
 *
 * After the pairing, the data connection carries epochs: EPOCH_BEGIN,
 * EXTENTs, EPOCH_END.  Each goes to the journal (journal.c), which makes
 * it durable before this side answers EPOCH_DURABLE, then applies it.
 * An epoch that breaks a rule (order, count, bytes, an extent's
 * checksum, a journal write) is refused with EPOCH_REFUSED and aborted
 * in the journal: the primary sends it again; the connection stays.  A
 * failed commit stops the daemon (exit 1): the journal is then in an
 * unknown state that only a restart's recovery may judge.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fleece.h"
#include "clock.h"
#include "colod.h"
#include "conn.h"
#include "events.h"
#include "journal.h"
#include "log.h"
#include "secondary-internal.h"
#include "state.h"

struct epoch_rx {
  uint64_t epoch, count, bytes, want_count, want_bytes;
  uint64_t disk_bytes[COLOD_MAX_DISKS], disk_count[COLOD_MAX_DISKS];
  struct colo_wire_digest digest;
  uint32_t refuse;                /* enum colo_refuse_reason, 0: fine */
  char why[COLO_WIRE_MAX_STRING + 1];
  int64_t t0;
};

static void
refuse (struct epoch_rx *e, uint32_t reason, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

static void
refuse (struct epoch_rx *e, uint32_t reason, const char *fmt, ...)
{
  va_list ap;

  if (e->refuse)
    return;
  e->refuse = reason;
  va_start (ap, fmt);
  vsnprintf (e->why, sizeof e->why, fmt, ap);
  va_end (ap);
}

/* ---- the journal writer ----
 *
 * EXTENT data goes to the journal on a thread of its own, so that
 * receiving the next extent (TLS, checksums) overlaps writing this one.
 * The receiver takes each extent's buffer from the decoder (giving it a
 * spare one), queues it, and waits for the queue to drain before it
 * ends, refuses or drops an epoch: the journal sees the same calls in
 * the same order as before.  WRITER_DEPTH bounds the memory: at most
 * that many extents (of --max-extent bytes) wait.
 */

#define WRITER_DEPTH 2

struct wjob {
  uint64_t offset, checksum;
  uint32_t length, flags;
  const void *data;
  void *mem;                      /* the buffer data lives in */
  size_t cap;
};

/* The queue between the data connection's thread and the writer
 * thread.  thread is the data connection's (writer_start, writer_stop);
 * the rest is under lock, but for what writer_start sets before the
 * writer thread runs and writer_stop frees after it is joined.  cond is
 * broadcast when a job is queued, taken or done.
 */
static struct {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  pthread_t thread;
  struct wjob q[WRITER_DEPTH];
  unsigned head, n;               /* queued jobs */
  bool busy, stop;                /* writing one; told to end */
  void *spare[WRITER_DEPTH + 1];  /* buffers for the decoder */
  size_t spare_cap[WRITER_DEPTH + 1];
  unsigned nspare;
  uint32_t refuse;                /* the first failure, 0: none */
  char why[COLO_WIRE_MAX_STRING + 1];
} w = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };

static void *
writer_thread (void *arg)
{
  (void) arg;
  pthread_mutex_lock (&w.lock);
  for (;;) {
    struct wjob job;
    int r = 0;

    while (w.n == 0 && !w.stop)
      pthread_cond_wait (&w.cond, &w.lock);
    if (w.n == 0)
      break;
    job = w.q[w.head];
    w.head = (w.head + 1) % WRITER_DEPTH;
    w.n--;
    w.busy = true;
    if (w.refuse == 0) {
      pthread_mutex_unlock (&w.lock);
      pthread_mutex_lock (&sec.jlock);
      r = journal_add_verified_extent (sec.j, job.offset, job.length,
                                       job.flags, job.data, job.checksum);
      if (r == -1)
        snprintf (w.why, sizeof w.why, "%s", journal_error (sec.j));
      pthread_mutex_unlock (&sec.jlock);
      pthread_mutex_lock (&w.lock);
      if (r == -1)
        w.refuse = COLO_REFUSE_IO;
    }
    if (job.mem) {
      w.spare[w.nspare] = job.mem;
      w.spare_cap[w.nspare++] = job.cap;
    }
    w.busy = false;
    pthread_cond_broadcast (&w.cond);
  }
  pthread_mutex_unlock (&w.lock);
  return NULL;
}

static int
writer_start (char *err, size_t errlen)
{
  int r;

  w.head = w.n = 0;
  w.busy = w.stop = false;
  w.refuse = 0;
  r = pthread_create (&w.thread, NULL, writer_thread, NULL);
  if (r) {
    snprintf (err, errlen, "pthread_create: journal writer: %s",
              strerror (r));
    return -1;
  }
  return 0;
}

/* Wait until every queued extent is in the journal (or refused). */
static void
writer_drain (void)
{
  pthread_mutex_lock (&w.lock);
  while (w.n || w.busy)
    pthread_cond_wait (&w.cond, &w.lock);
  pthread_mutex_unlock (&w.lock);
}

static void
writer_stop (void)
{
  pthread_mutex_lock (&w.lock);
  w.stop = true;
  pthread_cond_broadcast (&w.cond);
  pthread_mutex_unlock (&w.lock);
  pthread_join (w.thread, NULL);
  while (w.nspare)
    colo_wire_buffer_free (w.spare[--w.nspare]);
}

/* Queue the EXTENT the connection's decoder holds: its buffer goes with
 * it, and the decoder gets a spare one.
 */
static void
writer_queue (struct colod_conn *c, const struct colo_msg_extent *x)
{
  struct wjob job = {
    .offset = x->offset, .checksum = x->checksum,
    .length = x->length, .flags = x->flags, .data = x->data,
  };

  pthread_mutex_lock (&w.lock);
  while (w.n == WRITER_DEPTH)
    pthread_cond_wait (&w.cond, &w.lock);
  if (w.nspare) {
    job.mem = w.spare[--w.nspare];
    job.cap = w.spare_cap[w.nspare];
  }
  /* The decoder holds x: swapping cannot fail. */
  if (colo_wire_decoder_swap_buffer (c->dec, &job.mem, &job.cap) == -1)
    abort ();
  w.q[(w.head + w.n) % WRITER_DEPTH] = job;
  w.n++;
  pthread_cond_broadcast (&w.cond);
  pthread_mutex_unlock (&w.lock);
}

/* After writer_drain: move a write failure into the epoch. */
static void
writer_collect (struct epoch_rx *e)
{
  pthread_mutex_lock (&w.lock);
  if (w.refuse)
    refuse (e, w.refuse, "%s", w.why);
  w.refuse = 0;
  pthread_mutex_unlock (&w.lock);
}

/* EPOCH_END: commit or refuse, answer, apply.  -1: stop the connection. */
static int
end_epoch (struct colod_conn *c, struct epoch_rx *e,
           const struct colo_msg_epoch_end *m, bool *first_durable,
           char *err, size_t errlen)
{
  struct colo_msg a = { 0 };

  if (m->epoch != e->epoch) {
    snprintf (err, errlen, "EPOCH_END for epoch %" PRIu64 " in epoch %"
              PRIu64, m->epoch, e->epoch);
    return -1;
  }
  if (m->extent_count != e->count || e->count != e->want_count ||
      e->bytes != e->want_bytes)
    refuse (e, COLO_REFUSE_COUNT, "epoch %" PRIu64 ": %" PRIu64 " extents "
            "of %" PRIu64 " bytes received, %" PRIu64 " of %" PRIu64
            " announced", e->epoch, e->count, e->bytes, e->want_count,
            e->want_bytes);
  else if (m->digest != colo_wire_digest_final (&e->digest))
    refuse (e, COLO_REFUSE_DIGEST, "epoch %" PRIu64 ": the digest of the "
            "extent list does not match", e->epoch);
  pthread_mutex_lock (&sec.jlock);
  if (!e->refuse && journal_end (sec.j, m->extent_count, m->digest) == -1)
    refuse (e, COLO_REFUSE_IO, "%s", journal_error (sec.j));
  if (e->refuse) {
    if (sec.epoch_open)
      journal_abort (sec.j);
    sec.epoch_open = false;
    pthread_mutex_unlock (&sec.jlock);
    colod_warn ("epoch %" PRIu64 " refused: %s", e->epoch, e->why);
    a.type = COLO_MSG_EPOCH_REFUSED;
    a.epoch_refused.epoch = e->epoch;
    a.epoch_refused.reason = e->refuse;
    snprintf (a.epoch_refused.message, sizeof a.epoch_refused.message, "%s",
              e->why);
    pthread_mutex_lock (&colod.lock);
    colod.st.epochs_refused++;
    colod.st.epoch_in_flight = 0;
    pthread_mutex_unlock (&colod.lock);
    return colod_send (c, &a, err, errlen);
  }
  sec.epoch_open = false;
  secondary_publish_journal ();
  a.type = COLO_MSG_EPOCH_DURABLE;
  a.epoch_durable.epoch = e->epoch;
  if (colod_send (c, &a, err, errlen) == -1) {
    pthread_mutex_unlock (&sec.jlock);
    return -1;
  }
  if (*first_durable) {
    secondary_drop_diverged ();
    *first_durable = false;
  }
  if (journal_apply (sec.j) == -1) {
    /* The epoch is durable in the journal; the next start redoes it. */
    colod_err ("%s: stopping; a restart applies epoch %" PRIu64 " again",
               journal_error (sec.j), e->epoch);
    pthread_mutex_unlock (&sec.jlock);
    sec.failed = true;
    colod.stop = 1;
    return -1;
  }
  pthread_mutex_unlock (&sec.jlock);
  secondary_publish_journal ();
  pthread_mutex_lock (&colod.lock);
  colod.st.committed_at_ms = colod_wall_ms ();
  colod.st.last_epoch = e->epoch;
  colod.st.last_epoch_bytes = e->bytes;
  colod.st.last_epoch_extents = e->count;
  memcpy (colod.st.disk_epoch_bytes, e->disk_bytes, sizeof e->disk_bytes);
  memcpy (colod.st.disk_epoch_extents, e->disk_count, sizeof e->disk_count);
  colod.st.last_epoch_ms = monotonic_ms () - e->t0;
  colod.st.epoch_in_flight = colod.st.bytes_in_flight = 0;
  colod.st.epochs_durable++;
  pthread_mutex_unlock (&colod.lock);
  colod_event ("EPOCH_DURABLE", json_pack ("{s:I,s:I,s:I}", "epoch",
                                           (json_int_t) e->epoch, "bytes",
                                           (json_int_t) e->bytes, "extents",
                                           (json_int_t) e->count));
  return 0;
}

/* The data connection after the handshake: epochs until it ends. */
void
secondary_receive_epochs (struct colod_conn *c)
{
  struct epoch_rx e = { 0 };
  bool in_epoch = false, first_durable = true;
  char err[1024] = "";

  if (writer_start (err, sizeof err) == -1) {
    colod_warn ("data connection ended: %s", err);
    return;
  }
  for (;;) {
    const struct colo_msg *m;
    int r = colod_recv (c, &m, err, sizeof err);

    if (r != 1)
      break;
    if (m->type == COLO_MSG_EPOCH_BEGIN && !in_epoch) {
      const struct colo_msg_epoch_begin *b = &m->epoch_begin;
      memset (&e, 0, sizeof e);
      e.epoch = b->epoch;
      e.want_count = b->extent_count;
      e.want_bytes = b->total_bytes;
      e.t0 = monotonic_ms ();
      colo_wire_digest_init (&e.digest);
      pthread_mutex_lock (&sec.jlock);
      if (journal_begin (sec.j, b->epoch, b->generation_id) == -1)
        refuse (&e, COLO_REFUSE_IO, "%s", journal_error (sec.j));
      else
        sec.epoch_open = true;
      pthread_mutex_unlock (&sec.jlock);
      pthread_mutex_lock (&colod.lock);
      colod.st.epoch_in_flight = b->epoch;
      colod.st.bytes_in_flight = 0;
      colod.st.resync_remaining = b->flags & COLO_EPOCH_FULL
        ? b->total_bytes : 0;
      pthread_mutex_unlock (&colod.lock);
      in_epoch = true;
    }
    else if (m->type == COLO_MSG_EXTENT && in_epoch) {
      const struct colo_msg_extent *x = &m->extent;
      struct colo_wire_error we;
      if (colod.opt.debug_extent_delay_ms)
        colod_sleep_ms (colod.opt.debug_extent_delay_ms);
      colo_wire_digest_add (&e.digest, x);
      e.count++;
      e.bytes += x->length;
      if (COLO_EXTENT_DISK (x->flags) < COLOD_MAX_DISKS) {
        e.disk_bytes[COLO_EXTENT_DISK (x->flags)] += x->length;
        e.disk_count[COLO_EXTENT_DISK (x->flags)]++;
      }
      if (COLO_EXTENT_KIND (x->flags) == COLO_EXTENT_DATA &&
          colo_wire_extent_verify (x, &we) == -1)
        refuse (&e, COLO_REFUSE_CHECKSUM, "epoch %" PRIu64 ": %s", e.epoch,
                we.msg);
      if (!e.refuse)
        writer_queue (c, x);
      pthread_mutex_lock (&colod.lock);
      colod.st.bytes_in_flight = e.bytes;
      if (colod.st.resync_remaining >= x->length)
        colod.st.resync_remaining -= x->length;
      pthread_mutex_unlock (&colod.lock);
    }
    else if (m->type == COLO_MSG_EPOCH_END && in_epoch) {
      in_epoch = false;
      writer_drain ();
      writer_collect (&e);
      if (end_epoch (c, &e, &m->epoch_end, &first_durable, err,
                     sizeof err) == -1)
        break;
    }
    else {
      snprintf (err, sizeof err, "%s: unexpected %s %s an epoch",
                colo_conn_peer (c->conn), colo_msg_type_name (m->type),
                in_epoch ? "inside" : "outside");
      colod_send_error (c, COLO_ERROR_UNEXPECTED, err);
      break;
    }
  }
  writer_stop ();
  pthread_mutex_lock (&sec.jlock);
  if (sec.epoch_open) {
    colod_warn ("epoch %" PRIu64 " dropped: the connection ended before its "
               "end", e.epoch);
    journal_abort (sec.j);
    sec.epoch_open = false;
  }
  pthread_mutex_unlock (&sec.jlock);
  if (!colod.stop)
    colod_warn ("data connection ended: %s", err);
}

