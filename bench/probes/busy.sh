#!/usr/bin/env bash
# busy.sh [RUNS]: bench snap-pull-busy for fleece: live randwrite 4k iodepth 32, nbdcopy of snapshot after 0.3 s
set -euo pipefail
runs=${1:-3}
top=/work/perf
plugin=${PLUGIN:-$top/plugin/.libs/nbdkit-fleece-plugin.so}
tmp=/tmp/busyprobe.$$; mkdir -p $tmp
disk=/tmp/perfw/disk1g.img
trap 'kill $(cat $tmp/pid 2>/dev/null) 2>/dev/null; sleep 0.3; rm -rf $tmp' EXIT
for r in $(seq $runs); do
  rm -f $tmp/store $tmp/busy_*.log
  nbdkit -U $tmp/sock -P $tmp/pid $plugin disk=$disk store=$tmp/store control=$tmp/ctl ${EXTRA:-}
  for i in $(seq 100); do [ -S $tmp/ctl ] && [ -s $tmp/pid ] && break; sleep 0.1; done
  $top/tools/fleecectl -s $tmp/ctl snapshot create s1 >/dev/null
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$tmp/sock" --rw=randwrite --bs=4k --iodepth=32 --size=1G \
      --time_based --runtime=5 --output-format=json --output=$tmp/fio.json \
      --write_lat_log=$tmp/busy --log_avg_msec=0 --log_unix_epoch=1 >/dev/null &
  fp=$!
  sleep 0.3
  t0=$EPOCHREALTIME; nbdcopy "nbd+unix:///snapshot/s1?socket=$tmp/sock" null:; t1=$EPOCHREALTIME
  wait $fp
  iops=$(python3 $top/bench/bench-report.py rate $tmp/busy_lat.1.log "${t0/./}" "${t1/./}")
  awk -v a=$t0 -v b=$t1 -v i=$iops 'BEGIN{printf "pull %.3f s, live writes during pull %d IOPS\n", b-a, i}'
  kill $(cat $tmp/pid); sleep 0.5
done
