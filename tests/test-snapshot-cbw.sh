#!/usr/bin/env bash
# Snapshots keep the point-in-time content through overwrites, zeroes,
# trims and unaligned writes (invariants 1 and 5); N snapshots share one
# copy (invariant 2); deleting snapshots frees the store; snapshot extents
# keep pulls sparse.  Real clients: qemu-io, nbdcopy, nbdinfo, qemu-img,
# fleecectl.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version
requires nbdinfo --version
requires qemu-img --version

disk=$tmp/disk
make_disk "$disk" 16M 0x11 8M   # 8M..16M: hole
ok "nbdkit starts" start_nbdkit s -- disk="$disk" store="$tmp/store" \
   control="$tmp/s.ctl" cluster-size=64K

# --- one snapshot, then every kind of overwrite ---
ok "live write" qio s "" "write -P 0x22 0 1M"
cp "$disk" "$tmp/ref0"
ok "snapshot create s0" ctl s snapshot create s0
ok "overwrite" qio s "" "write -P 0x33 0 2M"
ok "zero" qio s "" "write -z 4M 1M"
ok "trim" qio s "" "discard 6M 1M"
ok "unaligned write across a cluster edge" qio s "" "write -P 0x44 65000 1000"
ok "two-byte write across a cluster edge" qio s "" "write -P 0x45 131071 2"
ok "write into the hole" qio s "" "write -P 0x46 12M 64k"
ok "live reads new data" qio s "" "read -P 0x33 0 64000" \
   "read -P 0x44 65000 1000" "read -P 0 4M 1M" "read -P 0x46 12M 64k"
ok "snapshot reads old data" qio s snapshot/s0 "read -P 0x22 0 1M" \
   "read -P 0x11 4M 1M" "read -P 0 12M 64k"
ok "pull s0 with nbdcopy" pull s s0 "$tmp/out0"
is "$(sum "$tmp/out0")" "$(sum "$tmp/ref0")" "s0 equals the disk at its creation"
ok "pull s0 with qemu-img convert" qemu-img convert -f raw -O raw \
   "$(snap_uri s s0)" "$tmp/out0q"
is "$(sum "$tmp/out0q")" "$(sum "$tmp/ref0")" "qemu-img pull equals too"

# Extents: the hole is still a hole in s0 (the cluster written at 12M was
# zero, so it was recorded, not stored), and the pull stays sparse.
map=$(nbdinfo --map "$(snap_uri s s0)")
diag "snapshot map: $(echo "$map" | tr '\n' ';')"
ok "snapshot map shows 8M..16M as hole,zero" \
   grep -Eq '^ *8388608 +8388608 +3 +hole,zero' <<<"$map"
alloc=$(du -k "$tmp/out0" | cut -f1)
ok "nbdcopy pull is sparse ($alloc KiB allocated)" test "$alloc" -lt 12288

# --- three snapshots interleaved with writes ---
for i in 1 2 3; do
  ok "write before s$i" qio s "" "write -P $((0x50 + i)) $((i * 512))k 300k" \
     "write -P $((0x60 + i)) $((i * 3))M 70k"
  cp "$disk" "$tmp/ref$i"
  ok "snapshot create s$i" ctl s snapshot create "s$i"
done
ok "writes after s3" qio s "" "write -P 0x77 0 8M" "write -z 8M 4M"
for i in 0 1 2 3; do
  ok "pull s$i" pull s "s$i" "$tmp/out$i"
  is "$(sum "$tmp/out$i")" "$(sum "$tmp/ref$i")" "s$i equals its reference"
done

# --- N snapshots share one copy (invariant 2) ---
ok "snapshots a, b, c with no write between" \
   sh -c "fleecectl -s '$tmp/s.ctl' snapshot create a &&
          fleecectl -s '$tmp/s.ctl' snapshot create b &&
          fleecectl -s '$tmp/s.ctl' snapshot create c"
before=$(ctl s --json stats)
ok "overwrite one cluster" qio s "" "write -P 0x88 15M 64k"
after=$(ctl s --json stats)
is "$(( $(jget "$after" 'd["cbw-clusters"]') - $(jget "$before" 'd["cbw-clusters"]') ))" \
   1 "one cluster copied for three snapshots"
is "$(( $(jget "$after" 'd["copies"]') - $(jget "$before" 'd["copies"]') ))" \
   1 "one copy record"
held=$(jget "$after" '" ".join("%s=%s" % (s["name"], s["clusters-held"]) for s in d["snapshot-clusters"] if s["name"] in "abc")')
is "$held" "a=1 b=1 c=1" "each of a, b, c holds the shared copy"
cp "$disk" "$tmp/ref-now"
ok "pull c" pull s c "$tmp/outc"
ok "c differs from now exactly at 15M" \
   bash -c "! cmp -s '$tmp/outc' '$tmp/ref-now' && cmp -s <(head -c 15M '$tmp/outc') <(head -c 15M '$tmp/ref-now')"

# --- exports and descriptions ---
list=$(nbdinfo --list "$(live_uri s)")
ok "nbdinfo --list shows the live export" grep -q 'live disk' <<<"$list"
ok "nbdinfo --list shows snapshot/s2" grep -q 'export="snapshot/s2"' <<<"$list"
ok "snapshot description says point-in-time" \
   grep -q 'point-in-time image of' <<<"$list"

# --- delete frees the store ---
used=$(jget "$(ctl s --json stats)" 'd["store-bytes-used"]')
file_before=$(du -k "$tmp/store" | cut -f1)
ok "store holds copies ($used bytes)" test "$used" -gt 0
for n in s0 s1 s2 s3 a b c; do
  ok "snapshot delete $n" ctl s snapshot delete "$n"
done
st=$(ctl s --json stats)
is "$(jget "$st" 'd["store-bytes-used"]')" 0 "store empty after deleting all"
is "$(jget "$st" 'd["copies"]')" 0 "no copy records left"
file_after=$(du -k "$tmp/store" | cut -f1)
ok "store file shrank ($file_before KiB -> $file_after KiB)" \
   test "$file_after" -lt "$file_before"
ok "deleted snapshot export is gone" \
   sh -c "! nbdinfo '$(snap_uri s s0)' >/dev/null 2>&1"
ok "nbdkit stops cleanly" stop_nbdkit s
