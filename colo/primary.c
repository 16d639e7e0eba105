/* fleece-colod primary: ships the plugin's checkpoints to the secondary.
 *
 * Checkpoints on the plugin are named colo-N, N the epoch.  After epoch
 * N: snapshot colo-N exists while N is being shipped, bitmap colo-N
 * records every write since checkpoint N, and the bitmaps colo-K (K < N)
 * are frozen, each holding the clusters changed between checkpoint K and
 * the next one.  So the clusters that differ between the secondary at
 * epoch X and the disk at checkpoint N are the union of colo-X .. colo-
 * (N-1): as long as bitmap colo-X exists, the secondary can be brought
 * to N incrementally.  That is why nothing is removed until the
 * secondary says DURABLE, and why, while the secondary is away, the
 * recording bitmap simply keeps recording: when it returns, the first
 * epoch carries everything it missed ("catch-up").
 *
 * The primary's identity (volume id, generation history, the last epoch
 * the secondary acknowledged) is STATE_DIR/primary.json, replaced
 * atomically.  A primary made from a promoted secondary takes the
 * identity from the secondary's state file (STATE_DIR/state).
 *
 * Threads: the main thread connects, handshakes and runs the epochs; a
 * heartbeat thread pings on the second connection and, when replies
 * stop for --hb-timeout, shuts the data connection down so that the
 * main thread, wherever it is blocked, fails and reconnects.
 *
 * The plugin (its control socket, geometry and colo-N checkpoints) is
 * plugin.c, the state files are in state.c, the connection in conn.c,
 * the pairing rules in pairing.c.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "clock.h"
#include "colod.h"
#include "conn.h"
#include "ctl.h"
#include "events.h"
#include "log.h"
#include "pairing.h"
#include "plugin.h"
#include "primary.h"
#include "state.h"
#include "source.h"

/* The identity (STATE_DIR/primary.json, state.c), and its path for
 * messages.  Main thread only (the heartbeat thread reads p.acked).
 */
static struct colo_primary_state id;
static char id_path[PATH_MAX];

/* Which thread owns what: the main thread (connect, handshake, epochs)
 * and the heartbeat thread (hb_thread), which it starts after each
 * handshake and joins before it closes the connections.
 */
static struct {
  /* The connections: opened and closed by the main thread, which uses
   * data; hb and hb_thread are set before the heartbeat thread starts
   * and it alone uses hb until it is joined.  The heartbeat thread only
   * aborts data (colod_conn_abort: a shutdown), never closes it.
   */
  struct colod_conn *data, *hb;
  pthread_t hb_thread;
  /* Both threads: the peer is lost (set by whichever sees it first; the
   * main thread clears it before it starts a heartbeat thread).
   */
  atomic_bool lost;
  /* The last epoch durable on the secondary (id.acked), for the
   * heartbeat thread's HEARTBEATs: written by the main thread.
   */
  _Atomic uint64_t acked;
  /* Main thread only: what the first epoch after a handshake must
   * cover.
   */
  uint64_t base;                  /* 0: a full copy */
  /* The secondary's diverged clusters, per disk (NULL, 0: none). */
  uint8_t *extra[COLOD_MAX_DISKS];
  uint64_t extra_bits[COLOD_MAX_DISKS];
  uint64_t sec_committed;
  uint16_t sec_version;           /* its HELLO's max_version */
} p;

/* ---- identity ---- */

static void
publish_identity (void)
{
  pthread_mutex_lock (&colod.lock);
  memcpy (colod.st.volume_id, id.volume_id, 16);
  memcpy (colod.st.history, id.history, id.history_len * sizeof *id.history);
  colod.st.history_len = id.history_len;
  memcpy (colod.st.generation_id, id.history[id.history_len - 1].id, 16);
  colod.st.last_committed = colod.st.last_applied = id.acked;
  pthread_mutex_unlock (&colod.lock);
  atomic_store (&p.acked, id.acked);
}

static int
save_identity (void)
{
  char err[1024];

  if (colo_state_save_primary (colod.opt.state_dir, &id, err,
                               sizeof err) == -1) {
    colod_err ("%s", err);
    return -1;
  }
  return 0;
}

/* 1 loaded, 0 none, -1 error. */
static int
load_identity (void)
{
  char err[1024];
  int r;

  colo_state_path (colod.opt.state_dir, "primary.json", id_path,
                   sizeof id_path);
  r = colo_state_load_primary (colod.opt.state_dir, &id, err, sizeof err);
  if (r == -1)
    colod_err ("%s", err);
  return r;
}

