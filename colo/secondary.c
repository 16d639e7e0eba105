/* fleece-colod secondary: keeps a copy of the primary's disk at exactly
 * a committed epoch, and takes over when the primary dies.
 *
 * The journal (journal.c) does the durable part: every epoch is
 * journaled, verified and committed before it is acknowledged, then
 * applied.  This file pairs with the primary, judges generation
 * histories, receives epochs, answers heartbeats and runs the failover
 * states of QEMU colo.c: NONE (a primary is sending heartbeats) -> REQUIRE
 * (none for --hb-timeout) -> ACTIVE (promotion running) -> COMPLETED
 * (a new generation; the disk is ours to serve).
 *
 * The pairing rules (docs/replication.md "Pairing"), from the primary's
 * HELLO and our own state:
 *   - never paired: adopt the primary's identity; a full copy;
 *   - same generation: go on from our last committed epoch;
 *   - our generation is an older one of the primary's history (we are
 *     an old primary coming back, or a secondary that slept through a
 *     promotion): adopt its history; the primary sends what it changed
 *     since its promotion plus the clusters we wrote as a primary that
 *     never reached it (STATE_DIR/diverged, made by `demote'), or a full
 *     copy when neither covers the gap;
 *   - the primary's generation is older than ours, both sides have a
 *     generation of their own, or nothing in common: split brain or
 *     unrelated histories, refused unless --discard-diverged says this
 *     side's data may go (then a full copy).
 *
 * Threads: the main thread accepts connections; a monitor thread
 * watches heartbeats and promotes; each connection has a thread.  The
 * journal is used under jlock; a new data connection replaces the old
 * one, which is shut down and waited for first.
 *
 * Until a peer has finished the TLS handshake and sent a primary's
 * HELLO it is "pending", and nothing it does matters to anyone else: it
 * is handled on its own thread, so the accept loop never waits on it;
 * it must be done within --handshake-timeout of its accept; at most
 * COLOD_MAX_PENDING peers are pending, and a connection beyond them is
 * closed at once; and the failover judgment (watch) counts only what an
 * authenticated primary does: an accepted data HELLO and heartbeats.
 * So idle or garbage connections can neither delay the real primary's
 * pairing (into a false failover) nor stand in for its heartbeats.
 *
 * Size.  Over 1000 lines: the pairing, the epochs, the journal writer,
 * the connection threads and the promotion all work on the one state
 * struct s below, under colod.lock and jlock; splitting it would make s
 * a shared header of the secondary's.  The seams, if it grows: the
 * journal writer ("the journal writer") and the promotion ("promotion",
 * watch) are the parts that use s least.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fleece.h"
#include "clock.h"
#include "colod.h"
#include "conn.h"
#include "ctl.h"
#include "events.h"
#include "journal.h"
#include "log.h"
#include "pairing.h"
#include "secondary.h"
#include "state.h"

static struct {
  pthread_mutex_t jlock;
  struct journal *j;              /* NULL until the first pairing */
  bool epoch_open;
  int64_t started_ms;
  /* Under colod.lock: the connection threads. */
  struct colod_conn *data, *hb;
  bool data_busy, hb_busy;
  bool promoted;
  bool primary_stopped;           /* it said so: no failover */
  bool failed;                    /* stopped by an I/O error: exit 1 */
  int64_t paired_ms;              /* a primary's data HELLO accepted */
  struct colo_conn *pending[COLOD_MAX_PENDING]; /* before their HELLO */
  unsigned npending;
  unsigned nthreads;              /* connection threads alive */
  int64_t require_since;
  int lock_fd;                    /* holds the disk's locks, or -1 */
} s = { .jlock = PTHREAD_MUTEX_INITIALIZER, .lock_fd = -1 };

/* ---- STATE_DIR/diverged (state.c) ---- */

/* 1 with the file's contents (*bits malloc'ed), 0 none, -1 bad. */
static int
read_diverged (uint64_t *base, uint64_t *disk_size, uint32_t *cs,
               uint8_t **bits, uint64_t *nbits)
{
  char err[PATH_MAX + 128];
  int r = colo_state_read_diverged (colod.opt.state_dir, base, disk_size,
                                    cs, bits, nbits, err, sizeof err);

  if (r == -1)
    colod_log ("%s: ignored; the resync will be a full copy", err);
  return r;
}

static void
drop_diverged (void)
{
  char path[PATH_MAX];

  colo_state_path (colod.opt.state_dir, "diverged", path, sizeof path);
  if (colo_state_remove_diverged (colod.opt.state_dir))
    colod_log ("the diverged clusters are replaced: %s removed", path);
}

/* ---- status ---- */

static void
publish_journal (void)
{
  const struct journal_state *js;

  if (s.j == NULL)
    return;
  js = journal_get_state (s.j);
  pthread_mutex_lock (&colod.lock);
  memcpy (colod.st.volume_id, js->volume_id, 16);
  memcpy (colod.st.generation_id, js->generation_id, 16);
  colod.st.history_len = colod_history_from_journal (js, colod.st.history);
  colod.st.last_committed = js->committed_epoch;
  colod.st.last_applied = js->applied_epoch;
  pthread_mutex_unlock (&colod.lock);
}

/* ---- the disk's locks (nbdkit-fleece-plugin(1), LOCKING) ----
 *
 * While this side is a secondary, it alone may write the disk: it holds
 * the QEMU-compatible locks that the plugin takes, on a descriptor of
 * its own, so that nbdkit with the plugin, a VM or qemu-nbd cannot open
 * the disk for writing meanwhile, and a disk one of them has open is
 * refused.  Promotion hands the disk over: the locks go before
 * --on-promote starts a server on it, and a promoted side restarted
 * takes none.  On a file system without OFD locks it goes on unlocked
 * (the plugin's locking=auto).
 */
