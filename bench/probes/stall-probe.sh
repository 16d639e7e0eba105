#!/usr/bin/env bash
# stall-probe.sh MODE [RUNS]: fio 4 KiB randwrite iodepth 8 on fleece live
# export; 10 times, 0.3 s apart, run MODE's command and measure the latency
# of requests in flight around it (bench-report.py stall).
# MODE: create (create + delete previous, as make bench), status (a no-op
# control command), createonly (no deletes).
set -euo pipefail
mode=${1:-create}; runs=${2:-3}
top=/work/perf
plugin=${PLUGIN:-$top/plugin/.libs/nbdkit-fleece-plugin.so}
ctlbin=$top/tools/fleecectl
report=$top/bench/bench-report.py
tmp=${TMPDIR:-/tmp}/stallprobe.$$
mkdir -p $tmp
disk=/tmp/perfw/disk1g.img
if [ ! -f $disk ]; then
  head -c 64M /dev/urandom > $tmp/chunk
  for i in $(seq 16); do cat $tmp/chunk; done > $disk
fi
trap 'kill $(cat $tmp/pid 2>/dev/null) 2>/dev/null; rm -rf $tmp' EXIT
for run in $(seq $runs); do
  rm -f $tmp/dwin $tmp/store $tmp/ctl $tmp/sock $tmp/pid $tmp/windows $tmp/drains $tmp/stall_*.log
  nbdkit -f -U $tmp/sock -P $tmp/pid $plugin disk=$disk store=$tmp/store control=$tmp/ctl ${EXTRA:-} 2>>${ERRLOG:-/dev/null} &
  for i in $(seq 100); do [ -S $tmp/ctl ] && [ -s $tmp/pid ] && break; sleep 0.1; done
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$tmp/sock" --rw=randwrite --bs=4k \
      --iodepth=8 --size=1G --time_based --runtime=7 --output-format=json --output=$tmp/fio.json \
      --write_lat_log=$tmp/stall --log_avg_msec=0 --log_unix_epoch=1 >/dev/null &
  fp=$!
  sleep 1.5
  for i in $(seq 10); do
    t0=$EPOCHREALTIME
    case $mode in
      create|createonly) $ctlbin -s $tmp/ctl snapshot create st$i >/dev/null ;;
      status) $ctlbin -s $tmp/ctl status >/dev/null ;;
    esac
    t1=$EPOCHREALTIME
    echo "${t0/./} ${t1/./}" >> $tmp/windows
    $ctlbin -s $tmp/ctl -j stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["last-drain-ns"])' >> $tmp/drains
    if [ $mode = create ] && [ $i -gt 1 ]; then d0=$EPOCHREALTIME; $ctlbin -s $tmp/ctl snapshot delete st$((i-1)) >/dev/null; d1=$EPOCHREALTIME; echo "${d0/./} ${d1/./}" >> $tmp/dwin; fi
    sleep 0.3
  done
  wait $fp
  echo "run $run: $(python3 $report stall $tmp/stall_lat.1.log $tmp/windows $tmp/drains)"
  [ -f $tmp/dwin ] && echo "  delete ms: $(awk '{printf "%.0f ", ($2-$1)/1000}' $tmp/dwin)"
  python3 "$(dirname "$0")/cmp.py" $tmp/stall_lat.1.log $tmp/windows | sed 's/^/  /' 
  [ -n "${KEEPLOG:-}" ] && cp $tmp/stall_lat.1.log $KEEPLOG.$run && cp $tmp/windows $KEEPLOG.$run.win; cp $tmp/dwin $KEEPLOG.$run.dwin 2>/dev/null || true
  kill $(cat $tmp/pid); sleep 0.5
done