static int
init_identity (void)
{
  struct journal_state js;
  char err[1024];
  int r = load_identity ();

  if (r == -1)
    return -1;
  if (r == 1) {
    if (id.demoted) {
      colod_err ("%s: this state directory was demoted (fleece-colod "
                 "demote): it belongs to a secondary now", id_path);
      return -1;
    }
    return 0;
  }
  r = colo_state_read (colod.opt.state_dir, &js, err, sizeof err);
  if (r == -1) {
    colod_err ("%s", err);
    return -1;
  }
  if (r == 1 && js.history_len > 0) {
    /* A promoted secondary becoming the primary. */
    memcpy (id.volume_id, js.volume_id, 16);
    id.history_len = colod_history_from_journal (&js, id.history);
    id.acked = 0;
    colod_log ("identity from the secondary state in %s (generation %u of "
               "the history, first epoch %" PRIu64 ")", colod.opt.state_dir,
               id.history_len, id.history[id.history_len - 1].start_epoch);
  }
  else {
    if (getrandom (id.volume_id, 16, 0) != 16 ||
        getrandom (id.history[0].id, 16, 0) != 16) {
      colod_err ("getrandom: %s", strerror (errno));
      return -1;
    }
    id.history[0].start_epoch = 1;
    id.history_len = 1;
    id.acked = 0;
    colod_log ("a new volume identity in %s", colod.opt.state_dir);
  }
  return save_identity ();
}

/* ---- the handshake ---- */

static void
fill_hello (struct colo_msg *m, uint32_t channel)
{
  struct colo_msg_hello *h = colod_hello_init (m, COLO_ROLE_PRIMARY, channel);

  memcpy (h->volume_id, id.volume_id, 16);
  memcpy (h->generation_id, id.history[id.history_len - 1].id, 16);
  h->last_committed = h->last_applied = id.acked;
  unsigned i;

  h->disk_size = plugins[0].disk_size;
  h->cluster_size = plugins[0].cluster_size;
  h->history_count = id.history_len;
  memcpy (h->history, id.history, id.history_len * sizeof *id.history);
  h->disk_count = nplugins;
  for (i = 0; i < nplugins; i++)
    h->disk_sizes[i] = plugins[i].disk_size;
}

static void
set_refused (const char *why)
{
  pthread_mutex_lock (&colod.lock);
  snprintf (colod.st.refusal, sizeof colod.st.refusal, "%s", why);
  colod.st.connection = "refused";
  pthread_mutex_unlock (&colod.lock);
}

static void
free_extra (void)
{
  unsigned i;

  for (i = 0; i < COLOD_MAX_DISKS; i++) {
    free (p.extra[i]);
    p.extra[i] = NULL;
    p.extra_bits[i] = 0;
  }
}

static bool
have_extra (void)
{
  unsigned i;

  for (i = 0; i < nplugins; i++)
    if (p.extra_bits[i])
      return true;
  return false;
}

/* The secondary's DIVERGED, after its accepting HELLO_REPLY: one per
 * disk of the group, in order, if it speaks version 3 of HELLO
 * (COLO_WIRE_VERSION_GROUP_DIVERGED), else one, which for a group
 * carries no bits (an older secondary has no diverged clusters of a
 * group).  Sets p.base and p.extra.  0, or -1 with err.
 */
static int
recv_diverged (struct colod_conn *pc, char *err, size_t errlen)
{
  unsigned n = nplugins > 1 &&
    p.sec_version >= COLO_WIRE_VERSION_GROUP_DIVERGED ? nplugins : 1;
  const char *peer = colo_conn_peer (pc->conn);
  const struct colo_msg *m;
  unsigned i;

  free_extra ();
  for (i = 0; i < n; i++) {
    const struct colo_msg_diverged *d;

    if (colod_recv (pc, &m, err, errlen) != 1)
      return -1;
    d = &m->diverged;
    if (m->type != COLO_MSG_DIVERGED)
      snprintf (err, errlen, "%s: expected DIVERGED for disk %u, got %s",
                peer, i, colo_msg_type_name (m->type));
    else if (d->disk != i || (i > 0 && d->base_epoch != p.base) ||
             (d->bit_count && (n < nplugins ||
                               d->cluster_size != plugins[i].cluster_size ||
                               d->disk_size != plugins[i].disk_size)))
      snprintf (err, errlen, "%s: DIVERGED of disk %" PRIu32 " (base epoch %"
                PRIu64 ", %" PRIu64 " bytes in clusters of %" PRIu32 ", %"
                PRIu64 " bits) does not fit disk %u of this group of %u (%"
                PRIu64 " bytes in clusters of %" PRIu32 ")", peer, d->disk,
                d->base_epoch, d->disk_size, d->cluster_size, d->bit_count,
                i, nplugins, plugins[i].disk_size, plugins[i].cluster_size);
    else {
      p.base = d->base_epoch;
      p.extra_bits[i] = d->bit_count;
      if (d->bit_count) {
        size_t bytes = (d->bit_count + 7) / 8;
        p.extra[i] = malloc (bytes);
        if (p.extra[i] == NULL) {
          snprintf (err, errlen, "malloc: DIVERGED of disk %u: %s", i,
                    strerror (errno));
          return -1;
        }
        memcpy (p.extra[i], d->bits, bytes);
      }
      continue;
    }
    colod_send_error (pc, COLO_ERROR_UNEXPECTED, err);
    return -1;
  }
  return 0;
}

