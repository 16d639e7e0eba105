#!/usr/bin/env bash
# fw.sh DEPTH RUNTIME [snap|nosnap] [PROFILE_CMD]: fio randwrite 4k on fleece with a fresh snapshot
set -euo pipefail
depth=${1:-8}; rt=${2:-3}; snap=${3:-snap}; prof=${4:-}
top=/work/perf
plugin=${PLUGIN:-$top/plugin/.libs/nbdkit-fleece-plugin.so}
tmp=/tmp/fwprobe.$$; mkdir -p $tmp
disk=/tmp/perfw/disk1g.img
trap 'kill $(cat $tmp/pid 2>/dev/null) 2>/dev/null; sleep 0.3; rm -rf $tmp' EXIT
nbdkit -f -U $tmp/sock -P $tmp/pid $plugin disk=$disk store=$tmp/store control=$tmp/ctl ${EXTRA:-} 2>>${ERRLOG:-/dev/null} &
for i in $(seq 100); do [ -S $tmp/ctl ] && [ -s $tmp/pid ] && break; sleep 0.1; done
[ $snap = snap ] && $top/tools/fleecectl -s $tmp/ctl snapshot create s1
if [ -n "$prof" ]; then $prof -p $(cat $tmp/pid) & pp=$!; sleep 0.5; fi
fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$tmp/sock" --rw=randwrite --bs=4k \
    --iodepth=$depth --size=1G --time_based --runtime=$rt --output-format=json --output=$tmp/fio.json >/dev/null
[ -n "$prof" ] && { kill -INT $pp; wait $pp || true; }
python3 -c '
import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]["write"]
p=j["clat_ns"]["percentile"]
print("iops=%d p50=%dus p99=%dus" % (j["iops"], p["50.000000"]/1e3, p["99.000000"]/1e3))' $tmp/fio.json
$top/tools/fleecectl -s $tmp/ctl stats | egrep 'cbw|copied' || true
