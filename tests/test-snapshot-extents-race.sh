#!/usr/bin/env bash
# Snapshot extents never report a hole for a cluster that was data when
# the snapshot was taken, even when a live trim copies it and punches it
# out of the disk while the extents request is asking the disk
# (invariant 1; issue 19).  The extents of a snapshot ask the disk's
# allocation with no lock held, then locate every cluster again:
# -D fleece.live_read_delay_us holds a request after it found every
# cluster live and before it asks the disk, while qemu-io trims the live
# export: the disk then answers with the hole the trim punched.  Real clients: nbdinfo, qemu-io,
# nbdcopy, fleecectl.
#
# FLEECE_BREAK_ISOLATION=1 passes -D fleece.skip_isolation_check=1, which
# makes the extents believe the disk's stale answer: the test must then
# fail, showing that it can.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires nbdinfo --version
requires qemu-io --version
requires nbdcopy --version

disk=$tmp/disk
head -c 4M /dev/urandom >"$disk"
cp "$disk" "$tmp/ref"
flags=(-D fleece.live_read_delay_us=1500000)
[ -n "${FLEECE_BREAK_ISOLATION:-}" ] && flags+=(-D fleece.skip_isolation_check=1)
ok "nbdkit starts" start_nbdkit s "${flags[@]}" -- disk="$disk" \
   store="$tmp/store" control="$tmp/s.ctl" cluster-size=64K
ok "snapshot create s" ctl s snapshot create s

# One extents request over the whole snapshot, held 1.5 s after it
# found every cluster live; meanwhile 1M..2M is trimmed live (copied,
# then punched out of the disk), so the disk's answer has a hole there.
t0=${EPOCHREALTIME/./}
timeout -k 5 30 nbdinfo --map "$(snap_uri s s)" >"$tmp/map" 2>&1 &
map_pid=$!
cleanup_fn "kill $map_pid 2>/dev/null"
sleep 0.5
ok "trim 1M..2M on the live export during the request" \
   qio s "" "discard 1M 1M"
t1=${EPOCHREALTIME/./}
ok "nbdinfo --map of the snapshot succeeds" wait "$map_pid"
t2=${EPOCHREALTIME/./}
ok "the trim finished while the request was held ($(( (t1 - t0) / 1000 )) ms < $(( (t2 - t0) / 1000 )) ms)" \
   test "$t1" -lt "$t2"
diag "snapshot map during the trim: $(tr '\n' ';' <"$tmp/map")"
ok "the snapshot is all data: no hole where the trim raced" \
   grep -Eq '^ *0 +4194304 +0 +data' "$tmp/map"

ok "the disk has a hole at 1M..2M now" \
   bash -c "nbdinfo --map '$(live_uri s)' | grep -Eq '^ *1048576 +1048576 +3 +hole,zero'"
ok "a new map of the snapshot is still all data" \
   bash -c "nbdinfo --map '$(snap_uri s s)' | grep -Eq '^ *0 +4194304 +0 +data'"
ok "pull the snapshot" pull s s "$tmp/out"
is "$(sum "$tmp/out")" "$(sum "$tmp/ref")" "the pull equals the disk at snapshot time"
ok "nbdkit stops" stop_nbdkit s