/* Connect one channel and exchange HELLOs.  NULL on failure; *fatal
 * when the secondary refused the pairing itself.
 */
static struct colod_conn *
open_channel (struct colo_tls *tls, uint32_t channel, bool *fatal,
              char *err, size_t errlen)
{
  struct colo_conn *c = colo_connect (tls, colod.opt.peer);
  struct colod_conn *pc;
  const struct colo_msg *m;
  struct colo_msg hello;

  if (c == NULL) {
    snprintf (err, errlen, "%s", colo_tls_last_error ());
    return NULL;
  }
  pc = colod_conn_wrap (c);
  if (pc == NULL) {
    snprintf (err, errlen, "out of memory");
    return NULL;
  }
  colo_conn_set_timeout (c, 30000);
  fill_hello (&hello, channel);
  if (colod_send (pc, &hello, err, errlen) == -1 ||
      colod_recv (pc, &m, err, errlen) != 1)
    goto fail;
  if (m->type != COLO_MSG_HELLO || m->hello.role != COLO_ROLE_SECONDARY) {
    snprintf (err, errlen, "%s: expected the secondary's HELLO, got %s",
              colo_conn_peer (c), colo_msg_type_name (m->type));
    colod_send_error (pc, COLO_ERROR_UNEXPECTED, err);
    goto fail;
  }
  if (channel == COLO_CHANNEL_DATA) {
    p.sec_committed = m->hello.last_committed;
    p.sec_version = colod_pair_version (m->hello.max_version);
  }
  if (colod_recv (pc, &m, err, errlen) != 1)
    goto fail;
  if (m->type != COLO_MSG_HELLO_REPLY) {
    snprintf (err, errlen, "%s: expected HELLO_REPLY, got %s",
              colo_conn_peer (c), colo_msg_type_name (m->type));
    colod_send_error (pc, COLO_ERROR_UNEXPECTED, err);
    goto fail;
  }
  if (m->hello_reply.status != COLO_HELLO_ACCEPT) {
    snprintf (err, errlen, "%s refused the pairing (%s): %.700s",
              colo_conn_peer (c),
              m->hello_reply.status == COLO_HELLO_SPLIT_BRAIN ? "split brain"
              : m->hello_reply.status == COLO_HELLO_UNRELATED
              ? "unrelated histories"
              : m->hello_reply.status == COLO_HELLO_WRONG_VOLUME
              ? "another volume" : m->hello_reply.status == COLO_HELLO_BUSY
              ? "busy" : "refused", m->hello_reply.reason);
    *fatal = m->hello_reply.status != COLO_HELLO_BUSY;
    if (m->hello_reply.status == COLO_HELLO_SPLIT_BRAIN)
      colod_event ("SPLIT_BRAIN", json_pack ("{s:s,s:s}", "peer",
                                             colo_conn_peer (c), "reason",
                                             m->hello_reply.reason));
    goto fail;
  }
  if (channel == COLO_CHANNEL_DATA && recv_diverged (pc, err, errlen) == -1)
    goto fail;
  colo_conn_set_timeout (c, channel == COLO_CHANNEL_HEARTBEAT
                         ? colod.opt.hb_timeout_ms : -1);
  return pc;
 fail:
  colod_conn_close (pc);
  return NULL;
}

/* ---- heartbeats ---- */

