#!/usr/bin/env bash
# Reading a repository: fleece-backup verify (qemu-img check of every
# file, the checksum list of every point against its content: a flipped
# byte in any point's file fails it with exit 1, naming the point and
# the offset), restore (to a sparse file and to the live export of a new
# Fleece server, exact; a damaged point stops the restore at the bad
# cluster) and serve (a read-only NBD export of a point that nbdinfo and
# nbdcopy read, stopped by SIGTERM); a disk of an odd size with 4 KiB
# granules restores to the byte.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires_repo
requires nbdinfo --version

disk=$tmp/disk
truncate -s 32M "$disk"
qemu-io -f raw -c 'write -P 0x01 0 8M' -c 'write -P 0x05 20M 100k' \
  "$disk" >/dev/null
ok "nbdkit starts" start_repo_server s "$disk"
repo=$tmp/repo
ok "init" fleece-backup init "$repo"
ok "checkpoint c1" ctl s checkpoint c1
ok "backup c1" fleece-backup backup "$repo" "$(snap_uri s c1)" -q
ok "writes" qio s "" "write -P 0x22 4M 200k" "write -z 0 64k"
ok "checkpoint c2" ctl s checkpoint c2
ok "backup c2" fleece-backup backup "$repo" "$(snap_uri s c2)" --since=c1 -q
ok "pull c1" pull s c1 "$tmp/ref1"
ok "pull c2" pull s c2 "$tmp/ref2"

# --- verify ---
ok "verify: all points" fleece-backup verify "$repo"
ok "verify c2" fleece-backup verify "$repo" c2
ok_fails "verify of a point that is not there" "has no point 'nope'" \
   fleece-backup verify "$repo" nope

# --- restore ---
ok "restore c2 to a file" fleece-backup restore "$repo" c2 "$tmp/out2"
is "$(sum "$tmp/out2")" "$(sum "$tmp/ref2")" "restored c2 is c2"
ok "restore c1 to a file" fleece-backup restore "$repo" c1 "$tmp/out1" -q
is "$(sum "$tmp/out1")" "$(sum "$tmp/ref1")" "restored c1 is c1"
ok "the restored file is sparse" \
   test "$(du -B1 "$tmp/out2" | cut -f1)" -lt $((16 << 20))
truncate -s 32M "$tmp/new"
ok "a new Fleece server starts" start_nbdkit n -- disk="$tmp/new" \
   store="$tmp/nstore" control="$tmp/n.ctl"
qemu-io -f raw -c 'write -P 0xee 0 32M' "$(live_uri n)" >/dev/null
ok "restore c2 to its live export (NBD URI)" \
   fleece-backup restore "$repo" c2 "$(live_uri n)" -q
is "$(sum "$tmp/new")" "$(sum "$tmp/ref2")" "the new server's disk is c2"

# --- serve ---
fleece-backup serve "$repo" c2 --socket "$tmp/srv.sock" 2>"$tmp/srv.log" &
srv=$!
cleanup_fn "kill $srv 2>/dev/null"
ok "serve: the socket appears" wait_for 10 test -S "$tmp/srv.sock"
is "$(nbdinfo --size "nbd+unix:///?socket=$tmp/srv.sock")" 33554432 \
   "nbdinfo: the point's size"
ok "serve is read-only" sh -c \
   "nbdinfo --json 'nbd+unix:///?socket=$tmp/srv.sock' | grep -q '\"is_read_only\": true'"
ok "nbdcopy of the served point" nbdcopy \
   "nbd+unix:///?socket=$tmp/srv.sock" "$tmp/served"
is "$(sum "$tmp/served")" "$(sum "$tmp/ref2")" "the served point is c2"
ok_fails "prune waits while a point is served" "in use: a point is being read" \
   fleece-backup prune "$repo" --keep-last 1
ok "SIGTERM stops serve" kill "$srv"
ok "serve is gone" pid_gone "$srv"

