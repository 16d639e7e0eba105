#!/usr/bin/env bash
# Durability across kill -9 (issue 4).  24 times: nbdkit persistent=true
# (with sub-cluster copies, issue 19) is killed with SIGKILL at a random moment while crash-writer writes the
# live disk and the test creates checkpoints and snapshots, pulls each to
# a reference file as soon as it exists and deletes the oldest beyond 3.
# After each crash:
#   - every write acknowledged before a completed flush is on the disk
#     (crash-writer verify);
#   - nbdkit restarts on the same disk and store;
#   - every snapshot is broken or equal to its reference; none whose
#     create returned is missing, none whose delete returned is back;
#   - every bitmap is inconsistent or covers every cluster that changed
#     in its interval (frozen: between its two checkpoints' references;
#     recording: between its checkpoint's reference and the disk); since
#     DIRTY records, none comes back inconsistent;
#   - every reference, pulled before the crash or after the restart, is
#     the disk at one instant between the create's request and its reply
#     (crash-writer snapcheck: the blocks name the writes that put them
#     there), so that a snapshot wrong since before its first pull, or
#     damaged by the restart before its reference was taken, is caught
#     too, not only one that changed across a crash.
# A snapshot or a bitmap that is wrong without saying so fails the test.
#
# The kill comes either after a random delay (mostly during plain writes
# or a pull) or just as a chosen control command or pull starts (create,
# delete, bitmap remove).  The writer's rate changes from one iteration to
# the next: unlimited (8 writes always in flight) or bursts at 2000 or
# 8000 writes/s (copy-before-write all along the iteration).
#
# FLEECE_CRASH_SEED (default 4242) seeds $RANDOM at each iteration: the
# choices (kill plan, writer rate, operations) repeat, the timing does
# not.
# FLEECE_CRASH_ITERATIONS (default 24, 6 under valgrind).
# FLEECE_CRASH_NOKILL=1 is a self-test of the harness that needs no
# persistence: it stops the writer instead of killing nbdkit, runs
# persistent=false and does not restart, so every check runs against a
# server that never crashed and must pass.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires nbdcopy --version
requires python3 --version
requires timeout --version
cw=$abs_top_builddir/tests/crash-writer
requires test -x "$cw"

seed=${FLEECE_CRASH_SEED:-4242}
iters=${FLEECE_CRASH_ITERATIONS:-$([ -n "$VG" ] && echo 6 || echo 24)}
nokill=${FLEECE_CRASH_NOKILL:-}
persistent=$([ -n "$nokill" ] && echo false || echo true)
diag "seed $seed (FLEECE_CRASH_SEED=$seed repeats the choices)," \
     "$iters iterations${nokill:+, NOKILL self-test}"

BS=4096 G=65536
disk=$tmp/disk store=$tmp/store log=$tmp/writes.log
truncate -s 32M "$disk"
ok "initial content" "$cw" init "$disk" $BS

# subcluster=true (the default, said here so that a Fleece that cannot
# fails): the 4 KiB writes copy single blocks into 64 KiB clusters, so the
# crashes cut PARTIAL records and the restarts replay them.
server ()
{
  start_nbdkit s -- disk="$disk" store="$store" control="$tmp/s.ctl" \
    persistent="$persistent" subcluster=true && ctl_ready s
}
if ! ok "nbdkit starts with persistent=$persistent" server; then
  echo "Bail out! nbdkit does not start with persistent=$persistent"
  exit 1
fi

# pull_to SNAPSHOT FILE: pull, bounded in time.
pull_to () { rm -f "$2"; timeout 60 nbdcopy "$(snap_uri s "$1")" "$2"; }
# The writer's log, in records: marks the moments a create was sent and
# returned (crash-writer snapcheck).
logrecs () { echo $(( $(stat -c %s "$log" 2>/dev/null || echo 0) / 16 )); }
msleep () { sleep "$(( $1 / 1000 )).$(printf %03d $(( $1 % 1000 )))"; }