static void *
hb_thread (void *arg)
{
  char err[1024];

  (void) arg;
  while (!colod.stop && !atomic_load (&p.lost)) {
    struct colo_msg m = { .type = COLO_MSG_HEARTBEAT };
    const struct colo_msg *r;
    int64_t t0 = monotonic_ms ();

    m.heartbeat.monotonic_ms = t0;
    m.heartbeat.last_committed = atomic_load (&p.acked);
    if (colod_send (p.hb, &m, err, sizeof err) == -1 ||
        colod_recv (p.hb, &r, err, sizeof err) != 1)
      break;
    if (r->type != COLO_MSG_HEARTBEAT_REPLY ||
        r->heartbeat_reply.echo_ms != (uint64_t) t0) {
      snprintf (err, sizeof err, "heartbeat: unexpected %s",
                colo_msg_type_name (r->type));
      break;
    }
    pthread_mutex_lock (&colod.lock);
    colod.st.last_heartbeat_ms = monotonic_ms ();
    colod.st.rtt_us = (colod.st.last_heartbeat_ms - t0) * 1000;
    pthread_mutex_unlock (&colod.lock);
    colod_sleep_ms (colod.opt.hb_interval_ms);
  }
  if (colod.stop)               /* not a failure: no failover for this */
    colod_send_error (p.hb, COLO_ERROR_SHUTDOWN, "the primary is stopping");
  else if (!atomic_exchange (&p.lost, true)) {
    colod_warn ("peer lost: %s", err);
    colod_conn_abort (p.data);
  }
  return NULL;
}

/* ---- epochs ---- */

struct ship {
  struct colod_conn *c;
  struct colo_wire_digest digest;
  uint32_t disk;                  /* the disk being read, in the group */
  uint64_t count, sent;
  bool corrupt;
  char *err;
  size_t errlen;
};

static int
ship_extent (void *opaque, uint64_t offset, uint32_t length, bool zero,
             const void *data, uint64_t xxh)
{
  struct ship *s = opaque;
  struct colo_msg m = { .type = COLO_MSG_EXTENT };
  uint8_t *copy = NULL;
  int r;

  m.extent.offset = offset;
  m.extent.length = length;
  m.extent.flags = (zero ? COLO_EXTENT_ZERO : COLO_EXTENT_DATA) |
    s->disk << COLO_EXTENT_DISK_SHIFT;
  m.extent.checksum = xxh;
  m.extent.data = data;
  if (s->corrupt && !zero) {    /* --debug corrupt-epoch: one bad byte */
    copy = malloc (length);
    if (copy) {
      memcpy (copy, data, length);
      copy[length / 2] ^= 0x5a;
      m.extent.data = copy;
      colod_log ("debug: corrupting extent %" PRIu64 "+%" PRIu32 " of this "
                 "epoch", offset, length);
    }
    s->corrupt = false;
  }
  colo_wire_digest_add (&s->digest, &m.extent);
  r = colod_send (s->c, &m, s->err, s->errlen);
  free (copy);
  if (r == -1)
    return -1;
  s->count++;
  s->sent += length;
  pthread_mutex_lock (&colod.lock);
  colod.st.bytes_in_flight = s->sent;
  if (colod.st.resync_remaining >= length)
    colod.st.resync_remaining -= length;
  pthread_mutex_unlock (&colod.lock);
  return 0;
}

/* The planned epoch of the whole group: every disk's plan, in order. */
struct group_plan {
  struct colo_plan disk[COLOD_MAX_DISKS];
  uint64_t n, total_bytes, zero_bytes;
};

/* Send the planned epoch once, the disks one after the other; 1
 * durable, 0 refused, -1 failed.
 */
