#!/usr/bin/env bash
# persistent=true under store trouble (docs/durability.md): a full store
# (store-max) under both on-cbw-error policies, injected store-data and
# metadata write errors, and a slow store with cbw-timeout; each followed
# by a kill -9 and a restart, after which the outcome must still hold:
# a broken snapshot stays broken with its reason, an intact one is exact,
# a write that failed left nothing on the live disk.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version

disk=$tmp/disk
make_disk "$disk" 8M 0x21

# start NAME STORE [nbdkit args] -- [plugin args]
start ()
{
  local name=$1 store=$2; shift 2
  local pre=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do pre+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  start_nbdkit "$name" "${pre[@]}" -- disk="$disk" store="$store" \
    control="$tmp/$name.ctl" persistent=true "$@"
}
crash () { crash_nbdkit "$1"; }
snapinfo () { jget "$(ctl "$1" --json snapshot list)" "[s.get('$3', '') for s in d if s['name'] == '$2'][0]"; }
now_ms () { echo $(( $(date +%s%N) / 1000000 )); }

# --- store-max, break-snapshot ---
ok "start (store-max=256K, break-snapshot)" start b "$tmp/sb" -- store-max=256K
ok "snapshot create s" ctl b snapshot create s
ok "a write past store-max succeeds" qio b "" "write -P 0x31 0 1M"
is "$(snapinfo b s broken)" True "s is broken"
reason=$(snapinfo b s broken-reason)
ok "the reason names store-max" grep -q "store-max of 262144 bytes reached" <<<"$reason"
live=$(sum "$disk")
crash b
ok "restart after kill -9" start b "$tmp/sb" -- store-max=256K
is "$(snapinfo b s broken)" True "s is still broken"
is "$(snapinfo b s broken-reason)" "$reason" "with the same reason"
ok_fails "its export fails reads" "Input/output error" qio b snapshot/s "read 0 64k"
ok_fails "fleece-backup refuses it and says where the reason is" \
  "Input/output error; if the snapshot is broken, 'fleecectl snapshot list'" \
  fleece-backup "$(snap_uri b s)" "$tmp/b.img"
is "$(sum "$disk")" "$live" "the acknowledged write is on the live disk"
ok "snapshot delete s" ctl b snapshot delete s
ok "nbdkit stops cleanly" stop_nbdkit b

# --- store-max, fail-write ---
qemu-io -f raw -c 'write -P 0x22 0 8M' "$disk" >/dev/null
cp "$disk" "$tmp/ref"
ok "start (store-max=256K, fail-write)" start f "$tmp/sf" -- store-max=256K on-cbw-error=fail-write
ok "snapshot create s" ctl f snapshot create s
ok "a write that fits" qio f "" "write -P 0x41 0 192k"
cp "$disk" "$tmp/after-fit"
ok_fails "a write past store-max fails with ENOSPC" "No space left on device" \
  qio f "" "write -P 0x42 1M 1M"
is "$(sum "$disk")" "$(sum "$tmp/after-fit")" "the failed write changed nothing"
crash f
ok "restart after kill -9" start f "$tmp/sf" -- store-max=256K on-cbw-error=fail-write
is "$(snapinfo f s broken)" False "s is not broken"
ok "pull s" pull f s "$tmp/s.img"
is "$(sum "$tmp/s.img")" "$(sum "$tmp/ref")" "s is exact"
ok "nbdkit stops cleanly" stop_nbdkit f

# --- injected store data errors ---
cp "$tmp/ref" "$disk"
ok "start (-D fleece.fail_store_write=1)" start e "$tmp/se" -D fleece.fail_store_write=1 --
ok "snapshot create s" ctl e snapshot create s
ok "a write whose copy fails succeeds (break-snapshot)" qio e "" "write -P 0x51 0 64k"
reason=$(snapinfo e s broken-reason)
ok "s broken by the injected error" grep -q "injected error (fleece.fail_store_write)" <<<"$reason"
crash e
ok "restart without the fault" start e "$tmp/se"
is "$(snapinfo e s broken-reason)" "$reason" "s is still broken, same reason"
ok "nbdkit stops cleanly" stop_nbdkit e

