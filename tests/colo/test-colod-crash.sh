#!/usr/bin/env bash
# fleece-colod: the secondary killed with -9 mid-epoch, ten times.  Each
# time, once restarted, it is exactly at its last committed epoch (its
# journal's committed and applied epochs are equal, and its disk is
# byte for byte what the primary's disk was at that epoch), its log says
# what recovery did, and the primary, reconnecting by itself, brings it
# up to date with its first epoch (incremental, from the bitmaps kept
# for it).
#
# Host a: nbdkit (fleece plugin) and the primary, epochs on request only
# (--interval 0; the first after pairing goes by itself), extents of 64
# KiB; host b: the secondary, slowed by --debug extent-delay-ms so that
# an epoch of a few MiB takes about half a second.  No TLS (--insecure):
# test-colod-failover.sh covers it.
#
# Before each epoch the test records the sha256 of a's live disk (no
# writes run during a checkpoint, so that is the epoch's content), keyed
# by the epoch number.  Most kills land a random moment after the first
# extent arrived (mid-epoch: recovery must drop the epoch); every third
# polls b until the epoch is committed and kills at once, in its apply
# or just after (recovery must keep, or redo, it).  After the kill b
# restarts first on a port the primary does not know, so that what
# recovery left is checked before any catch-up, then on its own port.
# COLOD_CRASH_SEED replays a run's offsets and delays.
source "${abs_top_srcdir:-../..}/tests/colo/colod-functions.sh"
requires qemu-io --version
requires nbdcopy --version

seed_random COLOD_CRASH_SEED
t_start=$SECONDS

size=$((16 << 20))
mkdir -p "$tmp/a" "$tmp/b"
truncate -s "$size" "$tmp/a/disk" "$tmp/b/disk"
qemu-io -f raw -c 'write -P 0x11 0 6M' -c 'write -P 0x12 12M 1M' \
  "$tmp/a/disk" >/dev/null
pb=$(free_port)
pq=$(free_port)
while [ "$pq" = "$pb" ]; do pq=$(free_port); done


# secondary_b [PORT]: b's secondary daemon, on its own port by default.
secondary_b ()
{
  start_colod b secondary --listen "127.0.0.1:${1:-$pb}" \
    --disk "$tmp/b/disk" --insecure --hb-interval 100 --hb-timeout 3000 \
    --debug extent-delay-ms=10
}

ok "nbdkit on a" start_plugin a
ok "secondary b starts" secondary_b
ok "primary a starts" start_colod a primary --fleece "$tmp/a.ctl" \
  --nbd "$(live_uri a)" --peer "127.0.0.1:$pb" --insecure --interval 0 \
  --hb-interval 100 --hb-timeout 3000 --max-extent 65536
ok "the first (full) epoch goes by itself" wait_for 30 eval \
  'status_ge b last-applied-epoch 1 && status_ge a last-committed-epoch 1'
e=$(s b last-committed-epoch)
is "$(s a last-committed-epoch)/$(s a last-epoch-full)" "$e/true" \
  "a says epoch $e was durable, and full"
declare -A want
live=$(live_sum a)
want[$e]=$live
is "$(file_sum "$tmp/b/disk")" "$live" "b's disk equals a's at epoch $e"

