#!/usr/bin/env bash
# fleece-backup backup of a group of disks (issue 17): two, then three
# disks, each served by its own nbdkit, while group-writer makes
# dependent writes round robin over them (a write issued only once the
# one before it, on another disk, was acknowledged).  Each night is one
# command: one checkpoint across all the disks at one instant, then each
# disk pulled into the group repository (full, then incremental).  A
# restored group point equals the snapshots of that instant (copied by
# the post-hook, while they exist) and holds a prefix of the writes; a
# pull that fails (the post-hook kills one server) leaves the group point
# incomplete, never restorable, and the next night succeeds; prune keeps
# whole group points; verify catches a damaged file of one disk; mixing
# one-disk and group backups is refused.  Real clients: nbdkit, qemu-img,
# qemu-nbd, nbdcopy, qemu-io, group-writer.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires_repo
requires qemu-io --version

gw=$abs_top_builddir/tests/group-writer
repo=$tmp/repo

# The post-hook: copy each disk's snapshot of the group, the reference.
cat >"$tmp/refs.sh" <<'HOOK'
#!/bin/sh
[ "$FLEECE_GROUP_RESULT" = created ] || exit 0
for d in $DISKS; do
  nbdcopy "nbd+unix:///snapshot/$FLEECE_GROUP_NAME?socket=$T/$d.sock" \
    "$T/ref.$FLEECE_GROUP_NAME.$d" || exit 1
done
HOOK
chmod +x "$tmp/refs.sh"
export T=$tmp DISKS

writer_start ()
{
  local d uris=()
  for d in $DISKS; do uris+=("$(live_uri "$d")"); done
  "$gw" write 60 "${uris[@]}" >"$tmp/writer.out" 2>&1 &
  wpid=$!
  cleanup_fn "kill $wpid 2>/dev/null"
  sleep 0.2
}
writer_stop ()
{
  kill "$wpid" && wait "$wpid" && pid_gone "$wpid" &&
    diag "the writer made $(cat "$tmp/writer.out") writes"
}

# gbackup REPO NAME [fleece-backup options]: one group backup of $DISKS.
gbackup ()
{
  local r=$1 n=$2 d args=(); shift 2
  for d in $DISKS; do
    args+=("$d=$(live_uri "$d")" --control "$tmp/$d.ctl")
  done
  fleece-backup backup "$r" "${args[@]}" --name "$n" "$@" \
    2>"$tmp/$n.err" || { cat "$tmp/$n.err"; return 1; }
}
# exact_restore REPO NAME: the group point restored into a directory
# equals the references, and the disks hold a prefix of the writes.
exact_restore ()
{
  local r=$1 n=$2 d uris=() pids=() st=0
  rm -rf "$tmp/rs.$n" && mkdir "$tmp/rs.$n" &&
  fleece-backup restore "$r" "$n" "$tmp/rs.$n" 2>"$tmp/rs.$n.err" ||
    { cat "$tmp/rs.$n.err"; return 1; }
  for d in $DISKS; do
    cmp "$tmp/rs.$n/$d" "$tmp/ref.$n.$d" || return 1
    timeout -k 1 20 qemu-nbd -r -f raw --socket "$tmp/rs.$n.$d.sock" \
      "$tmp/rs.$n/$d" &
    pids+=($!)
    uris+=("nbd+unix:///?socket=$tmp/rs.$n.$d.sock")
  done
  for d in $DISKS; do wait_for 10 test -S "$tmp/rs.$n.$d.sock" || return 1; done
  "$gw" check "${uris[@]}" >"$tmp/check.out" || st=1
  echo "$n: $(cat "$tmp/check.out")" >>"$tmp/cuts"
  for d in "${pids[@]}"; do kill "$d" 2>/dev/null; wait "$d" 2>/dev/null; done
  return $st
}
listed ()
{
  fleece-backup list "$repo" | grep -q "^$1 *$2 "
}

# ---- Two disks ----
DISKS="a b"
for d in $DISKS; do
  make_disk "$tmp/disk.$d" 4M 0x11
  ok "nbdkit $d starts" start_repo_server "$d" "$tmp/disk.$d"
done
ok "init" fleece-backup init "$repo"
writer_start
for n in 1 2 3 4; do
  if [ "$n" -gt 1 ]; then
    ok "writes before night $n" bash -c \
      "qemu-io -f raw -c 'write -P $(( n + 0x30 )) $(( n * 256 ))k 128k' '$(live_uri a)' >/dev/null &&
       qemu-io -f raw -c 'write -P $(( n + 0x40 )) $(( n * 512 ))k 64k' '$(live_uri b)' >/dev/null"
  fi
  ok "night $n: one group backup of disks a and b" \
     gbackup "$repo" "g$n" --post-hook "$tmp/refs.sh"
  if [ "$n" = 1 ]; then
    is "$(grep -c 'sync=full' "$tmp/g$n.err")" 2 "night 1: both disks full"
  else
    is "$(grep -c "sync=incremental.* point=g$n parent=g$(( n - 1 ))" "$tmp/g$n.err")" 2 \
       "night $n: both disks incremental on their point of night $(( n - 1 ))"
  fi
  ok "g$n is listed complete" listed "g$n" complete
  ok "g$n restores to the snapshots of its instant, a prefix of the writes" \
     exact_restore "$repo" "g$n"