static int
lock_disk (char *err, size_t errlen)
{
  bool locked;
  int fd;

  if (s.lock_fd >= 0)
    return 0;
  fd = open (colod.opt.disk, O_RDWR | O_CLOEXEC);
  if (fd == -1) {
    snprintf (err, errlen, "open: %s: %s", colod.opt.disk, strerror (errno));
    return -1;
  }
  if (fleece_lock_image (fd, "disk", colod.opt.disk, FLEECE_LOCKING_AUTO,
                         &locked) == -1) {
    snprintf (err, errlen, "%s", fleece_last_error ());
    close (fd);
    return -1;
  }
  if (!locked)
    colod_log ("disk %s: not locked: its file system has no OFD locks",
               colod.opt.disk);
  s.lock_fd = fd;
  return 0;
}

static void
unlock_disk (void)
{
  if (s.lock_fd >= 0)
    close (s.lock_fd);
  s.lock_fd = -1;
}

static int
open_journal (uint64_t size, uint32_t cs, bool lock, char *err,
              size_t errlen)
{
  if (lock && lock_disk (err, errlen) == -1)
    return -1;
  s.j = journal_open (colod.opt.state_dir, colod.opt.disk, size, cs, err,
                      errlen);
  if (s.j == NULL)
    return -1;
  colod_log ("journal: %s", journal_recovery_note (s.j));
  publish_journal ();
  return 0;
}

/* ---- STATE_DIR/promoted: this side took over (its generation) ---- */

static bool
read_promoted (void)
{
  return colo_state_promoted_in (colod.opt.state_dir,
                                 journal_get_state (s.j)->generation_id);
}

static int
write_promoted (const uint8_t gen[16])
{
  char err[PATH_MAX + 128];

  if (colo_state_write_promoted (colod.opt.state_dir, gen, err,
                                 sizeof err) == -1) {
    colod_log ("%s", err);
    return -1;
  }
  return 0;
}

/* ---- the pairing ---- */

static const uint8_t no_volume[16];     /* a journal never paired */

static int
adopt (const struct colo_msg_hello *ph, uint64_t epoch, char *err,
       size_t errlen)
{
  struct journal_generation h[COLO_WIRE_MAX_HISTORY];
  uint32_t i;

  for (i = 0; i < ph->history_count; i++) {
    memcpy (h[i].id, ph->history[i].id, 16);
    h[i].first_epoch = ph->history[i].start_epoch;
  }
  if (journal_set_identity (s.j, ph->volume_id, h, ph->history_count,
                            epoch) == -1) {
    snprintf (err, errlen, "%s", journal_error (s.j));
    return -1;
  }
  publish_journal ();
  return 0;
}

struct verdict {
  uint32_t status;
  char reason[COLO_WIRE_MAX_STRING + 1];
  uint64_t base;                  /* DIVERGED base_epoch */
  uint8_t *bits;                  /* DIVERGED bits, or NULL */
  uint64_t nbits;
};

/* A journal for this primary's disk: opened from our state, or made for
 * its geometry the first time.  -1: refused (v filled) or failed.
 */
static int
ensure_journal (const struct colo_msg_hello *ph, struct verdict *v,
                char *err, size_t errlen)
{
  const struct journal_state *js;

  if (s.j == NULL && open_journal (ph->disk_size, ph->cluster_size, true,
                                   err, errlen) == -1)
    return -1;
  js = journal_get_state (s.j);
  if (js->disk_size != ph->disk_size || js->cluster_size != ph->cluster_size) {
    v->status = COLO_HELLO_WRONG_VOLUME;
    snprintf (v->reason, sizeof v->reason, "the primary's disk is %" PRIu64
              " bytes in clusters of %" PRIu32 ", this secondary's %" PRIu64
              " in clusters of %" PRIu32, ph->disk_size, ph->cluster_size,
              js->disk_size, js->cluster_size);
    return -1;
  }
  /* The apply of a committed epoch left pending by a failure. */
  if (js->applied_epoch < js->committed_epoch && journal_apply (s.j) == -1) {
    snprintf (err, errlen, "%s", journal_error (s.j));
    return -1;
  }
  return 0;
}

/* Judge a primary's data HELLO (under jlock): v->status and, when
 * accepted, what the primary must send.  -1 on a local failure.
 */
