#!/usr/bin/env bash
# Exports opened by name (lib/export.c) whatever the name holds: with
# checkpoints named with a space, '%', '?' and '#' (characters that mean
# something in a URI), the epoch reader (colo-epoch, colo/source.c) reads
# snapshot/NAME and bitmap/NAME on the server of a plain URI, and
# fleece-backup pulls incrementally from bitmap/NAME on the server of its
# SOURCE.  Each copy must equal the disk, which is not written after the
# second checkpoint.
source "${abs_top_srcdir:-../..}/tests/functions.sh"
requires python3 --version
requires qemu-io --version

n1='one 100%?#a'
n2='two %41?&b'
base="nbd+unix:///?socket=$tmp/p.sock"
# The URI of snapshot/NAME, percent-encoded as a URI must be.
snap () {
  python3 -c 'import sys, urllib.parse as u; print("nbd+unix:///snapshot/%s?socket=%s" % (u.quote(sys.argv[1], safe=""), sys.argv[2]))' \
    "$1" "$tmp/p.sock"
}
epoch () { $VG "${abs_top_builddir:-../..}/tests/colo/colo-epoch" "$@"; }

# A disk of data with a zero tail; changed after the first checkpoint
# through the live export.
disk=$tmp/disk
head -c 3M /dev/urandom >"$disk"
truncate -s 4M "$disk"
ok "nbdkit starts" start_nbdkit p -- disk="$disk" store="$tmp/store" \
  control="$tmp/p.ctl"
ok "checkpoint '$n1'" fleecectl -s "$tmp/p.ctl" checkpoint "$n1"
ok "writes" qio p "" "write -P 0x31 512k 64k" "write -z 2M 128k"
ok "checkpoint '$n2'" fleecectl -s "$tmp/p.ctl" checkpoint "$n2"

ok "epoch reader: full epoch from snapshot '$n1'" \
  eval 'epoch read "$base" "$n1" - "$tmp/sec.img" >"$tmp/e1.log"'
ok "epoch reader: epoch from bitmap '$n1' and snapshot '$n2'" \
  eval 'epoch read "$base" "$n2" "$n1" "$tmp/sec.img" >"$tmp/e2.log"'
diag "$(tail -1 "$tmp/e2.log")"
is "$(sum "$tmp/sec.img")" "$(sum "$disk")" "... the copy equals the disk"
ok_fails "a bitmap that does not exist is named in the message" \
  "bitmap 'no such%' does not exist" \
  epoch read "$base" "$n2" 'no such%' "$tmp/x.img"

ok "fleece-backup: full pull of snapshot '$n1'" \
  fleece-backup --quiet "$(snap "$n1")" "$tmp/b.img"
ok "fleece-backup: incremental pull since '$n1' of snapshot '$n2'" \
  fleece-backup --quiet --sync=incremental --since="$n1" "$(snap "$n2")" \
  "$tmp/b.img"
is "$(sum "$tmp/b.img")" "$(sum "$disk")" "... the copy equals the disk"

ok "nbdkit stops cleanly" stop_nbdkit p
