#!/usr/bin/env bash
# bitmap-merge: merging two checkpoints' bitmaps gives their union (counts
# in query-bitmaps and the bits of the bitmap exports, read over TLS);
# frozen bitmaps refuse to be merge targets; and the operator's way out of
# a failed pull that will not be retried (merge the old bitmap into the
# recording one, drop the old checkpoint) gives a correct incremental pull
# the next night.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version
requires python3 --version
requires fleece-backup --help
make_pki

disk=$tmp/disk
make_disk "$disk" 16M 0x01
ok "nbdkit starts (TLS, tls-exports-only)" \
   start_nbdkit s --tls=require --tls-certificates="$tmp/pki" \
   -- disk="$disk" store="$tmp/store" control="$tmp/s.ctl" \
   cluster-size=64K tls-exports-only=true

# Granule numbers below are offsets / 64 KiB.
ok "checkpoint c1" ctl s checkpoint c1
ok "writes A: granules 16 32 48 49" qio_x509 s "" -- \
   "write -P 0x11 1M 64k" "write -P 0x12 2M 4k" "write -P 0x13 3M 128k"
ok "checkpoint c2" ctl s checkpoint c2
ok "writes B: granules 32 64 65 100" qio_x509 s "" -- \
   "write -P 0x21 2M 512" "write -P 0x22 $((4 * 1048576 + 65534)) 4" \
   "write -z $((100 * 65536)) 4096"
ok "checkpoint c3" ctl s checkpoint c3

bl=$(ctl s --json bitmap list)
diag "$(ctl s bitmap list)"
is "$(jget "$bl" '[(b["name"], b["frozen"], b.get("frozen-by")) for b in d]')" \
   "[('c1', True, 'c2'), ('c2', True, 'c3'), ('c3', False, None)]" \
   "c1 frozen by c2, c2 frozen by c3, c3 recording"
is "$(bitmap_count s c1)" 4 "c1 counts the 4 granules of A"
is "$(bitmap_count s c2)" 4 "c2 counts the 4 granules of B"
is "$(bitmap_bits "$(x509_uri s bitmap/c1)" | tr '\n' ' ')" "16 32 48 49 " \
   "bitmap/c1 export: bits of A"
is "$(bitmap_bits "$(x509_uri s bitmap/c2)" | tr '\n' ' ')" "32 64 65 100 " \
   "bitmap/c2 export: bits of B"

ok "bitmap add u --disabled" ctl s bitmap add u --disabled
ok "bitmap merge u c1 c2" ctl s bitmap merge u c1 c2
is "$(bitmap_count s u)" 7 "u counts |A ∪ B| = 7"
is "$(bitmap_bits "$(x509_uri s bitmap/u)" | tr '\n' ' ')" \
   "16 32 48 49 64 65 100 " "bitmap/u export: the union's bits"
ok "bitmap add u2 --disabled" ctl s bitmap add u2 --disabled
ok "raw bitmap-merge" ctl s raw \
   '{"execute":"bitmap-merge","arguments":{"target":"u2","sources":["c2","c1"]}}'
is "$(bitmap_bits "$(x509_uri s bitmap/u2)" | tr '\n' ' ')" \
   "16 32 48 49 64 65 100 " "raw merge in the other order: the same union"
is "$(bitmap_count s c1) $(bitmap_count s c2)" "4 4" "sources unchanged"
ok "live write after the merge" qio_x509 s "" -- "write -P 0x31 8M 4k"
is "$(bitmap_count s u)" 7 "a disabled merge target does not record"
is "$(bitmap_count s c3)" 1 "the recording bitmap does"

ok_fails "merge into a frozen bitmap refused" "frozen" \
   ctl s bitmap merge c1 c2
ok_fails "merge from an unknown bitmap refused" "nosuch" \
   ctl s bitmap merge u c1 nosuch
is "$(bitmap_count s u)" 7 "target unchanged by the refused merge"
ok "nbdkit stops cleanly" stop_nbdkit s

# --- the operator's way out of a failed pull ---
# Night 1 pulled; night 2's pull failed and will not be retried (the
# store needs the space): fold bitmap n1 into the recording n2, drop n1
# and snapshot n2.  Night 3's incremental --since=n2 then covers both days.
qemu-io -f raw -c 'write -P 0x01 0 16M' "$disk" >/dev/null
ok "nbdkit w starts" start_nbdkit w --tls=require --tls-certificates="$tmp/pki" \
   -- disk="$disk" store="$tmp/wstore" control="$tmp/w.ctl" cluster-size=64K
ok "checkpoint n1" ctl w checkpoint n1
cp "$disk" "$tmp/ref1"
ok "night 1 full pull" fleece-backup --sync=full \
   "$(x509_uri w snapshot/n1)" "$tmp/backup.img"
is "$(sum "$tmp/backup.img")" "$(sum "$tmp/ref1")" "backup at n1"
ok "day 2 writes" qio_x509 w "" -- "write -P 0x41 1M 1M" "write -z 5M 64k"
ok "checkpoint n2" ctl w checkpoint n2
ok "(night 2 pull fails) bitmap merge n2 n1" ctl w bitmap merge n2 n1
ok "snapshot delete n2" ctl w snapshot delete n2
ok "bitmap remove n1" ctl w bitmap remove n1
ok "day 3 writes" qio_x509 w "" -- "write -P 0x42 1536k 1M" "write -P 0x43 12M 4k"
ok "checkpoint n3" ctl w checkpoint n3
cp "$disk" "$tmp/ref3"
ok "night 3 incremental --since=n2" fleece-backup --sync=incremental \
   --since=n2 "$(x509_uri w snapshot/n3)" "$tmp/backup.img"
is "$(sum "$tmp/backup.img")" "$(sum "$tmp/ref3")" \
   "backup at n3 although night 2 was never pulled"
ok "nbdkit w stops cleanly" stop_nbdkit w
