#!/usr/bin/env bash
# Bounded stress through real clients (invariant 1).  In each round a new
# snapshot is taken of a quiet disk (its reference is a plain copy of the
# disk file), then fio writes, trims and zeroes the live export over
# several connections while nbdcopy pulls the snapshot again and again;
# every pull must equal the reference.  A fresh snapshot per round means
# every cluster is uncopied again, so pulls keep racing copies.  nbdkit
# runs with -D fleece.live_read_delay_us to widen the window between a
# snapshot read finding a cluster uncopied and reading it live: that is
# exactly where a writer's copy-and-overwrite must not slip in.
#
# FLEECE_BREAK_ISOLATION=1 also passes -D fleece.skip_isolation_check=1,
# which disables the read validation: the test must then fail, showing
# that it can.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires fio --version
requires nbdcopy --version

rounds=${FLEECE_STRESS_ROUNDS:-6}
secs=${FLEECE_STRESS_SECONDS:-1}
disk=$tmp/disk
truncate -s 32M "$disk"
fio --name=fill --filename="$disk" --rw=write --bs=1M --size=24M \
    --buffer_pattern=0x5c5c >/dev/null
flags=(-D fleece.live_read_delay_us=2000)
[ -n "${FLEECE_BREAK_ISOLATION:-}" ] && flags+=(-D fleece.skip_isolation_check=1)
ok "nbdkit starts" start_nbdkit s "${flags[@]}" -- disk="$disk" \
   store="$tmp/store" control="$tmp/s.ctl" cluster-size=16K

writers ()
{
  fio --name=w --ioengine=nbd --uri="$(live_uri s)" --size=32M \
      --rw=randwrite --bsrange=512-96k --bs_unaligned=1 --iodepth=8 \
      --numjobs=2 --time_based --runtime="$secs" --randrepeat=0 \
      >"$tmp/fio-w.log" 2>&1 &
  fio_w=$!
  fio --name=t --ioengine=nbd --uri="$(live_uri s)" --size=32M \
      --rw=randtrim --bs=16k --iodepth=4 --time_based --runtime="$secs" \
      --randrepeat=0 >"$tmp/fio-t.log" 2>&1 &
  fio_t=$!
}

total_pulls=0 total_bad=0
for (( r = 1; r <= rounds; r++ )); do
  cp "$disk" "$tmp/ref"
  ok "round $r: snapshot create" ctl s snapshot create "r$r"
  writers
  pulls=0 bad=0
  while kill -0 "$fio_w" 2>/dev/null; do
    if ! nbdcopy --connections=2 --requests=8 "$(snap_uri s "r$r")" \
         "$tmp/pull.img"; then
      bad=$((bad + 1))
    elif ! cmp -s "$tmp/pull.img" "$tmp/ref"; then
      bad=$((bad + 1))
      diag "round $r: $(cmp -l "$tmp/pull.img" "$tmp/ref" | wc -l) bytes differ"
    fi
    pulls=$((pulls + 1))
  done
  ok "round $r: fio writers finished" wait "$fio_w"
  ok "round $r: fio trimmer finished" wait "$fio_t"
  ok "round $r: a pull after the writes equals the reference" \
     sh -c "nbdcopy '$(snap_uri s "r$r")' '$tmp/final.img' && cmp '$tmp/final.img' '$tmp/ref'"
  total_pulls=$((total_pulls + pulls)) total_bad=$((total_bad + bad))
  ok "round $r: snapshot delete" ctl s snapshot delete "r$r"
done
diag "$total_pulls pulls raced the writers; fio: $(grep -ho 'IOPS=[^,]*' "$tmp/fio-w.log" | tr '\n' ' ')"
ok "pulls raced the writers in every round" test "$total_pulls" -ge "$rounds"
is "$total_bad" 0 "every pull equal to the disk at snapshot time"

# A snapshot taken while fio writes: two pulls of it are identical.
writers
sleep 0.5
ok "snapshot create under load" ctl s snapshot create hot
ok "pull hot once" pull s hot "$tmp/hot1.img"
ok "pull hot again" pull s hot "$tmp/hot2.img"
ok "fio finished" wait "$fio_w"
ok "fio trimmer finished" wait "$fio_t"
ok "pull hot after writes stopped" pull s hot "$tmp/hot3.img"
is "$(sum "$tmp/hot1.img")" "$(sum "$tmp/hot2.img")" "hot snapshot stable"
is "$(sum "$tmp/hot1.img")" "$(sum "$tmp/hot3.img")" "hot snapshot stable after writes"
st=$(ctl s --json stats)
diag "cbw-clusters=$(jget "$st" 'd["cbw-clusters"]') max-drain-ns=$(jget "$st" 'd["max-drain-ns"]')"
ok "nbdkit stops cleanly" stop_nbdkit s
