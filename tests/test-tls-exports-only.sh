#!/usr/bin/env bash
# tls-exports-only=true with nbdkit --tls=on (TLS optional): a plaintext
# connection sees and opens only the live export, while snapshot and
# bitmap exports are listed and served only over TLS.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version
requires nbdinfo --version
make_pki

disk=$tmp/disk
make_disk "$disk" 8M 0x61 4M
ok "nbdkit starts with --tls=on and tls-exports-only=true" \
   start_nbdkit s --tls=on --tls-certificates="$tmp/pki" \
   -- disk="$disk" store="$tmp/store" control="$tmp/s.ctl" tls-exports-only=true
ok "snapshot create s1" ctl s snapshot create s1
cp "$disk" "$tmp/ref"
ok "checkpoint c1 (snapshot/c1 and bitmap/c1)" ctl s checkpoint c1

# --- plaintext: the live export only ---
plain=$(nbdinfo --list "$(live_uri s)" 2>&1)
diag "plaintext list: $(grep 'export=' <<<"$plain" | tr '\n' ' ')"
ok "plaintext list shows the live export" grep -q '^export="":' <<<"$plain"
is "$(grep -c '^export=' <<<"$plain")" 1 "plaintext list shows nothing else"
ok "plaintext live write" qio s "" "write -P 0x62 1M 1M"
ok "plaintext live read" qio s "" "read -P 0x62 1M 1M" "read -P 0x61 0 1M"
ok_fails "plaintext open of snapshot/s1 refused as unknown" "No such file" \
   nbdinfo "$(snap_uri s s1)"
ok "the server says why" \
   grep -q "export 'snapshot/s1' is only served over TLS" "$tmp/s.log"
ok_fails "plaintext nbdcopy of snapshot/s1 refused" "no export named" \
   nbdcopy "$(snap_uri s s1)" "$tmp/plain.img"
ok_fails "plaintext qemu-io of snapshot/s1 refused" "export not available" \
   qio s snapshot/s1 "read 0 64k"
ok_fails "plaintext fleece-backup of snapshot/s1 refused, suggesting TLS" \
   "the server offers TLS and may serve this export only over TLS: use nbds://" \
   fleece-backup --sync=full "$(snap_uri s s1)" "$tmp/plain.img"
ok_fails "plaintext open of bitmap/c1 refused as unknown" "No such file" \
   nbdinfo "nbd+unix:///bitmap/c1?socket=$tmp/s.sock"
ok_fails "plaintext nbdcopy of bitmap/c1 refused" "no export named" \
   nbdcopy "nbd+unix:///bitmap/c1?socket=$tmp/s.sock" "$tmp/plainbm"
ok "no plaintext data" test ! -s "$tmp/plain.img" -a ! -s "$tmp/plainbm"

# --- TLS: everything ---
tls=$(nbdinfo --list "$(x509_uri s "")" 2>&1)
diag "TLS list: $(grep 'export=' <<<"$tls" | tr '\n' ' ')"
ok "TLS list shows the live export" grep -q '^export="":' <<<"$tls"
ok "TLS list shows snapshot/s1" grep -q '^export="snapshot/s1":' <<<"$tls"
ok "TLS list shows snapshot/c1" grep -q '^export="snapshot/c1":' <<<"$tls"
ok "TLS list shows bitmap/c1" grep -q '^export="bitmap/c1":' <<<"$tls"
is "$(bitmap_bits "$(x509_uri s bitmap/c1)" | tr '\n' ' ')" "$(seq -s ' ' 16 31) " \
   "TLS read of bitmap/c1: granules 16-31, the plaintext write at 1M"
ok "TLS pull of snapshot/s1" nbdcopy "$(x509_uri s snapshot/s1)" "$tmp/s1.img"
is "$(sum "$tmp/s1.img")" "$(sum "$tmp/ref")" "TLS pull equals the disk at s1"
ok "TLS live read" qio_x509 s "" -- "read -P 0x62 1M 1M"
ok "nbdkit stops cleanly" stop_nbdkit s

# --- without tls-exports-only, --tls=on serves snapshots in plaintext ---
ok "nbdkit starts with --tls=on only" \
   start_nbdkit t --tls=on --tls-certificates="$tmp/pki" \
   -- disk="$disk" store="$tmp/store2" control="$tmp/t.ctl"
ok "snapshot create s2" ctl t snapshot create s2
ok "plaintext list shows snapshot/s2" \
   grep -q '^export="snapshot/s2":' <<<"$(nbdinfo --list "$(live_uri t)")"
ok "plaintext pull of snapshot/s2" pull t s2 "$tmp/s2.img"
ok "nbdkit t stops cleanly" stop_nbdkit t
