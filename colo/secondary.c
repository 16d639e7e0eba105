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
 * Files: this one holds the pairing, the connections (before and after
 * their HELLO) and the accept loop; secondary-epochs.c receives epochs
 * into the journal; secondary-promote.c watches heartbeats and
 * promotes; secondary-disks.c locks the group's disks.  They share struct secondary (secondary-internal.h), which
 * says which thread or lock owns each field.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
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
#include "secondary-internal.h"
#include "state.h"

struct secondary sec = {
  .jlock = PTHREAD_MUTEX_INITIALIZER,
};

/* ---- status ---- */

void
secondary_publish_journal (void)
{
  const struct journal_state *js;

  if (sec.j == NULL)
    return;
  js = journal_get_state (sec.j);
  pthread_mutex_lock (&colod.lock);
  memcpy (colod.st.volume_id, js->volume_id, 16);
  memcpy (colod.st.generation_id, js->generation_id, 16);
  colod.st.history_len = colod_history_from_journal (js, colod.st.history);
  colod.st.last_committed = js->committed_epoch;
  colod.st.last_applied = js->applied_epoch;
  pthread_mutex_unlock (&colod.lock);
}

/* The journal of the group's disks (sizes: one for each --disk). */
static int
open_journal (const uint64_t *sizes, uint32_t cs, bool lock, char *err,
              size_t errlen)
{
  if (lock && secondary_lock_disks (err, errlen) == -1)
    return -1;
  sec.j = journal_open_group (colod.opt.state_dir, colod.opt.ndisks,
                              colod.opt.disks, sizes, cs, err, errlen);
  if (sec.j == NULL)
    return -1;
  colod_log ("journal: %s", journal_recovery_note (sec.j));
  secondary_publish_journal ();
  return 0;
}

/* ---- STATE_DIR/promoted: this side took over (its generation) ---- */

static bool
read_promoted (void)
{
  return colo_state_promoted_in (colod.opt.state_dir,
                                 journal_get_state (sec.j)->generation_id);
}

