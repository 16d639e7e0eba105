#!/usr/bin/env bash
# Deleting a big snapshot while the disk is written: how long the delete
# takes to reply, how long the control socket then takes to answer, and
# how long until the store's space is given back.
#
#   bench/delete-bench.sh --plugin=.../nbdkit-fleece-plugin.so
#       --fleecectl=.../fleecectl [--disk-size=1G] [--fill=8]
#       [--runs=3] [--persistent=true,false]
#
# For each run: one nbdkit with the Fleece plugin on a --disk-size disk
# (every byte written once first, so that copies hold data), written by
# fio (4 KiB random writes, queue depth 8, over NBD) all along; a
# snapshot is created, fio writes for --fill seconds (the copies fill the
# store), then `snapshot delete` is timed, then `status`, then the time
# until `stats` says the store holds nothing.  The freed space is punched
# out of the store file; on ext4 a punch first writes back the range's
# dirty pages, which under writes takes seconds.
#
# Everything lives in one temporary directory, the server on a Unix
# socket there, stopped by PID.

set -euo pipefail

prog=${0##*/}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/bench-functions.sh"

plugin= fleecectl= size=1G fill=8 runs=3 modes=true,false
for a in "$@"; do
  case $a in
    --plugin=*) plugin=${a#*=} ;;
    --fleecectl=*) fleecectl=${a#*=} ;;
    --disk-size=*) size=${a#*=} ;;
    --fill=*) fill=${a#*=} ;;
    --runs=*) runs=${a#*=} ;;
    --persistent=*) modes=${a#*=} ;;
    *) die "unknown argument '$a'" ;;
  esac
done
[ -n "$plugin" ] && [ -n "$fleecectl" ] || die "--plugin and --fleecectl are required"
for c in nbdkit fio python3; do
  command -v "$c" >/dev/null || die "$c is required"
done

tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/fleece-delete-bench.XXXXXX")
pids=()
cleanup ()
{
  local p
  for p in "${pids[@]}"; do stop_pid "$p"; done
  rm -rf "$tmp"
}
trap cleanup EXIT

ms () { echo $(( $(date +%s%N) / 1000000 )); }
used () {
  "$fleecectl" -s "$tmp/c.sock" --json stats |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["store-bytes-used"])'
}

printf '%-11s %4s %10s %12s %12s %14s\n' persistent run "store MiB" \
       "delete ms" "status ms" "space back ms"
IFS=, read -r -a ms_modes <<<"$modes"
for mode in "${ms_modes[@]}"; do
  for (( r = 1; r <= runs; r++ )); do
    rm -f "$tmp/disk" "$tmp/store" "$tmp/n.sock"
    truncate -s "$size" "$tmp/disk"
    fio --name=fill --filename="$tmp/disk" --rw=write --bs=1M \
        --size="$size" >/dev/null 2>&1
    nbdkit -f -U "$tmp/n.sock" "$plugin" disk="$tmp/disk" \
      store="$tmp/store" control="$tmp/c.sock" persistent="$mode" \
      >"$tmp/nbdkit.log" 2>&1 &
    npid=$!
    pids+=("$npid")
    for (( i = 0; i < 100; i++ )); do
      [ -S "$tmp/c.sock" ] && [ -S "$tmp/n.sock" ] && break
      sleep 0.1
    done
    [ -S "$tmp/c.sock" ] || die "nbdkit did not start: $(cat "$tmp/nbdkit.log")"
    "$fleecectl" -s "$tmp/c.sock" snapshot create s >/dev/null
    fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$tmp/n.sock" \
        --rw=randwrite --bs=4k --iodepth=8 --size="$size" --time_based \
        --runtime=$(( fill + 120 )) >/dev/null 2>&1 &
    fpid=$!
    pids+=("$fpid")
    sleep "$fill"
    u=$(used)
    t0=$(ms)
    "$fleecectl" -s "$tmp/c.sock" snapshot delete s >/dev/null
    t1=$(ms)
    "$fleecectl" -s "$tmp/c.sock" status >/dev/null
    t2=$(ms)
    for (( i = 0; i < 1200; i++ )); do
      [ "$(used)" = 0 ] && break
      sleep 0.05
    done
    t3=$(ms)
    printf '%-11s %4d %10d %12d %12d %14d\n' "$mode" "$r" $(( u >> 20 )) \
           $(( t1 - t0 )) $(( t2 - t1 )) $(( t3 - t0 ))
    stop_pid "$fpid"
    stop_pid "$npid"
    pids=()
  done
done