# --- a flipped byte in any point ---
# flip POINT: invert one byte of a data cluster that the point itself
# holds; prints that cluster's guest offset.
flip ()
{
  local map host guest
  map=$(qemu-img map --output=json -f qcow2 "$repo/$1.qcow2")
  host=$(jget "$map" '[e["offset"] for e in d if e["depth"] == 0 and e["data"]][-1]')
  guest=$(jget "$map" '[e["start"] for e in d if e["depth"] == 0 and e["data"]][-1]')
  python3 -c '
import sys
f = open(sys.argv[1], "r+b"); f.seek(int(sys.argv[2]) + 100)
b = f.read(1); f.seek(int(sys.argv[2]) + 100); f.write(bytes([b[0] ^ 0xff]))' \
    "$repo/$1.qcow2" "$host"
  echo "$guest"
}
cp -a "$repo" "$tmp/repo.good"
off=$(flip c2)
diag "flipped a byte of c2's cluster at guest offset $off"
ok_fails "verify fails on c2, naming it and the offset" \
   "point c2 differs from its checksum list at offset $off " \
   fleece-backup verify "$repo"
ok "verify c1 still passes" fleece-backup verify "$repo" c1
ok_fails "verify exits 1" "^1$" sh -c \
   "fleece-backup verify '$repo' c2 2>/dev/null; echo \$?; exit 1"
ok_fails "restore of the damaged point stops at the bad cluster" \
   "point c2 differs from its checksums at offset $off " \
   fleece-backup restore "$repo" c2 "$tmp/bad2"
rm -rf "$repo"
cp -a "$tmp/repo.good" "$repo"
off=$(flip c1)
diag "flipped a byte of c1's cluster at guest offset $off"
ok_fails "verify fails on c1, naming it and the offset" \
   "point c1 differs from its checksum list at offset $off " \
   fleece-backup verify "$repo" c1
ok_fails "a damaged checksum list is refused" "checksum list is damaged" \
   sh -c "printf x | dd of='$tmp/repo.good/c2.sums' bs=1 seek=40 conv=notrunc 2>/dev/null &&
          fleece-backup verify '$tmp/repo.good' c2"

# --- a disk whose size is no multiple of 512 (qcow2 rounds it up) or of
# the cluster, and granules of 4 KiB (finer than the 64 KiB checksums) ---
truncate -s $((5 * 1048576 + 3000)) "$tmp/odd"
qemu-io -f raw -c 'write -P 0x01 0 1M' -c "write -P 0x07 5M 3000" \
  "$tmp/odd" >/dev/null
ok "a server of an odd-sized disk starts" start_nbdkit odd -- \
   disk="$tmp/odd" store="$tmp/oddstore" control="$tmp/odd.ctl" \
   cluster-size=4K
ok "init" fleece-backup init "$tmp/oddrepo"
ok "point o1" fleece-backup backup "$tmp/oddrepo" "$(live_uri odd)" \
   --control "$tmp/odd.ctl" --name o1 -q
cp "$tmp/odd" "$tmp/oddref1"
ok "writes in the last, short cluster and in 4 KiB granules" \
   qio odd "" "write -P 0x09 $((5 * 1048576 + 1000)) 100" \
   "write -P 0x0a 8192 4096" "write -z 600k 4k"
cp "$tmp/odd" "$tmp/oddref2"
ok "point o2 (incremental)" fleece-backup backup "$tmp/oddrepo" \
   "$(live_uri odd)" --control "$tmp/odd.ctl" --name o2 -q
ok "verify" fleece-backup verify "$tmp/oddrepo"
ok "restore o1" fleece-backup restore "$tmp/oddrepo" o1 "$tmp/oddout1" -q
ok "restore o2" fleece-backup restore "$tmp/oddrepo" o2 "$tmp/oddout2" -q
ok "o1 is exact, to the byte (size too)" cmp "$tmp/oddout1" "$tmp/oddref1"
ok "o2 is exact, to the byte (size too)" cmp "$tmp/oddout2" "$tmp/oddref2"
