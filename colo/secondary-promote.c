/* fleece-colod secondary: failover and promotion (secondary.c's note
 * describes the role and the failover states).
 *
 * The monitor thread judges the primary's signs of life every 100 ms:
 * only an authenticated primary's data HELLO and heartbeats count.  After
 * --hb-timeout without them the state is REQUIRE; with --auto-failover,
 * or on `fleece-colod promote', this side promotes: it drops the
 * connections, recovers the journal's committed epoch onto the disk,
 * starts a generation of its own, lets go of the disk's locks, and runs
 * --on-promote.  A promotion that fails leaves the side a secondary.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fleece.h"
#include "clock.h"
#include "colod.h"
#include "events.h"
#include "journal.h"
#include "log.h"
#include "secondary-internal.h"
#include "state.h"

/* A store for the plugin the operator starts on the promoted disk, with
 * a checkpoint bitmap colo-EPOCH recording from the first write: what a
 * later failback sends back (the promoted side's changes).
 */
static int
prepare_store (unsigned d, uint64_t epoch, char *err, size_t errlen)
{
  struct fleece_config cfg = {
    .disk = colod.opt.disks[d], .store = colod.opt.promote_stores[d],
    .cluster_size = journal_get_state (sec.j)->cluster_size,
    .persistent = true,
  };
  char name[64];
  struct fleece *fl = fleece_open (&cfg);

  snprintf (name, sizeof name, "colo-%" PRIu64, epoch);
  if (fl == NULL || fleece_start (fl) == -1 ||
      fleece_checkpoint_create (fl, name) == -1 ||
      fleece_snapshot_delete (fl, name) == -1) {
    snprintf (err, errlen, "--promote-store %s: %s",
              colod.opt.promote_stores[d], fleece_last_error ());
    if (fl)
      fleece_close (fl);
    return -1;
  }
  fleece_close (fl);
  colod_log ("store %s made, with bitmap %s recording from the first write",
             colod.opt.promote_stores[d], name);
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
    colod_err ("--on-promote: fork: %s", strerror (errno));
    return -1;
  }
  if (pid == 0) {
    unsigned i;
    char name[64], n[16];

    setenv ("FLEECE_COLOD_DISK", colod.opt.disk, 1);
    /* A group: every disk (and its store), numbered from 0. */
    snprintf (n, sizeof n, "%u", colod.opt.ndisks);
    setenv ("FLEECE_COLOD_DISKS", n, 1);
    for (i = 0; i < colod.opt.ndisks; i++) {
      snprintf (name, sizeof name, "FLEECE_COLOD_DISK_%u", i);
      setenv (name, colod.opt.disks[i], 1);
      snprintf (name, sizeof name, "FLEECE_COLOD_STORE_%u", i);
      if (i < colod.opt.npromote_stores)
        setenv (name, colod.opt.promote_stores[i], 1);
    }
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
    colod_err ("--on-promote '%s' failed (%s %d)", colod.opt.on_promote,
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
  unsigned i;

  colod_set_failover (FAILOVER_ACTIVE, why);
  pthread_mutex_lock (&colod.lock);
  sec.promoted = true;            /* refuse primaries from now on */
  pthread_mutex_unlock (&colod.lock);
  secondary_drop_channels ();

  pthread_mutex_lock (&sec.jlock);
  if (sec.j == NULL || journal_get_state (sec.j)->committed_epoch == 0) {
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
  if (journal_recover (sec.j) == -1 ||
      getrandom (gen, sizeof gen, 0) != sizeof gen) {
    snprintf (err, sizeof err, "%s", journal_error (sec.j));
    goto fail;
  }
  epoch = journal_get_state (sec.j)->committed_epoch;
  if (journal_new_generation (sec.j, gen, epoch + 1) == -1) {
    snprintf (err, sizeof err, "%s", journal_error (sec.j));
    goto fail;
  }
  secondary_publish_journal ();
  if (secondary_write_promoted (gen) == -1)
    colod_warn ("a restart of this daemon will not know it was promoted: "
               "start it with the same --state only as a primary");
  secondary_unlock_disk ();               /* for the server that takes over */
  for (i = 0; i < colod.opt.npromote_stores; i++)
    if (prepare_store (i, epoch, err, sizeof err) == -1)
      colod_warn ("%s: a later failback will need a full copy", err);
  pthread_mutex_unlock (&sec.jlock);
  colod_hex (gen, 16, hex);
  if (colod.opt.ndisks > 1)
    colod_notice ("promoted at epoch %" PRIu64 ": generation %s; the %u "
                  "disks of the group (%s ...) are ready to serve, all at "
                  "that epoch", epoch, hex, colod.opt.ndisks, colod.opt.disk);
  else
    colod_notice ("promoted at epoch %" PRIu64 ": generation %s; the disk %s "
                  "is ready to serve", epoch, hex, colod.opt.disk);
  if (colod.opt.on_promote)
    run_on_promote (epoch, hex);
  pthread_mutex_lock (&colod.lock);
  colod.promote_requested = false;
  colod.promote_error[0] = '\0';
  pthread_mutex_unlock (&colod.lock);
  colod_set_failover (FAILOVER_COMPLETED, "promoted");
  return;
 fail:
  pthread_mutex_unlock (&sec.jlock);
  colod_err ("promotion failed: %s", err);
  pthread_mutex_lock (&colod.lock);
  sec.promoted = false;
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
  last = sec.started_ms;
  if (colod.st.last_heartbeat_ms > last)
    last = colod.st.last_heartbeat_ms;
  if (sec.paired_ms > last)
    last = sec.paired_ms;
  paired = colod.st.last_committed > 0;
  stopped = sec.primary_stopped;
  pthread_mutex_unlock (&colod.lock);
  if (f == FAILOVER_COMPLETED)
    return;
  if (f == FAILOVER_NONE && paired && !stopped &&
      now - last > colod.opt.hb_timeout_ms) {
    char why[128];
    snprintf (why, sizeof why, "no heartbeat from the primary for %" PRId64
              " ms", now - last);
    sec.require_since = now;
    colod_event ("PEER_LOST", json_pack ("{s:s}", "reason", why));
    colod_set_failover (FAILOVER_REQUIRE, why);
    f = FAILOVER_REQUIRE;
  }
  if (f == FAILOVER_REQUIRE && last > sec.require_since) {
    colod_set_failover (FAILOVER_NONE, "heartbeats are back");
    return;
  }
  if (req)
    promote ("fleece-colod promote");
  else if (f == FAILOVER_REQUIRE && colod.opt.auto_failover)
    promote ("--auto-failover: the primary is gone");
}

void *
secondary_monitor_thread (void *arg)
{
  (void) arg;
  while (!colod.stop) {
    watch ();
    colod_sleep_ms (100);
  }
  return NULL;
}
