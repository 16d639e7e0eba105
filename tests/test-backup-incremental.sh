#!/usr/bin/env bash
# Nightly incremental backup over TLS (X.509, peer verified): a full pull
# of checkpoint c1 and incremental pulls of c2 (--since=c1) and c3
# (--since=c2) applied in order reproduce each checkpoint exactly, while
# fio keeps writing the live disk during every pull; an incremental pull
# reads only the changed granules, counted both by fleece-backup's summary
# line and by nbdkit's stats filter in a proxy in front of the server.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires fio --version
requires nbdcopy --version
requires fleece-backup --help
make_pki

G=65536                                 # granule = cluster size
disk=$tmp/disk
make_disk "$disk" 64M 0x01 32M
ok "nbdkit starts (--tls=require, peer verified)" \
   start_nbdkit s --tls=require --tls-certificates="$tmp/pki" --tls-verify-peer \
   -- disk="$disk" store="$tmp/store" control="$tmp/s.ctl" \
   cluster-size=64K tls-exports-only=true

# writer SEED: fio random 4 KiB writes to 8M..24M of the live disk, 64 of
# them, rate-limited so that they overlap the pull that follows; its PID
# is in $writer.  fio's nbd engine cannot load certificates from a URI
# (libnbd allows that only to clients that ask), so it writes through a
# plain proxy that speaks TLS to the server.
ok "writer proxy starts" start_proxy wp s \
   -- tls=require tls-certificates="$tmp/pki"
writer ()
{
  fio --name=w --ioengine=nbd --uri="$(live_uri wp)" --rw=randwrite \
    --bs=4k --offset=8M --size=16M --io_size=256k --iodepth=4 \
    --rate=256k --randseed="$1" --output="$tmp/fio-$1.out" \
    >/dev/null 2>&1 &
  writer=$!
}

# counted_pull N SINCE SNAP ERR: an incremental pull of SNAP
# --since=SINCE through counting proxy pN (nbdkit's stats filter, in
# $tmp/pN.stats) while fio writer N+1 writes; fleece-backup's messages in
# ERR.
counted_pull ()
{
  local w=$(( $1 + 1 ))
  ok "counting proxy p$1 starts" start_proxy "p$1" s \
     --filter=stats statsfile="$tmp/p$1.stats" statsappend=true \
     -- tls=require tls-certificates="$tmp/pki"
  writer "$w"
  ok "incremental pull of $3 --since=$2 while fio writes" \
     backup "$4" --sync=incremental --since="$2" \
     "nbd+unix:///snapshot/$3?socket=$tmp/p$1.sock" "$tmp/backup.img"
  ok "fio writer $w succeeded" wait "$writer"
  diag "$(cat "$4")"
}

# --- night 1: full ---
ok "checkpoint c1" ctl s checkpoint c1
cp "$disk" "$tmp/ref1"
writer 1
ok "full pull of c1 while fio writes" backup "$tmp/full.err" --sync=full \
   "$(x509_uri s snapshot/c1)" "$tmp/backup.img"
ok "fio writer 1 succeeded" wait "$writer"
diag "$(cat "$tmp/full.err")"
is "$(summary "$tmp/full.err" sync)" full "summary says sync=full"
is "$(sum "$tmp/backup.img")" "$(sum "$tmp/ref1")" "backup equals c1"

# --- night 2: incremental --since=c1, through a counting proxy ---
ok "day 2: more writes" qio_x509 s "" -- "write -P 0x22 40M 200k" \
   "write -z 2M 64k"
ok "checkpoint c2" ctl s checkpoint c2
cp "$disk" "$tmp/ref2"
n1=$(bitmap_count s c1)
diag "bitmap c1 (c1..c2) has $n1 granules set"
ok "bitmap c1 is frozen by c2" test "$(jget "$(ctl s --json bitmap list)" \
   '[b["frozen-by"] for b in d if b["name"] == "c1"][0]')" = c2
ok "changed granules: some, far from all ($n1 of 1024)" \
   test "$n1" -gt 4 -a "$n1" -lt 200