# ---- what the test knows ----
# snap[X]: alive (create returned), maybe (create cut by the crash),
#   deleting (delete cut by the crash), deleted (delete returned).
# bm[B]: rec (recording), frozen:F (frozen by checkpoint F), maybe
#   (checkpoint B cut by the crash), recorfrozen:F (recording, or frozen
#   by F whose checkpoint was cut), removing, removed.
# order: live snapshots, oldest first.  ref[X]: X's reference file,
# trusted[X]: the reference matched the snapshot after a restart.
# sent[X], back[X]: the writer's log length when X's create was sent and
# when it returned (or, cut by the crash, when the writer ended).
declare -A snap=() bm=() ref=() trusted=() seen_broken=() seen_incons=()
declare -A sent=() back=()
order=()
active_cp=
n_exact=0 n_broken=0 n_late=0 n_partial=0 n_bm_ok=0 n_bm_unchecked=0 n_bm_incons=0
silent=0

# ---- the crash ----
kpid= crash_op=

arm_killer ()
{
  [ -n "$kpid" ] && return 0
  local pid=$(cat "$tmp/s.pid") delay=$1
  (
    [ "$delay" -gt 0 ] && msleep "$delay"
    t=$EPOCHREALTIME
    if [ -n "$nokill" ]; then kill "$wpid"; else kill -9 "$pid"; fi
    echo "$t" >"$tmp/killed"
  ) &
  kpid=$!
}

# Did the op that failed at time $1 fail because nbdkit had been killed?
crashed_by ()
{
  local i
  for (( i = 0; i < 20; i++ )); do
    [ -s "$tmp/killed" ] && break
    sleep 0.05
  done
  [ -s "$tmp/killed" ] &&
    awk -v k="$(cat "$tmp/killed")" -v t="$1" 'BEGIN { exit !(k <= t) }'
}

# run_op LABEL KILL-DELAY-MS CMD...: one operation of an iteration; arms
# the killer first if this is the chosen op.  Returns 1 when the crash cut
# it; a failure without a crash goes to $tmp/problems.
opn=0
run_op ()
{
  local label=$1 delay=$2 t; shift 2
  opn=$((opn + 1))
  [ "$opn" -eq "$target_op" ] && arm_killer "$delay"
  if "$@" >"$tmp/op.out" 2>&1; then
    return 0
  fi
  t=$EPOCHREALTIME
  if crashed_by "$t"; then
    crash_op=$label
  else
    echo "iteration $it: $label failed without a crash: $(tail -3 "$tmp/op.out")" >>"$tmp/problems"
  fi
  return 1
}

op_create () # snapshot|checkpoint NAME
{
  local kind=$1 x=$2 cmd
  snap[$x]=maybe
  if [ "$kind" = checkpoint ]; then
    cmd=(checkpoint "$x")
    bm[$x]=maybe
    [ -n "$active_cp" ] && bm[$active_cp]="recorfrozen:$x"
  else
    cmd=(snapshot create "$x")
  fi
  sent[$x]=$(logrecs)
  run_op "$kind $x" $((RANDOM % 3)) ctl s -t 10 "${cmd[@]}" || return 1
  back[$x]=$(logrecs)
  snap[$x]=alive
  order+=("$x")
  if [ "$kind" = checkpoint ]; then
    [ -n "$active_cp" ] && bm[$active_cp]="frozen:$x"
    bm[$x]=rec active_cp=$x
  fi
}

op_pull () # NAME
{
  run_op "pull $1" $((RANDOM % 300)) pull_to "$1" "$tmp/ref.$1" || {
    rm -f "$tmp/ref.$1"; return 1; }
  ref[$1]=$tmp/ref.$1
  snapcheck "$1" "before the crash"
}

