#!/usr/bin/env bash
# The plugin logs every event, so that an alert is not lost when no
# client of the control socket listens: a SNAPSHOT_BROKEN that nobody
# subscribed to is in nbdkit's log (stderr), and, when stderr is the
# journal (JOURNAL_STREAM names it, as systemd sets it), a journal
# record with its priority and fields FLEECE_EVENT, FLEECE_SNAPSHOT,
# FLEECE_REASON.  journald is stood in for by tests/journal-listen.py on
# /run/systemd/journal/socket, in a tmpfs mounted in this test's own
# mount namespace (the test re-executes itself under unshare -m).
if [ -z "${FLEECE_IN_NS:-}" ]; then
  exec env FLEECE_IN_NS=1 unshare -m --propagation private bash "$0" "$@"
fi
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version

# break NAME: a snapshot, then a write whose copy fails (the debug flag
# fails every store write): SNAPSHOT_BROKEN, with nobody subscribed.
break_snapshot ()
{
  ctl "$1" snapshot create s && qio "$1" "" "write -P 0x44 0 64k" >/dev/null
}

make_disk "$tmp/disk" 4M 0x11
ok "nbdkit starts (stderr)" start_nbdkit e -D fleece.fail_store_write=1 -- \
   disk="$tmp/disk" store="$tmp/store" control="$tmp/e.ctl"
ok "a snapshot breaks with no subscriber" break_snapshot e
ok "the event is in nbdkit's log" wait_for 5 grep -q \
   "error: event SNAPSHOT_BROKEN: snapshot 's': " "$tmp/e.log"
ok "nbdkit stops cleanly" stop_nbdkit e

# --- the journal ---
ok "a stand-in journald listens" start_journal

# nbdkit's stderr is a file whose device and inode JOURNAL_STREAM names,
# as systemd names the stream it connects.
: >"$tmp/j.log"
stream=$(stat -c '%d:%i' "$tmp/j.log")
rm -f "$tmp/j.sock"
env JOURNAL_STREAM="$stream" \
  ${FLEECE_ASAN_PRELOAD:+LD_PRELOAD="$FLEECE_ASAN_PRELOAD"} \
  $VG nbdkit -f -U "$tmp/j.sock" -D fleece.fail_store_write=1 "$FLEECE_PLUGIN" \
  disk="$tmp/disk" store="$tmp/store2" control="$tmp/j.ctl" >>"$tmp/j.log" 2>&1 &
echo $! >"$tmp/j.pid"
ok "nbdkit starts (journal)" _started "nbdkit j" "$tmp/j.sock" "$tmp/j.pid" "$tmp/j.log"
ok "a snapshot breaks with no subscriber" break_snapshot j
ok "a journal record came" wait_for 5 grep -q SNAPSHOT_BROKEN "$tmp/journal"
rec=$(grep SNAPSHOT_BROKEN "$tmp/journal" | head -1)
diag "$rec"
is "$(jget "$rec" 'd["FLEECE_EVENT"]')" SNAPSHOT_BROKEN "FLEECE_EVENT"
is "$(jget "$rec" 'd["FLEECE_SNAPSHOT"]')" s "FLEECE_SNAPSHOT"
is "$(jget "$rec" 'd["PRIORITY"]')" 3 "PRIORITY 3 (err)"
ok "FLEECE_REASON says why" grep -q "injected error" <<<"$(jget "$rec" 'd["FLEECE_REASON"]')"
ok "MESSAGE is the line nbdkit would log" \
   grep -q "^event SNAPSHOT_BROKEN: snapshot 's': " <<<"$(jget "$rec" 'd["MESSAGE"]')"
ok "not also written to stderr" eval '! grep -q SNAPSHOT_BROKEN "$tmp/j.log"'
ok "nbdkit stops cleanly" stop_nbdkit j