mid=0 after=0 redone=0
for (( i = 1; i <= 10; i++ )); do
  # New data: 6 runs of 512 KiB at random 64K-aligned offsets, a pattern
  # of its own each; every other iteration one run is zeroed instead.
  cmds=()
  for (( k = 0; k < 6; k++ )); do
    off=$(( (RANDOM % (size / 65536 - 8)) * 65536 ))
    if (( k == 5 && i % 2 == 0 )); then cmds+=("write -z $off 512k")
    else cmds+=("write -P $(( (i * 16 + k) % 255 + 1 )) $off 512k"); fi
  done
  ok "$i: writes on a" qio a "" "${cmds[@]}"
  n=$(( $(s a last-committed-epoch) + 1 ))
  live=$(live_sum a)
  want[$n]=$live
  reconnects=$(s a reconnects)
  ok "$i: checkpoint requested (epoch $n)" colod a checkpoint --no-wait

  seen_inflight=no
  if (( i % 3 == 0 )); then
    # Poll b as fast as it answers until epoch n is committed, and kill
    # at once.
    deadline=$((SECONDS + 30))
    for (( t = 0; t < 6000 && SECONDS < deadline; t++ )); do
      pre=$("$COLOD" status --state "$tmp/b/state" 2>/dev/null)
      c=$(sed -n 's/^last-committed-epoch: //p' <<<"$pre")
      [ -n "$c" ] && (( c >= n )) && break
    done
    kill -9 "$(cat "$tmp/b/colod.pid")"
    ok "$i: epoch $n committed on b" test "${c:-0}" -ge "$n"
    when="as soon as epoch $n was committed"
  else
    wait_arriving b
    ok "$i: epoch $n arriving on b" test "${bif:-0}" -gt 0
    delay=$(( RANDOM % 250 ))
    sleep "$(printf '0.%03d' "$delay")"
    when="$delay ms after epoch $n's first extent"
    # What b says right before the kill.
    pre=$("$COLOD" status --state "$tmp/b/state" 2>/dev/null)
  fi
  pre_eif=$(sed -n 's/^epoch-in-flight: //p' <<<"$pre")
  pre_bif=$(sed -n 's/^bytes-in-flight: //p' <<<"$pre")
  pre_c=$(sed -n 's/^last-committed-epoch: //p' <<<"$pre")
  pre_a=$(sed -n 's/^last-applied-epoch: //p' <<<"$pre")
  [ "$pre_eif" = "$n" ] && [ "${pre_c:-0}" -lt "$n" ] && seen_inflight=yes
  # What recovery left, before any catch-up.
  restart_b_alone "$i" "$pq"
  c=$(s b last-committed-epoch)
  a_=$(s b last-applied-epoch)
  sum_b=$(file_sum "$tmp/b/disk")
  ok "$i: b stops cleanly" stop_colod b
  diag "$i: killed $when (b had: in flight ${pre_eif:-?}," \
    "${pre_bif:-?} bytes, committed ${pre_c:-?}, applied ${pre_a:-?});" \
    "restarted at epoch $c; recovery: $note"
  is "$a_" "$c" "$i: b's applied epoch equals its committed one"
  ok "$i: b is at epoch $n or $((n - 1))" \
    test "$c" -eq "$n" -o "$c" -eq "$((n - 1))"
  is "$sum_b" "${want[$c]:-no epoch $c}" \
    "$i: b's disk is exactly a's disk at epoch $c"
  if [ "$c" -eq "$((n - 1))" ]; then
    [ "$seen_inflight" = yes ] && mid=$((mid + 1))
    ok "$i: recovery dropped epoch $n" \
      grep -q "^dropped epoch $n: incomplete" <<<"$note"
  else
    after=$((after + 1))
    case $note in
      "epoch $n was committed but not applied"*) redone=$((redone + 1)) ;;
    esac
    ok "$i: recovery kept epoch $n" grep -Eq "^(epoch $n was committed but not applied: applied it again|journal empty: nothing to recover|journal held epoch $n, already applied: emptied)" \
      <<<"$note"
  fi

  # Catch-up: b back on its port; the primary reconnects by itself and
  # its first epoch brings b from c to a's disk now.
  ok "$i: b restarts" secondary_b
  # An epoch b dropped is sent again from its snapshot (the primary does
  # not pile up checkpoints while the link fails): catch-up epoch n.  If
  # b had committed n, the catch-up is a new checkpoint, n + 1.
  if [ "$c" -eq "$n" ]; then cu=$((n + 1)); else cu=$n; fi
  ok "$i: a reconnects and catches b up" wait_for 30 eval \
    '[ "$(s b last-applied-epoch)" -ge "$cu" ] && [ "$(s a last-committed-epoch)" -ge "$cu" ]'
  m=$(s b last-committed-epoch)
  [ -n "$m" ] && want[$m]=$live
  is "$m" "$cu" "$i: b is at the catch-up epoch $cu"
  is "$(s a last-committed-epoch)/$(s a last-epoch-full)" "$m/false" \
    "$i: a agrees, and the catch-up was incremental"
  is "$(file_sum "$tmp/b/disk")" "$live" \
    "$i: b's disk equals a's after the catch-up"
done

diag "kills: $mid mid-epoch (epoch in flight, dropped), $after after the" \
  "commit ($redone of them before the apply ended)"
ok "at least 5 of 10 kills landed mid-epoch ($mid)" test "$mid" -ge 5
# What the failed epochs left on the plugin is gone: after the last
# durable epoch, no snapshot, and only its recording bitmap.
names () { jget "$(ctl a --json "$1" list)" "' '.join(sorted(x['name'] for x in d))"; }
is "$(names snapshot)" "" "no snapshot left on a's plugin"
is "$(names bitmap)" "colo-$m" "only bitmap colo-$m left on a's plugin"
ok "the primary never stopped" kill -0 "$(cat "$tmp/a/colod.pid")"
is "$(s a epochs-refused)" 0 "the secondary refused no epoch"
ok "nor any pairing" eval '! grep "refused the pairing" "$tmp/a/colod.log"'
ok "secondary b stops cleanly" stop_colod b
ok "primary a stops cleanly" stop_colod a
ok "nbdkit stops cleanly" stop_nbdkit a
diag "$((SECONDS - t_start)) s"