done
ok "the writer ran through the nights" writer_stop
diag "the writer made $(cat "$tmp/writer.out") writes; the last write each disk shows: $(tr '\n' ';' <"$tmp/cuts")"
ok "the nights caught the writer at different points" \
   test "$(for n in 1 2 3 4; do cat "$tmp/ref.g$n.a" "$tmp/ref.g$n.b" | head -c 1024 | sha256sum; done | sort -u | wc -l)" -ge 3

json=$(fleece-backup list "$repo" --json)
is "$(jget "$json" '" ".join(g["name"] + ":" + ",".join(x["disk"] + "=" + x["point"]["name"] for x in g["disks"]) for g in d)')" \
   "g1:a=g1,b=g1 g2:a=g2,b=g2 g3:a=g3,b=g3 g4:a=g4,b=g4" \
   "list --json: each group point ties the disks' points together"
ok "... with each disk's identity" \
   test "$(jget "$json" 'd[0]["disks"][1]["disk-id"]')" = "$tmp/disk.b"

# One disk of a group.
ok "restore --target b=FILE restores disk b only" \
   fleece-backup restore "$repo" g2 --target "b=$tmp/one.b"
ok "... exactly" cmp "$tmp/one.b" "$tmp/ref.g2.b"
ok "a disk's repository restores alone" \
   fleece-backup restore "$repo/disks/a" g2 "$tmp/one.a"
ok "... exactly" cmp "$tmp/one.a" "$tmp/ref.g2.a"

# Mixing is refused.
ok_fails "a one-disk backup into a disk of the group is refused" \
   "disk 'a' of a group repository" \
   fleece-backup backup "$repo/disks/a" "$(live_uri a)" --control "$tmp/a.ctl"
ok_fails "a backup of one disk of the group is refused" \
   "is a group of disks a, b; this backup names a" \
   fleece-backup backup "$repo" "a=$(live_uri a)" --control "$tmp/a.ctl"
ok "a one-disk repository" fleece-backup init "$tmp/single"
ok "... takes a point" fleece-backup backup "$tmp/single" "$(live_uri a)" \
   --control "$tmp/a.ctl" --name s1
ok_fails "... and refuses a group" "holds the points of one disk" \
   fleece-backup backup "$tmp/single" "a=$(live_uri a)" --control "$tmp/a.ctl" \
   "b=$(live_uri b)" --control "$tmp/b.ctl"

# A failed pull: the post-hook kills server b once the checkpoint exists.
ok_fails "night 5: disk b's server dies after the checkpoint: the backup fails" \
   "" gbackup "$repo" g5 --post-hook "kill \$(cat '$tmp/b.pid')"
ok "g5 is listed incomplete" listed g5 incomplete
ok "disk a has its point g5, complete" \
   fleece-backup restore "$repo/disks/a" g5 "$tmp/g5.a"
ok_fails "restore of g5 is refused" "group point g5 of .* is incomplete" \
   fleece-backup restore "$repo" g5 "$tmp"
rm -f "$tmp/b.pid"
ok "nbdkit b starts again" start_repo_server b "$tmp/disk.b"
writer_start
ok "night 6 succeeds" gbackup "$repo" g6 --post-hook "$tmp/refs.sh"
ok "night 6: a incremental on g5, b full (its server lost its bitmaps)" \
   bash -c "grep -q 'sync=incremental.* point=g6 parent=g5' '$tmp/g6.err' &&
            grep -q 'sync=full.* point=g6 parent=-' '$tmp/g6.err'"
ok "g6 exact, a prefix of the writes" exact_restore "$repo" g6
ok "g5 is still incomplete" listed g5 incomplete
# A run killed (SIGKILL) at each step of a group backup: the group point
# stays incomplete, and the next run finishes it (from the snapshots
# still on the servers) or removes it (nothing of it was made).
crashed ()
{
  local n=$1 step=$2 st=0 d args=()
  for d in $DISKS; do
    args+=("$d=$(live_uri "$d")" --control "$tmp/$d.ctl")
  done
  FLEECE_BACKUP_CRASH_AT=$step fleece-backup backup "$repo" "${args[@]}" \
    --name "$n" --post-hook "$tmp/refs.sh" 2>"$tmp/$n.err" || st=$?
  [ "$st" = 137 ] || { echo "not killed at $step: status $st"; return 1; }
  listed "$n" incomplete
}
ok "night 7 killed once it is in the manifest" crashed g7 group-journaled
ok "night 8 killed once the checkpoints exist" crashed g8 group-checkpointed
ok "night 9 killed after disk a's point" crashed g9 group-disk-pulled
ok "night 10 succeeds" gbackup "$repo" g10 --post-hook "$tmp/refs.sh"
ok "... removing g7, of which nothing was made" \
   bash -c "grep -q 'removing group point g7' '$tmp/g10.err' && ! fleece-backup list '$repo' | grep -q '^g7 '"
