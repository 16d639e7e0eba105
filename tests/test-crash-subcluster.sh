#!/usr/bin/env bash
# Sub-cluster copies survive kill -9 (issue 19).  A persistent store with
# subcluster=true and 64 KiB clusters; snapshot s1 is created with no
# write in flight and the disk's sha256 taken then.  Ten times: crash-writer
# sends 4 KiB random writes (each copies one block of a cluster, the
# PARTIAL records), nbdkit is killed with SIGKILL at a random moment,
# restarted on the same store, and every snapshot must pull exactly as
# its sha256 at creation: blocks copied before the crash from the store,
# the others from the disk.  Snapshots s2 and s3 are created at the
# fourth and eighth restarts, so that clusters partly copied for one are
# finished and copied again in part for the next; the seventh iteration
# stops the writer (SIGTERM: it waits for its writes in flight, flushes
# and disconnects) and then nbdkit cleanly instead (the image then holds
# the partial table).
# Cluster 0 is copied in part before the first crash and completed after
# it.  The test also checks that the restarts found partly copied
# clusters and completed copies, so that it cannot pass on whole-cluster
# copies alone.
#
# FLEECE_CRASH_SEED (default 1919) seeds the choices;
# FLEECE_CRASH_SUBCLUSTER_ITERATIONS (default 10, 4 under valgrind).
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires nbdcopy --version
requires timeout --version
cw=$abs_top_builddir/tests/crash-writer
requires test -x "$cw"

seed=${FLEECE_CRASH_SEED:-1919}
iters=${FLEECE_CRASH_SUBCLUSTER_ITERATIONS:-$([ -n "$VG" ] && echo 4 || echo 10)}
diag "seed $seed, $iters iterations"

disk=$tmp/disk store=$tmp/store log=$tmp/writes.log
truncate -s 64M "$disk"
ok "initial content" "$cw" init "$disk" 4096

server ()
{
  start_nbdkit s -- disk="$disk" store="$store" control="$tmp/s.ctl" \
    cluster-size=64K persistent=true subcluster=true && ctl_ready s
}
msleep () { sleep "$(( $1 / 1000 )).$(printf %03d $(( $1 % 1000 )))"; }

ok "nbdkit starts (persistent, subcluster)" server
declare -A want=()
ok "snapshot s1 created" ctl s snapshot create s1
want[s1]=$(sum "$disk")
# Cluster 0 partly copied now, completed after the first restart (below),
# whatever the random writes do: the restarts must find that copy.
ok "a 4 KiB write copies one block of cluster 0" qio s "" "write -P 0x77 0 4k"

# check_snaps WHEN: every snapshot pulls as it was created.
check_snaps ()
{
  local x
  for x in "${!want[@]}"; do
    rm -f "$tmp/out"
    ok "$1: pull $x" timeout 60 nbdcopy "$(snap_uri s "$x")" "$tmp/out"
    is "$(sum "$tmp/out")" "${want[$x]}" \
       "$1: snapshot $x equals its content at creation (sha256)"
  done
}

n_partial=0 n_copies=0
for (( it = 1; it <= iters; it++ )); do
  RANDOM=$((seed + it * 7919))
  rates=(0 2000 8000)
  rate=${rates[RANDOM % 3]}
  delay=$((150 + RANDOM % 1200))
  timeout -s KILL 60 "$cw" write "$(live_uri s)" "$log" 4096 \
    "$RANDOM$RANDOM" "$rate" 2>"$tmp/writer.err" &
  wpid=$!
  msleep "$delay"
  if [ "$it" -eq 7 ]; then
    kill "$wpid"
    ok "iteration $it: the writer stops on SIGTERM" wait "$wpid"
    ok "iteration $it: nbdkit stops cleanly" stop_nbdkit s
    how="clean stop"
  else
    crash_nbdkit s
    wait "$wpid" || diag "writer: $(tail -1 "$tmp/writer.err")"
    how="kill -9"
  fi
  diag "iteration $it: rate ${rate:-unlimited}, $how after $delay ms;" \
       "$(tail -1 "$tmp/writer.err")"
  ok "iteration $it: nbdkit restarts on the store" server
  st=$(ctl s --json stats)
  p=$(jget "$st" 'd["partial-clusters"]') c=$(jget "$st" 'd["copies"]')
  diag "iteration $it: after the restart $p clusters partly copied, $c copies"
  n_partial=$((n_partial + p)) n_copies=$((n_copies + c))
  check_snaps "iteration $it"
  [ "$it" -eq 1 ] &&
    ok "the rest of cluster 0 written after a restart" \
       qio s "" "write -P 0x78 4k 60k"
  if [ "$it" -eq 4 ] || [ "$it" -eq 8 ]; then
    x=s$(( it / 4 + 1 ))
    ok "snapshot $x created" ctl s snapshot create "$x"
    want[$x]=$(sum "$disk")
  fi
done

ok "the restarts found partly copied clusters ($n_partial)" \
   test "$n_partial" -gt 0
ok "the restarts found completed copies ($n_copies)" test "$n_copies" -gt 0
ok "nbdkit stops cleanly" stop_nbdkit s
