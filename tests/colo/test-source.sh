#!/usr/bin/env bash
# colo/source.c, the primary's side of an epoch, against a real plugin:
# the control client runs checkpoint-create; a full epoch (every cluster)
# applied to an empty file equals the first checkpoint's snapshot; the
# next epoch (the clusters of the frozen bitmap, read from the next
# snapshot) applied on top of it equals the next snapshot, moves only the
# changed clusters, and sends zero clusters as zero extents.
source "${abs_top_srcdir:-../..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version
# colo-epoch (under valgrind with make check-valgrind: $VG).
epoch () { $VG "${abs_top_builddir:-../..}/tests/colo/colo-epoch" "$@"; }

disk=$tmp/disk
make_disk "$disk" 8M 0x21 7M   # last MiB: zero
base="nbd+unix:///?socket=$tmp/p.sock"

ok "nbdkit starts" start_nbdkit p -- disk="$disk" store="$tmp/store" control="$tmp/p.ctl"
ok "checkpoint-create c1 through the control client" \
  epoch ctl "$tmp/p.ctl" checkpoint-create '{"name":"c1"}'
ok_fails "a failing command reports the server's error" "snapshot 'nope' does not exist" \
  epoch ctl "$tmp/p.ctl" snapshot-delete '{"name":"nope"}'
ok "full epoch from snapshot c1" eval 'epoch read "$base" c1 - "$tmp/sec.img" >"$tmp/full.log"'
diag "$(tail -1 "$tmp/full.log")"
ok "it sent the last MiB as zero extents" grep -q "^7340032 1048576 zero$" "$tmp/full.log"
pull p c1 "$tmp/c1.ref"
is "$(sum "$tmp/sec.img")" "$(sum "$tmp/c1.ref")" "the copy equals snapshot c1"

ok "writes: data, zeroes, the last cluster" qio p "" \
  "write -P 0x31 1M 128k" "write -z 3M 64k" "write -P 0x32 8128k 64k"
ok "checkpoint-create c2" epoch ctl "$tmp/p.ctl" checkpoint-create '{"name":"c2"}'
ok "epoch c1 -> c2: bitmap c1 from snapshot c2" \
  eval 'epoch read "$base" c2 c1 "$tmp/sec.img" >"$tmp/e2.log"'
diag "$(cat "$tmp/e2.log")"
is "$(head -n -1 "$tmp/e2.log" | tr '\n' ';')" \
   "1048576 131072 data;3145728 65536 zero;8323072 65536 data;" \
   "only the changed clusters, zeroes as zero extents"
pull p c2 "$tmp/c2.ref"
is "$(sum "$tmp/sec.img")" "$(sum "$tmp/c2.ref")" "the copy equals snapshot c2"
ok "small extents: max 64K" eval 'epoch read "$base" c2 c1 "$tmp/sec2.img" 65536 >"$tmp/e3.log"'
is "$(head -n -1 "$tmp/e3.log" | wc -l)" 4 "the 128K run is cut in two"
ok_fails "a bitmap that does not exist" "bitmap/nope" \
  epoch read "$base" c2 nope "$tmp/x.img"
ok_fails "a control socket that does not exist" "control socket $tmp/none.ctl: connect" \
  epoch ctl "$tmp/none.ctl" query-status
ok "nbdkit stops cleanly" stop_nbdkit p
