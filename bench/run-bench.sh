#!/usr/bin/env bash
# Fleece benchmark: the same workloads against Fleece and its peers, side
# by side, and the verdict on each performance target of docs/design.md.
#
#   bench/run-bench.sh [--size=1G] [--runs=3] [--runtime=5]
#       --plugin=.../nbdkit-fleece-plugin.so --fleecectl=.../fleecectl
#       --fleece-backup=.../fleece-backup [--csv=results.csv]
#       [--only=SCENARIO,...] [--keep] [--outdir=DIR]
#       [--equalise=cold|warm|drop|none] [--tmpfs=/dev/shm]
#
# "make bench" runs it with the built plugin and tools.  Everything lives
# in one temporary directory: a disk of --size bytes of random (non-zero)
# data, the stores, the Unix sockets of the servers.  Every server is
# started on a Unix socket in that directory and stopped by its PID.
#
# Servers (names as in the table):
#   null        nbdkit null: the protocol ceiling (no data at all)
#   file        nbdkit file on the disk: the baseline (in snap-pull-busy:
#               the floor, nbdcopy pulling the disk itself)
#   nobackup    nbdkit file on the disk, in snap-pull-busy: the writer
#               alone, no pull and no copy
#   qemu-nbd    qemu-nbd on the disk
#   qsd         qemu-storage-daemon exporting the disk's file node
#   qsd-fleece  QEMU fleecing: qemu-storage-daemon with a copy-before-write
#               filter (file=disk, target=a raw temp file) exported
#               writable as "live", and snapshot-access over it exported
#               as "snap".  The point in time is the daemon's start.
#   fleece      nbdkit with the Fleece plugin: export "" and snapshot/NAME
#               (sub-cluster copies, the default)
#   fleece-whole  the same with subcluster=false: whole 64 KiB clusters
#               copied (in the snapshot scenarios with writes)
#
# Scenarios (each measured --runs times, servers interleaved per run, the
# median reported):
#   live-nosnap        fio on the live export, no snapshot
#   snap-firstwrite    one pass of writes right after the snapshot, every
#                      write the first to its cluster (a copy each)
#   snap-laterwrite    fio on the live export once every cluster is copied
#   snap-read-idle     nbdcopy of the whole snapshot to null:, no writer
#                      (for "file": nbdcopy of the disk itself)
#   snap-pull-busy     the snapshot pulled once by nbdcopy while fio
#                      writes 4 KiB at random (iodepth 32) on the live
#                      export, each request's latency logged; the writes'
#                      rate and p50/p99 latency count those completed
#                      during the pull (for "file": the disk itself, no
#                      snapshot at all; for "nobackup": a 2 s window with
#                      no pull); the writer over time to pull-series.csv
#   snap-pull-busy-tmpfs  the same with the disk, the stores and QEMU's
#                      target on tmpfs (--tmpfs, default /dev/shm)
#   store-discard      the store's size over time while fleece-backup
#                      pulls the snapshot (at a quarter of the disk per
#                      second) under 4 KiB random writes at 8000 IOPS,
#                      with and without --discard-source
#                      (store-series.csv)
#   aa-equalise        (only when named in --only) Fleece's
#                      snap-pull-busy run --runs times with each
#                      --equalise mode, interleaved: the spread of each
#   snap-create-stall  fio 4 KiB random writes (per-request latency log)
#                      while snapshots are created; engine drain times;
#                      the gap in completions; a control run with
#                      "fleecectl status" in the same windows
#   incremental        fleece-backup full pull vs incremental pull of 1 %
#   repo               restore points: a full point and 7 incremental ones
#                      of 1 % each (fleece-backup backup --control), the
#                      restore of the newest vs qemu-img convert of the
#                      same chain, a compressed full point vs qemu-img
#                      convert -c of the same image (time and size)
#
# --equalise: what is done before each run of snap-pull-busy, -tmpfs and
# store-discard so that every server starts from the same memory state
# (bench/PERF-NOTES.md, "Memory equalised before each run").  Every mode
# but "none" first removes the previous run's store and QEMU target and
# syncs.  "cold" (the default) then waits 6 s, so that the memory they
# held has been handed back to the host and every server starts from the
# same state; "warm" instead touches and frees twice the disk's size of
# memory just before the server starts, so that the new store's pages are
# ones the host has just provided; "drop" also drops the page cache
# before that (needs root, else skipped with a warning) and reads the disk
# back into it; "none" does nothing.  The A/A runs that chose "cold" are
# in PERF-NOTES.md.
#
# The table goes to stdout and the CSV to --csv; progress to stderr.  The
# time series (pull-series.csv, store-series.csv) go to --outdir (default:
# the directory of --csv).

set -euo pipefail