# --- injected metadata write errors: nothing more can be recorded ---
# Metadata writes of a new store: its STATE (1), its superblock (2), the
# snapshot's STATE (3), the superblock marked in use at the first write
# (4); the 5th, that write's COPY record, fails.
cp "$tmp/ref" "$disk"
ok "start (-D fleece.fail_meta_write=4)" start m "$tmp/sm" -D fleece.fail_meta_write=4 --
ok "snapshot create s" ctl m snapshot create s
ok_fails "a write whose COPY record cannot be written fails" "Input/output error" \
  qio m "" "write -P 0x61 0 64k"
ok "the engine says why" grep -q "persistent store: writing the metadata log failed" "$tmp/m.log"
ok_fails "later writes that need a copy fail at once" "Input/output error" \
  qio m "" "write -P 0x62 1M 64k"
is "$(sum "$disk")" "$(sum "$tmp/ref")" "no failed write reached the live disk"
ok "reads still work" qio m "" "read -P 0x22 0 64k"
ok "the snapshot still reads" pull m s "$tmp/s.img"
crash m
ok "restart without the fault" start m "$tmp/sm"
is "$(snapinfo m s broken)" False "s is not broken"
ok "pull s" pull m s "$tmp/s.img"
is "$(sum "$tmp/s.img")" "$(sum "$tmp/ref")" "s is exact"
ok "writes work again" qio m "" "write -P 0x63 0 64k"
ok "nbdkit stops cleanly" stop_nbdkit m

# --- a slow store and cbw-timeout ---
for policy in break-snapshot fail-write; do
  for persistent in false true; do
    n=t$persistent${policy%%-*}
    cp "$tmp/ref" "$disk"
    rm -f "$tmp/st$n"
    ok "start $n (store writes take 3 s, cbw-timeout=0.5, $policy, persistent=$persistent)" \
      start_nbdkit "$n" -D fleece.store_write_delay_ms=3000 -- disk="$disk" \
        store="$tmp/st$n" control="$tmp/$n.ctl" persistent=$persistent \
        cbw-timeout=0.5 on-cbw-error=$policy
    ok "snapshot create s" ctl "$n" snapshot create s
    t0=$(now_ms)
    if [ $policy = break-snapshot ]; then
      ok "the write succeeds" qio "$n" "" "write -P 0x71 0 64k"
    else
      ok_fails "the write fails with EIO" "Input/output error" qio "$n" "" "write -P 0x71 0 64k"
    fi
    ms=$(( $(now_ms) - t0 ))
    diag "write took $ms ms"
    ok "it did not wait for the store (< 2.5 s)" test "$ms" -lt 2500
    if [ $policy = break-snapshot ]; then
      reason=$(snapinfo "$n" s broken-reason)
      ok "s broken: the reason names cbw-timeout" grep -q "longer than cbw-timeout (500 ms)" <<<"$reason"
      ok "the live disk has the write" qio "$n" "" "read -P 0x71 0 64k"
    else
      is "$(snapinfo "$n" s broken)" False "s not broken"
      is "$(sum "$disk")" "$(sum "$tmp/ref")" "the live disk is unchanged"
    fi
    if [ $persistent = true ]; then
      crash "$n"
      ok "restart after kill -9" start_nbdkit "$n" -- disk="$disk" \
        store="$tmp/st$n" control="$tmp/$n.ctl" persistent=true
      if [ $policy = break-snapshot ]; then
        is "$(snapinfo "$n" s broken-reason)" "$reason" "s still broken"
      else
        ok "pull s" pull "$n" s "$tmp/s.img"
        is "$(sum "$tmp/s.img")" "$(sum "$tmp/ref")" "s exact"
      fi
    fi
    ok "nbdkit $n stops cleanly" stop_nbdkit "$n"
  done
done
