#!/usr/bin/env bash
# fleece-colod: a group whose plugin goes away between epochs.  The
# primary's group checkpoint (lib/group.c's coordinator on its own
# control connections) fails naming that plugin's control socket, the
# other plugin is released (group-abort) with nothing created on it,
# and once the plugin is back the primary reconnects to it and the next
# epoch takes both disks at one instant.
source "${abs_top_srcdir:-../..}/tests/colo/colod-functions.sh"
requires nbdcopy --version
requires qemu-io --version

mkdir -p "$tmp/p0" "$tmp/p1" "$tmp/b"
truncate -s $((4 << 20)) "$tmp/p0/disk" "$tmp/p1/disk" "$tmp/b/disk0" \
  "$tmp/b/disk1"
pb=$(free_port)

ok "nbdkit p0" start_plugin p0
ok "nbdkit p1" start_plugin p1
ok "secondary b" start_colod b secondary --listen "127.0.0.1:$pb" \
  --disk "$tmp/b/disk0" --disk "$tmp/b/disk1" --insecure
ok "primary a of two disks" start_colod a primary \
  --fleece "$tmp/p0.ctl" --nbd "$(live_uri p0)" \
  --fleece "$tmp/p1.ctl" --nbd "$(live_uri p1)" \
  --peer "127.0.0.1:$pb" --insecure --interval 0
ok "epoch 1 is durable" wait_for 30 eval 'status_ge a last-committed-epoch 1'

ok "p1's nbdkit stops" stop_nbdkit p1
out=$(colod a checkpoint 2>&1); st=$?
diag "a checkpoint without p1: $out"
ok "a checkpoint without p1 fails" test "$st" -ne 0
ok "the failure names p1's control socket" grep -qF "$tmp/p1.ctl" <<<"$out"
ok "and says that nothing was created" \
  grep -q "aborted: nothing was created" <<<"$out"
ok "p0 has no colo-2 snapshot: nothing was created on it" \
  eval '! fleecectl -s "$tmp/p0.ctl" snapshot list | grep -q colo-2'
qio p0 "" 'write -P 7 0 64k' >/dev/null

ok "p1's nbdkit is back" start_plugin p1
qio p1 "" 'write -P 8 1M 64k' >/dev/null
w0=$(live_sum p0) w1=$(live_sum p1)
ok "a checkpoint with p1 back succeeds (a reconnects to it)" \
  wait_for 30 eval 'colod a checkpoint >/dev/null 2>&1'
ok "b applies it" wait_for 30 eval \
  '[ "$(s b last-applied-epoch)" = "$(s a last-committed-epoch)" ]'
is "$(file_sum "$tmp/b/disk0")" "$w0" "b's disk 0 is p0's"
is "$(file_sum "$tmp/b/disk1")" "$w1" "b's disk 1 is p1's"
ok "a stops cleanly" stop_colod a
ok "b stops cleanly" stop_colod b
ok "nbdkit p0 stops cleanly" stop_nbdkit p0
ok "nbdkit p1 stops cleanly" stop_nbdkit p1
