#!/usr/bin/env bash
# Snapshots pulled over TLS with X.509 certificates and peer verification
# (nbdkit --tls=require --tls-certificates --tls-verify-peer):
# fleece-backup, nbdcopy and qemu-img convert (tls-creds-x509,
# tls-hostname=localhost on a Unix socket) get the point-in-time image; a
# plaintext client and a client whose certificate comes from another CA
# are refused.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires qemu-img --version
requires nbdcopy --version
requires nbdinfo --version
requires fleece-backup --help
make_pki

disk=$tmp/disk
truncate -s 16M "$disk"
qemu-io -f raw -c 'write -P 0x11 0 6M' -c 'write -P 0x12 10M 1M' "$disk" >/dev/null
ok "nbdkit starts with --tls=require --tls-verify-peer" \
   start_nbdkit s --tls=require --tls-certificates="$tmp/pki" --tls-verify-peer \
   -- disk="$disk" store="$tmp/store" control="$tmp/s.ctl"

ok "live write over TLS (qemu-io)" qio_x509 s "" -- "write -P 0x21 1M 2M"
cp "$disk" "$tmp/ref"
ok "snapshot create s1" ctl s snapshot create s1
ok "live overwrite over TLS" qio_x509 s "" -- "write -P 0x31 0 4M" \
   "write -z 10M 1M" "write -P 0x32 14M 64k"

# --- pulls that must work ---
ok "nbdcopy pulls snapshot/s1 over TLS" \
   nbdcopy "$(x509_uri s snapshot/s1)" "$tmp/s1.img"
is "$(sum "$tmp/s1.img")" "$(sum "$tmp/ref")" "TLS pull equals the disk at s1"
ok "qemu-img convert pulls snapshot/s1 over TLS" \
   qemu-img convert \
   --object "tls-creds-x509,id=tls0,endpoint=client,dir=$tmp/pki" \
   --image-opts "driver=nbd,path=$tmp/s.sock,export=snapshot/s1,tls-creds=tls0,tls-hostname=localhost" \
   -O raw "$tmp/s1q.img"
is "$(sum "$tmp/s1q.img")" "$(sum "$tmp/ref")" "qemu-img TLS pull equals too"
ok "fleece-backup pulls snapshot/s1 over TLS" \
   fleece-backup "$(x509_uri s snapshot/s1)" "$tmp/s1f.img"
is "$(sum "$tmp/s1f.img")" "$(sum "$tmp/ref")" "fleece-backup TLS pull equals too"
ok "nbdinfo --list over TLS shows snapshot/s1" \
   grep -q 'export="snapshot/s1"' <<<"$(nbdinfo --list "$(x509_uri s "")")"
ok "snapshot reads old data over TLS (qemu-io)" \
   qio_x509 s snapshot/s1 -- "read -P 0x21 1M 2M" "read -P 0x12 10M 1M"

# --- clients that must be refused ---
ok_fails "plaintext nbdcopy refused" "requires TLS" \
   nbdcopy "$(snap_uri s s1)" "$tmp/plain.img"
ok_fails "plaintext nbdinfo --list refused" "list request|TLS" \
   nbdinfo --list "$(live_uri s)"
ok_fails "plaintext qemu-img refused" "TLS negotiation required" \
   qemu-img convert -f raw -O raw "$(snap_uri s s1)" "$tmp/plainq.img"
ok "no plaintext pull left a file" test ! -s "$tmp/plain.img"
lines=$(wc -l <"$tmp/s.log")
ok_fails "client certificate from another CA refused" "gnutls" \
   nbdcopy "$(x509_uri s snapshot/s1 "$tmp/pki-other")" "$tmp/other.img"
ok_fails "fleece-backup with that certificate refused" "gnutls" \
   fleece-backup "$(x509_uri s snapshot/s1 "$tmp/pki-other")" "$tmp/other-f.img"
# (fleece-backup's message is libnbd's "Operation not supported" for now.)
ok_fails "plaintext fleece-backup refused" "TLS|Operation not supported" \
   fleece-backup "$(snap_uri s s1)" "$tmp/plain-f.img"
ok "the server logs the certificate error" \
   grep -qi 'certificate' <(tail -n +"$((lines + 1))" "$tmp/s.log")
mkdir "$tmp/wrongca"
cp "$tmp/pki-other/other-ca-cert.pem" "$tmp/wrongca/ca-cert.pem"
cp "$tmp/pki-other/client-cert.pem" "$tmp/pki-other/client-key.pem" "$tmp/wrongca"
ok_fails "a client that does not trust the server's CA refuses it" \
   "certificate|verif|TLS" \
   qemu-img convert \
   --object "tls-creds-x509,id=tls0,endpoint=client,dir=$tmp/wrongca" \
   --image-opts "driver=nbd,path=$tmp/s.sock,export=snapshot/s1,tls-creds=tls0,tls-hostname=localhost" \
   -O raw "$tmp/wrongca.img"

# The refused clients did not disturb the snapshot.
ok "pull again after the refusals" \
   nbdcopy "$(x509_uri s snapshot/s1)" "$tmp/s1b.img"
is "$(sum "$tmp/s1b.img")" "$(sum "$tmp/ref")" "still equal"
ok "snapshot delete s1" ctl s snapshot delete s1
ok "nbdkit stops cleanly" stop_nbdkit s
