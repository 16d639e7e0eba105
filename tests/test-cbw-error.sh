#!/usr/bin/env bash
# A full or failing store (invariant 6): with on-cbw-error=break-snapshot
# the live write succeeds and the snapshot breaks loudly (EIO, event,
# reason in the list); with fail-write the live write fails and nothing
# changes.  Either way no snapshot returns wrong data.
#
# The store lives on a 512 KiB tmpfs mounted in this test's own mount
# namespace (the test re-executes itself under unshare -m).
if [ -z "${FLEECE_IN_NS:-}" ]; then
  exec env FLEECE_IN_NS=1 unshare -m --propagation private bash "$0" "$@"
fi
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version

disk=$tmp/disk
make_disk "$disk" 8M 0x21
mkdir "$tmp/small"
mount -t tmpfs -o size=512k tmpfs "$tmp/small"
cleanup_fn "umount '$tmp/small'"

# --- break-snapshot (the default) ---
ok "nbdkit starts (break-snapshot)" start_nbdkit b -- disk="$disk" \
   store="$tmp/small/store" control="$tmp/b.ctl"
ok "snapshot create s" ctl b snapshot create s
watch_events "$tmp/b.ctl" "$tmp/events" 20
sleep 0.5
ok "live write succeeds although the store is full" \
   qio b "" "write -P 0x99 0 4M"
ok "live disk has the new data" qio b "" "read -P 0x99 0 4M"
ok_fails "broken snapshot fails reads with EIO" "Input/output error" \
   qio b snapshot/s "read 0 64k"
ok_fails "nbdcopy of the broken snapshot fails" "." \
   nbdcopy "$(snap_uri b s)" "$tmp/broken.img"
list=$(ctl b snapshot list)
diag "$list"
ok "snapshot list says broken" grep -qi 'broken' <<<"$list"
js=$(ctl b --json snapshot list)
reason=$(jget "$js" 'd[0].get("broken-reason", "")')
diag "reason: $reason"
ok "the reason names the store error" grep -q 'No space left on device' <<<"$reason"
sleep 0.5
kill "$events_pid" 2>/dev/null; wait "$events_pid" 2>/dev/null
ok "SNAPSHOT_BROKEN event sent" grep -q '"event": *"SNAPSHOT_BROKEN"' "$tmp/events"
ok "event names the snapshot" grep -q '"snapshot": *"s"' "$tmp/events"
errs=$(jget "$(ctl b --json stats)" 'd["cbw-errors"]')
ok "stats count the copy failure ($errs)" test "$errs" -ge 1
ok "snapshot delete of a broken snapshot" ctl b snapshot delete s
ok "nbdkit b stops cleanly" stop_nbdkit b

# --- fail-write ---
rm -f "$tmp/small/store"
qemu-io -f raw -c 'write -P 0x21 0 8M' "$disk" >/dev/null
cp "$disk" "$tmp/ref"
ok "nbdkit starts (fail-write)" start_nbdkit f -- disk="$disk" \
   store="$tmp/small/store" control="$tmp/f.ctl" on-cbw-error=fail-write
ok "snapshot create s" ctl f snapshot create s
ok_fails "live write fails with the store's error" "No space left on device" \
   qio f "" "write -P 0x99 0 4M"
is "$(sum "$disk")" "$(sum "$tmp/ref")" "live disk unchanged by the failed write"
ok "a write that fits still works" qio f "" "write -P 0x42 7M 64k"
ok "pull s" pull f s "$tmp/s.img"
is "$(sum "$tmp/s.img")" "$(sum "$tmp/ref")" "snapshot intact"
is "$(jget "$(ctl f --json snapshot list)" 'd[0]["broken"]')" False \
   "snapshot not broken"
ok "nbdkit f stops cleanly" stop_nbdkit f

# --- injected store I/O error (nbdkit -D fleece.fail_store_write=1) ---
qemu-io -f raw -c 'write -P 0x21 0 8M' "$disk" >/dev/null
ok "nbdkit starts (fault injection)" start_nbdkit i -D fleece.fail_store_write=1 \
   -- disk="$disk" store="$tmp/store" control="$tmp/i.ctl"
ok "snapshot create s" ctl i snapshot create s
ok "live write succeeds" qio i "" "write -P 0x98 0 64k"
ok_fails "snapshot read fails with EIO" "Input/output error" \
   qio i snapshot/s "read 0 64k"
reason=$(jget "$(ctl i --json snapshot list)" 'd[0].get("broken-reason", "")')
ok "reason names the injected error" grep -q 'injected error' <<<"$reason"
ok "nbdkit i stops cleanly" stop_nbdkit i

# --- injected live-disk errors reach the client, and change nothing ---
qemu-io -f raw -c 'write -P 0x21 0 8M' "$disk" >/dev/null
cp "$disk" "$tmp/ref-disk"
ok "nbdkit starts (fail_disk_write)" start_nbdkit w -D fleece.fail_disk_write=1 \
   -- disk="$disk" store="$tmp/store-w" control="$tmp/w.ctl"
ok_fails "a live write fails with EIO" "Input/output error" \
   qio w "" "write -P 0x77 0 64k"
ok "reads still work" qio w "" "read -P 0x21 0 64k"
ok "snapshot create s" ctl w snapshot create s
ok_fails "a write after the snapshot fails too" "Input/output error" \
   qio w "" "write -P 0x77 1M 64k"
ok "the snapshot still reads the old data" qio w snapshot/s "read -P 0x21 1M 64k"
is "$(sum "$disk")" "$(sum "$tmp/ref-disk")" "the disk is unchanged"
ok "the server logs the injected error" grep -q 'injected error (fleece.fail_disk_write)' "$tmp/w.log"
ok "nbdkit w stops cleanly" stop_nbdkit w
ok "nbdkit starts (fail_disk_read)" start_nbdkit r -D fleece.fail_disk_read=1 \
   -- disk="$disk" store="$tmp/store-r" control="$tmp/r.ctl"
ok_fails "a live read fails with EIO" "Input/output error" \
   qio r "" "read 0 64k"
ok "snapshot create s" ctl r snapshot create s
ok_fails "a snapshot read of live data fails with EIO" "Input/output error" \
   qio r snapshot/s "read 0 64k"
ok_fails "a write whose old data cannot be read fails" "Input/output error" \
   qio r "" "write -P 0x78 2M 64k"
is "$(sum "$disk")" "$(sum "$tmp/ref-disk")" "the disk is still unchanged"
ok "nbdkit r stops cleanly" stop_nbdkit r