prog=${0##*/}
here=$(cd "$(dirname "$0")" && pwd)
report="$here/bench-report.py"
. "$here/bench-functions.sh"

size=1G
runs=3
runtime=5
plugin=
fleecectl=
backup=
csv=results.csv
only=
keep=no
outdir=
equalise=cold
tmpfs=/dev/shm

usage ()
{
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}

for arg in "$@"; do
  case $arg in
    --size=*) size=${arg#*=} ;;
    --runs=*) runs=${arg#*=} ;;
    --runtime=*) runtime=${arg#*=} ;;
    --plugin=*) plugin=${arg#*=} ;;
    --fleecectl=*) fleecectl=${arg#*=} ;;
    --fleece-backup=*) backup=${arg#*=} ;;
    --csv=*) csv=${arg#*=} ;;
    --only=*) only=${arg#*=} ;;
    --keep) keep=yes ;;
    --outdir=*) outdir=${arg#*=} ;;
    --equalise=*) equalise=${arg#*=} ;;
    --tmpfs=*) tmpfs=${arg#*=} ;;
    -h|--help) usage 0 ;;
    *) echo "$prog: unknown argument: $arg" >&2; usage 1 ;;
  esac
done

[ -f "$plugin" ] || die "--plugin=$plugin: no such file (build first: make)"
[ -x "$fleecectl" ] || die "--fleecectl=$fleecectl: not executable"
[ -x "$backup" ] || die "--fleece-backup=$backup: not executable"
[ "$runs" -ge 1 ] || die "--runs must be at least 1"
for c in nbdkit nbdcopy fio qemu-nbd qemu-storage-daemon python3 numfmt; do
  command -v "$c" >/dev/null ||
    die "$c not found (scripts/install-deps installs it)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "fio has no nbd engine"

size_bytes=$(numfmt --from=iec "$size")
cluster=65536
(( size_bytes % cluster == 0 && size_bytes >= 64 * cluster )) ||
  die "--size must be a multiple of 64K and at least 4M"
csv=$(realpath -m "$csv")
outdir=$(realpath -m "${outdir:-$(dirname "$csv")}")
mkdir -p "$outdir"
case $equalise in
  warm|drop|cold|none) ;;
  *) die "--equalise=$equalise: not warm, drop, cold or none" ;;
esac

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fleece-bench.XXXXXX")
disk=$tmp/disk.img
sdir=$tmp                       # where the stores and QEMU's target live
shm=                            # the tmpfs directory, while in use
raw=$tmp/raw.csv
started=()                      # pidfiles of the servers running now

cleanup ()
{
  local pf
  for pf in "${started[@]}"; do
    [ -f "$pf" ] && stop_pid "$(<"$pf")"
  done
  [ -z "$shm" ] || rm -rf "$shm"
  if [ "$keep" = yes ]; then
    echo "$prog: kept $tmp" >&2
  else
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Wanted: is scenario $1 selected by --only?
wanted ()
{
  [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]
}

# record SCENARIO SERVER METRIC UNIT RUN VALUE
record ()
{
  local IFS=,
  echo "$*" >>"$raw"
  log "$1 run $5 $2 $3: $6 $4"
}

# Seconds between two $EPOCHREALTIME values.
elapsed ()
{
  awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", b - a }'
}

# MiB/s for $1 bytes in $2 seconds.
mibps ()
{
  awk -v n="$1" -v s="$2" 'BEGIN { printf "%.1f", n / 1048576 / s }'
}

# ---- servers ----

# Wait for the server's pidfile and socket.
wait_ready ()
{
  local pf=$1 sock=$2 i
  for (( i = 0; i < 100; i++ )); do
    [ -s "$pf" ] && [ -S "$sock" ] && return 0
    sleep 0.1
  done
  die "server did not start (pidfile $pf, socket $sock)"
}

# The Unix socket, pidfile and control socket of each server.
sock_of () { echo "$tmp/$1.sock"; }
pidfile_of () { echo "$tmp/$1.pid"; }
ctl=$tmp/fleece.store.sock

# qemu-storage-daemon arguments for QEMU fleecing: the cbw filter (point
# in time = now) with a fresh raw target as big as the disk.
qsd_fleece_args ()
{
  local target=$sdir/qsd-fleece-target.img
  rm -f "$target"
  truncate -s "$size_bytes" "$target"
  printf '%s\n' \
    --blockdev "driver=file,node-name=disk0,filename=$disk" \
    --blockdev "driver=file,node-name=tmp0,filename=$target" \
    --blockdev "driver=copy-before-write,node-name=cbw,file=disk0,target=tmp0" \
    --blockdev "driver=snapshot-access,node-name=acc,file=cbw" \
    --export "type=nbd,id=live,node-name=cbw,name=live,writable=on" \
    --export "type=nbd,id=snap,node-name=acc,name=snap"
}

start_server ()
{
  local name=$1 sock pf
  sock=$(sock_of "$name")
  pf=$(pidfile_of "$name")
  rm -f "$sock" "$pf"
  case $name in
    null) nbdkit -U "$sock" -P "$pf" null "size=$size_bytes" ;;
    file|nobackup) nbdkit -U "$sock" -P "$pf" file "file=$disk" ;;
    fleece|fleece-whole)
      rm -f "$sdir/fleece.store" "$ctl"
      nbdkit -U "$sock" -P "$pf" "$plugin" "disk=$disk" \
             "store=$sdir/fleece.store" "control=$ctl" \
             "subcluster=$([ "$name" = fleece ] && echo true || echo false)" ;;
    qemu-nbd)
      qemu-nbd --fork --pid-file="$pf" -k "$sock" -f raw -t -e 16 \
               --cache=writeback --aio=threads "$disk" ;;
    qsd)
      qemu-storage-daemon --daemonize --pidfile "$pf" \
        --blockdev "driver=file,node-name=disk0,filename=$disk" \
        --nbd-server "addr.type=unix,addr.path=$sock" \
        --export type=nbd,id=live,node-name=disk0,name=live,writable=on ;;
    qsd-fleece)
      local -a args
      mapfile -t args < <(qsd_fleece_args)
      qemu-storage-daemon --daemonize --pidfile "$pf" \
        --nbd-server "addr.type=unix,addr.path=$sock" "${args[@]}" ;;
    *) die "unknown server $name" ;;
  esac
  wait_ready "$pf" "$sock"
  [ "${name%-whole}" != fleece ] || wait_ready "$pf" "$ctl"
  started+=("$pf")
}

