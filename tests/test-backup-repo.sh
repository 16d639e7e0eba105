#!/usr/bin/env bash
# A repository of restore points (fleece-backup init, backup, list): a
# full point and incremental points on top, written by QEMU (qemu-nbd)
# as a qcow2 chain that QEMU's own tools read: each point is exactly the
# disk at its checkpoint (sha256 against nbdcopy's pull of the snapshot,
# and qemu-img compare), qemu-img check is clean, the backing file is
# the previous point by relative name, and an incremental point holds
# only the changed clusters (zeroed ones as qcow2 zero clusters).  The
# manifest records each point; a wrong base, another disk's snapshot and
# a second writer are refused with messages naming both sides; a backup
# killed (SIGKILL) at each of its steps leaves the repository so that the
# next backup completes the chain.  The old form still works alongside.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires_repo

disk=$tmp/disk
truncate -s 32M "$disk"
qemu-io -f raw -c 'write -P 0x01 0 8M' -c 'write -P 0x05 20M 100k' \
  "$disk" >/dev/null
ok "nbdkit starts" start_repo_server s "$disk"
repo=$tmp/repo

# point_is POINT SNAPSHOT: the point's image equals a pull of the
# snapshot (sha256), and qemu-img compare agrees.
point_is ()
{
  pull s "$2" "$tmp/ref-$2" &&
  qemu-img convert -f qcow2 -O raw "$repo/$1.qcow2" "$tmp/img-$1" &&
  [ "$(sum "$tmp/img-$1")" = "$(sum "$tmp/ref-$2")" ] &&
  qemu-img compare -q -f qcow2 -F raw "$repo/$1.qcow2" "$tmp/ref-$2"
}
# field POINT KEY: a field of POINT in the manifest.
field ()
{
  jget "$(cat "$repo/manifest.json")" \
    "[p['$2'] for p in d['points'] if p['name'] == '$1'][0]"
}

ok "init" fleece-backup init "$repo"
ok_fails "init twice is refused" "already a repository" \
   fleece-backup init "$repo"
ok_fails "backup to a directory that is no repository" \
   "not a fleece-backup repository" \
   fleece-backup backup "$tmp" "$(snap_uri s c1)"

# --- night 1: full ---
ok "checkpoint c1" ctl s checkpoint c1
ok "backup c1 (full)" backup "$tmp/b1.err" backup "$repo" "$(snap_uri s c1)"
diag "$(cat "$tmp/b1.err")"
ok "point c1 is c1" point_is c1 c1
ok "qemu-img check c1" qemu-img check -q -f qcow2 "$repo/c1.qcow2"
is "$(field c1 parent)" None "c1 has no parent"
is "$(field c1 complete)" True "c1 is complete"
is "$(field c1 disk-size)" 33554432 "manifest: disk size"
is "$(field c1 disk)" "$disk" "manifest: the server's disk"
is "$(field c1 checkpoint)" c1 "manifest: checkpoint"
is "$(stat -c %s "$repo/c1.sums")" $((32 + 512 * 8)) \
   "checksum list: 8 bytes per 64 KiB cluster"
ok "a full point writes no zeroes into its new qcow2" \
   test "$(field c1 bytes-zeroed)" = 0

# --- night 2: incremental ---
ok "writes" qio s "" "write -P 0x22 4M 200k" "write -z 0 64k" \
   "write -P 0x33 30M 5k"
ok "checkpoint c2" ctl s checkpoint c2
ok "backup c2 --since=c1" backup "$tmp/b2.err" backup "$repo" \
   "$(snap_uri s c2)" --since=c1
diag "$(cat "$tmp/b2.err")"
ok "point c2 is c2" point_is c2 c2
ok "point c1 is still c1" point_is c1 c1
ok "qemu-img check c2" qemu-img check -q -f qcow2 "$repo/c2.qcow2"
info=$(qemu-img info --output=json "$repo/c2.qcow2")
is "$(jget "$info" 'd["backing-filename"]')" c1.qcow2 \
   "c2's backing file is c1.qcow2, relative"
is "$(jget "$info" 'd["backing-filename-format"]')" qcow2 \
   "backing format qcow2"
map=$(qemu-img map --output=json -f qcow2 "$repo/c2.qcow2")
is "$(jget "$map" 'sum(e["length"] for e in d if e["depth"] == 0 and e["data"])')" \
   $((4 * 65536 + 65536)) "c2 holds only the changed data clusters"