static int
judge (const struct colo_msg_hello *ph, struct verdict *v, char *err,
       size_t errlen)
{
  const struct journal_state *js;
  struct colo_generation ours[COLO_WIRE_MAX_HISTORY];
  enum colod_relation rel;
  uint64_t fork, dbase = 0, dsize = 0, dbits = 0;
  uint32_t dcs = 0;
  uint8_t *bits = NULL;
  int have_div;

  memset (v, 0, sizeof *v);
  if (ensure_journal (ph, v, err, errlen) == -1)
    return v->status ? 0 : -1;
  js = journal_get_state (s.j);
  if (memcmp (js->volume_id, no_volume, 16) == 0)
    return adopt (ph, 0, err, errlen);
  if (memcmp (js->volume_id, ph->volume_id, 16) != 0) {
    if (colod.opt.discard_diverged) {
      colod_log ("another volume; --discard-diverged: this disk will be "
                 "replaced by a full copy");
      return adopt (ph, 0, err, errlen);
    }
    v->status = COLO_HELLO_WRONG_VOLUME;
    snprintf (v->reason, sizeof v->reason, "this secondary holds another "
              "volume (see fleece-colod status); --discard-diverged "
              "replaces it");
    return 0;
  }
  colod_history_from_journal (js, ours);
  rel = colod_relate (ours, js->history_len, ph->history, ph->history_count,
                      &fork);
  have_div = read_diverged (&dbase, &dsize, &dcs, &bits, &dbits);
  if (have_div == 1 && (dsize != js->disk_size || dcs != js->cluster_size)) {
    free (bits);
    bits = NULL;
    have_div = -1;
  }
  switch (rel) {
  case REL_SAME:
    v->base = have_div == -1 ? 0 : js->committed_epoch;
    break;
  case REL_BEHIND:
    if (have_div == 1 && dbase <= fork - 1 && js->committed_epoch <= fork - 1)
      v->base = fork - 1;
    else if (have_div == 0 && js->committed_epoch == fork - 1)
      v->base = fork - 1;
    else
      v->base = 0;
    colod_log ("the primary is in a later generation (from epoch %" PRIu64
               "); resync from epoch %" PRIu64 "%s", fork, v->base,
               v->base == 0 ? " (a full copy)" : have_div == 1
               ? " plus the clusters this side wrote as a primary" : "");
    if (adopt (ph, v->base, err, errlen) == -1)
      goto fail;
    break;
  case REL_AHEAD:
  case REL_DIVERGED:
  case REL_UNRELATED:
    if (colod.opt.discard_diverged) {
      colod_log ("%s histories; --discard-diverged: this side's data goes, "
                 "a full copy follows", colod_relation_name (rel));
      free (bits);
      return adopt (ph, 0, err, errlen);
    }
    v->status = rel == REL_UNRELATED ? COLO_HELLO_UNRELATED
      : COLO_HELLO_SPLIT_BRAIN;
    if (rel == REL_AHEAD)
      snprintf (v->reason, sizeof v->reason, "split brain: this side was "
                "promoted to a new generation at epoch %" PRIu64 " and is "
                "written to, while the connecting primary stayed in the old "
                "one and kept writing; restart the side whose writes are to "
                "be lost as a secondary with --discard-diverged", fork);
    else if (rel == REL_DIVERGED)
      snprintf (v->reason, sizeof v->reason, "split brain: both sides "
                "started generations of their own after a common one; "
                "restart the side whose writes are to be lost as a "
                "secondary with --discard-diverged");
    else
      snprintf (v->reason, sizeof v->reason, "unrelated generation "
                "histories: nothing in common; --discard-diverged replaces "
                "this side with a full copy");
    free (bits);
    return 0;
  }
  if (v->base != 0 && have_div == 1) {
    v->bits = bits;
    v->nbits = dbits;
  }
  else
    free (bits);
  return 0;
 fail:
  free (bits);
  return -1;
}

static void
fill_hello (struct colo_msg *m, uint32_t channel)
{
  const struct journal_state *js = s.j ? journal_get_state (s.j) : NULL;
  struct colo_msg_hello *h = colod_hello_init (m, COLO_ROLE_SECONDARY,
                                               channel);

  if (js == NULL)
    return;
  memcpy (h->volume_id, js->volume_id, 16);
  if (js->history_len)
    memcpy (h->generation_id, js->generation_id, 16);
  h->last_committed = js->committed_epoch;
  h->last_applied = js->applied_epoch;
  h->disk_size = js->disk_size;
  h->cluster_size = js->cluster_size;
  h->history_count = colod_history_from_journal (js, h->history);
}

/* ---- epochs ---- */

