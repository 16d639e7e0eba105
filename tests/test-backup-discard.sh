#!/usr/bin/env bash
# fleece-backup --discard-source trims what it has copied from the
# snapshot export, so the snapshot stops protecting it and the store
# stays small: at the end of a full pull the store is empty although fio
# kept overwriting the live disk, and the pulled image is still exact.
# Ranges trimmed by hand on a snapshot free their copies while the rest of
# the snapshot stays exact; a snapshot taken before is never affected.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires fio --version
requires nbdcopy --version
requires fleece-backup --help

G=65536
disk=$tmp/disk
make_disk "$disk" 32M 0x11
ok "nbdkit starts" start_nbdkit s -- disk="$disk" store="$tmp/store" \
   control="$tmp/s.ctl" cluster-size=64K

used () { jget "$(ctl s --json stats)" 'd["store-bytes-used"]'; }

# writer SEED MB: fio random 4 KiB writes over the whole live disk,
# MB MiB of them at 1 MiB/s; PID in $writer.
writer ()
{
  fio --name=w --ioengine=nbd --uri="$(live_uri s)" --rw=randwrite \
    --bs=4k --size=32M --io_size="$2"M --iodepth=4 --rate=1m \
    --randseed="$1" --output="$tmp/fio-$1.out" >/dev/null 2>&1 &
  writer=$!
}

# --- a full pull with --discard-source while fio writes ---
ok "snapshot create s1" ctl s snapshot create s1
cp "$disk" "$tmp/ref1"
writer 1 2
ok "full pull of s1 --discard-source at 16 MiB/s while fio writes" \
   backup "$tmp/s1.err" --sync=full --discard-source --rate=16777216 \
   "$(snap_uri s s1)" "$tmp/s1.img"
diag "$(cat "$tmp/s1.err")"
is "$(sum "$tmp/s1.img")" "$(sum "$tmp/ref1")" "the pulled image equals s1"
u=$(used)
ok "store near empty at the end of the pull ($u bytes)" test "$u" -le $((4 * G))
ok "fio writer 1 succeeded" wait "$writer"
u=$(used)
ok "still near empty after the writer ($u bytes)" test "$u" -le $((4 * G))
ok "snapshot delete s1" ctl s snapshot delete s1

# --- trim by hand: the unread part stays exact ---
ok "live write 0x12 everywhere" qio s "" "write -P 0x12 0 32M"
ok "snapshot create s2" ctl s snapshot create s2
cp "$disk" "$tmp/ref2"
ok "overwrite everything (32 MiB copied)" qio s "" "write -P 0x13 0 32M"
u=$(used)
is "$u" $((32 * 1048576)) "the store holds all of s2"
ok "trim the first half of snapshot/s2" qio s snapshot/s2 "discard 0 16M"
u=$(used)
is "$u" $((16 * 1048576)) "the store holds only the second half"
ok "overwrite everything again" qio s "" "write -P 0x14 0 32M"
is "$(used)" $((16 * 1048576)) "no new copy for the trimmed half"
ok "the second half of s2 is still exact" qio s snapshot/s2 "read -P 0x12 16M 16M"
ok "pull s2 (what the trimmed half reads is unspecified)" pull s s2 "$tmp/s2.img"
ok "its second half equals s2" cmp -i 16M:16M "$tmp/s2.img" "$tmp/ref2"
ok "snapshot delete s2" ctl s snapshot delete s2

# --- an older snapshot is unaffected by a newer one's discards ---
ok "snapshot create old" ctl s snapshot create old
cp "$disk" "$tmp/ref-old"
ok "day 2: overwrite the first 8 MiB" qio s "" "write -P 0x15 0 8M"
ok "snapshot create new" ctl s snapshot create new
cp "$disk" "$tmp/ref-new"
writer 3 2
ok "full pull of new --discard-source while fio writes" \
   fleece-backup --sync=full --discard-source --rate=16777216 \
   "$(snap_uri s new)" "$tmp/new.img"
ok "fio writer 3 succeeded" wait "$writer"
is "$(sum "$tmp/new.img")" "$(sum "$tmp/ref-new")" "the pulled image equals new"
ok "pull old" pull s old "$tmp/old.img"
is "$(sum "$tmp/old.img")" "$(sum "$tmp/ref-old")" "old is unaffected"
u=$(used)
ok "the store still holds old's copies ($u bytes)" test "$u" -ge $((8 * 1048576))
ok "nbdkit stops cleanly" stop_nbdkit s