stop_server ()
{
  local pf
  pf=$(pidfile_of "$1")
  stop_pid "$(<"$pf")"
  rm -f "$pf" "$(sock_of "$1")"
  started=("${started[@]/$pf}")
}

# NBD URI of the live export / of the snapshot export of a server.
live_uri ()
{
  case $1 in
    qsd|qsd-fleece) echo "nbd+unix:///live?socket=$(sock_of "$1")" ;;
    *) echo "nbd+unix:///?socket=$(sock_of "$1")" ;;
  esac
}

snap_uri ()
{
  case $1 in
    qsd-fleece) echo "nbd+unix:///snap?socket=$(sock_of "$1")" ;;
    fleece|fleece-whole)
      echo "nbd+unix:///snapshot/$2?socket=$(sock_of "$1")" ;;
    *) live_uri "$1" ;;
  esac
}

# Take the snapshot the scenario measures (QEMU fleecing took it at start).
snapshot ()
{
  [ "${1%-whole}" = fleece ] || return 0
  "$fleecectl" -s "$ctl" snapshot create "$2" >/dev/null
}

# ---- fio ----

# fio_run OUT URI RW BS DEPTH [FIO OPTIONS...]
fio_run ()
{
  local out=$1 uri=$2 rw=$3 bs=$4 depth=$5
  shift 5
  fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" \
      --iodepth="$depth" --size="$size_bytes" \
      --output-format=json --output="$out" "$@" >/dev/null
}

fio_value ()
{
  python3 "$report" fio "$@"
}

# Time-based workload NAME on URI; records MiB/s or IOPS.
# live_workload SCENARIO SERVER RUN NAME URI
live_workload ()
{
  local scen=$1 server=$2 run=$3 name=$4 uri=$5 out=$tmp/fio.json v
  local -a tb=(--time_based --runtime="$runtime")
  case $name in
    seqwrite-1m) fio_run "$out" "$uri" write 1m 16 "${tb[@]}"
                 v=$(fio_value "$out" write.bw_bytes) ;;
    seqwrite-64k) fio_run "$out" "$uri" write 64k 16 "${tb[@]}"
                  v=$(fio_value "$out" write.bw_bytes) ;;
    randwrite-4k) fio_run "$out" "$uri" randwrite 4k 32 "${tb[@]}"
                  v=$(fio_value "$out" write.iops) ;;
    seqread-1m) fio_run "$out" "$uri" read 1m 16 "${tb[@]}"
                v=$(fio_value "$out" read.bw_bytes) ;;
  esac
  if [ "$name" = randwrite-4k ]; then
    record "$scen" "$server" "$name" IOPS "$run" "${v%.*}"
  else
    record "$scen" "$server" "$name" MiB/s "$run" "$(mibps "$v" 1)"
  fi
}

# ---- scenarios ----

# Servers side by side per workload (file and fleece next to each other),
# in reverse order every other run.
scen_live_nosnap ()
{
  local run server wl
  local -a servers=(null file fleece qemu-nbd qsd)
  for (( run = 1; run <= runs; run++ )); do
    for wl in seqwrite-1m seqwrite-64k randwrite-4k seqread-1m; do
      for server in "${servers[@]}"; do
        start_server "$server"
        live_workload live-nosnap "$server" "$run" "$wl" \
                      "$(live_uri "$server")"
        stop_server "$server"
      done
    done
    mapfile -t servers < <(printf '%s\n' "${servers[@]}" | tac)
  done
}