static int
send_epoch (uint64_t epoch, const char *snap, const struct group_plan *plan,
            bool full, bool corrupt, char *err, size_t errlen)
{
  struct colo_msg m = { .type = COLO_MSG_EPOCH_BEGIN };
  struct ship s = { .c = p.data, .corrupt = corrupt, .err = err,
                    .errlen = errlen };
  const struct colo_msg *r;

  m.epoch_begin.epoch = epoch;
  memcpy (m.epoch_begin.generation_id, id.history[id.history_len - 1].id,
          16);
  m.epoch_begin.cluster_size = plugins[0].cluster_size;
  m.epoch_begin.flags = full ? COLO_EPOCH_FULL : 0;
  m.epoch_begin.extent_count = plan->n;
  m.epoch_begin.total_bytes = plan->total_bytes;
  colo_wire_digest_init (&s.digest);
  if (colod_send (p.data, &m, err, errlen) == -1)
    return -1;
  for (s.disk = 0; s.disk < nplugins; s.disk++)
    if (colo_plan_read (plugins[s.disk].nbd_uri, snap, &plan->disk[s.disk],
                        0, ship_extent, &s, err, errlen) == -1)
      return -1;
  m.type = COLO_MSG_EPOCH_END;
  m.epoch_end.epoch = epoch;
  m.epoch_end.extent_count = s.count;
  m.epoch_end.digest = colo_wire_digest_final (&s.digest);
  if (colod_send (p.data, &m, err, errlen) == -1 ||
      colod_recv (p.data, &r, err, errlen) != 1)
    return -1;
  if (r->type == COLO_MSG_EPOCH_DURABLE && r->epoch_durable.epoch == epoch)
    return 1;
  if (r->type == COLO_MSG_EPOCH_REFUSED && r->epoch_refused.epoch == epoch) {
    colod_warn ("epoch %" PRIu64 " refused by the secondary (reason %" PRIu32
               "): %s; sending it again", epoch, r->epoch_refused.reason,
               r->epoch_refused.message);
    pthread_mutex_lock (&colod.lock);
    colod.st.epochs_refused++;
    pthread_mutex_unlock (&colod.lock);
    colod_event ("EPOCH_REFUSED", json_pack ("{s:I,s:s}", "epoch",
                                             (json_int_t) epoch, "reason",
                                             r->epoch_refused.message));
    return 0;
  }
  snprintf (err, errlen, "epoch %" PRIu64 ": expected EPOCH_DURABLE, got "
            "%s", epoch, colo_msg_type_name (r->type));
  colod_send_error (p.data, COLO_ERROR_UNEXPECTED, err);
  return -1;
}

/* The highest colo-N on any plugin of the group. */
static uint64_t
last_checkpoint (void)
{
  uint64_t last = 0;
  unsigned i;

  for (i = 0; i < nplugins; i++)
    if (plugins[i].last_checkpoint > last)
      last = plugins[i].last_checkpoint;
  return last;
}

/* The snapshot of the last checkpoint if every plugin of the group still
 * has it (an epoch made whole, that failed to ship): its epoch, or 0.
 */
static uint64_t
unsent_snapshot (void)
{
  uint64_t last = last_checkpoint ();
  unsigned i;

  for (i = 0; i < nplugins; i++)
    if (plugins[i].last_checkpoint != last ||
        plugin_unsent_snapshot (&plugins[i]) != last)
      return 0;
  return last;
}

/* Checkpoint colo-EPOCH: on a single disk with checkpoint-create, on a
 * group with the group protocol (plugin.c), at one instant on all its
 * disks or on none.  *drain_ns: how long writers were held.
 */
static int
take_checkpoint (uint64_t epoch, const char *snap, int64_t *drain_ns,
                 char *err, size_t errlen)
{
  json_t *r;

  if (nplugins > 1)
    return plugin_group_checkpoint (snap, COLOD_GROUP_DEADLINE_MS, drain_ns,
                                    err, errlen);
  r = plugin_ctl (&plugins[0], "checkpoint-create",
                  json_pack ("{s:s}", "name", snap), err, errlen);
  if (r == NULL)
    return -1;
  json_decref (r);
  plugins[0].last_checkpoint = epoch;
  /* How long the plugin held writers for this checkpoint (its drain):
   * the writer stall of the epoch, for the event.
   */
  r = plugin_ctl (&plugins[0], "query-stats", NULL, err, errlen);
  if (r) {
    json_int_t ns;
    if (json_unpack (r, "{s:I}", "last-drain-ns", &ns) == 0)
      *drain_ns = ns;
    json_decref (r);
  }
  return 0;
}

static void
free_group_plan (struct group_plan *gp)
{
  unsigned i;

  for (i = 0; i < nplugins; i++)
    colo_plan_free (&gp->disk[i]);
}

/* Plan every disk's share of the epoch.  A disk whose base bitmap is
 * gone makes the whole epoch a full copy (*full).
 */
static int
plan_group (uint64_t epoch, const char *snap, bool *full,
            struct group_plan *gp, char *err, size_t errlen)
{
  char **names[COLOD_MAX_DISKS] = { NULL };
  size_t nnames[COLOD_MAX_DISKS] = { 0 };
  unsigned i;
  int c, rc = -1;

