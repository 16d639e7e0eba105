#!/usr/bin/env bash
# inc.sh [N] [WRAP]: bench "incremental" scenario; prints full and incremental pull times;
# the incremental pull is repeated N times (fresh checkpoint each time) and optionally run under WRAP
set -euo pipefail
n=${1:-3}; wrap=${2:-}
top=/work/perf
plugin=${PLUGIN:-$top/plugin/.libs/nbdkit-fleece-plugin.so}
backup=${BACKUP:-$top/tools/fleece-backup}
ctl=$top/tools/fleecectl
tmp=/tmp/incprobe.$$; mkdir -p $tmp
disk=/tmp/perfw/disk1g.img
trap 'kill $(cat $tmp/pid 2>/dev/null) 2>/dev/null; sleep 0.3; rm -rf $tmp' EXIT
nbdkit -U $tmp/sock -P $tmp/pid $plugin disk=$disk store=$tmp/store control=$tmp/ctl
for i in $(seq 100); do [ -S $tmp/ctl ] && [ -s $tmp/pid ] && break; sleep 0.1; done
$ctl -s $tmp/ctl checkpoint c0 >/dev/null
t0=$EPOCHREALTIME; $backup --quiet --sync=full "nbd+unix:///snapshot/c0?socket=$tmp/sock" $tmp/backup.img; t1=$EPOCHREALTIME
awk -v a=$t0 -v b=$t1 'BEGIN{printf "full: %.3f s\n", b-a}'
$ctl -s $tmp/ctl snapshot delete c0 >/dev/null
prev=c0
for k in $(seq $n); do
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$tmp/sock" --rw=randwrite --bs=64k --iodepth=16 --size=1G --io_size=$((163*65536)) --randseed=$RANDOM --output=/dev/null >/dev/null
  $ctl -s $tmp/ctl checkpoint c$k >/dev/null
  t0=$EPOCHREALTIME; $wrap $backup --quiet --sync=incremental --since=$prev "nbd+unix:///snapshot/c$k?socket=$tmp/sock" $tmp/backup.img; t1=$EPOCHREALTIME
  awk -v a=$t0 -v b=$t1 'BEGIN{printf "incr: %.4f s\n", b-a}'
  cmp -s $tmp/backup.img $disk || echo "MISMATCH"
  $ctl -s $tmp/ctl snapshot delete c$k >/dev/null
  $ctl -s $tmp/ctl bitmap remove $prev >/dev/null 2>&1 || true
  prev=c$k
done