# One pass of first writes (each to a cluster never copied since the
# snapshot), on a fresh server and snapshot.
first_write_pass ()
{
  local server=$1 run=$2 name=$3 out=$tmp/fio.json v
  local uri
  uri=$(live_uri "$server")
  case $name in
    seqwrite-1m) fio_run "$out" "$uri" write 1m 16
                 v=$(mibps "$(fio_value "$out" write.bw_bytes)" 1) ;;
    randwrite-64k) fio_run "$out" "$uri" randwrite 64k 16
                   v=$(mibps "$(fio_value "$out" write.bw_bytes)" 1) ;;
    # 4 KiB at the start of every cluster: write 4K, skip 60K.
    stride-4k) fio_run "$out" "$uri" write:60k 4k 32 \
                       --number_ios="$(( size_bytes / cluster ))"
               v=$(fio_value "$out" write.iops); v=${v%.*} ;;
  esac
  record snap-firstwrite "$server" "$name" \
         "$([ "$name" = stride-4k ] && echo IOPS || echo MiB/s)" "$run" "$v"
  if [ "${server%-whole}" = fleece ]; then
    log "  $server stats: $("$fleecectl" -s "$ctl" -j stats |
        python3 -c 'import json,sys; j=json.load(sys.stdin);
print("cbw-clusters=%d bytes-copied=%d" % (j["cbw-clusters"], j["bytes-copied"]))')"
  fi
}

scen_snap_write ()
{
  local run server wl
  for (( run = 1; run <= runs; run++ )); do
    for server in qsd-fleece fleece fleece-whole; do
      for wl in seqwrite-1m randwrite-64k stride-4k; do
        start_server "$server"
        snapshot "$server" s1
        first_write_pass "$server" "$run" "$wl"
        [ "$wl" = stride-4k ] || stop_server "$server"
      done
      # Every cluster has now been copied once: later writes.
      for wl in seqwrite-1m randwrite-4k; do
        live_workload snap-laterwrite "$server" "$run" "$wl" \
                      "$(live_uri "$server")"
      done
      stop_server "$server"
    done
  done
}

# nbdcopy URI to null:, prints the seconds taken.
pull_once ()
{
  local t0 t1
  t0=$EPOCHREALTIME
  nbdcopy "$1" null:
  t1=$EPOCHREALTIME
  elapsed "$t0" "$t1"
}

scen_snap_read_idle ()
{
  local run server s
  for (( run = 1; run <= runs; run++ )); do
    for server in file qsd-fleece fleece; do
      start_server "$server"
      snapshot "$server" s1
      s=$(pull_once "$(snap_uri "$server" s1)")
      record snap-read-idle "$server" nbdcopy MiB/s "$run" \
             "$(mibps "$size_bytes" "$s")"
      stop_server "$server"
    done
  done
}

# ---- memory equalised before each run ----

drop_warned=no

# equalise [MODE]: bring the machine's memory to the same state before a
# server's run (see --equalise above and bench/PERF-NOTES.md).  The stores
# and QEMU's target of the previous run are removed first, so that their
# page cache is freed now rather than when the next server starts.
equalise ()
{
  local mode=${1:-$equalise} bytes avail
  [ "$mode" != none ] || return 0
  rm -f "$sdir/fleece.store" "$sdir/qsd-fleece-target.img"
  sync
  if [ "$mode" = drop ]; then
    if [ -w /proc/sys/vm/drop_caches ]; then
      echo 3 >/proc/sys/vm/drop_caches
    elif [ "$drop_warned" = no ]; then
      log "WARNING: /proc/sys/vm/drop_caches not writable (not root):" \
          "the page cache is not dropped between runs"
      drop_warned=yes
    fi
    # Every server finds the disk in the page cache, as the first did.
    cat "$disk" >/dev/null
  fi
  case $mode in
    warm|drop)
      # Twice the disk (what the largest store and QEMU's target can
      # take), at most half of the memory available.
      avail=$(awk '/^MemAvailable:/ { printf "%d\n", $2 * 1024 }' /proc/meminfo)
      bytes=$(( 2 * size_bytes ))
      (( bytes <= avail / 2 )) || bytes=$(( avail / 2 ))
      python3 "$report" prefault "$bytes" ;;
    cold) sleep 6 ;;
  esac
}

# ---- snapshot pulled under writes ----

# wait_writing IOLOG PID: fio takes 0.2 to 0.7 s here to connect and
# start (more on a busy machine), so a fixed sleep after its start does
# not say that it writes.  Its I/O log is written through a stdio buffer:
# once the file is not empty, some hundred requests have been issued.
wait_writing ()
{
  local i
  for (( i = 0; i < 200; i++ )); do
    [ ! -s "$1" ] || return 0
    kill -0 "$2" 2>/dev/null || die "fio exited before writing"
    sleep 0.05
  done
  die "fio issued no request within 10 s ($1 empty)"
}

