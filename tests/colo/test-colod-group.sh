#!/usr/bin/env bash
# fleece-colod: a replicated consistency group of two disks.  A writer
# writes to both disks before each of 10 epochs; the secondary is killed
# with -9 at a random moment of epochs 1 to 9 (and restarted), and the
# whole primary host (fleece-colod and both nbdkits) in epoch 10.  After
# every restart and after the failover, both secondary disks are at one
# epoch: the one its state records (committed = applied), and each
# disk, byte for byte, is what the primary's disk was at that epoch.
#
# Every round k writes, on each disk, 64 KiB of byte k at offset 0 (so
# that the round a disk holds can be read back from its content) and
# two 256 KiB runs at random offsets; then the test records each disk's
# sha256, keyed by the epoch number the checkpoint will get (no writes
# run during it).  Host a: two nbdkits (p0, p1) and the primary, epochs
# on request (--interval 0), extents of 64 KiB; host b: the secondary
# with two --disk, slowed by --debug extent-delay-ms so that an epoch
# lasts about 0.2 s, with --auto-failover.  Kills land a random
# moment after the epoch's first extent arrived, every third one as soon
# as the epoch is committed.  A secondary that applied the disks of an
# epoch separately would, killed in between, restart with disk 0 at one
# epoch and disk 1 at the other: the checks below fail then.
# COLOD_GROUP_SEED replays a run's offsets and delays.
source "${abs_top_srcdir:-../..}/tests/colo/colod-functions.sh"
requires qemu-io --version
requires nbdcopy --version

seed_random COLOD_GROUP_SEED
t_start=$SECONDS

size=$((8 << 20))
mkdir -p "$tmp/p0" "$tmp/p1" "$tmp/b"
truncate -s "$size" "$tmp/p0/disk" "$tmp/p1/disk" "$tmp/b/disk0" \
  "$tmp/b/disk1"
qemu-io -f raw -c 'write -P 0x21 1M 2M' "$tmp/p0/disk" >/dev/null
qemu-io -f raw -c 'write -P 0x22 4M 1M' "$tmp/p1/disk" >/dev/null
pb=$(free_port)
pq=$(free_port)
while [ "$pq" = "$pb" ]; do pq=$(free_port); done


secondary_b ()
{
  start_colod b secondary --listen "127.0.0.1:${1:-$pb}" \
    --disk "$tmp/b/disk0" --disk "$tmp/b/disk1" --insecure \
    --hb-interval 100 --hb-timeout 1500 --auto-failover \
    --debug extent-delay-ms=10
}
primary_a ()
{
  start_colod a primary --fleece "$tmp/p0.ctl" --nbd "$(live_uri p0)" \
    --fleece "$tmp/p1.ctl" --nbd "$(live_uri p1)" \
    --peer "127.0.0.1:$pb" --insecure --interval 0 --hb-interval 100 \
    --hb-timeout 1500 --max-extent 65536
}
log_lines () { wc -l <"$tmp/$1/colod.log"; }
# round_of FILE: the round whose byte is at offset 0.
round_of () { od -An -tu1 -N1 "$1" | tr -d ' '; }

# check_b WHAT: b is at one epoch on both disks, each disk equal to
# the primary's at that epoch.  Sets c.
check_b ()
{
  local a_ d0 d1 r0 r1 j
  c=$(s b last-committed-epoch)
  a_=$(s b last-applied-epoch)
  j=$("$COLOD" status --json --state "$tmp/b/state")
  d0=$(jget "$j" "d['disks'][0]['last-applied-epoch']")
  d1=$(jget "$j" "d['disks'][1]['last-applied-epoch']")
  r0=$(round_of "$tmp/b/disk0")
  r1=$(round_of "$tmp/b/disk1")
  is "$a_/$d0/$d1" "$c/$c/$c" \
    "$1: committed $c = applied, and so for each disk"
  is "$r0/$r1" "${round[$c]:-no epoch $c}/${round[$c]:-no epoch $c}" \
    "$1: both disks hold round ${round[$c]:-?} by their content"
  is "$(file_sum "$tmp/b/disk0")" "${want0[$c]:-no epoch $c}" \
    "$1: disk 0 is exactly a's disk 0 at epoch $c"
  is "$(file_sum "$tmp/b/disk1")" "${want1[$c]:-no epoch $c}" \
    "$1: disk 1 is exactly a's disk 1 at epoch $c"
}

# bail WHY: what each daemon logged last, and stop (the rest would only
# repeat the failure).
bail ()
{
  local h
  for h in a b; do
    echo "# $h's log:"
    sed 's/^/#   /' "$tmp/$h/colod.log" | tail -25
  done
  echo "Bail out! $1"
  exit 1
}