int
secondary_write_promoted (const uint8_t gen[16])
{
  char err[PATH_MAX + 128];

  if (colo_state_write_promoted (colod.opt.state_dir, gen, err,
                                 sizeof err) == -1) {
    colod_err ("%s", err);
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
  if (journal_set_identity (sec.j, ph->volume_id, h, ph->history_count,
                            epoch) == -1) {
    snprintf (err, errlen, "%s", journal_error (sec.j));
    return -1;
  }
  secondary_publish_journal ();
  return 0;
}

struct verdict {
  uint32_t status;
  char reason[COLO_WIRE_MAX_STRING + 1];
  uint64_t base;                  /* DIVERGED base_epoch */
  struct colo_diverged div;       /* DIVERGED bits per disk (none: 0) */
};

/* A journal for this primary's disk: opened from our state, or made for
 * its geometry the first time.  -1: refused (v filled) or failed.
 */
static int
ensure_journal (const struct colo_msg_hello *ph, struct verdict *v,
                char *err, size_t errlen)
{
  const struct journal_state *js;
  /* A primary that lists no disks has one. */
  uint32_t n = ph->disk_count ? ph->disk_count : 1;
  const uint64_t *sizes = ph->disk_count ? ph->disk_sizes : &ph->disk_size;
  uint32_t i;

  if (n != colod.opt.ndisks) {
    v->status = COLO_HELLO_WRONG_VOLUME;
    snprintf (v->reason, sizeof v->reason, "the primary's group has %"
              PRIu32 " disk%s, this secondary's %u (--disk %s%s): give the "
              "secondary one --disk for each of the primary's --fleece, in "
              "the same order", n, n == 1 ? "" : "s", colod.opt.ndisks,
              colod.opt.disk, colod.opt.ndisks > 1 ? " ..." : "");
    return -1;
  }
  for (i = 0; sec.j == NULL && i < n; i++) {
    int64_t have = secondary_disk_bytes (colod.opt.disks[i]);
    if (have >= 0 && (uint64_t) have < sizes[i]) {
      v->status = COLO_HELLO_WRONG_VOLUME;
      snprintf (v->reason, sizeof v->reason, "disk %" PRIu32 " (--disk %s):"
                " %" PRId64 " bytes, smaller than the primary's disk %" PRIu32
                " (%" PRIu64 " bytes)", i, colod.opt.disks[i], have, i,
                sizes[i]);
      return -1;
    }
  }
  if (sec.j == NULL && open_journal (sizes, ph->cluster_size, true,
                                     err, errlen) == -1)
    return -1;
  js = journal_get_state (sec.j);
  for (i = 0; i < n; i++)
    if (js->disk_sizes[i] != sizes[i] ||
        js->cluster_size != ph->cluster_size) {
      v->status = COLO_HELLO_WRONG_VOLUME;
      snprintf (v->reason, sizeof v->reason, "disk %" PRIu32 " (--disk %s): "
                "the primary's is %" PRIu64 " bytes in clusters of %" PRIu32
                ", this secondary's %" PRIu64 " in clusters of %" PRIu32, i,
                colod.opt.disks[i], sizes[i], ph->cluster_size,
                js->disk_sizes[i], js->cluster_size);
      return -1;
    }
  /* The apply of a committed epoch left pending by a failure. */
  if (js->applied_epoch < js->committed_epoch && journal_apply (sec.j) == -1) {
    snprintf (err, errlen, "%s", journal_error (sec.j));
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
  uint64_t fork;
  struct colo_diverged div;
  int have_div;

  memset (v, 0, sizeof *v);
  if (ensure_journal (ph, v, err, errlen) == -1)
    return v->status ? 0 : -1;
  js = journal_get_state (sec.j);
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
  have_div = secondary_read_diverged (&div);
  if (have_div == 1 && !secondary_diverged_fits (&div, js)) {
    colo_diverged_free (&div);
    have_div = -1;
  }
  if (have_div == 0 && colo_state_failback_pending (colod.opt.state_dir)) {
    colod_log ("%s: this side was a primary demoted at epoch %" PRIu64
               " and its diverged clusters are gone before the first "
               "epoch after that was durable: the resync will be a full "
               "copy", colod.opt.state_dir, js->committed_epoch);
    have_div = -1;
  }
  if (have_div == 1 && js->disk_count > 1 &&
      colod_pair_version (ph->max_version) <
      COLO_WIRE_VERSION_GROUP_DIVERGED) {
    colod_log ("the pairing speaks protocol %" PRIu16 " (the primary's "
               "HELLO says %" PRIu16 "), which takes no diverged clusters "
               "of a group: the resync will be a full copy of every disk",
               colod_pair_version (ph->max_version), ph->max_version);
    colo_diverged_free (&div);
    have_div = -1;
  }
  switch (rel) {
  case REL_SAME:
    v->base = have_div == -1 ? 0 : js->committed_epoch;
    break;
  case REL_BEHIND:
    if (have_div == 1 && div.base <= fork - 1 &&
        js->committed_epoch <= fork - 1)
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
      colo_diverged_free (&div);
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
    colo_diverged_free (&div);
    return 0;
  }
  if (v->base != 0 && have_div == 1)
    v->div = div;
  else
    colo_diverged_free (&div);
  return 0;
 fail:
  colo_diverged_free (&div);
  return -1;
}

static void
fill_hello (struct colo_msg *m, uint32_t channel)
{
  const struct journal_state *js = sec.j ? journal_get_state (sec.j) : NULL;
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
  h->disk_count = js->disk_count;
  memcpy (h->disk_sizes, js->disk_sizes,
          js->disk_count * sizeof *h->disk_sizes);
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
        colod_notice ("the primary stopped cleanly: no failover for that");
        pthread_mutex_lock (&colod.lock);
        sec.primary_stopped = true;
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
    sec.primary_stopped = false;
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
  struct colod_conn **slot = channel == COLO_CHANNEL_DATA ? &sec.data : &sec.hb;
  bool *busy = channel == COLO_CHANNEL_DATA ? &sec.data_busy : &sec.hb_busy;

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
    sec.data = NULL;
    sec.data_busy = false;
    colod.st.connection = "listening";
  }
  else {
    sec.hb = NULL;
    sec.hb_busy = false;
  }
  pthread_cond_broadcast (&colod.cond);
  pthread_mutex_unlock (&colod.lock);
}

/* Shut both connections down and wait for their threads to go. */
void
secondary_drop_channels (void)
{
  pthread_mutex_lock (&colod.lock);
  if (sec.data)
    colod_conn_abort (sec.data);
  if (sec.hb)
    colod_conn_abort (sec.hb);
  while (sec.data_busy || sec.hb_busy)
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

/* After an accepting HELLO_REPLY, DIVERGED: one per disk of the group
 * to a primary that takes them (HELLO max_version 3), else one (judge
 * gave a group's bits to no other).  The bits are v->div's, if any.
 */
static int
send_diverged (struct colod_conn *c, const struct colo_msg_hello *ph,
               const struct verdict *v, char *err, size_t errlen)
{
  uint32_t n = ph->disk_count > 1 &&
    colod_pair_version (ph->max_version) >= COLO_WIRE_VERSION_GROUP_DIVERGED
    ? ph->disk_count : 1;
  uint32_t i;

  for (i = 0; i < n; i++) {
    struct colo_msg m = { .type = COLO_MSG_DIVERGED };

    m.diverged.base_epoch = v->base;
    m.diverged.disk_size = ph->disk_count ? ph->disk_sizes[i] : ph->disk_size;
    m.diverged.cluster_size = ph->cluster_size;
    m.diverged.disk = i;
    if (i < v->div.disk_count) {
      m.diverged.bit_count = v->div.nbits[i];
      m.diverged.bits = v->div.nbits[i] ? v->div.bits[i] : NULL;
    }
    if (colod_send (c, &m, err, errlen) == -1)
      return -1;
  }
  return 0;
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
  pthread_mutex_lock (&sec.jlock);
  if (sec.promoted && !colod.opt.discard_diverged) {
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
    if (r == 0 && v.status == COLO_HELLO_ACCEPT && sec.promoted) {
      /* --discard-diverged on a promoted side: a secondary again, once
       * no server has the disk any more.
       */
      r = secondary_lock_disks (err, sizeof err);
      if (r == 0) {
        colo_state_clear_promoted (colod.opt.state_dir);
        sec.promoted = false;
        colod_set_failover (FAILOVER_NONE, "--discard-diverged: a "
                            "secondary again");
      }
    }
  }
  fill_hello (&m, COLO_CHANNEL_DATA);
  pthread_mutex_unlock (&sec.jlock);
  if (r == -1) {
    colod_warn ("pairing with %s: %s", colo_conn_peer (c->conn), err);
    colod_send_error (c, COLO_ERROR_INTERNAL, err);
    goto out;
  }
  if (colod_send (c, &m, err, sizeof err) == -1 ||
      send_reply (c, v.status, v.reason, err, sizeof err) == -1)
    goto out;
  if (v.status != COLO_HELLO_ACCEPT) {
    colod_warn ("refused the primary %s: %s", colo_conn_peer (c->conn),
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
  if (send_diverged (c, ph, &v, err, sizeof err) == -1)
    goto out;
  colo_conn_set_timeout (c->conn, -1);
  pthread_mutex_lock (&colod.lock);
  colod.st.connection = "connected";
  sec.paired_ms = monotonic_ms ();   /* the primary is back: alive */
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
                          (json_int_t) v.base, "diverged",
                          v.div.disk_count != 0));
  secondary_receive_epochs (c);
 out:
  colo_diverged_free (&v.div);
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
  pthread_mutex_lock (&sec.jlock);
  if (sec.promoted && !colod.opt.discard_diverged) {
    status = COLO_HELLO_SPLIT_BRAIN;
    reason = "split brain: this side was promoted and is the primary now";
  }
  else if (sec.j == NULL ||
           memcmp (journal_get_state (sec.j)->volume_id, ph->volume_id, 16) ||
           memcmp (journal_get_state (sec.j)->generation_id,
                   ph->generation_id, 16)) {
    status = COLO_HELLO_REFUSE;
    reason = "open the data connection first: the heartbeat connection "
      "must name the volume and generation it paired";
  }
  fill_hello (&m, COLO_CHANNEL_HEARTBEAT);
  pthread_mutex_unlock (&sec.jlock);
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

  for (i = 0; i < sec.npending; i++)
    if (sec.pending[i] == conn) {
      sec.pending[i] = sec.pending[--sec.npending];
      return;
    }
}

static void
conn_thread_end (struct colo_conn *pending)
{
  pthread_mutex_lock (&colod.lock);
  if (pending)
    pending_remove (pending);
  sec.nthreads--;
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
    colod_warn ("connection from %s closed before its HELLO: %s",
               colo_conn_peer (c->conn), err);
    return NULL;
  }
  colo_conn_set_deadline (c->conn, -1);
  if (m->type != COLO_MSG_HELLO || m->hello.role != COLO_ROLE_PRIMARY) {
    snprintf (err, sizeof err, "%s: expected a primary's HELLO, got %s",
              colo_conn_peer (c->conn), m->type == COLO_MSG_HELLO
              ? "a secondary's HELLO" : colo_msg_type_name (m->type));
    colod_err ("%s", err);
    colod_send_error (c, COLO_ERROR_UNEXPECTED, err);
    return NULL;
  }
  ph = malloc (sizeof *ph);
  if (ph == NULL) {
    colod_err ("malloc: HELLO of %s: %s", colo_conn_peer (c->conn),
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
    colod_err ("%s", colo_tls_last_error ());
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
        colod_err ("%s", colo_tls_last_error ());
        colod_sleep_ms (100);   /* e.g. EMFILE: the peer still waits */
      }
      return;
    }
    pthread_mutex_lock (&colod.lock);
    if (sec.npending == COLOD_MAX_PENDING) {
      pthread_mutex_unlock (&colod.lock);
      colod_warn ("connection from %s closed at once: %d connections are "
                 "already in their TLS handshake or HELLO, the most allowed",
                 colo_conn_peer (conn), COLOD_MAX_PENDING);
      colo_discard (conn);
      continue;
    }
    sec.pending[sec.npending++] = conn;
    sec.nthreads++;
    pthread_mutex_unlock (&colod.lock);
    pthread_attr_init (&attr);
    pthread_attr_setdetachstate (&attr, PTHREAD_CREATE_DETACHED);
    r = pthread_create (&t, &attr, conn_thread, conn);
    pthread_attr_destroy (&attr);
    if (r != 0) {
      colod_err ("pthread_create: connection from %s: %s",
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
  while (sec.nthreads > 0) {
    for (i = 0; i < sec.npending; i++)
      shutdown (colo_conn_fd (sec.pending[i]), SHUT_RDWR);
    if (sec.data)
      colod_conn_abort (sec.data);
    if (sec.hb)
      colod_conn_abort (sec.hb);
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
  struct colo_diverged d;
  uint64_t base;
  char err[1024], path[PATH_MAX];
  int r = colo_state_load_primary (colod.opt.state_dir, &ps, err,
                                   sizeof err);

  if (r == -1)
    colod_err ("%s", err);
  if (r <= 0 || !ps.demoted)
    return r;                   /* nothing, or a primary.json error */
  memcpy (h.volume_id, ps.volume_id, 16);
  memcpy (h.history, ps.history, ps.history_len * sizeof *h.history);
  h.history_count = ps.history_len;
  if (secondary_read_diverged (&d) != 1) {
    colod_err ("%s: demoted, but its diverged clusters are missing or "
               "damaged: pair with --discard-diverged for a full copy",
               colod.opt.state_dir);
    return colod.opt.discard_diverged ? 0 : -1;
  }
  if (colod.opt.ndisks != d.disk_count) {
    colod_err ("%s: a demoted primary of %" PRIu32 " disk%s, started with "
               "%u --disk", colod.opt.state_dir, d.disk_count,
               d.disk_count == 1 ? "" : "s", colod.opt.ndisks);
    colo_diverged_free (&d);
    return -1;
  }
  if ((sec.j == NULL &&
       open_journal (d.disk_sizes, d.cluster_size, true, err,
                     sizeof err) == -1) ||
      secondary_lock_disks (err, sizeof err) == -1 ||
      adopt (&h, d.base, err, sizeof err) == -1) {
    colod_err ("%s", err);
    colo_diverged_free (&d);
    return -1;
  }
  base = d.base;
  colo_diverged_free (&d);
  if (colo_state_write_failback (colod.opt.state_dir, err, sizeof err) == -1) {
    colod_err ("%s", err);
    return -1;
  }
  colo_state_clear_promoted (colod.opt.state_dir);
  colo_state_path (colod.opt.state_dir, "primary.json", path, sizeof path);
  if (unlink (path) == -1) {
    colod_err ("unlink: %s: %s", path, strerror (errno));
    return -1;
  }
  colod_log ("the demoted primary's identity, at epoch %" PRIu64 "%s",
             base, colod.opt.ndisks > 1 ? ", for the group" : "");
  return 1;
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
    colod_err ("mkdir: %s: %s", colod.opt.state_dir, strerror (errno));
    return COLOD_EXIT_ERROR;
  }
  r = colo_state_read (colod.opt.state_dir, &js, err, sizeof err);
  if (r == -1) {
    colod_err ("%s", err);
    return COLOD_EXIT_ERROR;
  }
  if (r == 1 && js.disk_count != colod.opt.ndisks) {
    colod_err ("%s/state: a group of %" PRIu32 " disk%s, not the %u "
               "--disk given", colod.opt.state_dir, js.disk_count,
               js.disk_count == 1 ? "" : "s", colod.opt.ndisks);
    return COLOD_EXIT_ERROR;
  }
  if (r == 1 &&
      open_journal (js.disk_sizes, js.cluster_size,
                    !colo_state_promoted_in (colod.opt.state_dir,
                                             js.generation_id),
                    err, sizeof err) == -1) {
    colod_err ("%s", err);
    return COLOD_EXIT_ERROR;
  }
  r = adopt_demoted ();
  if (r == -1)
    return COLOD_EXIT_ERROR;
  if (r == 0 && sec.j && read_promoted ()) {
    sec.promoted = true;
    colod.st.failover = FAILOVER_COMPLETED;
    colod_err ("this side was promoted (generation of %s): primaries "
               "are refused%s", colod.opt.state_dir,
               colod.opt.discard_diverged ? ", except with "
               "--discard-diverged" : "");
  }
  for (r = 0; !sec.promoted && r < (int) colod.opt.npromote_stores; r++)
    if (access (colod.opt.promote_stores[r], F_OK) == 0) {
      colod_err ("--promote-store %s: already exists; promotion makes a new "
                 "store there (remove the old one)",
                 colod.opt.promote_stores[r]);
      return COLOD_EXIT_ERROR;
    }
  if (colod_control_start (colod.opt.control) == -1)
    return COLOD_EXIT_ERROR;
  tls = colo_tls_new (&colod.opt.tls);
  if (tls == NULL) {
    colod_err ("%s", colo_tls_last_error ());
    return COLOD_EXIT_ERROR;
  }
  l = colo_listen (tls, colod.opt.listen);
  if (l == NULL) {
    colod_err ("%s", colo_tls_last_error ());
    colo_tls_free (tls);
    return COLOD_EXIT_ERROR;
  }
  colod_notice ("listening on %s, disk %s", colo_listener_address (l),
             colod.opt.disk);
  pthread_mutex_lock (&colod.lock);
  colod.st.connection = "listening";
  snprintf (colod.st.peer, sizeof colod.st.peer, "%s",
            colo_listener_address (l));
  pthread_mutex_unlock (&colod.lock);
  sec.started_ms = monotonic_ms ();
  /* Heartbeats are watched in a thread of their own, so that nothing
   * on this loop can delay the judgment.
   */
  if (pthread_create (&monitor, NULL, secondary_monitor_thread, NULL) != 0) {
    colod_err ("pthread_create: cannot start the heartbeat monitor");
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
  if (sec.j)
    journal_close (sec.j);
  secondary_unlock_disk ();
  return sec.failed ? COLOD_EXIT_ERROR : 0;
}