is "$(jget "$map" '[e["zero"] and e["depth"] == 0 for e in d if e["start"] == 0][0]')" \
   True "the zeroed cluster is a zero cluster of c2"
is "$(field c2 parent)" c1 "manifest: c2's parent is c1"
is "$(field c2 since)" c1 "manifest: since c1"
is "$(summary "$tmp/b2.err" sync)" incremental "summary: incremental"

# --- refusals ---
ok "writes" qio s "" "write -P 0x44 1M 64k"
ok "checkpoint c3" ctl s checkpoint c3
ok_fails "incremental onto the wrong base is refused, naming both" \
   "since=c1.*newest point.*'c2'.*checkpoint 'c2'.*wrong base" \
   fleece-backup backup "$repo" "$(snap_uri s c3)" --since=c1 --name wrong
ok "nothing was added" test ! -e "$repo/wrong.qcow2"
truncate -s 16M "$tmp/other"
ok "another server starts" start_nbdkit o -- disk="$tmp/other" \
   store="$tmp/ostore" control="$tmp/o.ctl"
ok "checkpoint on the other disk" ctl o checkpoint c3
ok_fails "another disk's snapshot is refused" "another disk's repository" \
   fleece-backup backup "$repo" "$(snap_uri o c3)" --full --name other
ok_fails "a point name is not reused" "already has a point named 'c2'" \
   fleece-backup backup "$repo" "$(snap_uri s c3)" --full --name c2

# A second writer while a backup runs (a full point, slowed down by a
# proxy to 4 MiB/s: about 2 s).
ok "slow proxy starts" start_proxy slow s --filter=rate rate=4M
fleece-backup backup "$repo" \
  "nbd+unix:///snapshot/c3?socket=$tmp/slow.sock" --full \
  2>"$tmp/slow.err" &
slow=$!
ok "the slow backup holds the lock" wait_for 10 \
   sh -c "ls '$repo'/c3.qcow2"
ok_fails "a second writer is refused" "in use: another fleece-backup writes it" \
   fleece-backup backup "$repo" "$(snap_uri s c3)" --since=c2 --name c3b
ok "the first backup finishes" wait "$slow"
ok "point c3 is c3" point_is c3 c3
is "$(field c3 parent)" None "--full: c3 is a full point"

# --- kill -9 at each step of a backup: the next one completes ---
n=4
for step in backup-journaled backup-pulled backup-synced; do
  ok "writes" qio s "" "write -P 0x$n$n $((n * 2))M 128k"
  ok "checkpoint c$n" ctl s checkpoint "c$n"
  FLEECE_BACKUP_CRASH_AT=$step fleece-backup backup "$repo" \
    "$(snap_uri s "c$n")" --since="c$((n - 1))" 2>/dev/null
  is "$?" 137 "backup of c$n killed at $step"
  is "$(field "c$n" complete)" False "c$n is left incomplete"
  ok "the next backup completes c$n" backup "$tmp/r$n.err" backup \
     "$repo" "$(snap_uri s "c$n")" --since="c$((n - 1))"
  ok "it said it removed the incomplete point" \
     grep -q "removing point c$n" "$tmp/r$n.err"
  ok "point c$n is c$n" point_is "c$n" "c$n"
  ok "qemu-img check c$n" qemu-img check -q -f qcow2 "$repo/c$n.qcow2"
  n=$((n + 1))
done
ok "no leftover files" test "$(ls "$repo" | sort | tr '\n' ' ')" = \
   "c1.qcow2 c1.sums c2.qcow2 c2.sums c3.qcow2 c3.sums c4.qcow2 c4.sums c5.qcow2 c5.sums c6.qcow2 c6.sums lock manifest.json readers "

# --- list ---
ok "list" fleece-backup list "$repo"
list=$(fleece-backup list "$repo" --json)
is "$(jget "$list" '" ".join(p["name"] + ":" + str(p["parent"]) for p in d)')" \
   "c1:None c2:c1 c3:None c4:c3 c5:c4 c6:c5" "list --json: points and parents"
ok "list shows the states" sh -c \
   "fleece-backup list '$repo' | grep -q '^c1 .* full$' &&
    fleece-backup list '$repo' | grep -q '^c6 .* c5 .* incremental$'"

# The old form is untouched.
ok "old form: a pull to a file" fleece-backup -q "$(snap_uri s c6)" \
   "$tmp/old.img"
is "$(sum "$tmp/old.img")" "$(sum "$tmp/ref-c6")" "old form: same image"
