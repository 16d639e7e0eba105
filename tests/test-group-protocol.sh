#!/usr/bin/env bash
# The consistency-group protocol of one server (docs/control-protocol.md,
# "Consistency groups"): group-prepare holds the live writes until
# group-commit creates the snapshot or checkpoint; group-abort, the
# deadline and a closed connection release with nothing created and (the
# last two) a GROUP_ABORTED event; a late commit is refused.  Real
# clients: qemu-io, nbdcopy, fleecectl, socat as a raw coordinator.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version
requires socat -V

disk=$tmp/disk
make_disk "$disk" 4M 0x11
ok "nbdkit starts" start_nbdkit g -- disk="$disk" store="$tmp/store" \
   control="$tmp/g.ctl" cluster-size=64K
watch_events "$tmp/g.ctl" "$tmp/events" 60

# The control service thread, which a group's messages wake (its wake-up
# is most of a hold, docs/design.md): named, so that top -H and perf
# sched show it, and with a 100 us scheduler slice, which Linux keeps
# from 6.12 on (EEVDF's custom slices; older kernels ignore it).
ctl_comm=$(grep -lx fleece-ctl /proc/"$(cat "$tmp/g.pid")"/task/*/comm || :)
ok "the control service thread is named fleece-ctl" test -n "$ctl_comm"
if custom_slices; then
  ok "fleece-ctl runs with a 100 us slice (Linux $(uname -r))" \
     has_slice "${ctl_comm%/comm}/sched"
else
  diag "Linux $(uname -r) has no custom slices: fleece-ctl's is not checked"
fi

# session LINE|"sleep S"...: one connection that sends the lines (and
# sleeps between them), then closes; its output on stdout.
session ()
{
  local a
  for a in "$@"; do
    case $a in
      sleep\ *) $a ;;
      *) printf '%s\n' "$a" ;;
    esac
  done | socat -t 3 - "UNIX-CONNECT:$tmp/g.ctl"
}
prep () { echo "{\"execute\":\"group-prepare\",\"arguments\":{\"group\":\"$1\",\"name\":\"$2\"${3:+,$3}}}"; }
commit () { echo "{\"execute\":\"group-commit\",\"arguments\":{\"group\":\"$1\"}}"; }
abort () { echo "{\"execute\":\"group-abort\",\"arguments\":{\"group\":\"$1\"}}"; }
snaps () { ctl g --json snapshot list; }

# --- prepare, then commit: the snapshot is taken with writes held ---
ok "live write 0x22" qio g "" "write -P 0x22 0 64k"
session "$(prep g1 s1 '"deadline-ms":3000')" "sleep 1" "$(commit g1)" >"$tmp/out1" &
spid=$!
sleep 0.3
t0=$(date +%s%N)
ok "a write issued while g1 is prepared" qio g "" "write -P 0x33 0 64k"
t1=$(date +%s%N)
wait $spid
diag "$(cat "$tmp/out1")"
ok "prepare replied with drain-ns" grep -q '"return":{"group":"g1","drain-ns"' "$tmp/out1"
ok "commit created s1 with hold-ns" \
   grep -Eq '"return":\{.*"name":"s1".*"hold-ns":[0-9]{8,}' "$tmp/out1"
# What the hold was spent on: the drain, the wait for the commit (the
# session sleeps 1 s before sending it), the commit's own work.
ok "the commit splits the hold: wait-ns is the 1 s sleep, commit-ns small" \
   python3 -c '
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])["return"]
print(r, file=sys.stderr)
assert r["wait-ns"] >= 900000000, r
assert r["commit-ns"] < 200000000, r
assert r["drain-ns"] + r["wait-ns"] + r["commit-ns"] == r["hold-ns"], r
' "$tmp/out1"
held_ms=$(( (t1 - t0) / 1000000 ))
ok "the write waited for the commit ($held_ms ms)" test "$held_ms" -ge 400
ok "s1 does not hold the write issued during the hold" \
   qio g snapshot/s1 "read -P 0x22 0 64k"
ok "the live disk does" qio g "" "read -P 0x33 0 64k"

# --- checkpoint commit ---
session "$(prep g2 c1 '"checkpoint":true')" "$(commit g2)" >"$tmp/out2"
ok "group commit of a checkpoint" grep -q '"checkpoint":true' "$tmp/out2"
ok "bitmap c1 records" bash -c "fleecectl -s '$tmp/g.ctl' bitmap list | grep -q '^c1 *recording'"

# --- abort ---
session "$(prep g3 s3)" "$(abort g3)" >"$tmp/out3"
ok "abort replies" grep -q '"return":{"group":"g3","hold-ns"' "$tmp/out3"
ok "abort created nothing" bash -c "! fleecectl -s '$tmp/g.ctl' snapshot list | grep -q '^s3 '"

# --- the deadline passes: released, event, late commit refused ---
session "$(prep g4 s4 '"deadline-ms":300')" "sleep 0.8" "$(commit g4)" \
  >"$tmp/out4"
diag "$(tail -1 "$tmp/out4")"
ok "a commit after the deadline is refused" \
   grep -q "group 'g4' is no longer prepared: its deadline of 300 ms passed before a commit; nothing of it was created" "$tmp/out4"
ok "nothing of g4 was created" bash -c "! fleecectl -s '$tmp/g.ctl' snapshot list | grep -q '^s4 '"
ok "writes go on after the deadline" timeout 5 qemu-io -f raw \
   "nbd+unix:///?socket=$tmp/g.sock" -c "write -P 0x44 0 64k"

# --- the coordinator's connection closes: released, event ---
session "$(prep g5 s5 '"deadline-ms":5000')" >"$tmp/out5"
t0=$(date +%s%N)
ok "writes go on once the coordinator is gone" timeout 5 qemu-io -f raw \
   "nbd+unix:///?socket=$tmp/g.sock" -c "write -P 0x55 0 64k"
t1=$(date +%s%N)
ok "... at once, not at the deadline ($(( (t1 - t0) / 1000000 )) ms)" \
   test $(( (t1 - t0) / 1000000 )) -lt 2500
ok "nothing of g5 was created" bash -c "! fleecectl -s '$tmp/g.ctl' snapshot list | grep -q '^s5 '"
ok "GROUP_ABORTED events for g4 and g5" wait_for 5 bash -c \
   "grep -q '\"event\":\"GROUP_ABORTED\".*deadline of 300 ms' '$tmp/events' &&
    grep -q '\"event\":\"GROUP_ABORTED\".*connection that prepared it closed.*\"group\":\"g5\"' '$tmp/events'"
diag "$(grep GROUP_ABORTED "$tmp/events")"

# --- refusals ---
session "$(prep g6 s1)" >"$tmp/out6"
ok "prepare refuses a snapshot name that exists" \
   grep -q "snapshot 's1' already exists" "$tmp/out6"
session "$(prep g7 s7)" "$(prep g8 s8)" "$(abort g7)" >"$tmp/out7"
ok "one group at a time" \
   grep -q "group 'g8': this server is already prepared for group 'g7'" "$tmp/out7"
session "$(prep g9 s9 '"deadline-ms":2000')" "sleep 1" >/dev/null &
spid=$!
sleep 0.4
session "$(commit g9)" >"$tmp/out9"
wait $spid
ok "a commit from another connection is refused" \
   grep -q "group 'g9' was prepared by another connection" "$tmp/out9"
session "$(prep g10 s10 '"deadline-ms":0')" >"$tmp/out10"
ok "deadline-ms 0 is refused" grep -q "deadline-ms 0 is not between 1 and 60000" "$tmp/out10"
ok "a commit of an unknown group is refused" \
   bash -c "fleecectl -s '$tmp/g.ctl' raw '$(commit nope)' | grep -q \"group 'nope' is not prepared on this server\""

ok "nbdkit stops cleanly" stop_nbdkit g