  memset (gp, 0, sizeof *gp);
  for (i = 0; i < nplugins && !*full; i++) {
    c = plugin_chain (&plugins[i], p.base, epoch, &names[i], &nnames[i], err,
                      errlen);
    if (c == -1)
      goto out;
    if (c == 1) {
      colod_log ("bitmap " PLUGIN_PREFIX "%" PRIu64 " is not on the "
                 "plugin %s: epoch %" PRIu64 " is a full copy", p.base,
                 plugins[i].socket, epoch);
      *full = true;
    }
  }
  for (i = 0; i < nplugins; i++) {
    if (colo_plan_epoch (plugins[i].nbd_uri, snap, *full,
                         (const char *const *) names[i], *full ? 0 : nnames[i],
                         *full ? NULL : p.extra[i], p.extra_bits[i],
                         colod.opt.max_extent, &gp->disk[i], err,
                         errlen) == -1)
      goto out;
    gp->n += gp->disk[i].n;
    gp->total_bytes += gp->disk[i].total_bytes;
    gp->zero_bytes += gp->disk[i].zero_bytes;
  }
  rc = 0;
 out:
  for (i = 0; i < nplugins; i++)
    plugin_free_names (names[i], nnames[i]);
  if (rc == -1)
    free_group_plan (gp);
  return rc;
}

/* The epoch is durable: record it, prune, and say so. */
static void
epoch_done (uint64_t epoch, const struct group_plan *plan, bool full,
            int64_t t0, int64_t wall0, int64_t ck0, int64_t ck1,
            int64_t drain_ns)
{
  unsigned i;

  id.acked = p.sec_committed = epoch;
  atomic_store (&p.acked, epoch);
  p.base = epoch;
  free_extra ();
  if (save_identity () == -1)
    colod_err ("the acknowledged epoch %" PRIu64 " could not be recorded",
               epoch);
  for (i = 0; i < nplugins; i++)
    plugin_prune (&plugins[i], 0, epoch);
  pthread_mutex_lock (&colod.lock);
  colod.st.last_committed = colod.st.last_applied = epoch;
  colod.st.committed_at_ms = wall0;
  colod.st.last_epoch = epoch;
  colod.st.last_epoch_bytes = plan->total_bytes;
  colod.st.last_epoch_extents = plan->n;
  for (i = 0; i < nplugins; i++) {
    colod.st.disk_epoch_bytes[i] = plan->disk[i].total_bytes;
    colod.st.disk_epoch_extents[i] = plan->disk[i].n;
  }
  colod.st.last_epoch_ms = monotonic_ms () - t0;
  colod.st.last_epoch_full = full;
  colod.st.epoch_in_flight = colod.st.bytes_in_flight = 0;
  colod.st.resync_remaining = 0;
  colod.st.epochs_durable++;
  pthread_mutex_unlock (&colod.lock);
  colod_event ("EPOCH_DURABLE",
               json_pack ("{s:I,s:I,s:I,s:I,s:I,s:b,s:I,s:I,s:I,s:i}",
                          "epoch", (json_int_t) epoch, "bytes",
                          (json_int_t) plan->total_bytes, "zero-bytes",
                          (json_int_t) plan->zero_bytes, "extents",
                          (json_int_t) plan->n, "duration-ms",
                          (json_int_t) (monotonic_ms () - t0), "full", full,
                          "checkpoint-start-us", (json_int_t) ck0,
                          "checkpoint-end-us", (json_int_t) ck1,
                          "drain-ns", (json_int_t) drain_ns,
                          "disks", (int) nplugins));
}

/* One epoch: checkpoint, plan, ship (again if refused), then prune.
 * 0, or -1 with err (the connection is then dropped).
 */