# busy_pull SCENARIO SERVER RUN: fio writes 4 KiB at random on the live
# export (iodepth 32, per-request latency log) and, 0.3 s after it
# has started writing, nbdcopy pulls the whole snapshot once; fio is stopped 0.3 s
# after the pull.  Records the rate and the p50/p99 latency of the live
# writes completed while the pull ran, and the pull's rate; appends the
# writer's run over time to pull-series.csv.  "nobackup" has no pull: its
# window is 2 s of the writer alone.
busy_pull ()
{
  local scen=$1 server=$2 run=$3 fio_pid t0 t1 iops p50 p99
  rm -f "$tmp"/busy_*.log "$tmp/busy.iolog"
  fio --name=bench --ioengine=nbd --uri="$(live_uri "$server")" \
      --rw=randwrite --bs=4k --iodepth=32 --size="$size_bytes" \
      --time_based --runtime=600 --output-format=json \
      --output="$tmp/fio.json" --write_lat_log="$tmp/busy" \
      --log_avg_msec=0 --log_unix_epoch=1 --write_iolog="$tmp/busy.iolog" \
      >/dev/null &
  fio_pid=$!
  wait_writing "$tmp/busy.iolog" "$fio_pid"
  sleep 0.3
  t0=$EPOCHREALTIME
  if [ "$server" = nobackup ]; then
    sleep 2
  else
    timeout -k 5 600 nbdcopy "$(snap_uri "$server" s1)" null: ||
      die "nbdcopy of $server's snapshot failed"
  fi
  t1=$EPOCHREALTIME
  sleep 0.3
  kill -INT "$fio_pid"
  wait "$fio_pid" || :
  [ -s "$tmp/busy_lat.1.log" ] || die "fio wrote no latency log ($server)"
  read -r iops p50 p99 < <(python3 "$report" pull "$tmp/busy_lat.1.log" \
      "${t0/./}" "${t1/./}" "$outdir/pull-series.csv" "$scen,$server,$run")
  record "$scen" "$server" randwrite-4k IOPS "$run" "$iops"
  record "$scen" "$server" lat-p50 us "$run" "$p50"
  record "$scen" "$server" lat-p99 us "$run" "$p99"
  [ "$server" = nobackup ] ||
    record "$scen" "$server" nbdcopy MiB/s "$run" \
           "$(mibps "$size_bytes" "$(elapsed "$t0" "$t1")")"
}

# pull_busy_runs SCENARIO SERVER...: every run starts each server once,
# from equalised memory, in reverse order every other run.
pull_busy_runs ()
{
  local scen=$1 run server
  shift
  local -a servers=("$@")
  for (( run = 1; run <= runs; run++ )); do
    for server in "${servers[@]}"; do
      equalise
      start_server "$server"
      snapshot "$server" s1
      busy_pull "$scen" "$server" "$run"
      stop_server "$server"
    done
    mapfile -t servers < <(printf '%s\n' "${servers[@]}" | tac)
  done
}

pull_servers=(nobackup file qsd-fleece fleece-whole fleece)

scen_snap_pull_busy ()
{
  pull_busy_runs snap-pull-busy "${pull_servers[@]}"
}

# The same on tmpfs: a copy of the disk, the stores and QEMU's target in a
# directory of --tmpfs (the sockets stay where they are).
scen_snap_pull_busy_tmpfs ()
{
  local fs odisk=$disk
  fs=$(stat -f -c %T "$tmpfs" 2>/dev/null) || fs=none
  [ "$fs" = tmpfs ] || die "--tmpfs=$tmpfs: not a tmpfs mount (it is $fs)"
  shm=$(mktemp -d "$tmpfs/fleece-bench.XXXXXX")
  cp "$odisk" "$shm/disk.img"
  disk=$shm/disk.img sdir=$shm
  pull_busy_runs snap-pull-busy-tmpfs "${pull_servers[@]}"
  disk=$odisk sdir=$tmp
  rm -rf "$shm"
  shm=
}

# A/A: Fleece alone, the same snap-pull-busy run with each way of
# equalising memory, the modes interleaved and reversed every other run.
scen_aa_equalise ()
{
  local run mode
  local -a modes=(none warm drop cold)
  for (( run = 1; run <= runs; run++ )); do
    for mode in "${modes[@]}"; do
      equalise "$mode"
      start_server fleece
      snapshot fleece s1
      busy_pull "aa-equalise-$mode" fleece "$run"
      stop_server fleece
    done
    mapfile -t modes < <(printf '%s\n' "${modes[@]}" | tac)
  done
}

# ---- the store during a pull, with and without --discard-source ----

