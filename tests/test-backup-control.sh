#!/usr/bin/env bash
# fleece-backup backup --control: eight nights (a full point, then seven
# incrementals, with qemu-io and fio writes between) run through the
# control socket, one command a night.  Every point is exactly the disk
# at its checkpoint (sha256 against a pull of a snapshot taken at the
# same moment, qemu-img compare, restore); the server keeps only the
# newest checkpoint's recording bitmap; a run killed (SIGKILL) at each of
# its steps is completed by the next run with nothing lost; a missing
# bitmap makes a full point, saying why; prune to 3 keeps those exact;
# verify passes, and fails on a flipped byte in each kept point.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires_repo
requires fio --version

disk=$tmp/disk
make_disk "$disk" 32M 0x01 8M
ok "nbdkit starts" start_repo_server s "$disk"
repo=$tmp/repo
ok "init" fleece-backup init "$repo"

# night N [CRASH-STEP]: the backup of night N (point nN), killed at
# CRASH-STEP first if given, then run again.
night ()
{
  local n=$1 step=${2:-} st=0
  # The reference: a snapshot at the moment of the checkpoint (no
  # writes run between the two).
  ctl s snapshot create "ref$n" >/dev/null &&
  nbdcopy "$(snap_uri s "ref$n")" "$tmp/ref$n" &&
  ctl s snapshot delete "ref$n" >/dev/null || return 1
  if [ -n "$step" ]; then
    FLEECE_BACKUP_CRASH_AT=$step fleece-backup backup "$repo" \
      "$(live_uri s)" --control "$tmp/s.ctl" --name "n$n" \
      2>"$tmp/crash$n.err" || st=$?
    [ "$st" -eq 137 ] || { echo "not killed at $step: status $st";
                           cat "$tmp/crash$n.err"; return 1; }
  fi
  fleece-backup backup "$repo" "$(live_uri s)" --control "$tmp/s.ctl" \
    --name "n$n" 2>"$tmp/night$n.err" || { cat "$tmp/night$n.err"; return 1; }
  cat "$tmp/night$n.err"
}
# exact N: point nN reads as the disk at its checkpoint.
exact ()
{
  qemu-img convert -f qcow2 -O raw "$repo/n$1.qcow2" "$tmp/img" &&
  [ "$(sum "$tmp/img")" = "$(sum "$tmp/ref$1")" ] &&
  qemu-img compare -q -f qcow2 -F raw "$repo/n$1.qcow2" "$tmp/ref$1"
}
# tidy N: the server holds no snapshot and one bitmap, nN, recording.
tidy ()
{
  local snaps bitmaps
  snaps=$(ctl s --json snapshot list) && bitmaps=$(ctl s --json bitmap list) &&
  [ "$(jget "$snaps" 'len(d)')" = 0 ] &&
  [ "$(jget "$bitmaps" '" ".join(b["name"] + ":" + str(b["enabled"]) for b in d)')" = "n$1:True" ] ||
  { echo "snapshots: $snaps"; echo "bitmaps: $bitmaps"; return 1; }
}
writes ()
{
  qio s "" "write -P $(( ($1 * 37) % 255 + 1 )) $(( ($1 * 5) % 30 ))M 300k" \
    "write -z $(( $1 + 8 ))M 128k" >/dev/null &&
  fio --name=w --ioengine=nbd --uri="$(live_uri s)" --rw=randwrite \
    --bs=4k --offset=8M --size=16M --io_size=128k --randseed="$1" \
    --output="$tmp/fio-$1.out" >/dev/null 2>&1
}

ok "night 1: a full point" night 1
ok "it said why it is full" grep -q "a full point: the repository has no point" \
   "$tmp/night1.err"
ok "n1 exact" exact 1
ok "server tidy after night 1" tidy 1
crash=("" "" "" control-checkpointed backup-pulled backup-synced
       control-complete control-snapshot-deleted "")
for n in 2 3 4 5 6 7 8; do
  ok "writes before night $n" writes "$n"
  step=${crash[$n]}
  ok "night $n${step:+ (killed at $step, then run again)}" night "$n" "$step"
  diag "$(cat "$tmp/night$n.err")"
  ok "night $n is incremental" grep -q "sync=incremental.* point=n$n " \
     "$tmp/night$n.err" ${step:+"$tmp/crash$n.err"}
  ok "n$n exact" exact "$n"
  ok "server tidy after night $n" tidy "$n"
done
list=$(fleece-backup list "$repo" --json)
is "$(jget "$list" '" ".join(p["name"] + ":" + str(p["parent"]) for p in d)')" \
   "n1:None n2:n1 n3:n2 n4:n3 n5:n4 n6:n5 n7:n6 n8:n7" "a chain of 8 points"
for n in 1 8; do
  ok "restore n$n" fleece-backup restore "$repo" "n$n" "$tmp/rest$n" -q
  is "$(sum "$tmp/rest$n")" "$(sum "$tmp/ref$n")" "restored n$n is exact"
