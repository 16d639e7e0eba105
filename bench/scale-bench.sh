#!/usr/bin/env bash
# How Fleece's costs grow with the disk and with the work (issue 19): a
# sparse disk of --disk-size (default 4 TiB), and 10 k, 100 k and 1 M
# copied clusters.
#
#   bench/scale-bench.sh --plugin=.../nbdkit-fleece-plugin.so
#       --fleecectl=.../fleecectl --fleece-backup=.../fleece-backup
#       [--disk-size=4T] [--copies=10000,100000,1000000] [--runs=3]
#       [--csv=scale-results.csv]
#
# 1 M copied clusters of the default 64 KiB would be a 64 GiB store: too
# much for the bench's disk and time.  So every figure that counts copies
# runs with cluster-size=4096 (1 M copies = a 4 GiB store), on a disk
# whose first (largest --copies) x 4 KiB hold random data (written once
# at the start, so that each copy is a real 4 KiB of data, not a zero
# cluster the engine detects and does not store); the rest of the disk is
# a hole.  The writes are sequential 64 KiB requests (16 clusters each)
# over clusters never written since the snapshots.
#
# Figures (each in the CSV as figure,param,run,value,unit; a param is
# KEY=VALUE pairs separated by ";"):
#   start-s        nbdkit start to a control socket that answers, no
#                  snapshot, per disk size (1/4, 1/2 and all of
#                  --disk-size) and cluster size (64K, 4K), --runs times
#   rss-nosnap     the nbdkit process's RSS (VmRSS) and anonymous RSS
#                  (RssAnon) after that start, bytes
#   rss-copies     anonymous RSS with 10 snapshots and N copies, N = 0 and
#                  each --copies (one server, the copies added in steps);
#                  bytes-per-copy = (RssAnon(N) - RssAnon(0)) / N
#   create-s       snapshot creation time with N copies held (median of 5
#                  creations, each deleted again)
#   restart-s      restart time of a persistent=true store holding N
#                  copies (one snapshot), and its anonymous RSS after it
#   incr-s, incr-bytes  an incremental pull (fleece-backup
#                  --sync=incremental) of N changed clusters since the last
#                  checkpoint onto a sparse file: time, and the bytes
#                  written to the target (its allocation growing); 1 % of the disk
#                  changed (41 GiB for 4 TiB) is more than this run
#                  writes: the fit's value there is given, as
#                  "extrapolated"
#
# Everything lives in one temporary directory (the disks are sparse); the
# servers listen on Unix sockets there and are stopped by PID.  The table
# goes to stdout, the CSV to --csv, progress to stderr.

set -euo pipefail