# discard_run RUN MODE: a fresh server and snapshot, fio 4 KiB random
# writes at 8000 IOPS on the live export, and fleece-backup pulling the
# snapshot to a file at a quarter of the disk per second, with
# --discard-source if MODE is "discard"; the store's bytes in use (the
# engine's store-bytes-used: slots, 64 KiB each even for a cluster partly
# copied) and the blocks its file holds, sampled every 0.1 s into
# store-series.csv (MODE, RUN, ms since the pull started, both in bytes).
discard_run ()
{
  local run=$1 mode=$2 fio_pid smp_pid t0 t1 peak last fpeak
  local -a opt=()
  [ "$mode" = keep ] || opt=(--discard-source)
  equalise
  start_server fleece
  snapshot fleece s1
  rm -f "$tmp/backup.img" "$tmp/store.samples"
  fio --name=bench --ioengine=nbd --uri="$(live_uri fleece)" \
      --rw=randwrite --bs=4k --iodepth=8 --rate_iops=8000 \
      --size="$size_bytes" --time_based --runtime=600 >/dev/null &
  fio_pid=$!
  t0=$EPOCHREALTIME
  (
    while :; do
      echo "${EPOCHREALTIME/./} $("$fleecectl" -s "$ctl" -j stats |
        grep -o '"store-bytes-used":[0-9]*' | cut -d: -f2)" \
           "$(( $(stat -c %b "$sdir/fleece.store") * 512 ))"
      sleep 0.1
    done
  ) >"$tmp/store.samples" &
  smp_pid=$!
  sleep 0.5
  timeout -k 5 600 "$backup" --quiet --rate="$(( size_bytes / 4 ))" \
    "${opt[@]}" "$(snap_uri fleece s1)" "$tmp/backup.img" ||
    die "fleece-backup ${opt[*]} failed"
  t1=$EPOCHREALTIME
  sleep 0.5
  kill "$smp_pid"
  wait "$smp_pid" 2>/dev/null || :
  kill -INT "$fio_pid"
  wait "$fio_pid" || :
  stop_server fleece
  read -r peak last fpeak < <(awk -v t0="${t0/./}" -v m="$mode" -v r="$run" \
      -v out="$outdir/store-series.csv" '
    NF == 3 {
      printf "%s,%s,%.0f,%s,%s\n", m, r, ($1 - t0) / 1000 - 500, $2, $3 >>out
      if ($2 > peak) peak = $2
      if ($3 > fpeak) fpeak = $3
      last = $2
    }
    END { printf "%.1f %.1f %.1f\n", peak / 1048576, last / 1048576,
                 fpeak / 1048576 }' \
      "$tmp/store.samples")
  record store-discard "fleece-$mode" store-peak MiB "$run" "$peak"
  record store-discard "fleece-$mode" store-end MiB "$run" "$last"
  record store-discard "fleece-$mode" file-peak MiB "$run" "$fpeak"
  record store-discard "fleece-$mode" pull s "$run" "$(elapsed "$t0" "$t1")"
}

scen_store_discard ()
{
  local run
  for (( run = 1; run <= runs; run++ )); do
    discard_run "$run" keep
    discard_run "$run" discard
  done
}

# Ten snapshot creations, 0.3 s apart, under fio 4 KiB random writes at
# iodepth 8; each new snapshot replaces the previous one.  With MODE
# "status" the same windows run "fleecectl status" (a no-op) instead and
# nothing is deleted: the control run, the floor a process start next to
# fio costs on this machine.  fio's latency log has completion times in
# whole milliseconds; its I/O log (version 3) has issue times in
# microseconds, so bench-report.py rebuilds each completion to the
# microsecond (issue time + latency) for the gap in completions.
# stall_run RUN MODE
stall_run ()
{
  local run=$1 mode=$2 fio_pid i t0 t1 stats sfx=
  local b50 b99 bmax a50 a99 amax cnt d50 d99 dmax
  local g50 g99 gmax gb50 gb99 gbmax res
  local win=$tmp/windows drains=$tmp/drains
  [ "$mode" = create ] || sfx=-$mode
  rm -f "$win" "$drains" "$tmp"/stall_*.log "$tmp/stall.iolog"
  fio_run "$tmp/fio-stall.json" "$(live_uri fleece)" randwrite 4k 8 \
          --time_based --runtime="$((runtime + 2))" \
          --write_lat_log="$tmp/stall" --log_avg_msec=0 --log_unix_epoch=1 \
          --log_offset=1 --write_iolog="$tmp/stall.iolog" &
  fio_pid=$!
  sleep 1.5
  for (( i = 1; i <= 10; i++ )); do
    t0=$EPOCHREALTIME
    if [ "$mode" = create ]; then
      "$fleecectl" -s "$ctl" snapshot create "st$i" >/dev/null
    else
      "$fleecectl" -s "$ctl" status >/dev/null
    fi
    t1=$EPOCHREALTIME
    echo "${t0/./} ${t1/./}" >>"$win"
    "$fleecectl" -s "$ctl" -j stats | python3 -c \
      'import json,sys; print(json.load(sys.stdin)["last-drain-ns"])' \
      >>"$drains"
    [ "$i" -eq 1 ] || [ "$mode" != create ] ||
      "$fleecectl" -s "$ctl" snapshot delete "st$((i - 1))" >/dev/null
    sleep 0.3
  done
  wait "$fio_pid"
  stats=$(python3 "$report" stall "$tmp/stall_lat.1.log" "$win" "$drains" \
          "$tmp/stall.iolog")
  read -r b50 b99 bmax a50 a99 amax cnt d50 d99 dmax \
       g50 g99 gmax gb50 gb99 gbmax res <<<"$stats"
  if [ "$mode" = create ]; then
    record snap-create-stall fleece lat-base-p50 us "$run" "$b50"
    record snap-create-stall fleece lat-base-p99 us "$run" "$b99"
    record snap-create-stall fleece lat-base-max us "$run" "$bmax"
  fi
  record snap-create-stall fleece "lat-around$sfx-p50" us "$run" "$a50"
  record snap-create-stall fleece "lat-around$sfx-p99" us "$run" "$a99"
  record snap-create-stall fleece "lat-around$sfx-max" us "$run" "$amax"
  record snap-create-stall fleece "lat-around$sfx-count" requests "$run" "$cnt"
  if [ "$mode" = create ]; then
    record snap-create-stall fleece drain-p50 us "$run" "$d50"
    record snap-create-stall fleece drain-p99 us "$run" "$d99"
    record snap-create-stall fleece drain-max us "$run" "$dmax"
  fi
  record snap-create-stall fleece "gap-around$sfx-p50" us "$run" "$g50"
  record snap-create-stall fleece "gap-around$sfx-p99" us "$run" "$g99"
  record snap-create-stall fleece "gap-around$sfx-max" us "$run" "$gmax"
  record snap-create-stall fleece "gap-base$sfx-p50" us "$run" "$gb50"
  record snap-create-stall fleece "gap-base$sfx-p99" us "$run" "$gb99"
  record snap-create-stall fleece "gap-base$sfx-max" us "$run" "$gbmax"
  record snap-create-stall fleece "gap-resolution$sfx" us "$run" "$res"
}