declare -A want0 want1 round
ok "nbdkit p0" start_plugin p0
ok "nbdkit p1" start_plugin p1
ok "secondary b starts with two disks" secondary_b
want0[1]=$(live_sum p0)
want1[1]=$(live_sum p1)
round[1]=0
ok "primary a starts with two disks" primary_a
ok "the first (full) epoch goes by itself" wait_for 30 eval \
  'status_ge b last-applied-epoch 1 && status_ge a last-committed-epoch 1'
is "$(s a last-committed-epoch)" 1 "a says epoch 1 was durable"
check_b "first epoch"
ok "a's log says it is a group" \
  grep -q "a consistency group of 2 disks" "$tmp/a/colod.log"

mid=0 after=0
host_kill=10
for (( i = 1; i <= 10; i++ )); do
  for d in 0 1; do
    cmds=("write -P $i 0 64k")
    for (( k = 0; k < 2; k++ )); do
      off=$(( (RANDOM % (size / 65536 - 5) + 1) * 65536 ))
      cmds+=("write -P $(( (i * 16 + k + d * 7) % 250 + 1 )) $off 256k")
    done
    ok "$i: writes on disk $d" qio "p$d" "" "${cmds[@]}"
  done
  n=$(( $(s a last-committed-epoch) + 1 ))
  want0[$n]=$(live_sum p0)
  want1[$n]=$(live_sum p1)
  round[$n]=$i
  reconnects=$(s a reconnects)
  ok "$i: checkpoint requested (epoch $n)" colod a checkpoint --no-wait

  if (( i % 3 == 0 && i != host_kill )); then
    deadline=$((SECONDS + 30))
    while (( SECONDS < deadline )); do
      cc=$(s b last-committed-epoch)
      [ -n "$cc" ] && (( cc >= n )) && break
    done
    when="as soon as epoch $n was committed"
  else
    wait_arriving b
    ok "$i: epoch $n arriving on b" test "${bif:-0}" -gt 0
    delay=$(( RANDOM % 200 ))
    sleep "$(printf '0.%03d' "$delay")"
    when="$delay ms after epoch $n's first extent"
  fi
  pre_c=$(s b last-committed-epoch)

  if (( i == host_kill )); then
    # The primary host dies: its daemon and both its servers.
    ok "$i: kill -9 a's fleece-colod" kill9_colod a
    crash_nbdkit p0
    crash_nbdkit p1
    ok "$i: a's nbdkits are gone" eval '! kill -0 "$(cat "$tmp/p0.pid" 2>/dev/null)" 2>/dev/null'
    diag "$i: host a killed $when (b had committed ${pre_c:-?})"
    ok "$i: b fails over by itself" \
      wait_for 15 eval '[ "$(s b failover)" = completed ]'
    check_b "$i: after the failover"
    ok "$i: b is at epoch $n or $((n - 1))" \
      test "$c" -eq "$n" -o "$c" -eq "$((n - 1))"
    ok "$i: the promotion is logged for the group" \
      grep -q "promoted at epoch $c: .* the 2 disks of the group" \
      "$tmp/b/colod.log"
    break
  fi

  ok "$i: kill -9 b" kill9_colod b
  ok "$i: a notices" \
    wait_for 10 eval '[ "$(s a reconnects)" -gt "$reconnects" ]'
  # What recovery left, before any catch-up: b alone on another port.
  n0=$(log_lines b)
  ok "$i: b restarts (alone)" secondary_b "$pq"
  note=$(tail -n +"$((n0 + 1))" "$tmp/b/colod.log" |
           sed -n 's/.*journal: //p' | head -1)
  check_b "$i: restarted"
  ok "$i: b stops cleanly" stop_colod b
  diag "$i: b killed $when (committed ${pre_c:-?}); restarted at epoch $c;" \
    "recovery: $note"
  ok "$i: b is at epoch $n or $((n - 1))" \
    test "$c" -eq "$n" -o "$c" -eq "$((n - 1))"
  if [ "$c" -eq "$((n - 1))" ]; then mid=$((mid + 1)); else after=$((after + 1)); fi

  ok "$i: b restarts" secondary_b
  if [ "$c" -eq "$n" ]; then cu=$((n + 1)); else cu=$n; fi
  want0[$cu]=$(live_sum p0)
  want1[$cu]=$(live_sum p1)
  round[$cu]=$i
  f=$_tap_failed
  ok "$i: a reconnects and catches b up" wait_for 30 eval \
    '[ "$(s b last-applied-epoch)" -ge "$cu" ] && [ "$(s a last-committed-epoch)" -ge "$cu" ]'
  [ "$_tap_failed" -gt "$f" ] && bail "$i: no catch-up"
  check_b "$i: caught up"
done

diag "secondary kills: $mid mid-epoch (dropped), $after after the commit"
ok "at least 3 kills of b landed mid-epoch ($mid)" test "$mid" -ge 3
ok "b's disks are served by nobody: b stops cleanly" stop_colod b
diag "$((SECONDS - t_start)) s"
