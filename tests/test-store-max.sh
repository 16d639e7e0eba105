#!/usr/bin/env bash
# store-max caps the store: once full, copy-before-write fails and the
# on-cbw-error policy applies (break-snapshot: the live write succeeds and
# the snapshot breaks, saying why; fail-write: the write fails with
# ENOSPC and nothing changes).  store-warn sends STORE_HIGH_WATER once
# when the store passes the mark, and again after it dropped below.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version

disk=$tmp/disk
make_disk "$disk" 8M 0x21

# --- bad parameters ---
nbd () { nbdkit_once -f -U "$tmp/x.sock" "$FLEECE_PLUGIN" "$@"; }
ok_fails "store-max smaller than a cluster" "store-max=1024 is smaller than one cluster" \
  nbd disk="$disk" store="$tmp/st" store-max=1K
ok_fails "store-warn out of range" "store-warn=101: expected a percentage" \
  nbd disk="$disk" store="$tmp/st" store-max=1M store-warn=101
ok_fails "store-warn zero" "store-warn=0: expected a percentage" \
  nbd disk="$disk" store="$tmp/st" store-max=1M store-warn=0
ok_fails "store-warn without store-max" "store-warn needs store-max" \
  nbd disk="$disk" store="$tmp/st" store-warn=50

# --- break-snapshot with a 1 MiB store (16 clusters of 64 KiB) ---
ok "nbdkit starts with store-max=1M store-warn=50" start_nbdkit b -- \
   disk="$disk" store="$tmp/store" control="$tmp/b.ctl" store-max=1M \
   store-warn=50
is "$(jget "$(ctl b --json status)" 'd["store-max"]')" 1048576 "status shows store-max"
is "$(jget "$(ctl b --json stats)" 'd["store-max-bytes"]')" 1048576 "stats show store-max"
watch_events "$tmp/b.ctl" "$tmp/events" 30
sleep 0.5
ok "snapshot create s" ctl b snapshot create s
ok "write 7 clusters: below the mark" qio b "" "write -P 0x31 0 448k"
sleep 0.3
ok "no high-water event yet" sh -c "! grep -q STORE_HIGH_WATER '$tmp/events'"
ok "write an 8th cluster: at the mark" qio b "" "write -P 0x31 448k 64k"
ok "write more" qio b "" "write -P 0x31 512k 128k"
sleep 0.3
is "$(grep -c STORE_HIGH_WATER "$tmp/events")" 1 "one STORE_HIGH_WATER event"
ok "it names the copy and the sizes" \
   grep -q 'a copy of 65536 bytes took the store from 458752 to 524288 of at most 1048576 bytes (store-warn at 524288 bytes)' "$tmp/events"
cp "$disk" "$tmp/before-overflow"
ok "a write past store-max still succeeds (break-snapshot)" \
   qio b "" "write -P 0x41 1M 2M"
ok "live disk has it" qio b "" "read -P 0x41 1M 2M"
ok_fails "the snapshot fails reads" "Input/output error" qio b snapshot/s "read 0 64k"
reason=$(jget "$(ctl b --json snapshot list)" 'd[0].get("broken-reason", "")')
diag "reason: $reason"
ok "the reason names store-max" grep -q 'store-max of 1048576 bytes reached' <<<"$reason"
# A broken snapshot is logged once, however many reads fail, and its
# copies are freed at once: the full store recovers without a delete.
ok_fails "a second read of the broken snapshot fails" "Input/output error" \
   qio b snapshot/s "read 64k 64k"
ok_fails "a pull of the broken snapshot fails" "." \
   nbdcopy "$(snap_uri b s)" "$tmp/broken.img"
is "$(grep -c "snapshot 's' is broken" "$tmp/b.log")" 1 \
   "the server logged the broken snapshot once"
is "$(jget "$(ctl b --json stats)" 'd["store-bytes-used"]')" 0 \
   "the broken snapshot's copies were freed without a delete"
is "$(jget "$(ctl b --json snapshot list)" '[x["name"] for x in d]')" "['s']" \
   "the broken snapshot is still listed"
is "$(jget "$(ctl b --json snapshot list)" 'd[0]["clusters-held"]')" 0 \
   "and holds no copies"
ok "snapshot create t next to the broken s" ctl b snapshot create t
cp "$disk" "$tmp/ref-t"
ok "live writes copy again for t" qio b "" "write -P 0x45 0 448k"
is "$(jget "$(ctl b --json stats)" 'd["store-bytes-used"]')" 458752 \
   "the store holds t's copies"
is "$(jget "$(ctl b --json snapshot list)" 'd[1]["broken"]')" False "t is not broken"
ok "pull t" pull b t "$tmp/t.img"
is "$(sum "$tmp/t.img")" "$(sum "$tmp/ref-t")" "t equals the disk at its creation"
ok "snapshot delete t" ctl b snapshot delete t
ok "snapshot delete s" ctl b snapshot delete s
is "$(jget "$(ctl b --json stats)" 'd["store-bytes-used"]')" 0 "store empty again"
ok "snapshot create s2" ctl b snapshot create s2
ok "fill past the mark again" qio b "" "write -P 0x51 4M 576k"
sleep 0.5
kill "$events_pid" 2>/dev/null; wait "$events_pid" 2>/dev/null
is "$(grep -c STORE_HIGH_WATER "$tmp/events")" 2 "the warning was re-armed below the mark"
ok "STORE_HIGH_WATER names no snapshot" sh -c "! grep STORE_HIGH_WATER '$tmp/events' | grep -q '\"snapshot\"'"
ok "nbdkit b stops cleanly" stop_nbdkit b