done
ok "verify" fleece-backup verify "$repo"

# --- a missing bitmap: a full point, saying why ---
ok "writes before night 9" writes 9
ok "the bitmap of n8 is removed behind fleece-backup's back" \
   ctl s bitmap remove n8
ok "night 9" night 9
ok "it made a full point, saying why" grep -q \
   "a full point: the server has no bitmap of the newest point's checkpoint" \
   "$tmp/night9.err"
ok "n9 exact" exact 9
is "$(fleece-backup list "$repo" --json | python3 -c 'import json,sys; print([p["parent"] for p in json.load(sys.stdin)][-1])')" \
   None "n9 has no parent"
ok "writes before night 10" writes 10
ok "night 10: incremental again" night 10
ok "n10 exact" exact 10
ok "n10 is on n9" grep -q "parent=n9" "$tmp/night10.err"

# --- prune to 3 ---
ok "prune --keep-last 3" fleece-backup prune "$repo" --keep-last 3
is "$(fleece-backup list "$repo" --json | python3 -c 'import json,sys; print(" ".join(p["name"] for p in json.load(sys.stdin)))')" \
   "n8 n9 n10" "n8, n9, n10 remain"
for n in 8 9 10; do ok "n$n exact after prune" exact "$n"; done
ok "verify after prune" fleece-backup verify "$repo"
cp -a "$repo" "$tmp/good"
for n in 8 9 10; do
  rm -rf "$repo"; cp -a "$tmp/good" "$repo"
  host=$(qemu-img map --output=json -f qcow2 "$repo/n$n.qcow2" |
         python3 -c 'import json,sys; print([e["offset"] for e in json.load(sys.stdin) if e["depth"] == 0 and e["data"]][0])')
  python3 -c '
import sys
f = open(sys.argv[1], "r+b"); f.seek(int(sys.argv[2])); b = f.read(1)
f.seek(int(sys.argv[2])); f.write(bytes([b[0] ^ 0x5a]))' \
    "$repo/n$n.qcow2" $((host + 7))
  ok_fails "verify fails on a flipped byte in n$n" \
     "point n$n differs from its checksum list at offset" \
     fleece-backup verify "$repo" "n$n"
done

# A night longer than the server keeps an idle control connection (a
# minute; 300 ms here with -D fleece.ctl_idle_timeout_ms, and each read
# of the snapshot slowed by 250 ms so that the pull outlasts it):
# fleece-backup does not hold the connection across the pull, so the run
# still ends cleanly, tidying the server.
ok "nbdkit stops" stop_nbdkit s
slow=$tmp/slow
make_disk "$slow" 16M 0x5c
ok "nbdkit starts with a 300 ms idle limit, slow snapshot reads" \
   start_nbdkit i -D fleece.ctl_idle_timeout_ms=300 \
   -D fleece.live_read_delay_us=250000 -- disk="$slow" \
   store="$tmp/i.store" control="$tmp/i.ctl" cluster-size=64K
ok "init" fleece-backup init "$tmp/irepo"
ok "a night that outlasts the idle limit ends cleanly" \
   sh -c "fleece-backup backup '$tmp/irepo' '$(live_uri i)' \
            --control '$tmp/i.ctl' --name i1 2>'$tmp/i1.err'"
s=$(sed -n 's/.* seconds=\([0-9.]*\) .*/\1/p' "$tmp/i1.err")
ok "... its pull did outlast it (${s:-?} s)" \
   awk -v s="${s:-0}" 'BEGIN { exit !(s > 0.3) }'
is "$(ctl i --json snapshot list)" "[]" "... and left no snapshot on the server"
ok "... and its point is the disk" fleece-backup restore "$tmp/irepo" i1 \
   "$tmp/i1.raw" -q
ok "... exactly" cmp "$tmp/i1.raw" "$slow"

# --rate paces a repository's pull as it does a plain one: 4 MiB
# changed, read at 1 MiB/s, is an incremental pull of about 4 s.
ok "writes" qio i "" "write -P 0x5d 1M 4M"
ok "night i2 with --rate=1M" \
   sh -c "fleece-backup backup '$tmp/irepo' '$(live_uri i)' \
            --control '$tmp/i.ctl' --name i2 --rate=1M 2>'$tmp/i2.err'"
s=$(sed -n 's/.* seconds=\([0-9.]*\) .*/\1/p' "$tmp/i2.err")
ok "... its pull of 4 MiB took at least 3.5 s (${s:-?} s)" \
   awk -v s="${s:-0}" 'BEGIN { exit !(s >= 3.5) }'
ok "... and its point is the disk" fleece-backup restore "$tmp/irepo" i2 \
   "$tmp/i2.raw" -q
ok "... exactly" cmp "$tmp/i2.raw" "$slow"
ok_fails "--rate=0 is refused" "out of range" \
   fleece-backup backup "$tmp/irepo" "$(live_uri i)" --control "$tmp/i.ctl" \
   --rate=0
ok "nbdkit stops" stop_nbdkit i