struct epoch_rx {
  uint64_t epoch, count, bytes, want_count, want_bytes;
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
      pthread_mutex_lock (&s.jlock);
      r = journal_add_verified_extent (s.j, job.offset, job.length,
                                       job.flags, job.data, job.checksum);
      if (r == -1)
        snprintf (w.why, sizeof w.why, "%s", journal_error (s.j));
      pthread_mutex_unlock (&s.jlock);
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
  pthread_mutex_lock (&s.jlock);
  if (!e->refuse && journal_end (s.j, m->extent_count, m->digest) == -1)
    refuse (e, COLO_REFUSE_IO, "%s", journal_error (s.j));
  if (e->refuse) {
    if (s.epoch_open)
      journal_abort (s.j);
    s.epoch_open = false;
    pthread_mutex_unlock (&s.jlock);
    colod_log ("epoch %" PRIu64 " refused: %s", e->epoch, e->why);
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
  s.epoch_open = false;
  publish_journal ();
  a.type = COLO_MSG_EPOCH_DURABLE;
  a.epoch_durable.epoch = e->epoch;
  if (colod_send (c, &a, err, errlen) == -1) {
    pthread_mutex_unlock (&s.jlock);
    return -1;
  }
  if (*first_durable) {
    drop_diverged ();
    *first_durable = false;
  }
  if (journal_apply (s.j) == -1) {
    /* The epoch is durable in the journal; the next start redoes it. */
    colod_log ("%s: stopping; a restart applies epoch %" PRIu64 " again",
               journal_error (s.j), e->epoch);
    pthread_mutex_unlock (&s.jlock);
    s.failed = true;
    colod.stop = 1;
    return -1;
  }
  pthread_mutex_unlock (&s.jlock);
  publish_journal ();
  pthread_mutex_lock (&colod.lock);
  colod.st.committed_at_ms = colod_wall_ms ();
  colod.st.last_epoch = e->epoch;
  colod.st.last_epoch_bytes = e->bytes;
  colod.st.last_epoch_extents = e->count;
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
static void
receive_epochs (struct colod_conn *c)
{
  struct epoch_rx e = { 0 };
  bool in_epoch = false, first_durable = true;
  char err[1024] = "";

  if (writer_start (err, sizeof err) == -1) {
    colod_log ("data connection ended: %s", err);
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
      pthread_mutex_lock (&s.jlock);
      if (journal_begin (s.j, b->epoch, b->generation_id) == -1)
        refuse (&e, COLO_REFUSE_IO, "%s", journal_error (s.j));
      else
        s.epoch_open = true;
      pthread_mutex_unlock (&s.jlock);
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
      if (x->flags == COLO_EXTENT_DATA &&
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
  pthread_mutex_lock (&s.jlock);
  if (s.epoch_open) {
    colod_log ("epoch %" PRIu64 " dropped: the connection ended before its "
               "end", e.epoch);
    journal_abort (s.j);
    s.epoch_open = false;
  }
  pthread_mutex_unlock (&s.jlock);
  if (!colod.stop)
    colod_log ("data connection ended: %s", err);
}

/* ---- connection threads ---- */

static void
heartbeats (struct colod_conn *c)
{
  char err[1024];

  colo_conn_set_timeout (c->conn, colod.opt.hb_timeout_ms);
  for (;;) {
    const struct colo_msg *m;
    struct colo_msg a = { .type = COLO_MSG_HEARTBEAT_REPLY };

    if (colod_recv (c, &m, err, sizeof err) != 1) {
      const struct colo_msg *last = colo_wire_decoder_msg (c->dec);
      if (last && last->type == COLO_MSG_ERROR &&
          last->error.code == COLO_ERROR_SHUTDOWN) {
        colod_log ("the primary stopped cleanly: no failover for that");
        pthread_mutex_lock (&colod.lock);
        s.primary_stopped = true;
        pthread_mutex_unlock (&colod.lock);
      }
      break;
    }
    if (m->type != COLO_MSG_HEARTBEAT) {
      snprintf (err, sizeof err, "unexpected %s on the heartbeat "
                "connection", colo_msg_type_name (m->type));
      colod_send_error (c, COLO_ERROR_UNEXPECTED, err);
      break;
    }
    a.heartbeat_reply.echo_ms = m->heartbeat.monotonic_ms;
    a.heartbeat_reply.monotonic_ms = monotonic_ms ();
    pthread_mutex_lock (&colod.lock);
    a.heartbeat_reply.last_committed = colod.st.last_committed;
    a.heartbeat_reply.last_applied = colod.st.last_applied;
    colod.st.last_heartbeat_ms = monotonic_ms ();
    s.primary_stopped = false;
    pthread_mutex_unlock (&colod.lock);
    if (colod_send (c, &a, err, sizeof err) == -1)
      break;
  }
  if (!colod.stop)
    colod_debug ("heartbeat connection ended: %s", err);
}

/* Replace the current connection of a channel with c: shut the old one
 * down and wait for its thread to go.
 */
static void
take_channel (uint32_t channel, struct colod_conn *c)
{
  struct colod_conn **slot = channel == COLO_CHANNEL_DATA ? &s.data : &s.hb;
  bool *busy = channel == COLO_CHANNEL_DATA ? &s.data_busy : &s.hb_busy;

  pthread_mutex_lock (&colod.lock);
  if (*slot)
    colod_conn_abort (*slot);
  while (*busy)
    colod_wait_ms (10);
  *slot = c;
  *busy = true;
  pthread_mutex_unlock (&colod.lock);
}

static void
leave_channel (uint32_t channel)
{
  pthread_mutex_lock (&colod.lock);
  if (channel == COLO_CHANNEL_DATA) {
    s.data = NULL;
    s.data_busy = false;
    colod.st.connection = "listening";
  }
  else {
    s.hb = NULL;
    s.hb_busy = false;
  }
  pthread_cond_broadcast (&colod.cond);
  pthread_mutex_unlock (&colod.lock);
}

/* Shut both connections down and wait for their threads to go. */
static void
drop_channels (void)
{
  pthread_mutex_lock (&colod.lock);
  if (s.data)
    colod_conn_abort (s.data);
  if (s.hb)
    colod_conn_abort (s.hb);
  while (s.data_busy || s.hb_busy)
    colod_wait_ms (1000);
  pthread_mutex_unlock (&colod.lock);
}

static int
send_reply (struct colod_conn *c, uint32_t status, const char *reason,
            char *err, size_t errlen)
{
  struct colo_msg m = { .type = COLO_MSG_HELLO_REPLY };

  m.hello_reply.status = status;
  snprintf (m.hello_reply.reason, sizeof m.hello_reply.reason, "%s",
            reason);
  return colod_send (c, &m, err, errlen);
}

/* A data HELLO: judge, answer, then take epochs. */
static void
data_channel (struct colod_conn *c, const struct colo_msg_hello *ph)
{
  struct verdict v;
  struct colo_msg m;
  char err[1024] = "";
  int r;

  take_channel (COLO_CHANNEL_DATA, c);
  pthread_mutex_lock (&s.jlock);
  if (s.promoted && !colod.opt.discard_diverged) {
    uint64_t fork = 0;
    memset (&v, 0, sizeof v);
    v.status = COLO_HELLO_SPLIT_BRAIN;
    pthread_mutex_lock (&colod.lock);
    colod_relate (colod.st.history, colod.st.history_len, ph->history,
                  ph->history_count, &fork);
    pthread_mutex_unlock (&colod.lock);
    snprintf (v.reason, sizeof v.reason, "split brain: this side was "
              "promoted (its own generation from epoch %" PRIu64 ") and is "
              "the primary now; restart the side whose writes are to be "
              "lost as a secondary with --discard-diverged", fork);
    r = 0;
  }
  else {
    r = judge (ph, &v, err, sizeof err);
    if (r == 0 && v.status == COLO_HELLO_ACCEPT && s.promoted) {
      /* --discard-diverged on a promoted side: a secondary again, once
       * no server has the disk any more.
       */
      r = lock_disk (err, sizeof err);
      if (r == 0) {
        colo_state_clear_promoted (colod.opt.state_dir);
        s.promoted = false;
        colod_set_failover (FAILOVER_NONE, "--discard-diverged: a "
                            "secondary again");
      }
    }
  }
  fill_hello (&m, COLO_CHANNEL_DATA);
  pthread_mutex_unlock (&s.jlock);
  if (r == -1) {
    colod_log ("pairing with %s: %s", colo_conn_peer (c->conn), err);
    colod_send_error (c, COLO_ERROR_INTERNAL, err);
    goto out;
  }
  if (colod_send (c, &m, err, sizeof err) == -1 ||
      send_reply (c, v.status, v.reason, err, sizeof err) == -1)
    goto out;
  if (v.status != COLO_HELLO_ACCEPT) {
    colod_log ("refused the primary %s: %s", colo_conn_peer (c->conn),
               v.reason);
    pthread_mutex_lock (&colod.lock);
    snprintf (colod.st.refusal, sizeof colod.st.refusal, "%s", v.reason);
    pthread_mutex_unlock (&colod.lock);
    if (v.status == COLO_HELLO_SPLIT_BRAIN)
      colod_event ("SPLIT_BRAIN", json_pack ("{s:s,s:s}", "peer",
                                             colo_conn_peer (c->conn),
                                             "reason", v.reason));
    goto out;
  }
  memset (&m, 0, sizeof m);
  m.type = COLO_MSG_DIVERGED;
  m.diverged.base_epoch = v.base;
  m.diverged.disk_size = ph->disk_size;
  m.diverged.cluster_size = ph->cluster_size;
  m.diverged.bit_count = v.nbits;
  m.diverged.bits = v.bits;
  if (colod_send (c, &m, err, sizeof err) == -1)
    goto out;
  colo_conn_set_timeout (c->conn, -1);
  pthread_mutex_lock (&colod.lock);
  colod.st.connection = "connected";
  s.paired_ms = monotonic_ms ();   /* the primary is back: alive */
  colod.st.refusal[0] = '\0';
  snprintf (colod.st.peer, sizeof colod.st.peer, "%s",
            colo_conn_peer (c->conn));
  snprintf (colod.st.peer_identity, sizeof colod.st.peer_identity, "%s",
            colo_conn_identity (c->conn));
  pthread_mutex_unlock (&colod.lock);
  colod_event ("PEER_CONNECTED",
               json_pack ("{s:s,s:s,s:I,s:b}", "peer",
                          colo_conn_peer (c->conn), "identity",
                          colo_conn_identity (c->conn), "base-epoch",
                          (json_int_t) v.base, "diverged", v.nbits != 0));
  receive_epochs (c);
 out:
  free (v.bits);
  if (err[0] && !colod.stop)
    colod_debug ("%s", err);
  leave_channel (COLO_CHANNEL_DATA);
  colod_conn_close (c);
}

static void
hb_channel (struct colod_conn *c, const struct colo_msg_hello *ph)
{
  struct colo_msg m;
  char err[1024];
  uint32_t status = COLO_HELLO_ACCEPT;
  const char *reason = "";

  take_channel (COLO_CHANNEL_HEARTBEAT, c);
  pthread_mutex_lock (&s.jlock);
  if (s.promoted && !colod.opt.discard_diverged) {
    status = COLO_HELLO_SPLIT_BRAIN;
    reason = "split brain: this side was promoted and is the primary now";
  }
  else if (s.j == NULL ||
           memcmp (journal_get_state (s.j)->volume_id, ph->volume_id, 16) ||
           memcmp (journal_get_state (s.j)->generation_id,
                   ph->generation_id, 16)) {
    status = COLO_HELLO_REFUSE;
    reason = "open the data connection first: the heartbeat connection "
      "must name the volume and generation it paired";
  }
  fill_hello (&m, COLO_CHANNEL_HEARTBEAT);
  pthread_mutex_unlock (&s.jlock);
  if (colod_send (c, &m, err, sizeof err) == 0 &&
      send_reply (c, status, reason, err, sizeof err) == 0 &&
      status == COLO_HELLO_ACCEPT)
    heartbeats (c);
  leave_channel (COLO_CHANNEL_HEARTBEAT);
  colod_conn_close (c);
}

/* ---- connections before their HELLO ---- */

/* Under colod.lock: a pending connection is done being pending. */
static void
pending_remove (struct colo_conn *conn)
{
  unsigned i;

  for (i = 0; i < s.npending; i++)
    if (s.pending[i] == conn) {
      s.pending[i] = s.pending[--s.npending];
      return;
    }
}

static void
conn_thread_end (struct colo_conn *pending)
{
  pthread_mutex_lock (&colod.lock);
  if (pending)
    pending_remove (pending);
  s.nthreads--;
  pthread_cond_broadcast (&colod.cond);
  pthread_mutex_unlock (&colod.lock);
}

/* The primary's HELLO, within what is left of --handshake-timeout:
 * a copy of it (the decoder's message goes with the next recv), or NULL.
 */
static struct colo_msg_hello *
recv_hello (struct colod_conn *c, int64_t accepted_ms)
{
  int left = colod.opt.tls.handshake_timeout_ms -
    (int) (monotonic_ms () - accepted_ms);
  const struct colo_msg *m;
  struct colo_msg_hello *ph;
  char err[1024];

  colo_conn_set_deadline (c->conn, left > 0 ? left : 1);
  if (colod_recv (c, &m, err, sizeof err) != 1) {
    colod_log ("connection from %s closed before its HELLO: %s",
               colo_conn_peer (c->conn), err);
    return NULL;
  }
  colo_conn_set_deadline (c->conn, -1);
  if (m->type != COLO_MSG_HELLO || m->hello.role != COLO_ROLE_PRIMARY) {
    snprintf (err, sizeof err, "%s: expected a primary's HELLO, got %s",
              colo_conn_peer (c->conn), m->type == COLO_MSG_HELLO
              ? "a secondary's HELLO" : colo_msg_type_name (m->type));
    colod_log ("%s", err);
    colod_send_error (c, COLO_ERROR_UNEXPECTED, err);
    return NULL;
  }
  ph = malloc (sizeof *ph);
  if (ph == NULL) {
    colod_log ("malloc: HELLO of %s: %s", colo_conn_peer (c->conn),
               strerror (errno));
    return NULL;
  }
  *ph = m->hello;
  return ph;
}

/* A new connection's thread: the handshake, then its HELLO says which
 * channel it is.
 */
static void *
conn_thread (void *arg)
{
  struct colo_conn *conn = arg;
  int64_t accepted_ms = monotonic_ms ();
  struct colod_conn *c;
  struct colo_msg_hello *ph;

  if (colo_accept_handshake (conn) == -1) {
    colod_log ("%s", colo_tls_last_error ());
    conn_thread_end (conn);     /* before the socket goes */
    colo_discard (conn);
    return NULL;
  }
  pthread_mutex_lock (&colod.lock);
  c = colod_conn_wrap (conn);   /* which closes conn if it fails */
  if (c == NULL)
    pending_remove (conn);
  pthread_mutex_unlock (&colod.lock);
  if (c == NULL) {
    conn_thread_end (NULL);
    return NULL;
  }
  colo_conn_set_timeout (c->conn, 30000);
  ph = recv_hello (c, accepted_ms);
  pthread_mutex_lock (&colod.lock);
  pending_remove (conn);
  pthread_mutex_unlock (&colod.lock);
  if (ph != NULL && ph->channel == COLO_CHANNEL_DATA)
    data_channel (c, ph);
  else if (ph != NULL)
    hb_channel (c, ph);
  else
    colod_conn_close (c);
  free (ph);
  conn_thread_end (NULL);
  return NULL;
}

/* Take the peers waiting on the listener, each to a thread of its own;
 * beyond COLOD_MAX_PENDING connections before their HELLO, close them.
 */
static void
accept_peers (struct colo_listener *l)
{
  for (;;) {
    struct colo_conn *conn = colo_accept_socket (l);
    pthread_attr_t attr;
    pthread_t t;
    int r;

    if (conn == NULL) {
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        colod_log ("%s", colo_tls_last_error ());
        colod_sleep_ms (100);   /* e.g. EMFILE: the peer still waits */
      }
      return;
    }
    pthread_mutex_lock (&colod.lock);
    if (s.npending == COLOD_MAX_PENDING) {
      pthread_mutex_unlock (&colod.lock);
      colod_log ("connection from %s closed at once: %d connections are "
                 "already in their TLS handshake or HELLO, the most allowed",
                 colo_conn_peer (conn), COLOD_MAX_PENDING);
      colo_discard (conn);
      continue;
    }
    s.pending[s.npending++] = conn;
    s.nthreads++;
    pthread_mutex_unlock (&colod.lock);
    pthread_attr_init (&attr);
    pthread_attr_setdetachstate (&attr, PTHREAD_CREATE_DETACHED);
    r = pthread_create (&t, &attr, conn_thread, conn);
    pthread_attr_destroy (&attr);
    if (r != 0) {
      colod_log ("pthread_create: connection from %s: %s",
                 colo_conn_peer (conn), strerror (r));
      conn_thread_end (conn);
      colo_discard (conn);
    }
  }
}

/* Stopping: end every connection thread, pending or not, and wait for
 * them (a pending one within the handshake timeout at worst).
 */
static void
end_conn_threads (void)
{
  unsigned i;

  pthread_mutex_lock (&colod.lock);
  while (s.nthreads > 0) {
    for (i = 0; i < s.npending; i++)
      shutdown (colo_conn_fd (s.pending[i]), SHUT_RDWR);
    if (s.data)
      colod_conn_abort (s.data);
    if (s.hb)
      colod_conn_abort (s.hb);
    colod_wait_ms (100);
  }
  pthread_mutex_unlock (&colod.lock);
}

/* A demoted primary's state directory, started as a secondary: the
 * journal takes the identity it had as a primary, at the epoch the old
 * secondary last acknowledged; STATE_DIR/diverged says what it wrote
 * since.  This replaces whatever secondary state the directory held
 * from an earlier role (and its promoted marker); primary.json goes, so
 * that it is done once.  1 adopted, 0 nothing to do, -1 error.
 */
static int
adopt_demoted (void)
{
  struct colo_msg_hello h = { 0 };
  struct colo_primary_state ps;
  uint64_t base, size, nbits;
  uint32_t cs;
  uint8_t *bits;
  char err[1024], path[PATH_MAX];
  int r = colo_state_load_primary (colod.opt.state_dir, &ps, err,
                                   sizeof err);

  if (r == -1)
    colod_log ("%s", err);
  if (r <= 0 || !ps.demoted)
    return r;                   /* nothing, or a primary.json error */
  memcpy (h.volume_id, ps.volume_id, 16);
  memcpy (h.history, ps.history, ps.history_len * sizeof *h.history);
  h.history_count = ps.history_len;
  base = ps.acked;
  if (read_diverged (&base, &size, &cs, &bits, &nbits) != 1) {
    colod_log ("%s: demoted, but its diverged clusters are missing or "
               "damaged: pair with --discard-diverged for a full copy",
               colod.opt.state_dir);
    return colod.opt.discard_diverged ? 0 : -1;
  }
  free (bits);
  if ((s.j == NULL && open_journal (size, cs, true, err, sizeof err) == -1)
      || lock_disk (err, sizeof err) == -1) {
    colod_log ("%s", err);
    return -1;
  }
  if (adopt (&h, base, err, sizeof err) == -1) {
    colod_log ("%s", err);
    return -1;
  }
  colo_state_clear_promoted (colod.opt.state_dir);
  colo_state_path (colod.opt.state_dir, "primary.json", path, sizeof path);
  if (unlink (path) == -1) {
    colod_log ("unlink: %s: %s", path, strerror (errno));
    return -1;
  }
  colod_log ("the demoted primary's identity, at epoch %" PRIu64, base);
  return 1;
}

/* ---- promotion ---- */

/* A store for the plugin the operator starts on the promoted disk, with
 * a checkpoint bitmap colo-EPOCH recording from the first write: what a
 * later failback sends back (the promoted side's changes).
 */
static int
prepare_store (uint64_t epoch, char *err, size_t errlen)
{
  struct fleece_config cfg = {
    .disk = colod.opt.disk, .store = colod.opt.promote_store,
    .cluster_size = journal_get_state (s.j)->cluster_size,
    .persistent = true,
  };
  char name[64];
  struct fleece *fl = fleece_open (&cfg);

  snprintf (name, sizeof name, "colo-%" PRIu64, epoch);
  if (fl == NULL || fleece_start (fl) == -1 ||
      fleece_checkpoint_create (fl, name) == -1 ||
      fleece_snapshot_delete (fl, name) == -1) {
    snprintf (err, errlen, "--promote-store %s: %s", colod.opt.promote_store,
              fleece_last_error ());
    if (fl)
      fleece_close (fl);
    return -1;
  }
  fleece_close (fl);
  colod_log ("store %s made, with bitmap %s recording from the first write",
             colod.opt.promote_store, name);
  return 0;
}

static int
run_on_promote (uint64_t epoch, const char *gen)
{
  char ep[32];
  pid_t pid;
  int status;

  snprintf (ep, sizeof ep, "%" PRIu64, epoch);
  pid = fork ();
  if (pid == -1) {
    colod_log ("--on-promote: fork: %s", strerror (errno));
    return -1;
  }
  if (pid == 0) {
    setenv ("FLEECE_COLOD_DISK", colod.opt.disk, 1);
    setenv ("FLEECE_COLOD_EPOCH", ep, 1);
    setenv ("FLEECE_COLOD_GENERATION", gen, 1);
    setenv ("FLEECE_COLOD_STATE", colod.opt.state_dir, 1);
    if (colod.opt.promote_store)
      setenv ("FLEECE_COLOD_STORE", colod.opt.promote_store, 1);
    execl ("/bin/sh", "sh", "-c", colod.opt.on_promote, (char *) NULL);
    _exit (127);
  }
  while (waitpid (pid, &status, 0) == -1 && errno == EINTR)
    ;
  if (!WIFEXITED (status) || WEXITSTATUS (status) != 0) {
    colod_log ("--on-promote '%s' failed (%s %d)", colod.opt.on_promote,
               WIFEXITED (status) ? "exit status" : "signal",
               WIFEXITED (status) ? WEXITSTATUS (status) : WTERMSIG (status));
    return -1;
  }
  colod_log ("--on-promote '%s' done", colod.opt.on_promote);
  return 0;
}

static void
promote (const char *why)
{
  uint8_t gen[16];
  char hex[33], err[1024] = "";
  uint64_t epoch;

  colod_set_failover (FAILOVER_ACTIVE, why);
  pthread_mutex_lock (&colod.lock);
  s.promoted = true;            /* refuse primaries from now on */
  pthread_mutex_unlock (&colod.lock);
  drop_channels ();

  pthread_mutex_lock (&s.jlock);
  if (s.j == NULL || journal_get_state (s.j)->committed_epoch == 0) {
    snprintf (err, sizeof err, "nothing to promote: no epoch was ever "
              "committed here");
    goto fail;
  }
  {
    char path[PATH_MAX];
    colo_state_path (colod.opt.state_dir, "diverged", path, sizeof path);
    if (colo_state_has_diverged (colod.opt.state_dir)) {
      snprintf (err, sizeof err, "the disk still holds this side's own "
                "writes from when it was a primary (%.700s): it is at no "
                "committed epoch until the resync is durable", path);
      goto fail;
    }
  }
  if (journal_recover (s.j) == -1 ||
      getrandom (gen, sizeof gen, 0) != sizeof gen) {
    snprintf (err, sizeof err, "%s", journal_error (s.j));
    goto fail;
  }
  epoch = journal_get_state (s.j)->committed_epoch;
  if (journal_new_generation (s.j, gen, epoch + 1) == -1) {
    snprintf (err, sizeof err, "%s", journal_error (s.j));
    goto fail;
  }
  publish_journal ();
  if (write_promoted (gen) == -1)
    colod_log ("a restart of this daemon will not know it was promoted: "
               "start it with the same --state only as a primary");
  unlock_disk ();               /* for the server that takes over */
  if (colod.opt.promote_store &&
      prepare_store (epoch, err, sizeof err) == -1)
    colod_log ("%s: a later failback will need a full copy", err);
  pthread_mutex_unlock (&s.jlock);
  colod_hex (gen, 16, hex);
  colod_log ("promoted at epoch %" PRIu64 ": generation %s; the disk %s is "
             "ready to serve", epoch, hex, colod.opt.disk);
  if (colod.opt.on_promote)
    run_on_promote (epoch, hex);
  pthread_mutex_lock (&colod.lock);
  colod.promote_requested = false;
  colod.promote_error[0] = '\0';
  pthread_mutex_unlock (&colod.lock);
  colod_set_failover (FAILOVER_COMPLETED, "promoted");
  return;
 fail:
  pthread_mutex_unlock (&s.jlock);
  colod_log ("promotion failed: %s", err);
  pthread_mutex_lock (&colod.lock);
  s.promoted = false;
  colod.promote_requested = false;
  snprintf (colod.promote_error, sizeof colod.promote_error, "%s", err);
  pthread_cond_broadcast (&colod.cond);
  pthread_mutex_unlock (&colod.lock);
  colod_set_failover (FAILOVER_NONE, err);
}

/* Heartbeats and requests, every tick of the main loop. */
static void
watch (void)
{
  int64_t now = monotonic_ms (), last;
  enum colod_failover f;
  bool req, paired, stopped;

  pthread_mutex_lock (&colod.lock);
  f = colod.st.failover;
  req = colod.promote_requested;
  /* Signs of life from an authenticated primary only: a pending peer
   * (handshake, HELLO) or a refused one counts for nothing.
   */
  last = s.started_ms;
  if (colod.st.last_heartbeat_ms > last)
    last = colod.st.last_heartbeat_ms;
  if (s.paired_ms > last)
    last = s.paired_ms;
  paired = colod.st.last_committed > 0;
  stopped = s.primary_stopped;
  pthread_mutex_unlock (&colod.lock);
  if (f == FAILOVER_COMPLETED)
    return;
  if (f == FAILOVER_NONE && paired && !stopped &&
      now - last > colod.opt.hb_timeout_ms) {
    char why[128];
    snprintf (why, sizeof why, "no heartbeat from the primary for %" PRId64
              " ms", now - last);
    s.require_since = now;
    colod_event ("PEER_LOST", json_pack ("{s:s}", "reason", why));
    colod_set_failover (FAILOVER_REQUIRE, why);
    f = FAILOVER_REQUIRE;
  }
  if (f == FAILOVER_REQUIRE && last > s.require_since) {
    colod_set_failover (FAILOVER_NONE, "heartbeats are back");
    return;
  }
  if (req)
    promote ("fleece-colod promote");
  else if (f == FAILOVER_REQUIRE && colod.opt.auto_failover)
    promote ("--auto-failover: the primary is gone");
}

static void *
monitor_thread (void *arg)
{
  (void) arg;
  while (!colod.stop) {
    watch ();
    colod_sleep_ms (100);
  }
  return NULL;
}

int
colod_run_secondary (void)
{
  pthread_t monitor;
  struct journal_state js;
  struct colo_listener *l;
  struct colo_tls *tls;
  char err[1024];
  int r;

  if (mkdir (colod.opt.state_dir, 0700) == -1 && errno != EEXIST) {
    colod_log ("mkdir: %s: %s", colod.opt.state_dir, strerror (errno));
    return COLOD_EXIT_ERROR;
  }
  r = colo_state_read (colod.opt.state_dir, &js, err, sizeof err);
  if (r == -1) {
    colod_log ("%s", err);
    return COLOD_EXIT_ERROR;
  }
  if (r == 1 &&
      open_journal (js.disk_size, js.cluster_size,
                    !colo_state_promoted_in (colod.opt.state_dir,
                                            js.generation_id), err, sizeof err) == -1) {
    colod_log ("%s", err);
    return COLOD_EXIT_ERROR;
  }
  r = adopt_demoted ();
  if (r == -1)
    return COLOD_EXIT_ERROR;
  if (r == 0 && s.j && read_promoted ()) {
    s.promoted = true;
    colod.st.failover = FAILOVER_COMPLETED;
    colod_log ("this side was promoted (generation of %s): primaries "
               "are refused%s", colod.opt.state_dir,
               colod.opt.discard_diverged ? ", except with "
               "--discard-diverged" : "");
  }
  if (!s.promoted && colod.opt.promote_store &&
      access (colod.opt.promote_store, F_OK) == 0) {
    colod_log ("--promote-store %s: already exists; promotion makes a new "
               "store there (remove the old one)", colod.opt.promote_store);
    return COLOD_EXIT_ERROR;
  }
  if (colod_control_start (colod.opt.control) == -1)
    return COLOD_EXIT_ERROR;
  tls = colo_tls_new (&colod.opt.tls);
  if (tls == NULL) {
    colod_log ("%s", colo_tls_last_error ());
    return COLOD_EXIT_ERROR;
  }
  l = colo_listen (tls, colod.opt.listen);
  if (l == NULL) {
    colod_log ("%s", colo_tls_last_error ());
    colo_tls_free (tls);
    return COLOD_EXIT_ERROR;
  }
  colod_log ("listening on %s, disk %s", colo_listener_address (l),
             colod.opt.disk);
  pthread_mutex_lock (&colod.lock);
  colod.st.connection = "listening";
  snprintf (colod.st.peer, sizeof colod.st.peer, "%s",
            colo_listener_address (l));
  pthread_mutex_unlock (&colod.lock);
  s.started_ms = monotonic_ms ();
  /* Heartbeats are watched in a thread of their own, so that nothing
   * on this loop can delay the judgment.
   */
  if (pthread_create (&monitor, NULL, monitor_thread, NULL) != 0) {
    colod_log ("pthread_create: cannot start the heartbeat monitor");
    colo_listener_close (l);
    colo_tls_free (tls);
    return COLOD_EXIT_ERROR;
  }
  while (!colod.stop) {
    struct pollfd pfd = { colo_listener_fd (l), POLLIN, 0 };

    if (poll (&pfd, 1, 100) == 1 && (pfd.revents & POLLIN))
      accept_peers (l);
  }
  pthread_join (monitor, NULL);
  end_conn_threads ();
  colo_listener_close (l);
  colo_tls_free (tls);
  if (s.j)
    journal_close (s.j);
  unlock_disk ();
  return s.failed ? COLOD_EXIT_ERROR : 0;
}
