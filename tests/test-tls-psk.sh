#!/usr/bin/env bash
# Snapshots pulled over TLS with a pre-shared key (nbdkit --tls=require
# --tls-psk): nbdcopy with the right key for user alice and qemu-img with
# tls-creds-psk get the point-in-time image; a wrong key and a plaintext
# client are refused.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires qemu-img --version
requires nbdcopy --version
make_pki

disk=$tmp/disk
truncate -s 16M "$disk"
qemu-io -f raw -c 'write -P 0x41 0 5M' -c 'write -P 0x42 9M 2M' "$disk" >/dev/null
cp "$disk" "$tmp/ref"
ok "nbdkit starts with --tls=require --tls-psk" \
   start_nbdkit s --tls=require --tls-psk="$tmp/pki/keys.psk" \
   -- disk="$disk" store="$tmp/store" control="$tmp/s.ctl"
ok "snapshot create s1" ctl s snapshot create s1
# Overwrite the live disk over TLS-PSK (qemu reads DIR/keys.psk).
ok "live overwrite over TLS-PSK (qemu-io)" \
   qemu-io --object "tls-creds-psk,id=tls0,endpoint=client,dir=$tmp/pki,username=alice" \
   --image-opts "driver=nbd,path=$tmp/s.sock,tls-creds=tls0" \
   -c "write -P 0x51 0 8M" -c "write -z 9M 1M"

ok "nbdcopy pulls snapshot/s1 with the right key" \
   nbdcopy "$(psk_uri s snapshot/s1)" "$tmp/s1.img"
is "$(sum "$tmp/s1.img")" "$(sum "$tmp/ref")" "PSK pull equals the disk at s1"
ok "qemu-img convert pulls snapshot/s1 with tls-creds-psk" \
   qemu-img convert \
   --object "tls-creds-psk,id=tls0,endpoint=client,dir=$tmp/pki,username=alice" \
   --image-opts "driver=nbd,path=$tmp/s.sock,export=snapshot/s1,tls-creds=tls0" \
   -O raw "$tmp/s1q.img"
is "$(sum "$tmp/s1q.img")" "$(sum "$tmp/ref")" "qemu-img PSK pull equals too"

lines=$(wc -l <"$tmp/s.log")
ok_fails "wrong key refused" "gnutls" \
   nbdcopy "$(psk_uri s snapshot/s1 "$tmp/pki/wrong-keys.psk")" "$tmp/wrong.img"
ok "the server logs the failed handshake" \
   grep -q 'gnutls_handshake' <(tail -n +"$((lines + 1))" "$tmp/s.log")
ok_fails "unknown user refused" "gnutls|PSK|username" \
   nbdcopy "nbds+unix://bob@/snapshot/s1?socket=$tmp/s.sock&tls-psk-file=$tmp/pki/keys.psk" \
   "$tmp/bob.img"
ok_fails "plaintext client refused" "requires TLS" \
   nbdcopy "$(snap_uri s s1)" "$tmp/plain.img"
ok_fails "plaintext qemu-io on the live export refused" "TLS negotiation required" \
   qio s "" "read 0 64k"
ok "nothing written by the refused clients" \
   test ! -s "$tmp/wrong.img" -a ! -s "$tmp/plain.img"

ok "pull again after the refusals" nbdcopy "$(psk_uri s snapshot/s1)" "$tmp/s1b.img"
is "$(sum "$tmp/s1b.img")" "$(sum "$tmp/ref")" "still equal"
ok "nbdkit stops cleanly" stop_nbdkit s