static int
run_epoch (char *err, size_t errlen)
{
  uint64_t epoch, gen_start = id.history[id.history_len - 1].start_epoch;
  int64_t t0 = monotonic_ms (), wall0 = colod_wall_ms (), ck0, ck1;
  int64_t drain_ns = -1;
  char snap[64];
  struct group_plan plan;
  bool full = p.base == 0;
  unsigned i;
  int attempt, sent = -1;

  if (last_checkpoint () > p.sec_committed &&
      (epoch = unsent_snapshot ()) != 0) {
    /* An epoch that failed: send its snapshot again rather than pile up
     * checkpoints (and frozen bitmaps) while the link is bad.
     */
    snprintf (snap, sizeof snap, PLUGIN_PREFIX "%" PRIu64, epoch);
    colod_warn ("epoch %" PRIu64 ": sending its snapshot again (the last "
                "attempt did not become durable)", epoch);
    ck0 = ck1 = 0;
  }
  else {
    epoch = last_checkpoint () > p.sec_committed ? last_checkpoint ()
      : p.sec_committed;
    if (epoch < gen_start - 1)
      epoch = gen_start - 1;
    epoch++;
    snprintf (snap, sizeof snap, PLUGIN_PREFIX "%" PRIu64, epoch);
    ck0 = colod_wall_us ();
    if (take_checkpoint (epoch, snap, &drain_ns, err, errlen) == -1)
      return -1;
    ck1 = colod_wall_us ();
  }
  for (i = 0; i < nplugins; i++)
    plugin_prune (&plugins[i], epoch, 0);
  if (plan_group (epoch, snap, &full, &plan, err, errlen) == -1)
    return -1;
  pthread_mutex_lock (&colod.lock);
  colod.st.epoch_in_flight = epoch;
  colod.st.bytes_in_flight = 0;
  colod.st.resync_remaining = full || have_extra () ||
    p.base < epoch - 1 ? plan.total_bytes : 0;
  pthread_mutex_unlock (&colod.lock);
  colod_debug ("epoch %" PRIu64 ": %" PRIu64 " extents, %" PRIu64 " bytes (%"
               PRIu64 " zero) of %u disk%s%s", epoch, plan.n,
               plan.total_bytes, plan.zero_bytes, nplugins,
               nplugins == 1 ? "" : "s", full ? ", full copy" : "");
  for (attempt = 0; attempt < COLOD_MAX_RESENDS && sent != 1; attempt++) {
    bool corrupt = attempt == 0 && colod.opt.debug_corrupt_epoch == epoch;
    sent = send_epoch (epoch, snap, &plan, full, corrupt, err, errlen);
    if (sent == -1)
      break;
  }
  if (sent == 0)
    snprintf (err, errlen, "epoch %" PRIu64 " refused %d times", epoch,
              COLOD_MAX_RESENDS);
  if (sent == 1)
    epoch_done (epoch, &plan, full, t0, wall0, ck0, ck1, drain_ns);
  else {
    pthread_mutex_lock (&colod.lock);
    colod.st.epoch_in_flight = colod.st.bytes_in_flight = 0;
    pthread_mutex_unlock (&colod.lock);
  }
  free_group_plan (&plan);
  return sent == 1 ? 0 : -1;
}

/* ---- the main loop ---- */

static void
disconnect (const char *why)
{
  if (p.hb) {
    /* Stopping: the heartbeat thread says so to the secondary itself
     * (within --hb-interval, or --hb-timeout if it waits for a reply).
     */
    if (!colod.stop) {
      atomic_store (&p.lost, true);
      colod_conn_abort (p.hb);
    }
    pthread_join (p.hb_thread, NULL);
  }
  colod_conn_close (p.hb);
  colod_conn_close (p.data);
  p.hb = p.data = NULL;
  pthread_mutex_lock (&colod.lock);
  colod.st.connection = "disconnected";
  colod.st.reconnects++;
  colod.st.epoch_in_flight = colod.st.bytes_in_flight = 0;
  pthread_mutex_unlock (&colod.lock);
  colod_event ("PEER_LOST", json_pack ("{s:s,s:s}", "peer", colod.opt.peer,
                                       "reason", why));
}

/* Connect both channels: 1 connected, 0 try again later, -1 refused. */
static int
connect_peer (struct colo_tls *tls, char *lasterr, size_t errlen)
{
  char err[1024];
  bool fatal = false;

  pthread_mutex_lock (&colod.lock);
  colod.st.connection = "connecting";
  pthread_mutex_unlock (&colod.lock);
  p.data = open_channel (tls, COLO_CHANNEL_DATA, &fatal, err, sizeof err);
  if (p.data)
    p.hb = open_channel (tls, COLO_CHANNEL_HEARTBEAT, &fatal, err,
                         sizeof err);
  if (p.hb == NULL) {
    colod_conn_close (p.data);
    p.data = NULL;
    if (fatal) {
      colod_err ("%s", err);
      set_refused (err);
      return -1;
    }
    if (strcmp (err, lasterr) != 0)       /* say it once, not every try */
      colod_warn ("cannot pair with %s: %s (trying again)", colod.opt.peer,
                 err);
    snprintf (lasterr, errlen, "%s", err);
    pthread_mutex_lock (&colod.lock);
    colod.st.connection = "disconnected";
    pthread_mutex_unlock (&colod.lock);
    return 0;
  }
  lasterr[0] = '\0';
  atomic_store (&p.lost, false);
  if (pthread_create (&p.hb_thread, NULL, hb_thread, NULL) != 0) {
    colod_conn_close (p.hb);
    colod_conn_close (p.data);
    p.hb = p.data = NULL;
    return 0;
  }
  pthread_mutex_lock (&colod.lock);
  colod.st.connection = "connected";
  colod.st.last_heartbeat_ms = monotonic_ms ();
  snprintf (colod.st.peer, sizeof colod.st.peer, "%s",
            colo_conn_peer (p.data->conn));
  snprintf (colod.st.peer_identity, sizeof colod.st.peer_identity, "%s",
            colo_conn_identity (p.data->conn));
  colod.st.refusal[0] = '\0';
  pthread_mutex_unlock (&colod.lock);
  colod_event ("PEER_CONNECTED",
               json_pack ("{s:s,s:s,s:I,s:I,s:b}", "peer", colod.st.peer,
                          "identity", colod.st.peer_identity,
                          "secondary-committed-epoch",
                          (json_int_t) p.sec_committed, "base-epoch",
                          (json_int_t) p.base, "diverged", have_extra ()));
  return 1;
}

