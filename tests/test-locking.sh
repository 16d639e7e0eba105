#!/usr/bin/env bash
# One writer per disk and per store (nbdkit-fleece-plugin(1), LOCKING):
# while Fleece serves a disk, a second Fleece, qemu-io opening it for
# writing and qemu-nbd are refused, and Fleece refuses a disk that
# qemu-nbd or qemu-io has open for writing; the store is locked too; a
# loop device is locked the same way.  nbdkit runs in the background with
# -P (where the locks must survive its fork) and in the foreground (-f).
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires qemu-nbd --version
requires qemu-img --version
requires losetup --version

disk=$tmp/disk
truncate -s 16M "$disk" "$tmp/disk2"
qemu-io -f raw -c 'write -P 0x11 0 16M' "$disk" >/dev/null

# A start that should be refused; one that is not exits at once (--run).
nbd () { nbdkit_once -U - "$FLEECE_PLUGIN" "$@" --run true; }
in_use='disk: .*/disk: in use by another process \(locked for writing'

# start_bg NAME PLUGIN-ARGS...: nbdkit in the background, as users run
# it: nbdkit itself forks after .get_ready and writes its PID file.
start_bg ()
{
  local name=$1 i; shift
  rm -f "$tmp/$name.sock" "$tmp/$name.pid"
  # shellcheck disable=SC2086
  env ${FLEECE_ASAN_PRELOAD:+LD_PRELOAD="$FLEECE_ASAN_PRELOAD"} \
    timeout -k 5 120 $VG nbdkit -U "$tmp/$name.sock" -P "$tmp/$name.pid" \
    "$FLEECE_PLUGIN" "$@" >"$tmp/$name.log" 2>&1 ||
    { cat "$tmp/$name.log"; return 1; }
  cleanup_fn "kill \$(cat '$tmp/$name.pid' 2>/dev/null) 2>/dev/null"
  for (( i = 0; i < 100; i++ )); do
    [ -S "$tmp/$name.sock" ] && [ -s "$tmp/$name.pid" ] && return 0
    sleep 0.1
  done
  return 1
}

# stop_bg NAME: SIGTERM by PID, and the process is gone within 10 s.
stop_bg ()
{
  local pid i
  pid=$(cat "$tmp/$1.pid")
  kill "$pid" || return 1
  for (( i = 0; i < 100; i++ )); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  echo "nbdkit $1 (pid $pid) is still running"
  return 1
}

# --- refusals while Fleece serves, in both modes ---
for mode in background foreground; do
  if [ $mode = background ]; then
    ok "fleece serves $disk ($mode, -P)" start_bg a disk="$disk" \
       store="$tmp/a.store" control="$tmp/a.ctl"
  else
    ok "fleece serves $disk ($mode, -f)" start_nbdkit a -- disk="$disk" \
       store="$tmp/a.store" control="$tmp/a.ctl"
  fi
  ok_fails "$mode: a second fleece on the disk is refused, naming it" \
    "$in_use: it has the image open with \"write\" permission" \
    nbd disk="$disk" store="$tmp/b.store"
  ok_fails "$mode: a second fleece on the store is refused, naming it" \
    'store: .*/a.store: in use by another process' \
    nbd disk="$tmp/disk2" store="$tmp/a.store"
  ok_fails "$mode: qemu-io opening the disk for writing is refused" \
    'Failed to get "write" lock' qemu-io -f raw -c 'write -P 0x66 0 64k' "$disk"
  ok_fails "$mode: qemu-img opening the disk for writing is refused" \
    'Failed to get "write" lock' qemu-img resize -f raw "$disk" 32M
  ok_fails "$mode: qemu-nbd on the disk is refused" 'Failed to get "write" lock' \
    timeout -k 5 20 qemu-nbd -f raw -k "$tmp/q.sock" "$disk"
  ok "$mode: read-only qemu-io and qemu-img info -U still read it" \
    eval "qemu-io -r -f raw -c 'read -P 0x11 0 64k' '$disk' &&
          qemu-img info -U '$disk'"
  ok "$mode: the live disk is still served and written" \
    qio a "" "write -P 0x22 0 64k"
  ok "$mode: nothing else wrote the disk" \
    qemu-io -r -f raw -c 'read -P 0x22 0 64k' -c 'read -P 0x11 64k 64k' "$disk"
  is "$(jget "$(ctl a --json status)" 'd["locking"]')" on \
     "$mode: query-status says locking on"
  if [ $mode = background ]; then
    ok "$mode: SIGTERM stops it" stop_bg a
  else
    ok "$mode: SIGTERM stops it" stop_nbdkit a
  fi
  ok "$mode: after the stop qemu-io may write the disk" \
    qemu-io -f raw -c 'write -P 0x11 0 64k' "$disk"