# Creation and control runs alternate, in reverse order every other run.
scen_snap_create_stall ()
{
  local run mode
  local -a modes=(create status)
  for (( run = 1; run <= runs; run++ )); do
    for mode in "${modes[@]}"; do
      start_server fleece
      stall_run "$run" "$mode"
      stop_server fleece
    done
    mapfile -t modes < <(printf '%s\n' "${modes[@]}" | tac)
  done
}

# Timed fleece-backup; prints seconds.
timed_backup ()
{
  local t0 t1
  t0=$EPOCHREALTIME
  "$backup" --quiet "$@"
  t1=$EPOCHREALTIME
  elapsed "$t0" "$t1"
}

incremental_run ()
{
  local run=$1 s uri target=$tmp/backup.img nclusters
  rm -f "$target"
  "$fleecectl" -s "$ctl" checkpoint c1 >/dev/null
  uri=$(snap_uri fleece c1)
  s=$(timed_backup --sync=full "$uri" "$target")
  record incremental fleece full-pull s "$run" "$s"
  "$fleecectl" -s "$ctl" snapshot delete c1 >/dev/null
  # 1 % of the disk in distinct random 64 KiB clusters.
  nclusters=$(( size_bytes / cluster / 100 ))
  fio_run "$tmp/fio.json" "$(live_uri fleece)" randwrite 64k 16 \
          --io_size="$(( nclusters * cluster ))"
  "$fleecectl" -s "$ctl" checkpoint c2 >/dev/null
  s=$(timed_backup --sync=incremental --since=c1 \
                   "$(snap_uri fleece c2)" "$target")
  record incremental fleece incr-pull s "$run" "$s"
  cmp -s "$target" "$disk" ||
    log "WARNING: incremental backup differs from the disk (run $run)"
}

scen_incremental ()
{
  local run
  for (( run = 1; run <= runs; run++ )); do
    start_server fleece
    incremental_run "$run"
    stop_server fleece
  done
}

# ---- restore points (fleece-backup's repository) ----

# Timed repository command of fleece-backup; prints seconds.
timed_repo ()
{
  local t0 t1
  t0=$EPOCHREALTIME
  "$backup" "$@" >/dev/null 2>&1 || die "fleece-backup $1 failed"
  t1=$EPOCHREALTIME
  elapsed "$t0" "$t1"
}

timed_cmd ()
{
  local t0 t1
  t0=$EPOCHREALTIME
  "$@" >/dev/null || die "$1 failed"
  t1=$EPOCHREALTIME
  elapsed "$t0" "$t1"
}