counted_pull 1 c1 c2 "$tmp/inc1.err"
is "$(sum "$tmp/backup.img")" "$(sum "$tmp/ref2")" "full + inc(c2) equals c2"
is "$(summary "$tmp/inc1.err" sync)" incremental "summary says incremental"
is "$(summary "$tmp/inc1.err" granules)" "$n1" "it moved the $n1 granules of c1"
read1=$(summary "$tmp/inc1.err" read)
ok "it read at most those granules ($read1 bytes)" \
   test "$read1" -le $((n1 * G))
ok "counting proxy stops" kill_by_pidfile "$tmp/p1.pid"
bytes=$(stats_read_bytes "$tmp/p1.stats")
diag "stats filter: $bytes bytes read through the proxy"
# The proxy also saw the bitmap export: a 4 KiB header and 128 bytes of
# bits, rounded to 8 KiB.  nbdkit's figure is rounded to 1 %.
ok "the server sent only the changed granules and the bitmap" \
   test "$bytes" -le $(( (n1 * G + 8192) * 101 / 100 )) -a \
   "$bytes" -ge $(( read1 * 99 / 100 ))

# --- night 3: incremental --since=c2, exactly five granules ---
ok "day 3: writes to granules 16, 160, 161, 320, 321" qio_x509 s "" -- \
   "write -P 0x31 1M 64k" "write -P 0x32 $((10 * 1048576 + 61440)) 8k" \
   "write -z 20M 128k"
# fio writer 2 ran after c2 too: its granules are in bitmap c2 as well.
ok "checkpoint c3" ctl s checkpoint c3
cp "$disk" "$tmp/ref3"
n2=$(bitmap_count s c2)
diag "bitmap c2 (c2..c3) has $n2 granules set"
counted_pull 2 c2 c3 "$tmp/inc2.err"
is "$(sum "$tmp/backup.img")" "$(sum "$tmp/ref3")" \
   "full + inc(c2) + inc(c3) equals c3"
is "$(summary "$tmp/inc2.err" granules)" "$n2" "it moved the $n2 granules of c2"
ok "counting proxy 2 stops" kill_by_pidfile "$tmp/p2.pid"
bytes=$(stats_read_bytes "$tmp/p2.stats")
diag "stats filter: $bytes bytes read through the proxy"
ok "the server sent only those granules and the bitmap" \
   test "$bytes" -le $(( (n2 * G + 8192) * 101 / 100 ))

# --- a quiet night: only the five known granules ---
ok "checkpoint c4 (nothing written since c3 but fio 3)" ctl s checkpoint c4
ok "day 4: the same five granules" qio_x509 s "" -- \
   "write -P 0x41 1M 64k" "write -P 0x42 $((10 * 1048576 + 61440)) 8k" \
   "write -z 20M 128k"
ok "checkpoint c5" ctl s checkpoint c5
cp "$disk" "$tmp/ref5"
is "$(bitmap_count s c4)" 5 "bitmap c4 counts 5 granules"
ok "incremental c4 --since=c3 (fio 3's granules)" fleece-backup \
   --sync=incremental --since=c3 "$(x509_uri s snapshot/c4)" "$tmp/backup.img"
ok "incremental c5 --since=c4" backup "$tmp/inc4.err" --sync=incremental --since=c4 \
   "$(x509_uri s snapshot/c5)" "$tmp/backup.img"
diag "$(cat "$tmp/inc4.err")"
is "$(summary "$tmp/inc4.err" granules)" 5 "summary: granules=5"
ok "summary: read at most 5 granules" \
   test "$(summary "$tmp/inc4.err" read)" -le $((5 * G))
is "$(sum "$tmp/backup.img")" "$(sum "$tmp/ref5")" "backup equals c5"

# --- the pulls succeeded: the operator drops the old checkpoints ---
for c in c1 c2 c3 c4; do
  ok "snapshot delete $c" ctl s snapshot delete "$c"
  ok "bitmap remove $c" ctl s bitmap remove "$c"
done
is "$(jget "$(ctl s --json bitmap list)" '[b["name"] for b in d]')" \
   "['c5']" "only the recording bitmap c5 is left"
ok "nbdkit stops cleanly" stop_nbdkit s