done

# --- locking=off: a second one starts, and says so ---
ok "fleece serves $disk" start_bg a disk="$disk" store="$tmp/a.store" \
   control="$tmp/a.ctl"
off () { nbdkit_once -v -U - "$FLEECE_PLUGIN" disk="$disk" \
           store="$tmp/b.store" control="$tmp/b.ctl" locking=off \
           --run "fleecectl -s '$tmp/b.ctl' --json status" >"$tmp/off.log" 2>&1; }
ok "locking=off lets a second fleece start on the disk" off
ok "... and it says that nothing stops a second writer" \
  grep -q 'locking=off: the disk .*/disk and the store .*/b.store are not locked' \
  "$tmp/off.log"
ok "... and query-status says locking off" grep -q '"locking": *"off"' \
  "$tmp/off.log"
ok_fails "locking=maybe is refused" "locking=maybe: expected on, off or auto" \
  nbd disk="$tmp/disk2" store="$tmp/c.store" locking=maybe
ok "stop" stop_bg a

# --- Fleece refuses a disk QEMU writes ---
rm -f "$tmp/q.sock"              # a refused qemu-nbd leaves it behind
timeout -k 5 60 qemu-nbd -f raw -k "$tmp/q.sock" "$disk" &
qpid=$!
cleanup_fn "kill $qpid 2>/dev/null"
ok "qemu-nbd serves the disk" wait_for 10 test -S "$tmp/q.sock"
ok_fails "fleece refuses a disk qemu-nbd serves, naming it" "$in_use" \
  nbd disk="$disk" store="$tmp/b.store"
kill $qpid; wait $qpid 2>/dev/null
timeout -k 5 60 qemu-io -f raw -c 'sleep 30000' "$disk" &
qpid=$!
cleanup_fn "kill $qpid 2>/dev/null"
# qemu-io takes its locks when it opens the disk, before its commands.
ino=$(stat -c %i "$disk")
for (( i = 0; i < 100; i++ )); do
  grep -q ":$ino " /proc/locks && break
  sleep 0.1
done
ok_fails "fleece refuses a disk qemu-io has open for writing" "$in_use" \
  nbd disk="$disk" store="$tmp/b.store"
kill $qpid; wait $qpid 2>/dev/null

# --- a block device ---
dev=$(losetup -f --show "$tmp/disk2") ||
  { echo "Bail out! losetup could not attach a loop device"; exit 1; }
cleanup_fn "losetup -d '$dev'"
ok "fleece serves $dev" start_nbdkit d -- disk="$dev" store="$tmp/d.store" \
   control="$tmp/d.ctl"
ok_fails "a second fleece on $dev is refused, naming it" \
  "disk: $dev: in use by another process \(locked for writing" \
  nbd disk="$dev" store="$tmp/b.store"
ok_fails "qemu-io opening $dev for writing is refused" \
  'Failed to get "write" lock' qemu-io -f raw -c 'write 0 64k' "$dev"
ok "stop" stop_nbdkit d