# A full point, then 7 incremental ones of 1 % each through --control;
# the restore of the newest against qemu-img convert of the same chain;
# a compressed full point against qemu-img convert -c of the same image.
repo_run ()
{
  local run=$1 repo=$tmp/repo zrepo=$tmp/zrepo n s nclusters bytes
  rm -rf "$repo" "$zrepo" "$tmp/restored" "$tmp/converted" "$tmp/c.qcow2"
  "$backup" init "$repo"
  s=$(timed_repo backup "$repo" "$(live_uri fleece)" --control "$ctl" \
        --name p1 -q)
  record repo fleece full-point s "$run" "$s"
  nclusters=$(( size_bytes / cluster / 100 ))
  for n in 2 3 4 5 6 7 8; do
    fio_run "$tmp/fio.json" "$(live_uri fleece)" randwrite 64k 16 \
            --io_size="$(( nclusters * cluster ))" --randseed="$n"
    s=$(timed_repo backup "$repo" "$(live_uri fleece)" --control "$ctl" \
          --name "p$n" -q)
    if [ "$n" = 2 ]; then
      record repo fleece incr-point s "$run" "$s"
      bytes=$(stat -c %s "$repo/p2.qcow2")
      record repo fleece incr-file-pct % "$run" \
        "$(awk -v a="$bytes" -v b="$size_bytes" 'BEGIN { printf "%.3f", 100 * a / b }')"
    fi
  done
  s=$(timed_repo restore "$repo" p8 "$tmp/restored" -q)
  record repo fleece restore-8 s "$run" "$s"
  cmp -s "$tmp/restored" "$disk" ||
    log "WARNING: the restored point differs from the disk (run $run)"
  # Durable, as a restore is (it ends with fsync): convert, then sync.
  s=$(timed_cmd sh -c 'qemu-img convert -f qcow2 -O raw "$1" "$2" &&
                       sync "$2"' sh "$repo/p8.qcow2" "$tmp/converted")
  record repo qemu-img convert-8 s "$run" "$s"
  "$backup" init "$zrepo"
  s=$(timed_repo backup "$zrepo" "$(live_uri fleece)" --control "$ctl" \
        --name z1 --compress -q)
  record repo fleece compressed-full s "$run" "$s"
  record repo fleece compressed-bytes B "$run" "$(stat -c %s "$zrepo/z1.qcow2")"
  s=$(timed_cmd sh -c 'qemu-img convert -c -f raw -O qcow2 \
        -o compression_type=zstd "$1" "$2" && sync "$2"' sh \
        "$tmp/restored" "$tmp/c.qcow2")
  record repo qemu-img compressed-full s "$run" "$s"
  record repo qemu-img compressed-bytes B "$run" "$(stat -c %s "$tmp/c.qcow2")"
  rm -rf "$repo" "$zrepo" "$tmp/restored" "$tmp/converted" "$tmp/c.qcow2"
}

scen_repo ()
{
  local run
  for (( run = 1; run <= runs; run++ )); do
    start_server fleece
    repo_run "$run"
    stop_server fleece
  done
}

# ---- main ----

machine ()
{
  echo "date:     $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "machine:  nproc=$(nproc), memory=$(free -g | awk '/^Mem:/ { print $2 " GiB" }')," \
       "$(uname -srm)"
  echo "disk:     $(df -hT "$tmp" | awk 'NR == 2 { print $1 " " $2 ", " $3 " total" }')," \
       "$(lsblk -dno NAME,ROTA,SIZE "$(df --output=source "$tmp" | tail -1)" 2>/dev/null |
          awk '{ print "rotational=" $2 }')"
  echo "versions: $(nbdkit --version), $(qemu-storage-daemon --version | head -1)," \
       "$(fio --version), $(nbdcopy --version | head -1)"
  echo "params:   size=$size runs=$runs runtime=${runtime}s"
}

machine
log "creating $size disk of random data in $tmp"
# 64 MiB of random data (or less), repeated: non-zero, and quick to make.
chunk=$(( size_bytes < 67108864 ? size_bytes : 67108864 ))
head -c "$chunk" /dev/urandom >"$tmp/chunk"
for (( i = 0; i < size_bytes / chunk; i++ )); do cat "$tmp/chunk"; done >"$disk"
head -c "$(( size_bytes % chunk ))" "$tmp/chunk" >>"$disk"
rm -f "$tmp/chunk"
echo "scenario,server,metric,unit,run,value" >"$raw"
echo "scenario,server,run,t_ms,pull_ms,iops,p50_us,p99_us" \
  >"$outdir/pull-series.csv"
echo "mode,run,t_ms,store_bytes,alloc_bytes" >"$outdir/store-series.csv"

if wanted live-nosnap; then scen_live_nosnap; fi
if wanted snap-write; then scen_snap_write; fi
if wanted snap-read-idle; then scen_snap_read_idle; fi
if wanted snap-pull-busy; then scen_snap_pull_busy; fi
if wanted snap-pull-busy-tmpfs; then scen_snap_pull_busy_tmpfs; fi
if wanted store-discard; then scen_store_discard; fi
# (A failure in a scenario must stop the run: "set -e" does not apply
# to the left of "&&".)  aa-equalise runs only when named.
if [[ ",$only," == *",aa-equalise,"* ]]; then scen_aa_equalise; fi
if wanted snap-create-stall; then scen_snap_create_stall; fi
if wanted incremental; then scen_incremental; fi
if wanted repo; then scen_repo; fi

echo
python3 "$report" report "$raw" "$csv"
cp "$raw" "${csv%.csv}-raw.csv"
log "done: $csv"
