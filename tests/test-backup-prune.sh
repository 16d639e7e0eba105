#!/usr/bin/env bash
# fleece-backup prune --keep-last N merges the oldest points away through
# QEMU (qemu-img commit into the oldest file, renamed over its child),
# keeping every other point exact.  A SIGKILL at each step of a prune
# (journaled, committed, renamed; and a commit killed halfway, whose
# writes into the dropped file are simulated) leaves every point that
# was to be kept restorable and exact, and the next prune (or backup)
# finishes the job.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires_repo

disk=$tmp/disk
truncate -s 16M "$disk"
qemu-io -f raw -c 'write -P 0x01 0 4M' "$disk" >/dev/null
ok "nbdkit starts" start_repo_server s "$disk"
repo=$tmp/repo
ok "init" fleece-backup init "$repo"

# Seven nights: c1 full, c2..c7 incremental, each with its reference.
for n in 1 2 3 4 5 6 7; do
  if [ "$n" -gt 1 ]; then
    qio s "" "write -P 0x$n$n $(( (n * 3) % 16 ))M 100k" \
      "write -z $(( n - 1 ))M 64k" >/dev/null
  fi
  ok "checkpoint c$n" ctl s checkpoint "c$n"
  if [ "$n" -eq 1 ]; then
    ok "backup c1" fleece-backup backup "$repo" "$(snap_uri s c1)" -q
  else
    ok "backup c$n" fleece-backup backup "$repo" "$(snap_uri s "c$n")" \
       --since="c$((n - 1))" -q
  fi
  pull s "c$n" "$tmp/ref$n"
done

# exact N...: each point cN reads as its reference (qemu-img convert of
# its chain, sha256), and the newest restores exactly.
exact ()
{
  local n last
  for n in "$@"; do
    qemu-img convert -f qcow2 -O raw "$repo/c$n.qcow2" "$tmp/img" || return 1
    [ "$(sum "$tmp/img")" = "$(sum "$tmp/ref$n")" ] ||
      { echo "c$n differs"; return 1; }
    last=$n
  done
  rm -f "$tmp/rest"
  fleece-backup restore "$repo" "c$last" "$tmp/rest" -q &&
    [ "$(sum "$tmp/rest")" = "$(sum "$tmp/ref$last")" ]
}
names () { fleece-backup list "$repo" --json |
           python3 -c 'import json,sys; print(" ".join(p["name"] for p in json.load(sys.stdin)))'; }

# --- killed after journaling; the dropped file then damaged as a commit
# killed halfway would leave it ---
FLEECE_BACKUP_CRASH_AT=prune-journaled fleece-backup prune "$repo" \
  --keep-last 6 >/dev/null 2>&1
is "$?" 137 "prune killed after journaling"
ok "c1..c7 exact" exact 1 2 3 4 5 6 7
ok "a half commit: c2's clusters written into c1's file" \
   qemu-io -f qcow2 -c "write -P 0xee 6M 100k" -c "write -P 0xee 1M 64k" \
   "$repo/c1.qcow2"
ok "c2..c7 still exact" exact 2 3 4 5 6 7
ok "the next prune finishes" fleece-backup prune "$repo" --keep-last 6
is "$(names)" "c2 c3 c4 c5 c6 c7" "c1 is gone"
ok "c2..c7 exact" exact 2 3 4 5 6 7
is "$(qemu-img info --output=json "$repo/c2.qcow2" | grep -c backing-filename)" 0 \
   "c2 is now a full point (no backing file)"
ok "c1's files are gone" test ! -e "$repo/c1.qcow2" -a ! -e "$repo/c1.sums"

# --- killed after the commit, before the rename ---
FLEECE_BACKUP_CRASH_AT=prune-committed fleece-backup prune "$repo" \
  --keep-last 5 >/dev/null 2>&1
is "$?" 137 "prune killed after the commit"
ok "c3..c7 exact" exact 3 4 5 6 7
ok "verify passes meanwhile" fleece-backup verify "$repo"
ok "verify says it skips c2" sh -c \
   "fleece-backup verify '$repo' | grep -q 'c2: not checked: an interrupted prune'"
ok_fails "restore of c2 is refused meanwhile" "c2 is being dropped" \
   fleece-backup restore "$repo" c2 "$tmp/c2.img"
ok "the next prune finishes" fleece-backup prune "$repo" --keep-last 5
is "$(names)" "c3 c4 c5 c6 c7" "c2 is gone"
ok "c3..c7 exact" exact 3 4 5 6 7

# --- killed after the rename: a backup finishes the prune ---
FLEECE_BACKUP_CRASH_AT=prune-renamed fleece-backup prune "$repo" \
  --keep-last 4 >/dev/null 2>&1
is "$?" 137 "prune killed after the rename"
ok "c4..c7 exact" exact 4 5 6 7
ok "verify passes meanwhile" fleece-backup verify "$repo"
ok "writes" qio s "" "write -P 0x88 2M 64k"
ok "checkpoint c8" ctl s checkpoint c8
ok "a backup finishes the prune, then adds c8" \
   fleece-backup backup "$repo" "$(snap_uri s c8)" --since=c7 -q
pull s c8 "$tmp/ref8"
is "$(names)" "c4 c5 c6 c7 c8" "c3 is gone"
ok "c4..c8 exact" exact 4 5 6 7 8

# --- prune to 3 in one go ---
ok "prune --keep-last 3" fleece-backup prune "$repo" --keep-last 3
is "$(names)" "c6 c7 c8" "three points remain"
ok "c6..c8 exact" exact 6 7 8
ok "verify passes" fleece-backup verify "$repo"
ok "qemu-img check of every file" sh -c \
   "for f in '$repo'/*.qcow2; do qemu-img check -q -f qcow2 \"\$f\" || exit 1; done"
ok "only the kept points' files remain" test \
   "$(cd "$repo" && ls *.qcow2 *.sums | tr '\n' ' ')" = \
   "c6.qcow2 c6.sums c7.qcow2 c7.sums c8.qcow2 c8.sums "
ok_fails "--keep-last 0 is refused" "not a number from 1" \
   fleece-backup prune "$repo" --keep-last 0
