#!/usr/bin/env bash
# Consistency groups: how long a group holds each server's writers
# (issue 17; target p99 < 2 ms with 8 disks on one host).
#
#   bench/group-bench.sh --plugin=.../nbdkit-fleece-plugin.so
#       --fleecectl=.../fleecectl [--disks=2,4,8] [--groups=40]
#       [--runtime=SECONDS] [--csv=FILE]
#
# For each count N of disks: N nbdkit servers with the Fleece plugin, one
# 64 MiB disk each, every one written by its own fio (4 KiB random
# writes, queue depth 4, over NBD); then --groups groups of snapshots
# taken with `fleecectl -s ... snapshot create` one after the other
# (each deleted before the next), while fio writes.  The hold of each
# server is what the server measured, from the closing of its write gate
# at group-prepare to its opening at group-commit (group-commit's
# hold-ns): the time its writers could not write.  Reported: p50, p99
# and max of the holds of every server in every group, and p50/p99 of
# fleecectl's wall time per group; what the holds were spent on (the
# reply's drain-ns, wait-ns and commit-ns: the drain of the writes in
# flight, the wait for the commit, the commit's own work); then the
# holds per disk (each server's holds over the groups).  The wall time
# includes connecting to every server, outside the holds.
#
# Everything lives in one temporary directory, the servers on Unix
# sockets there, stopped by PID.  The table goes to stdout, the CSV to
# --csv.

set -euo pipefail

prog=${0##*/}
disks=2,4,8
groups=40
runtime=600
plugin=
fleecectl=
csv=

die () { echo "$prog: $*" >&2; exit 1; }
for a in "$@"; do
  case $a in
    --plugin=*) plugin=${a#*=} ;;
    --fleecectl=*) fleecectl=${a#*=} ;;
    --disks=*) disks=${a#*=} ;;
    --groups=*) groups=${a#*=} ;;
    --runtime=*) runtime=${a#*=} ;;
    --csv=*) csv=${a#*=} ;;
    *) die "unknown argument '$a'" ;;
  esac
done
[ -n "$plugin" ] && [ -n "$fleecectl" ] || die "--plugin and --fleecectl are required"
for c in nbdkit fio python3; do
  command -v "$c" >/dev/null || die "$c is required"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fleece-group-bench.XXXXXX")
pids=()
cleanup ()
{
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || :; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || :; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# one_count N: the servers, the writers, the groups; appends the holds
# (ns, one line per server per group) to $tmp/hold.N and the wall times
# (ns) to $tmp/wall.N.
one_count ()
{
  local n=$1 d g socks=() t0 t1 first=${#pids[@]} i
  for (( d = 0; d < n; d++ )); do
    truncate -s 64M "$tmp/disk$d"
    rm -f "$tmp/n$d.sock"
    nbdkit -f -U "$tmp/n$d.sock" "$plugin" disk="$tmp/disk$d" \
      store="$tmp/store$d" control="$tmp/c$d.sock" >"$tmp/nbdkit$d.log" 2>&1 &
    pids+=($!)
    socks+=(-s "$tmp/c$d.sock")
  done
  for (( d = 0; d < n; d++ )); do
    for (( i = 0; i < 100; i++ )); do
      [ -S "$tmp/c$d.sock" ] && [ -S "$tmp/n$d.sock" ] && break
      sleep 0.1
    done
    [ -S "$tmp/c$d.sock" ] || die "nbdkit $d did not start: $(cat "$tmp/nbdkit$d.log")"
    fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$tmp/n$d.sock" \
        --rw=randwrite --bs=4k --iodepth=4 --size=64M --time_based \
        --runtime="$runtime" >/dev/null 2>&1 &
    pids+=($!)
  done
  sleep 1
  for (( g = 1; g <= groups; g++ )); do
    t0=$(date +%s%N)
    "$fleecectl" --json "${socks[@]}" snapshot create "g$g" >"$tmp/out"
    t1=$(date +%s%N)
    echo $(( t1 - t0 )) >>"$tmp/wall.$n"
    python3 -c 'import json,sys
for i, r in enumerate(json.load(open(sys.argv[1]))):
    print(i, r["hold-ns"], r["drain-ns"], r["wait-ns"], r["commit-ns"])' \
      "$tmp/out" >>"$tmp/hold.$n"
    for (( d = 0; d < n; d++ )); do
      "$fleecectl" -s "$tmp/c$d.sock" snapshot delete "g$g" >/dev/null
    done
    sleep 0.0$(( RANDOM % 10 ))
  done
  for (( i = ${#pids[@]} - 1; i >= first; i-- )); do
    kill "${pids[i]}" 2>/dev/null || :
    wait "${pids[i]}" 2>/dev/null || :
    unset 'pids[i]'
  done
  rm -f "$tmp"/disk* "$tmp"/store*
}

IFS=, read -r -a counts <<<"$disks"
for n in "${counts[@]}"; do
  echo "$prog: $n disks, $groups groups" >&2
  one_count "$n"
done

python3 - "$tmp" "$csv" "${counts[@]}" <<'PY'
import sys
tmp, csv, counts = sys.argv[1], sys.argv[2], sys.argv[3:]
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
rows = []
per = {}
parts = {}
print("%-6s %8s %10s %10s %10s %12s %12s" % ("disks", "holds", "p50 ms",
      "p99 ms", "max ms", "wall p50 ms", "wall p99 ms"))
for n in counts:
    pairs = [x.split() for x in open("%s/hold.%s" % (tmp, n))]
    h = [int(x[1]) / 1e6 for x in pairs]
    per[n] = {}
    for x in pairs:
        per[n].setdefault(int(x[0]), []).append(int(x[1]) / 1e6)
    parts[n] = [[int(x[k]) / 1e6 for x in pairs] for k in (2, 3, 4)]
    w = [int(x) / 1e6 for x in open("%s/wall.%s" % (tmp, n))]
    r = (n, len(h), pct(h, 50), pct(h, 99), max(h), pct(w, 50), pct(w, 99))
    rows.append(r)
    print("%-6s %8d %10.3f %10.3f %10.3f %12.1f %12.1f" % r)
print()
print("What the holds were spent on (drain-ns, wait-ns, commit-ns of each hold):")
print("%-6s %10s %10s %10s %10s %10s %10s" % ("disks", "drain p50", "drain p99",
      "wait p50", "wait p99", "commit p50", "commit p99"))
for n in counts:
    d, w, c = parts[n]
    print("%-6s %10.3f %10.3f %10.3f %10.3f %10.3f %10.3f" % (n,
          pct(d, 50), pct(d, 99), pct(w, 50), pct(w, 99), pct(c, 50),
          pct(c, 99)))
print()
print("Per disk (the hold of each server over the groups):")
print("%-6s %-5s %8s %10s %10s %10s" % ("disks", "disk", "holds", "p50 ms",
      "p99 ms", "max ms"))
for n in counts:
    for d, h in sorted(per[n].items()):
        print("%-6s %-5d %8d %10.3f %10.3f %10.3f" % (n, d, len(h),
              pct(h, 50), pct(h, 99), max(h)))
if csv:
    with open(csv, "w") as f:
        f.write("disks,holds,hold_p50_ms,hold_p99_ms,hold_max_ms,"
                "wall_p50_ms,wall_p99_ms\n")
        for r in rows:
            f.write("%s,%d,%.3f,%.3f,%.3f,%.1f,%.1f\n" % r)
PY
