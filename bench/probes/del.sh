#!/usr/bin/env bash
# del.sh: copy every cluster of a 1 GiB disk for snapshot s1, then time its deletion (no load)
set -euo pipefail
top=/work/perf
plugin=${PLUGIN:-$top/plugin/.libs/nbdkit-fleece-plugin.so}
tmp=/tmp/delprobe.$$; mkdir -p $tmp
disk=/tmp/perfw/disk1g.img
trap 'kill $(cat $tmp/pid 2>/dev/null) 2>/dev/null; sleep 0.3; rm -rf $tmp' EXIT
nbdkit -U $tmp/sock -P $tmp/pid $plugin disk=$disk store=$tmp/store control=$tmp/ctl
for i in $(seq 100); do [ -S $tmp/ctl ] && [ -s $tmp/pid ] && break; sleep 0.1; done
$top/tools/fleecectl -s $tmp/ctl snapshot create s1 >/dev/null
fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$tmp/sock" --rw=write:60k --bs=4k --iodepth=32 --size=1G --number_ios=16384 --output=/dev/null >/dev/null
t0=$EPOCHREALTIME; $top/tools/fleecectl -s $tmp/ctl snapshot delete s1 >/dev/null; t1=$EPOCHREALTIME
awk -v a=$t0 -v b=$t1 'BEGIN{printf "delete: %.1f ms\n", (b-a)*1000}'