# --- a copy bigger than the whole store passes the mark and fails ---
# STORE_HIGH_WATER says which copy did not fit, not that an empty store
# holds 0 bytes.
ok "nbdkit starts with store-max=128K store-warn=50" start_nbdkit w -- \
   disk="$disk" store="$tmp/store-w" control="$tmp/w.ctl" store-max=128K \
   store-warn=50
watch_events "$tmp/w.ctl" "$tmp/events-w" 30
sleep 0.5
ok "snapshot create s" ctl w snapshot create s
ok "a 256 KiB write (break-snapshot)" qio w "" "write -P 0x71 0 256k"
sleep 0.5
kill "$events_pid" 2>/dev/null; wait "$events_pid" 2>/dev/null
diag "$(grep STORE_HIGH_WATER "$tmp/events-w")"
is "$(grep -c STORE_HIGH_WATER "$tmp/events-w")" 1 "one STORE_HIGH_WATER event"
ok "it names the copy that did not fit" \
   grep -q 'a copy of 262144 bytes did not fit: the store held 0 of at most 131072 bytes (store-warn at 65536 bytes); it holds 0 bytes now' \
   "$tmp/events-w"
ok "nbdkit w stops cleanly" stop_nbdkit w

# --- persistent: a broken snapshot's slots are reused, and a crash ---
# s breaks on a copy that only it needs (t released those clusters); its
# copies are freed once its BROKEN record is stable, t's copies reuse
# their slots, and the store loads after a kill -9 with s broken and t
# intact.
qemu-io -f raw -c 'write -P 0x21 0 8M' "$disk" >/dev/null
ok "nbdkit starts persistent with store-max=512K" start_nbdkit p -- \
   disk="$disk" store="$tmp/store-p" control="$tmp/p.ctl" store-max=512K \
   persistent=true
ok "snapshot create s" ctl p snapshot create s
ok "4 copies for s" qio p "" "write -P 0x51 0 256k"
ok "snapshot create t" ctl p snapshot create t
cp "$disk" "$tmp/ref-pt"
ok "t's client releases 4M-8M" qio p snapshot/t "discard 4M 4M"
ok "a 1 MiB write that only s needs copies of (break-snapshot)" \
   qio p "" "write -P 0x52 4M 1M"
is "$(jget "$(ctl p --json snapshot list)" '[x["broken"] for x in d]')" \
   "[True, False]" "s broke, t did not"
is "$(jget "$(ctl p --json stats)" 'd["store-bytes-used"]')" 0 \
   "s's copies were freed once its BROKEN record was stable"
ok "7 copies for t reuse s's slots" qio p "" "write -P 0x53 0 448k"
is "$(jget "$(ctl p --json snapshot list)" 'd[1]["broken"]')" False "t is not broken"
pid=$(cat "$tmp/p.pid")
kill -9 "$pid"
wait "$pid" 2>/dev/null
ok "nbdkit p is gone after kill -9" sh -c "! kill -0 $pid 2>/dev/null"
ok "nbdkit restarts on the store" start_nbdkit p -- \
   disk="$disk" store="$tmp/store-p" control="$tmp/p.ctl" store-max=512K \
   persistent=true
is "$(jget "$(ctl p --json snapshot list)" '[(x["name"], x["broken"]) for x in d]')" \
   "[('s', True), ('t', False)]" "after the crash: s broken, t intact"
ok "pull t" pull p t "$tmp/pt.img"
ok "t equals the disk at its creation (up to what its client released)" \
   cmp -n 4194304 "$tmp/pt.img" "$tmp/ref-pt"
ok "nbdkit p stops cleanly" stop_nbdkit p

# --- fail-write with a 256 KiB store ---
qemu-io -f raw -c 'write -P 0x21 0 8M' "$disk" >/dev/null
cp "$disk" "$tmp/ref"
ok "nbdkit starts (fail-write, store-max=256K)" start_nbdkit f -- \
   disk="$disk" store="$tmp/store2" control="$tmp/f.ctl" store-max=256K \
   on-cbw-error=fail-write
ok "snapshot create s" ctl f snapshot create s
ok "a write that fits" qio f "" "write -P 0x61 0 192k"
cp "$disk" "$tmp/ref-after-fit"
ok_fails "a write past store-max fails with ENOSPC" "No space left on device" \
   qio f "" "write -P 0x62 1M 1M"
is "$(sum "$disk")" "$(sum "$tmp/ref-after-fit")" "the failed write changed nothing"
ok "pull s" pull f s "$tmp/s.img"
is "$(sum "$tmp/s.img")" "$(sum "$tmp/ref")" "snapshot intact"
is "$(jget "$(ctl f --json snapshot list)" 'd[0]["broken"]')" False "not broken"
ok "nbdkit f stops cleanly" stop_nbdkit f
