#!/usr/bin/env bash
# Quiesce hooks of a group (fleecectl --pre-hook, --post-hook,
# --hook-timeout; issue 17): the pre-hook runs before the prepares (a
# write it makes is in the snapshots), the post-hook after the commits
# (the snapshots exist, a write it makes is in none), both told the group
# in the environment; a failed or timed-out pre-hook aborts with nothing
# created and the post-hook still runs; a prepare that fails aborts and
# the post-hook runs; a failed post-hook is an error.  Real clients:
# qemu-io, fleecectl.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version

ok "nbdkit a and b start" start_disks a b
export tmp

# none NAME: no server has snapshot NAME.
none ()
{
  ! fleecectl -s "$tmp/a.ctl" snapshot list | grep -q "^$1 " &&
    ! fleecectl -s "$tmp/b.ctl" snapshot list | grep -q "^$1 "
}

# --- ordering ---
pre='date +%s%N >"$tmp/pre.t"; echo "$FLEECE_GROUP_NAME" >"$tmp/pre.name"
     qemu-io -f raw "nbd+unix:///?socket=$tmp/a.sock" -c "write -P 0x22 0 64k"'
post='date +%s%N >"$tmp/post.t"; echo "$FLEECE_GROUP_RESULT" >"$tmp/post.result"
      fleecectl -s "$tmp/b.ctl" snapshot list >"$tmp/post.list"
      qemu-io -f raw "nbd+unix:///?socket=$tmp/b.sock" -c "write -P 0x33 0 64k"'
t0=$(date +%s%N)
ok "a group with both hooks" fleecectl --pre-hook "$pre" --post-hook "$post" \
   "${group[@]}" snapshot create h1
t1=$(date +%s%N)
ok "the hooks ran in order, within the command" test "$t0" -lt "$(cat "$tmp/pre.t")" \
   -a "$(cat "$tmp/pre.t")" -lt "$(cat "$tmp/post.t")" -a "$(cat "$tmp/post.t")" -lt "$t1"
is "$(cat "$tmp/pre.name")" h1 "the pre-hook is told FLEECE_GROUP_NAME"
is "$(cat "$tmp/post.result")" created "the post-hook is told FLEECE_GROUP_RESULT=created"
ok "the pre-hook's write is in h1 (it ran before the prepares)" \
   qio a snapshot/h1 "read -P 0x22 0 64k"
ok "the snapshot existed when the post-hook ran" grep -q "^h1 " "$tmp/post.list"
ok "the post-hook's write is not in h1" qio b snapshot/h1 "read -P 0x11 0 64k"
ok "... it is on the live disk" qio b "" "read -P 0x33 0 64k"

# --- a failed pre-hook ---
rm -f "$tmp/post.result"
ok_fails "a failing pre-hook aborts the group" \
   "pre-hook 'exit 3' failed with exit status 3" \
   fleecectl --pre-hook 'exit 3' --post-hook "$post" "${group[@]}" \
   snapshot create h2
ok "nothing of h2 was created" none h2
is "$(cat "$tmp/post.result")" aborted "the post-hook ran, told aborted"

# --- a pre-hook that times out ---
rm -f "$tmp/post.result"
t0=$(date +%s%N)
ok_fails "a pre-hook past --hook-timeout aborts the group" \
   "pre-hook '.*' did not finish within 1 seconds: killed" \
   fleecectl --hook-timeout 1 --pre-hook 'echo $$ >"$tmp/hook.pid"; sleep 30' \
   --post-hook "$post" "${group[@]}" checkpoint h3
t1=$(date +%s%N)
ok "... after about a second ($(( (t1 - t0) / 1000000 )) ms)" \
   test $(( (t1 - t0) / 1000000 )) -lt 5000
ok "the hook was killed" pid_gone "$(cat "$tmp/hook.pid")" 2
ok "nothing of h3 was created" none h3
ok "... nor a bitmap" bash -c "! fleecectl -s '$tmp/a.ctl' bitmap list | grep -q '^h3 '"
is "$(cat "$tmp/post.result")" aborted "the post-hook ran, told aborted"

# --- a post-hook that times out is killed too ---
ok_fails "a post-hook past --hook-timeout is an error" \
   "post-hook 'sleep 30' did not finish within 1 seconds" \
   fleecectl --hook-timeout 1 --post-hook 'sleep 30' "${group[@]}" \
   snapshot create h4
ok "... but the group was created" bash -c \
   "fleecectl -s '$tmp/a.ctl' snapshot list | grep -q '^h4 ' &&
    fleecectl -s '$tmp/b.ctl' snapshot list | grep -q '^h4 '"

# --- a prepare fails: abort, post-hook runs ---
ok "snapshot h5 on b only" fleecectl -s "$tmp/b.ctl" snapshot create h5
rm -f "$tmp/post.result"
ok_fails "a prepare that fails aborts the group" \
   "b.ctl: group-prepare: snapshot 'h5' already exists" \
   fleecectl --post-hook "$post" "${group[@]}" snapshot create h5
ok "h5 was not created on a" bash -c "! fleecectl -s '$tmp/a.ctl' snapshot list | grep -q '^h5 '"
is "$(cat "$tmp/post.result")" aborted "the post-hook ran, told aborted"
ok "writes go on (a was released)" timeout 5 qemu-io -f raw \
   "$(live_uri a)" -c "write -P 0x44 0 64k"

# --- the command line ---
ok_fails "hooks are only for snapshot create and checkpoint" \
   "only for 'snapshot create' and 'checkpoint'" \
   fleecectl --pre-hook true -s "$tmp/a.ctl" snapshot list
ok_fails "--deadline is in milliseconds up to 60000" \
   "--deadline: '70000' is not a number of milliseconds" \
   fleecectl --deadline 70000 "${group[@]}" snapshot create h6

for d in a b; do
  ok "nbdkit $d stops cleanly" stop_nbdkit "$d"
done
