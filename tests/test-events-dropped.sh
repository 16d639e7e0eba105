#!/usr/bin/env bash
# Events that the control service cannot queue are dropped, never waited
# for (the engine does not hold up I/O for a listener), and then said to
# be dropped: a warning in nbdkit's log and the event EVENTS_DROPPED,
# with their count by kind, after the events that were delivered.  Before
# this, a full queue only left a debug message, and a subscriber missed
# a SNAPSHOT_BROKEN without knowing.
#
# -D fleece.ctl_max_events=1: one event queued at most.  The control
# service is kept busy by a snapshot creation that sleeps before its
# image (-D fleece.create_image_delay_ms=1500); meanwhile a write whose
# copy fails (-D fleece.fail_store_write=1) breaks the four snapshots
# that need it: four SNAPSHOT_BROKEN events, one queued, three dropped.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
plan 11

disk=$tmp/disk
make_disk "$disk" 8M 0x21 || exit 1
ok "nbdkit starts: 1 event queued at most, creations slowed, store writes fail" \
   start_nbdkit p -D fleece.ctl_max_events=1 \
     -D fleece.create_image_delay_ms=1500 -D fleece.fail_store_write=1 -- \
     disk="$disk" store="$tmp/store" control="$tmp/p.ctl"
watch_events "$tmp/p.ctl" "$tmp/events" 30
ok "snapshots s1, s2, s3" \
   eval 'ctl p snapshot create s1 && ctl p snapshot create s2 &&
         ctl p snapshot create s3'
ctl p snapshot create s4 >"$tmp/s4.out" 2>&1 &
s4=$!
sleep 0.5                       # s4 exists, the service sleeps
ok "a write whose copy fails, while the service is busy" \
   qio p "" "write -P 0x41 0 4k"
ok "snapshot create s4 returns" wait "$s4"
broken () { jget "$(ctl p --json snapshot list)" \
                 'sum(1 for s in d if s["broken"])'; }
is "$(broken)" 4 "the four snapshots are broken"
got_dropped () { grep -q EVENTS_DROPPED "$tmp/events"; }
ok "EVENTS_DROPPED came" wait_for 10 got_dropped
kill "$events_pid" 2>/dev/null; wait "$events_pid" 2>/dev/null
diag "$(cat "$tmp/events")"
is "$(grep -c '^{"event":"SNAPSHOT_BROKEN"' "$tmp/events")" 1 \
   "one SNAPSHOT_BROKEN delivered (the one queued)"
ev=$(grep EVENTS_DROPPED "$tmp/events")
is "$(jget "$ev" 'd["data"]["count"]')/$(jget "$ev" 'd["data"]["events"]')" \
   "3/{'SNAPSHOT_BROKEN': 3}" "it counts the 3 dropped, by kind"
ok "it comes after the delivered event" \
   sh -c "tail -1 '$tmp/events' | grep -q EVENTS_DROPPED"
ok "nbdkit logged the drop as a warning" \
   grep -q "3 events were dropped (SNAPSHOT_BROKEN 3): more than 1 waited" \
   "$tmp/p.log"
ok "nbdkit stops cleanly" stop_nbdkit p
