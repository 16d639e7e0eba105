#!/usr/bin/env bash
# The live disk as a block device (a loop device): size from
# BLKGETSIZE64, zero through BLKZEROOUT, trim through BLKDISCARD, and
# snapshots that keep the point-in-time content through all of them.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires losetup --version
requires qemu-io --version
requires nbdcopy --version

truncate -s 16M "$tmp/backing"
qemu-io -f raw -c 'write -P 0x31 0 16M' "$tmp/backing" >/dev/null
dev=$(losetup -f --show "$tmp/backing") ||
  { echo "Bail out! losetup could not attach a loop device"; exit 1; }
cleanup_fn "losetup -d '$dev'"
diag "loop device $dev"
ok "$dev is a block device" test -b "$dev"

ok "nbdkit starts on $dev" start_nbdkit s -- disk="$dev" \
   store="$tmp/store" control="$tmp/s.ctl"
is "$(jget "$(ctl s --json status)" 'd["disk-size"]')" 16777216 \
   "size of the block device"
ok "live write" qio s "" "write -P 0x32 1M 1M"
dd if="$dev" of="$tmp/ref" bs=1M status=none
ok "snapshot create" ctl s snapshot create b
ok "overwrite" qio s "" "write -P 0x33 0 4M"
ok "zero (BLKZEROOUT)" qio s "" "write -z 4M 2M"
ok "zero with unmap" qio s "" "write -z -u 6M 1M"
ok "trim (BLKDISCARD)" qio s "" "discard 8M 2M"
ok "FUA write" qio s "" "write -f -P 0x34 12M 64k"
ok "flush" qio s "" "flush"
ok "live reads the zeroes" qio s "" "read -P 0 4M 3M"
ok "device holds the new data" \
   qemu-io -r -f raw -c 'read -P 0x33 0 4M' -c 'read -P 0x34 12M 64k' "$dev"
ok "pull the snapshot" pull s b "$tmp/b.img"
is "$(sum "$tmp/b.img")" "$(sum "$tmp/ref")" "snapshot of the block device is exact"
map=$(nbdinfo --map "$(snap_uri s b)")
ok "extents of a block device are all data" \
   grep -Eq '^ *0 +16777216 +0 +data' <<<"$map"
ok "snapshot delete" ctl s snapshot delete b
ok "nbdkit stops cleanly" stop_nbdkit s