# snapcheck NAME WHEN: the reference of snapshot NAME is the disk at one
# instant of its create.
snapcheck ()
{
  if ! "$cw" snapcheck "${ref[$1]}" "$log" $BS "${sent[$1]}" \
       "${back[$1]}" >"$tmp/snapcheck.out" 2>&1; then
    silent=$((silent + 1))
    problem "SILENT MISMATCH: snapshot $1, pulled $2, is not the disk" \
            "at its creation: $(grep -v '^crash-writer snapcheck:' \
                                "$tmp/snapcheck.out" | head -5)"
  fi
}

# Delete the oldest snapshot but the two newest checkpoints (whose
# references check the bitmap between them), and its bitmap once frozen.
op_delete_oldest ()
{
  local i x keep=() cps=0
  for (( i = ${#order[@]} - 1; i >= 0; i-- )); do
    [[ ${order[i]} == c* ]] && (( cps++ < 2 )) && keep[i]=1
  done
  for (( i = 0; i < ${#order[@]}; i++ )); do
    [ -z "${keep[i]:-}" ] && break
  done
  x=${order[i]}
  snap[$x]=deleting
  run_op "snapshot delete $x" $((RANDOM % 3)) \
    ctl s -t 10 snapshot delete "$x" || return 1
  snap[$x]=deleted
  order=("${order[@]:0:i}" "${order[@]:i+1}")
  forget_ref "$x"
  if [[ ${bm[$x]:-} == frozen:* ]]; then
    bm[$x]=removing
    run_op "bitmap remove $x" $((RANDOM % 3)) \
      ctl s -t 10 bitmap remove "$x" || return 1
    bm[$x]=removed
  fi
}

forget_ref ()
{
  rm -f "$tmp/ref.$1"
  unset "ref[$1]" "trusted[$1]"
}

# ---- checks after the restart ----

problem () { echo "$*" >>"$tmp/problems"; }

# cover OLD NEW BITMAP-NAME: print the clusters that differ between the
# files OLD and NEW and are not set in the bitmap export, after a line
# "changed=N set=M".
cover ()
{
  timeout 60 nbdcopy "nbd+unix:///bitmap/$3?socket=$tmp/s.sock" "$tmp/bm" &&
  python3 - "$1" "$2" "$tmp/bm" $G <<'EOF'
import struct, sys
old, new, bm = (open(p, "rb").read() for p in sys.argv[1:4])
g = int(sys.argv[4])
assert bm[:8] == b"FLEECEBM", "bad bitmap export magic"
hsize, nbits = struct.unpack_from("<I", bm, 20)[0], struct.unpack_from("<Q", bm, 32)[0]
bit = lambda i: bm[hsize + i // 8] >> (i % 8) & 1
changed = [i for i in range(nbits) if old[i*g:(i+1)*g] != new[i*g:(i+1)*g]]
print("changed=%d set=%d" % (len(changed), sum(bit(i) for i in range(nbits))))
# Each missing cluster with the writes (crash-writer seq, 0: initial)
# its changed blocks hold on each side.
seq = lambda f, o: struct.unpack_from("<Q", f, o + 8)[0]
for i in changed:
    if not bit(i):
        d = [(o, seq(old, o), seq(new, o)) for o in range(i*g, (i+1)*g, 4096)
             if old[o:o+4096] != new[o:o+4096]]
        print("%d (block:old->new %s)" % (i, " ".join(
            "%d:%d->%d" % (o // 4096, a, b) for o, a, b in d[:4])))
EOF
}

check_snapshots ()
{
  local json rows name broken reason x
  declare -A listed=()
  json=$(ctl s -t 10 --json snapshot list) || { problem "snapshot list failed"; return; }
  mapfile -t rows < <(python3 -c '
import json, sys
for o in json.loads(sys.argv[1]):
    r = o.get("broken-reason", o.get("broken_reason", ""))
    print("%s\x1f%d\x1f%s" % (o["name"], o["broken"], r))' "$json")
  order=()
  for row in "${rows[@]}"; do
    IFS=$'\x1f' read -r name broken reason <<<"$row"
    listed[$name]=1
    case ${snap[$name]:-} in
      "") problem "snapshot $name is listed but the test never created it" ;;
      deleted) problem "snapshot $name is back although its delete returned" ;;
    esac
    if [ "$broken" = 1 ]; then
      n_broken=$((n_broken + 1))
      if [ -z "${seen_broken[$name]:-}" ]; then
        seen_broken[$name]=1
        diag "snapshot $name is broken: $reason"
      fi
      snap[$name]=deleting
      if ctl s -t 10 snapshot delete "$name" >"$tmp/op.out" 2>&1; then
        snap[$name]=deleted
      else
        problem "snapshot delete $name (broken) failed: $(cat "$tmp/op.out")"
      fi
      forget_ref "$name"
      continue
    fi
    snap[$name]=alive
    order+=("$name")
    if [ -z "${ref[$name]:-}" ]; then
      n_late=$((n_late + 1))
      diag "snapshot $name: the crash came before its reference pull" \
           "completed; reference pulled after the restart, used from now on"
      if pull_to "$name" "$tmp/ref.$name" >"$tmp/op.out" 2>&1; then
        ref[$name]=$tmp/ref.$name
        snapcheck "$name" "after the restart"
      else
        problem "pull of snapshot $name after the restart failed: $(cat "$tmp/op.out")"
      fi
      continue
    fi
    if ! pull_to "$name" "$tmp/cur" >"$tmp/op.out" 2>&1; then
      problem "pull of snapshot $name after the restart failed: $(cat "$tmp/op.out")"
    elif [ "$(sum "$tmp/cur")" = "$(sum "${ref[$name]}")" ]; then
      n_exact=$((n_exact + 1))
      trusted[$name]=1
    else
      silent=$((silent + 1))
      problem "SILENT MISMATCH: snapshot $name is not broken but differs" \
              "from its reference in" \
              "$(cmp -l "$tmp/cur" "${ref[$name]}" | wc -l) bytes"
      unset "trusted[$name]"
    fi
  done
  for x in "${!snap[@]}"; do
    [ -n "${listed[$x]:-}" ] && continue
    case ${snap[$x]} in
      alive) problem "snapshot $x is gone although its create returned"
             snap[$x]=deleted; forget_ref "$x" ;;
      maybe) unset "snap[$x]"; forget_ref "$x" ;;
      deleting) snap[$x]=deleted; forget_ref "$x" ;;
    esac
  done
}

# The state of bitmap $name listed as ($enabled, $frozen, $frozen_by)
# against what the test knows.
check_bitmap_state ()
{
  local want=${bm[$name]:-}
  case $want in
    "") problem "bitmap $name is listed but the test never created it" ;;
    removed) problem "bitmap $name is back although its remove returned" ;;
    rec) [ "$frozen" = 0 ] && [ "$enabled" = 1 ] ||
           problem "bitmap $name was recording before the crash, now enabled=$enabled frozen=$frozen" ;;
    frozen:*) [ "$frozen" = 1 ] && [ "$frozen_by" = "${want#frozen:}" ] ||
           problem "bitmap $name was frozen by ${want#frozen:} before the crash, now frozen=$frozen by '$frozen_by'" ;;
    recorfrozen:*) [ "$frozen" = 0 ] || [ "$frozen_by" = "${want#recorfrozen:}" ] ||
           problem "bitmap $name is frozen by '$frozen_by', expected ${want#recorfrozen:} or none" ;;
  esac
}

# check_cover NAME OLD NEW WHAT: the bitmap covers every cluster that
# differs between OLD and NEW.
check_cover ()
{
  local out missing
  if ! out=$(cover "$2" "$3" "$1" 2>&1); then
    problem "bitmap $1: reading it failed: $out"
    return
  fi
  missing=$(sed 1d <<<"$out" | wc -l)
  if [ "$missing" -gt 0 ]; then
    silent=$((silent + 1))
    problem "SILENT MISMATCH: bitmap $1 is not inconsistent but lacks" \
            "$missing clusters that changed $4:" \
            "$(sed -n 2,9p <<<"$out" | tr '\n' ' ')... ($(head -1 <<<"$out"))"
  else
    n_bm_ok=$((n_bm_ok + 1))
  fi
}

check_bitmaps ()
{
  local json rows name enabled frozen frozen_by incons reason x
  declare -A listed=()
  json=$(ctl s -t 10 --json bitmap list) || { problem "bitmap list failed"; return; }
  mapfile -t rows < <(python3 -c '
import json, sys
for o in json.loads(sys.argv[1]):
    r = o.get("inconsistent-reason", o.get("inconsistent_reason", ""))
    print("%s\x1f%d\x1f%d\x1f%s\x1f%d\x1f%s" % (o["name"], o["enabled"], o["frozen"],
          o.get("frozen-by", ""), o["inconsistent"], r))' "$json")
  active_cp=
  for row in "${rows[@]}"; do
    IFS=$'\x1f' read -r name enabled frozen frozen_by incons reason <<<"$row"
    listed[$name]=1
    check_bitmap_state
    if [ "$frozen" = 1 ]; then bm[$name]=frozen:$frozen_by
    else bm[$name]=rec active_cp=$name; fi
    if [ "$incons" = 1 ]; then
      n_bm_incons=$((n_bm_incons + 1))
      if [ -z "${seen_incons[$name]:-}" ]; then
        seen_incons[$name]=1
        diag "bitmap $name is inconsistent${reason:+: $reason}"
      fi
    elif [ "$frozen" = 1 ] && [ -n "${trusted[$name]:-}" ] &&
         [ -n "${trusted[$frozen_by]:-}" ]; then
      check_cover "$name" "${ref[$name]}" "${ref[$frozen_by]}" \
        "between checkpoints $name and $frozen_by"
    elif [ "$frozen" = 0 ] && [ -n "${trusted[$name]:-}" ]; then
      [ -z "$nokill" ] && diag "bitmap $name was recording at the crash" \
                               "and is consistent: checking it against the disk"
      check_cover "$name" "${ref[$name]}" "$disk" "since checkpoint $name"
    else
      n_bm_unchecked=$((n_bm_unchecked + 1))
    fi
  done
  for x in "${!bm[@]}"; do
    [ -n "${listed[$x]:-}" ] && continue
    case ${bm[$x]} in
      rec|frozen:*) problem "bitmap $x is gone although its checkpoint returned" ;;
    esac
    unset "bm[$x]"
  done
  # Remove the frozen bitmaps that can no longer be checked.
  for x in "${!bm[@]}"; do
    [[ ${bm[$x]} == frozen:* ]] || continue
    [ "${snap[$x]:-}" = alive ] && [ "${snap[${bm[$x]#frozen:}]:-}" = alive ] &&
      [ -z "${seen_incons[$x]:-}" ] && continue
    if ctl s -t 10 bitmap remove "$x" >"$tmp/op.out" 2>&1; then
      bm[$x]=removed
    else
      problem "bitmap remove $x failed: $(cat "$tmp/op.out")"
    fi
  done
}

no_problems () { cat "$tmp/problems"; [ ! -s "$tmp/problems" ]; }

# ---- the loop ----

for (( it = 1; it <= iters; it++ )); do
  RANDOM=$((seed + it * 7919))
  : >"$tmp/problems"
  rm -f "$tmp/killed"
  kpid= crash_op= opn=0
  rates=(0 2000 8000)
  rate=${rates[RANDOM % 3]}
  logsize=$(stat -c %s "$log" 2>/dev/null || echo 0)
  timeout -s KILL 60 "$cw" write "$(live_uri s)" "$log" $BS \
    "$RANDOM$RANDOM" "$rate" 2>"$tmp/writer.err" &
  wpid=$!
  for (( i = 0; i < 100; i++ )); do
    [ "$(stat -c %s "$log" 2>/dev/null || echo 0)" -gt "$logsize" ] && break
    sleep 0.05
  done
  if (( RANDOM % 2 )); then
    target_op=-1
    delay=$((200 + RANDOM % 2300))
    plan="after ${delay} ms"
    arm_killer "$delay"
  else
    target_op=$((1 + RANDOM % 10))
    plan="at op $target_op"
  fi
  start=${EPOCHREALTIME/./}
  k=0
  while [ ! -e "$tmp/killed" ]; do
    k=$((k + 1))
    msleep $((RANDOM % 250))
    [ -e "$tmp/killed" ] && break
    if (( ${EPOCHREALTIME/./} - start > 5000000 )); then
      arm_killer 0; continue
    fi
    if (( RANDOM % 2 )); then kind=checkpoint x=c${it}_$k
    else kind=snapshot x=s${it}_$k; fi
    op_create "$kind" "$x" || break
    op_pull "$x" || break
    while [ ${#order[@]} -gt 3 ]; do op_delete_oldest || break 2; done
  done
  arm_killer 0                  # if an op failed without a crash
  wait "$kpid"
  [ -z "$nokill" ] && wait "$(cat "$tmp/s.pid")" 2>/dev/null
  wst=0
  wait "$wpid" || wst=$?
  # A create the crash cut returned, if at all, before the writer ended.
  for x in "${!snap[@]}"; do
    [ "${snap[$x]}" = maybe ] && [ -z "${back[$x]:-}" ] && back[$x]=$(logrecs)
  done
  what="between operations" speed=unlimited
  [ -n "$crash_op" ] && what="cut \"$crash_op\""
  [ "$rate" != 0 ] && speed="$rate/s"
  diag "iteration $it: writer rate $speed, kill $plan, $what;" \
       "$(tail -1 "$tmp/writer.err")"
  if [ -n "$nokill" ]; then
    ok "iteration $it: the writer was stopped" \
       sh -c "test $wst -eq 0 && grep -q 'stopped by SIGTERM' '$tmp/writer.err'"
  else
    ok "iteration $it: the writer ran until the crash" \
       sh -c "cat '$tmp/writer.err'; test $wst -eq 0"
  fi
  ok "iteration $it: every write acknowledged before a completed flush is on the disk" \
     "$cw" verify "$disk" "$log" $BS
  diag "$(grep '^crash-writer verify:' "$tmp/.out")"
  if [ -z "$nokill" ]; then
    rm -f "$tmp/s.pid"
    if ! ok "iteration $it: nbdkit restarts on the same disk and store" server; then
      echo "Bail out! nbdkit does not restart after crash $it"
      exit 1
    fi
  fi
  st=$(ctl s -t 10 --json stats)
  p=$(jget "$st" 'd["partial-clusters"]')
  n_partial=$((n_partial + p))
  check_snapshots
  ok "iteration $it: every snapshot is exact or broken, none lost or back" no_problems
  : >"$tmp/problems"
  check_bitmaps
  ok "iteration $it: every bitmap covers its changes or is inconsistent" no_problems
done

diag "snapshot checks: $n_exact exact, $n_broken broken" \
     "(${#seen_broken[@]} snapshots), $n_late references taken after a restart"
diag "bitmap checks: $n_bm_ok consistent and covering, $n_bm_incons" \
     "inconsistent (${#seen_incons[@]} bitmaps), $n_bm_unchecked consistent" \
     "but not checkable"
diag "partly copied clusters found after the restarts: $n_partial"
ok "the restarts replayed partly copied clusters (sub-cluster copies)" \
   test "$n_partial" -gt 0
is "$silent" 0 "no silent mismatch over $iters crashes"
ok "nbdkit stops cleanly" stop_nbdkit s
