#!/usr/bin/env bash
# A/B of two or more builds of the Fleece plugin on run-bench.sh's
# snap-pull-busy scenario (and, with --nosnap, its live-nosnap
# randwrite-4k): Fleece only, no peers, the builds interleaved in every
# run and in reverse order every other run.
#
#   bench/ab-pull-busy.sh [--runs=3] [--cold=0] [--nosnap] [--dir=DIR]
#       --fleecectl=.../fleecectl NAME=PLUGIN.so [NAME=PLUGIN.so ...]
#
# --cold=SECONDS waits that long, with the previous store removed, before
# each snapshot run: on a VM that reports free memory to its host, pages
# freed a few seconds ago are fast to reuse and older ones are not
# (bench/PERF-NOTES.md), and the wait makes every run start cold.
# DIR (default a temporary directory, removed at the end) holds a 1 GiB
# disk of random data, made once.  One line per measurement on stdout:
#   run R NAME busy-randwrite4k IOPS pull-s SECONDS whole-run IOPS
#   run R NAME nosnap-randwrite4k IOPS

set -euo pipefail

prog=${0##*/}
here=$(cd "$(dirname "$0")" && pwd)
report="$here/bench-report.py"
. "$here/bench-functions.sh"
runs=3
cold=0
nosnap=no
dir=
fleecectl=
specs=()

for arg in "$@"; do
  case $arg in
    --runs=*) runs=${arg#*=} ;;
    --cold=*) cold=${arg#*=} ;;
    --nosnap) nosnap=yes ;;
    --dir=*) dir=${arg#*=} ;;
    --fleecectl=*) fleecectl=${arg#*=} ;;
    -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *=*.so) specs+=("$arg") ;;
    *) die "unknown argument: $arg" ;;
  esac
done
[ -x "$fleecectl" ] || die "--fleecectl=$fleecectl: not executable"
[ "${#specs[@]}" -ge 1 ] || die "no NAME=PLUGIN.so given"

if [ -z "$dir" ]; then
  dir=$(mktemp -d "${TMPDIR:-/tmp}/fleece-ab.XXXXXX")
  keep=no
else
  mkdir -p "$dir"
  keep=yes
fi
disk=$dir/disk.img
sock=$dir/ab.sock
pf=$dir/ab.pid
ctl=$dir/ab.ctl
trap 'stop; [ "$keep" = yes ] || rm -rf "$dir"' EXIT
uri="nbd+unix:///?socket=$sock"
if [ ! -f "$disk" ]; then
  head -c 67108864 /dev/urandom >"$dir/chunk"
  for (( i = 0; i < 16; i++ )); do cat "$dir/chunk"; done >"$disk"
  rm -f "$dir/chunk"
fi

start ()
{
  local i
  rm -f "$sock" "$pf" "$dir/store" "$ctl"
  nbdkit -U "$sock" -P "$pf" "$1" "disk=$disk" "store=$dir/store" \
         "control=$ctl"
  for (( i = 0; i < 100; i++ )); do
    [ -S "$sock" ] && [ -S "$ctl" ] && [ -s "$pf" ] && return 0
    sleep 0.1
  done
  die "nbdkit did not start"
}

stop () { stop_pidfile "$pf"; }

fio4k ()
{
  fio --name=ab --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k \
      --iodepth=32 --size=1G --time_based --runtime=5 \
      --output-format=json --output="$dir/fio.json" "$@" >/dev/null
}

# As run-bench.sh's busy_pull was before issue 19 (a fixed 5 s fio run,
# the pull 0.3 s after fio's start).
busy ()
{
  local fio_pid t0 t1 iops whole
  rm -f "$dir"/busy_*.log
  fio4k --write_lat_log="$dir/busy" --log_avg_msec=0 --log_unix_epoch=1 &
  fio_pid=$!
  sleep 0.3
  t0=$EPOCHREALTIME
  nbdcopy "nbd+unix:///snapshot/s1?socket=$sock" null:
  t1=$EPOCHREALTIME
  wait "$fio_pid"
  iops=$(python3 "$report" rate "$dir/busy_lat.1.log" "${t0/./}" "${t1/./}")
  whole=$(python3 "$report" fio "$dir/fio.json" write.iops)
  echo "$iops $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') ${whole%.*}"
}

for (( r = 1; r <= runs; r++ )); do
  order=("${specs[@]}")
  (( r % 2 )) || mapfile -t order < <(printf '%s\n' "${specs[@]}" | tac)
  for s in "${order[@]}"; do
    name=${s%%=*}
    so=${s#*=}
    if [ "$nosnap" = yes ]; then
      start "$so"
      fio4k
      stop
      v=$(python3 "$report" fio "$dir/fio.json" write.iops)
      echo "run $r $name nosnap-randwrite4k ${v%.*}"
    fi
    rm -f "$dir/store"
    sleep "$cold"
    start "$so"
    "$fleecectl" -s "$ctl" snapshot create s1 >/dev/null
    read -r iops pull whole < <(busy)
    stop
    echo "run $r $name busy-randwrite4k $iops pull-s $pull whole-run $whole"
  done
done
