#!/usr/bin/env bash
# fleece-backup --sync=top on a sparse disk, over TLS with a pre-shared
# key: it reads only the allocated data of the snapshot (counted by
# fleece-backup's summary and by nbdkit's stats filter in a proxy), the
# copy equals the snapshot and stays sparse, even after the live disk
# filled one of the snapshot's holes.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires_pull
make_pki

disk=$tmp/disk
truncate -s 64M "$disk"
qemu-io -f raw -c 'write -P 0x11 0 1M' -c 'write -P 0x22 20M 2M' \
   -c 'write -P 0x33 40M 64k' "$disk" >/dev/null
alloc=$((1048576 + 2097152 + 65536))
cp --sparse=always "$disk" "$tmp/ref"
ok "nbdkit starts (--tls=require, PSK)" \
   start_nbdkit s --tls=require --tls-psk="$tmp/pki/keys.psk" \
   -- disk="$disk" store="$tmp/store" control="$tmp/s.ctl" cluster-size=64K
ok "snapshot create s1" ctl s snapshot create s1
ok "live writes fill a hole and overwrite data" \
   qemu-io --object "tls-creds-psk,id=tls0,endpoint=client,dir=$tmp/pki,username=alice" \
   --image-opts "driver=nbd,path=$tmp/s.sock,tls-creds=tls0" \
   -c "write -P 0x44 30M 4M" -c "write -P 0x45 0 512k"

ok "counting proxy starts" start_proxy p s \
   --filter=stats statsfile="$tmp/p.stats" statsappend=true \
   -- tls=require tls-psk="$tmp/pki/keys.psk" tls-username=alice
ok "top pull of s1" backup "$tmp/top.err" --sync=top \
   "nbd+unix:///snapshot/s1?socket=$tmp/p.sock" "$tmp/top.img"
diag "$(cat "$tmp/top.err")"
ok "counting proxy stops" kill_by_pidfile "$tmp/p.pid"
is "$(sum "$tmp/top.img")" "$(sum "$tmp/ref")" "top copy equals s1"
is "$(summary "$tmp/top.err" sync)" top "summary says sync=top"
read=$(summary "$tmp/top.err" read)
ok "summary: read only allocated data ($read of $alloc bytes)" \
   test "$read" -le "$alloc"
bytes=$(stats_read_bytes "$tmp/p.stats")
diag "stats filter: $bytes bytes read through the proxy"
ok "server sent only the allocated data ($bytes bytes)" \
   test "$bytes" -le $((alloc * 101 / 100)) -a "$bytes" -ge $((alloc * 99 / 100))
kib=$(du -k "$tmp/top.img" | cut -f1)
ok "the copy is sparse ($kib KiB allocated)" test "$kib" -le $((alloc / 1024 + 1024))

# The same pull straight over TLS-PSK, as a user types it.
ok "top pull over nbds+unix:// with tls-psk-file" fleece-backup --sync=top \
   "$(psk_uri s snapshot/s1)" "$tmp/top2.img"
is "$(sum "$tmp/top2.img")" "$(sum "$tmp/ref")" "equals s1 too"
ok "full pull over TLS-PSK" backup "$tmp/full.err" --sync=full \
   "$(psk_uri s snapshot/s1)" "$tmp/full.img"
diag "$(cat "$tmp/full.err")"
is "$(sum "$tmp/full.img")" "$(sum "$tmp/ref")" "full pull equals s1"
ok_fails "a pull with the wrong key fails" "." fleece-backup --sync=top \
   "$(psk_uri s snapshot/s1 "$tmp/pki/wrong-keys.psk")" "$tmp/wrong.img"
ok "nbdkit stops cleanly" stop_nbdkit s
