#!/usr/bin/env bash
# like inc.sh, but the incremental pulls copy 0 clusters (fixed cost)
set -euo pipefail
top=/work/perf
plugin=${PLUGIN:-$top/plugin/.libs/nbdkit-fleece-plugin.so}
backup=${BACKUP:-$top/tools/fleece-backup}
ctl=$top/tools/fleecectl
tmp=/tmp/incprobe0.$$; mkdir -p $tmp
trap 'kill $(cat $tmp/pid 2>/dev/null) 2>/dev/null; sleep 0.3; rm -rf $tmp' EXIT
truncate -s 64M $tmp/disk; 
nbdkit -U $tmp/sock -P $tmp/pid $plugin disk=$tmp/disk store=$tmp/store control=$tmp/ctl
for i in $(seq 100); do [ -S $tmp/ctl ] && [ -s $tmp/pid ] && break; sleep 0.1; done
$ctl -s $tmp/ctl checkpoint c0 >/dev/null
$backup --quiet --sync=full "nbd+unix:///snapshot/c0?socket=$tmp/sock" $tmp/backup.img
prev=c0
for k in 1 2 3 4 5; do
  $ctl -s $tmp/ctl checkpoint c$k >/dev/null
  t0=$EPOCHREALTIME; $backup --quiet --sync=incremental --since=$prev "nbd+unix:///snapshot/c$k?socket=$tmp/sock" $tmp/backup.img; t1=$EPOCHREALTIME
  awk -v a=$t0 -v b=$t1 'BEGIN{printf "incr0: %.4f s\n", b-a}'
  prev=c$k
done