ok "... finishing g8 on both disks, and g9 on disk b" bash -c \
   "grep -q 'finishing checkpoint g8' '$tmp/g10.err' && grep -q 'finishing checkpoint g9' '$tmp/g10.err'"
ok "g8 and g9 are complete" bash -c "fleece-backup list '$repo' | grep -q '^g8 *complete' &&
   fleece-backup list '$repo' | grep -q '^g9 *complete'"
for n in g8 g9 g10; do
  ok "$n exact, a prefix of the writes" exact_restore "$repo" "$n"
done
ok_fails "a failed pre-hook fails the backup" "pre-hook 'false' failed.*nothing was created" \
   gbackup "$repo" g11 --pre-hook false
ok "... and creates nothing, on the servers or in the repository" bash -c \
   "! fleece-backup list '$repo' | grep -q '^g11 ' &&
    ! fleecectl -s '$tmp/a.ctl' snapshot list | grep -q '^g11 ' &&
    ! fleecectl -s '$tmp/b.ctl' bitmap list | grep -q '^g11 '"

ok "verify passes" bash -c "fleece-backup verify '$repo' >'$tmp/verify.out'"
ok "verify skips g5" grep -q "g5: not checked: incomplete" "$tmp/verify.out"

# Prune keeps whole group points.
ok "prune --keep-last 5" fleece-backup prune "$repo" --keep-last 5
is "$(fleece-backup list "$repo" --json | jget "$(cat)" '" ".join(g["name"] + ":" + str(g["complete"]) for g in d)')" \
   "g4:True g5:False g6:True g8:True g9:True g10:True" "the newest five group points are kept (and g5 between them, incomplete)"
is "$(fleece-backup list "$repo/disks/a" --json | jget "$(cat)" '" ".join(p["name"] for p in d)')" \
   "g4 g5 g6 g8 g9 g10" "disk a keeps its points from g4"
is "$(fleece-backup list "$repo/disks/b" --json | jget "$(cat)" '" ".join(p["name"] for p in d)')" \
   "g4 g6 g8 g9 g10" "disk b keeps its points from g4"
ok "g4 still exact" exact_restore "$repo" g4
ok "g6 still exact" exact_restore "$repo" g6
ok "verify passes after the prune" fleece-backup verify "$repo"

# A damaged file of one disk.
map=$(qemu-img map --output=json -f qcow2 "$repo/disks/b/g4.qcow2")
host=$(jget "$map" '[e["offset"] for e in d if e["depth"] == 0 and e["data"]][-1]')
python3 -c '
import sys
f = open(sys.argv[1], "r+b"); f.seek(int(sys.argv[2]) + 100)
b = f.read(1); f.seek(int(sys.argv[2]) + 100); f.write(bytes([b[0] ^ 0xff]))' \
  "$repo/disks/b/g4.qcow2" "$host"
ok_fails "verify fails on a flipped byte in disk b's point of g4" \
   "point g4 of disk b differs from its checksum list at offset" \
   fleece-backup verify "$repo" g4
ok_fails "restore of g4 stops at it" "differs from its checksum" \
   fleece-backup restore "$repo" g4 "$tmp"
ok "writer stops" writer_stop
for d in $DISKS; do ok "nbdkit $d stops cleanly" stop_nbdkit "$d"; done

# ---- Three disks ----
DISKS="x y z"
repo=$tmp/repo3
for d in $DISKS; do
  make_disk "$tmp/disk.$d" 4M 0x22
  ok "nbdkit $d starts" start_repo_server "$d" "$tmp/disk.$d"
done
ok "init (three disks)" fleece-backup init "$repo"
writer_start
for n in 1 2 3; do
  ok "three disks, night $n" gbackup "$repo" "t$n" --post-hook "$tmp/refs.sh"
  ok "t$n exact, a prefix of the writes" exact_restore "$repo" "t$n"
done
is "$(grep -c "sync=incremental.* point=t3 parent=t2" "$tmp/t3.err")" 3 \
   "night 3: three incrementals"
ok "writer stops" writer_stop
for d in $DISKS; do ok "nbdkit $d stops cleanly" stop_nbdkit "$d"; done