/* Wait for the next epoch: the interval, a checkpoint request, or the
 * end; not at all when now (the first epoch after pairing: a full copy
 * or a catch-up goes at once, even with --interval 0).  Returns the
 * checkpoint ticket to serve.
 */
static uint64_t
wait_for_epoch (int64_t next, bool now)
{
  uint64_t ticket = 0;

  pthread_mutex_lock (&colod.lock);
  while (!now && !colod.stop && !atomic_load (&p.lost) &&
         colod.checkpoint_requests == colod.checkpoint_served &&
         (colod.opt.interval_ms == 0 || monotonic_ms () < next))
    colod_wait_ms (20);
  ticket = colod.checkpoint_requests;
  pthread_mutex_unlock (&colod.lock);
  return ticket;
}

static void
serve_checkpoints (uint64_t ticket, const char *error)
{
  pthread_mutex_lock (&colod.lock);
  if (ticket > colod.checkpoint_served) {
    colod.checkpoint_served = ticket;
    snprintf (colod.checkpoint_error, sizeof colod.checkpoint_error, "%s",
              error ? error : "");
  }
  pthread_cond_broadcast (&colod.cond);
  pthread_mutex_unlock (&colod.lock);
}

int
colod_run_primary (void)
{
  struct colo_tls *tls;
  char lasterr[1024] = "";
  bool first;
  unsigned i;
  int rc = 0;

  if (mkdir (colod.opt.state_dir, 0700) == -1 && errno != EEXIST) {
    colod_err ("mkdir: %s: %s", colod.opt.state_dir, strerror (errno));
    return COLOD_EXIT_ERROR;
  }
  if (init_identity () == -1)
    return COLOD_EXIT_ERROR;
  publish_identity ();
  if (colod_control_start (colod.opt.control) == -1 ||
      plugin_start (true) == -1)
    return COLOD_EXIT_ERROR;
  if (nplugins > 1)
    colod_log ("a consistency group of %u disks: every epoch is a group "
               "checkpoint of all of them", nplugins);
  tls = colo_tls_new (&colod.opt.tls);
  if (tls == NULL) {
    colod_err ("%s", colo_tls_last_error ());
    return COLOD_EXIT_ERROR;
  }
  colod_notice ("primary: peer %s, epochs every %d ms",
             colod.opt.peer, colod.opt.interval_ms);
  while (!colod.stop) {
    int c = connect_peer (tls, lasterr, sizeof lasterr);
    int64_t next;

    if (c == -1) {
      rc = COLOD_EXIT_REFUSED;
      break;
    }
    if (c == 0) {
      uint64_t t;
      pthread_mutex_lock (&colod.lock);
      t = colod.checkpoint_requests;
      pthread_mutex_unlock (&colod.lock);
      serve_checkpoints (t, "checkpoint: the secondary is not connected");
      colod_sleep_ms (1000);
      continue;
    }
    next = monotonic_ms ();
    first = true;
    while (!colod.stop && !atomic_load (&p.lost)) {
      char err[1024] = "";
      uint64_t ticket = wait_for_epoch (next, first);
      first = false;
      if (colod.stop || atomic_load (&p.lost))
        break;
      next = monotonic_ms () + colod.opt.interval_ms;
      if (run_epoch (err, sizeof err) == -1) {
        colod_err ("%s", err);
        serve_checkpoints (ticket, err);
        if (!atomic_load (&p.lost))
          colod_send_error (p.data, COLO_ERROR_INTERNAL, err);
        break;
      }
      serve_checkpoints (ticket, NULL);
    }
    disconnect (colod.stop ? "stopping" : "the connection failed");
    colod_sleep_ms (colod.stop ? 0 : 500);
  }
  colo_tls_free (tls);
  for (i = 0; i < nplugins; i++)
    ctlc_close (plugins[i].ctl);
  free_extra ();
  return rc;
}
