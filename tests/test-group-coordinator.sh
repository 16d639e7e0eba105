#!/usr/bin/env bash
# A group's coordinator that dies or stalls between prepare and commit
# (issue 17): fleecectl with FLEECECTL_GROUP_STOP=prepared stops itself
# (SIGSTOP) once every server holds its writes.  Killed with -9, its
# connections close and every server releases at once; left stopped,
# every server releases at the deadline and refuses the commit when the
# coordinator is continued.  Either
# way the writers resume within the deadline, no snapshot or bitmap of
# the group is left on any server, each server says so in a
# GROUP_ABORTED event, and the next group succeeds.  Real clients:
# qemu-io, fleecectl.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version

ok "nbdkit a and b start" start_disks a b
watch_events "$tmp/a.ctl" "$tmp/events.a" 60
watch_events "$tmp/b.ctl" "$tmp/events.b" 60
ok "checkpoint c0 on both" fleecectl "${group[@]}" checkpoint c0

# coordinator ACTION NAME: start a coordinator of checkpoint NAME with a
# 2 s deadline that stops after the prepares, wait until it is there.
coordinator ()
{
  FLEECECTL_GROUP_STOP=prepared fleecectl --deadline 2000 "${group[@]}" \
    checkpoint "$1" >"$tmp/coord.out" 2>&1 &
  cpid=$!
  cleanup_fn "kill -9 $cpid 2>/dev/null"
  wait_for 10 grep -q "every server is prepared" "$tmp/coord.out"
}

# timed_write D PATTERN: write to disk D in the background; its time in
# ms lands in $tmp/w.D once done.
timed_write ()
{
  ( t0=$(date +%s%N)
    timeout 10 qemu-io -f raw "$(live_uri "$1")" -c "write -P $2 0 64k" \
      >/dev/null &&
      echo $(( ($(date +%s%N) - t0) / 1000000 )) >"$tmp/w.$1" ) &
}

# no_trace NAME: neither server has a snapshot or a bitmap NAME.
no_trace ()
{
  local d
  for d in a b; do
    ! fleecectl -s "$tmp/$d.ctl" snapshot list | grep -q "^$1 " &&
      ! fleecectl -s "$tmp/$d.ctl" bitmap list | grep -q "^$1 " || return 1
  done
}

# --- killed with -9 ---
ok "the coordinator of k1 stops after the prepares" coordinator k1
rm -f "$tmp"/w.?
timed_write a 0x22
timed_write b 0x22
sleep 0.3
ok "the writes wait while k1 is prepared" test ! -e "$tmp/w.a" -a ! -e "$tmp/w.b"
# Between the phases the coordinator runs with a short slice (slice.h),
# so that it does not wait for a CPU behind the writers.
if custom_slices; then
  ok "the coordinator has a 100 us slice between the phases" \
     has_slice "/proc/$cpid/sched"
else
  diag "Linux $(uname -r) has no custom slices: the coordinator's is not checked"
fi
kill -9 "$cpid"
wait "$cpid" 2>/dev/null
ok "the writes resume" wait_for 5 test -e "$tmp/w.a" -a -e "$tmp/w.b"
diag "writes held for $(cat "$tmp/w.a") ms (a), $(cat "$tmp/w.b") ms (b), deadline 2000 ms"
ok "... within the deadline" test "$(cat "$tmp/w.a")" -lt 2000 -a "$(cat "$tmp/w.b")" -lt 2000
ok "no snapshot or bitmap k1 on any server" no_trace k1
ok "bitmap c0 still records on both" bash -c \
   "fleecectl -s '$tmp/a.ctl' bitmap list | grep -q '^c0 *recording' &&
    fleecectl -s '$tmp/b.ctl' bitmap list | grep -q '^c0 *recording'"
ok "GROUP_ABORTED on both servers" wait_for 5 bash -c \
   "grep -q 'GROUP_ABORTED.*connection that prepared it closed' '$tmp/events.a' &&
    grep -q 'GROUP_ABORTED.*connection that prepared it closed' '$tmp/events.b'"
ok "the next group k2 succeeds" fleecectl "${group[@]}" checkpoint k2
ok "k2 froze c0 on both" bash -c \
   "fleecectl -s '$tmp/a.ctl' bitmap list | grep -q '^c0 *frozen.*k2' &&
    fleecectl -s '$tmp/b.ctl' bitmap list | grep -q '^c0 *frozen.*k2'"
ok "k2 holds the write made after the abort" qio a snapshot/k2 "read -P 0x22 0 64k"

# --- stalled: released at the deadline, the late commit refused ---
ok "the coordinator of k3 stops after the prepares" coordinator k3
rm -f "$tmp"/w.?
timed_write a 0x33
timed_write b 0x33
ok "the writes resume" wait_for 5 test -e "$tmp/w.a" -a -e "$tmp/w.b"
diag "writes held for $(cat "$tmp/w.a") ms (a), $(cat "$tmp/w.b") ms (b), deadline 2000 ms"
ok "... within the deadline" test "$(cat "$tmp/w.a")" -lt 2500 -a "$(cat "$tmp/w.b")" -lt 2500
ok "GROUP_ABORTED at the deadline on both servers" wait_for 5 bash -c \
   "grep -q 'GROUP_ABORTED.*deadline of 2000 ms' '$tmp/events.a' &&
    grep -q 'GROUP_ABORTED.*deadline of 2000 ms' '$tmp/events.b'"
kill -CONT "$cpid"
st=0
wait "$cpid" || st=$?
diag "$(cat "$tmp/coord.out")"
ok "the coordinator fails" test "$st" -eq 1
ok "... told that the commit came too late" \
   grep -q "group-commit: group '.*' is no longer prepared: its deadline of 2000 ms passed" "$tmp/coord.out"
ok "no snapshot or bitmap k3 on any server" no_trace k3
ok "the next group k4 succeeds" fleecectl "${group[@]}" checkpoint k4

for d in a b; do
  ok "nbdkit $d stops cleanly" stop_nbdkit "$d"
done