prog=${0##*/}
here=$(cd "$(dirname "$0")" && pwd)
report="$here/bench-report.py"
. "$here/bench-functions.sh"
plugin=
fleecectl=
backup=
disk_size=4T
copies=10000,100000,1000000
runs=3
csv=scale-results.csv

for arg in "$@"; do
  case $arg in
    --plugin=*) plugin=${arg#*=} ;;
    --fleecectl=*) fleecectl=${arg#*=} ;;
    --fleece-backup=*) backup=${arg#*=} ;;
    --disk-size=*) disk_size=${arg#*=} ;;
    --copies=*) copies=${arg#*=} ;;
    --runs=*) runs=${arg#*=} ;;
    --csv=*) csv=${arg#*=} ;;
    -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument: $arg" ;;
  esac
done
[ -f "$plugin" ] || die "--plugin=$plugin: no such file (build first: make)"
[ -x "$fleecectl" ] || die "--fleecectl=$fleecectl: not executable"
[ -x "$backup" ] || die "--fleece-backup=$backup: not executable"
for c in nbdkit fio python3 numfmt; do
  command -v "$c" >/dev/null || die "$c not found (scripts/install-deps)"
done
disk_bytes=$(numfmt --from=iec "$disk_size")
IFS=, read -r -a counts <<<"$copies"
max=0
for n in "${counts[@]}"; do
  [[ $n =~ ^[0-9]+$ ]] && (( n > max )) || die "--copies must increase: $copies"
  max=$n
done
csv=$(realpath -m "$csv")

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fleece-scale.XXXXXX")
sock=$tmp/nbd.sock
pf=$tmp/nbdkit.pid
ctl=$tmp/ctl.sock
raw=$tmp/raw.csv
trap 'stop; rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

# record FIGURE PARAM RUN VALUE UNIT
record ()
{
  echo "$1,$2,$3,$4,$5" >>"$raw"
  log "$1 [$2] run $3: $4 $5"
}

now () { echo "${EPOCHREALTIME/./}"; }

# Seconds from $1 to $2 (microseconds).
secs () { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", (b - a) / 1e6 }'; }

# start DISK STORE [PLUGIN OPTIONS...]: prints the seconds from the start
# of nbdkit to the first answer of its control socket.
start ()
{
  local disk=$1 store=$2 t0 i
  shift 2
  rm -f "$sock" "$pf" "$ctl"
  t0=$(now)
  nbdkit -U "$sock" -P "$pf" "$plugin" "disk=$disk" "store=$store" \
         "control=$ctl" "$@" || die "nbdkit did not start on $disk"
  for (( i = 0; i < 6000; i++ )); do
    if [ -S "$ctl" ] && "$fleecectl" -s "$ctl" status >/dev/null 2>&1; then
      secs "$t0" "$(now)"
      return 0
    fi
    sleep 0.01
  done
  die "the control socket of nbdkit on $disk did not answer within 60 s"
}

stop () { stop_pidfile "$pf"; }

# rss FIELD: VmRSS or RssAnon of the running nbdkit, in bytes.
rss ()
{
  awk -v f="$1:" '$1 == f { printf "%d\n", $2 * 1024 }' "/proc/$(<"$pf")/status"
}

ctl_cmd () { "$fleecectl" -s "$ctl" "$@" >/dev/null; }

# write_clusters FROM TO: 4 KiB clusters [FROM, TO) of the live export,
# in 64 KiB sequential writes.
write_clusters ()
{
  (( $2 > $1 )) || return 0
  fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
      --rw=write --bs=64k --iodepth=16 --offset="$(( $1 * 4096 ))" \
      --size="$(( ($2 - $1) * 4096 ))" --output-format=json \
      --output="$tmp/fio.json" >/dev/null ||
    die "fio writing clusters $1..$2 failed"
}

# median of 5 snapshot creations (each deleted after), seconds.
create_time ()
{
  local i t0 t1 v=()
  for (( i = 0; i < 5; i++ )); do
    t0=$(now)
    ctl_cmd snapshot create "probe$i"
    t1=$(now)
    v+=("$(secs "$t0" "$t1")")
    ctl_cmd snapshot delete "probe$i"
  done
  printf '%s\n' "${v[@]}" | sort -g | sed -n 3p
}

echo "figure,param,run,value,unit" >"$raw"

# ---- 1. start time and memory with no snapshot ----
for c in 65536 4096; do
  for frac in 4 2 1; do
    s=$(( disk_bytes / frac / 1048576 * 1048576 ))
    truncate -s "$s" "$tmp/empty.img"
    p="disk=$(numfmt --to=iec "$s");cluster=$(( c / 1024 ))K"
    for (( r = 1; r <= runs; r++ )); do
      rm -f "$tmp/store"
      record start-s "$p" "$r" "$(start "$tmp/empty.img" "$tmp/store" \
                                 "cluster-size=$c")" s
      record rss-nosnap-vmrss "$p" "$r" "$(rss VmRSS)" B
      record rss-nosnap-anon "$p" "$r" "$(rss RssAnon)" B
      stop
    done
    rm -f "$tmp/empty.img"
  done
done

# ---- the disk: sparse, its first max x 4 KiB random data ----
log "writing $(( max * 4096 / 1048576 )) MiB of random data into a" \
    "$disk_size sparse disk"
disk=$tmp/disk.img
head -c 67108864 /dev/urandom >"$tmp/chunk"
left=$(( max * 4096 ))
while (( left > 0 )); do
  if (( left >= 67108864 )); then cat "$tmp/chunk"; else head -c "$left" "$tmp/chunk"; fi
  left=$(( left - 67108864 ))
done >"$disk"
rm -f "$tmp/chunk"
truncate -s "$disk_bytes" "$disk"

# ---- 2. memory and snapshot creation with 10 snapshots and N copies ----
rm -f "$tmp/store"
start "$disk" "$tmp/store" cluster-size=4096 >/dev/null
record rss-copies-anon "snapshots=0;copies=0" 1 "$(rss RssAnon)" B
record create-s "copies=0;snapshots=0" 1 "$(create_time)" s
for i in 1 2 3 4 5 6 7 8 9 10; do ctl_cmd snapshot create "s$i"; done
base=$(rss RssAnon)
record rss-copies-anon "snapshots=10;copies=0" 1 "$base" B
record create-s "copies=0" 1 "$(create_time)" s
prev=0
for n in "${counts[@]}"; do
  log "writing clusters $prev..$n (10 snapshots)"
  write_clusters "$prev" "$n"
  prev=$n
  got=$("$fleecectl" -s "$ctl" -j stats | python3 -c \
        'import json,sys; j=json.load(sys.stdin); print(j["cbw-clusters"], j["store-bytes-used"])')
  read -r cbw used <<<"$got"
  (( cbw >= n )) || die "only $cbw clusters copied after writing $n"
  record store-bytes "copies=$n" 1 "$used" B
  a=$(rss RssAnon)
  record rss-copies-anon "snapshots=10;copies=$n" 1 "$a" B
  record bytes-per-copy "copies=$n" 1 \
    "$(awk -v a="$a" -v b="$base" -v n="$n" 'BEGIN { printf "%.1f", (a - b) / n }')" B
  record create-s "copies=$n" 1 "$(create_time)" s
done
stop

# ---- 3. incremental pulls of N changed clusters ----
rm -f "$tmp/store" "$tmp/target.img"
truncate -s "$disk_bytes" "$tmp/target.img"
start "$disk" "$tmp/store" cluster-size=4096 >/dev/null
ctl_cmd checkpoint c0
ctl_cmd snapshot delete c0
prev=0
for n in "${counts[@]}"; do
  log "incremental: writing clusters $prev..$n"
  write_clusters "$prev" "$n"
  ctl_cmd checkpoint "c$n"
  before=$(stat -c %b "$tmp/target.img")
  t0=$(now)
  "$backup" --quiet --sync=incremental --since="c$prev" \
    "nbd+unix:///snapshot/c$n?socket=$sock" "$tmp/target.img" ||
    die "incremental pull of c$n since c$prev failed"
  t1=$(now)
  after=$(stat -c %b "$tmp/target.img")
  record incr-s "changed=$(( n - prev ))" 1 "$(secs "$t0" "$t1")" s
  record incr-bytes "changed=$(( n - prev ))" 1 \
    "$(( (after - before) * 512 ))" B
  ctl_cmd snapshot delete "c$n"
  ctl_cmd bitmap remove "c$prev"
  prev=$n
done
stop

# ---- 4. restart of a persistent store holding N copies ----
rm -f "$tmp/store"
start "$disk" "$tmp/store" cluster-size=4096 persistent=true >/dev/null
ctl_cmd snapshot create p1
prev=0
for n in "${counts[@]}"; do
  log "persistent: writing clusters $prev..$n"
  write_clusters "$prev" "$n"
  prev=$n
  for (( r = 1; r <= runs; r++ )); do
    stop
    record restart-s "copies=$n" "$r" \
      "$(start "$disk" "$tmp/store" persistent=true)" s
  done
  record restart-rss-anon "copies=$n" 1 "$(rss RssAnon)" B
done
stop

python3 "$report" scale "$raw" "$csv"
