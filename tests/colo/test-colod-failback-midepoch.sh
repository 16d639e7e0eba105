#!/usr/bin/env bash
# Failback after the primary host died in the middle of an epoch.
# test-colod-failover.sh kills the primary between epochs: what the old
# primary holds beyond the last durable epoch A is only writes that no
# epoch carried.  Here the primary is killed while epoch E = A + 1 is on
# its way (the secondary is slowed by --debug extent-delay-ms, and the
# kill lands once E's first extent arrived): E's checkpoint exists on the
# old primary's plugin, the secondary drops E and takes over at A.  The
# demoted old primary must count E's clusters as diverged with the writes
# after E, and the resync must move exactly their union with what the
# new primary wrote, leaving both disks equal.
source "${abs_top_srcdir:-../..}/tests/colo/colod-functions.sh"
requires qemu-io --version
requires nbdcopy --version

cs=65536
mkdir -p "$tmp/a" "$tmp/b"
truncate -s 32M "$tmp/a/disk" "$tmp/b/disk"
qemu-io -f raw -c 'write -P 0x41 0 2M' "$tmp/a/disk" >/dev/null
pb=$(free_port)

ok "nbdkit on a" start_plugin a
ok "secondary b starts (10 ms per extent)" start_colod b secondary \
  --listen "127.0.0.1:$pb" --disk "$tmp/b/disk" --insecure \
  --hb-interval 100 --hb-timeout 1000 --debug extent-delay-ms=10 \
  --auto-failover --promote-store "$tmp/b/store" \
  --on-promote "${FLEECE_ASAN_PRELOAD:+LD_PRELOAD=$FLEECE_ASAN_PRELOAD }nbdkit -U $tmp/b.sock -P $tmp/b.nbdkit.pid $FLEECE_PLUGIN disk=\$FLEECE_COLOD_DISK store=\$FLEECE_COLOD_STORE persistent=true control=$tmp/b.ctl"
cleanup_fn "kill_by_pidfile '$tmp/b.nbdkit.pid'"
ok "primary a starts" start_colod a primary --fleece "$tmp/a.ctl" \
  --nbd "$(live_uri a)" --peer "127.0.0.1:$pb" --insecure --interval 0 \
  --hb-interval 100 --hb-timeout 1000 --max-extent "$cs"
ok "the first (full) epoch is durable on b" \
  wait_for 60 eval 'status_ge a last-committed-epoch 1 && status_ge b last-applied-epoch 1'
A=$(s a last-committed-epoch)
sum_a=$(live_sum a)
is "$(file_sum "$tmp/b/disk")" "$sum_a" "b's disk equals a's at epoch $A"

# Epoch E carries 16 MiB (256 extents, about 2.6 s on b): more than the
# loopback's socket buffers hold, so that the primary cannot have sent
# all of it, and its end, when it dies.
ok "writes on a for epoch E: 16 MiB at 8M" qio a "" "write -P 0x42 8M 16M"
colod a checkpoint >"$tmp/cp.out" 2>&1 &
cp_pid=$!
ok "epoch E's extents arrive on b" wait_arriving b
diag "bytes in flight on b: $bif"
# After E's checkpoint: a write that no epoch carries (1 cluster).
ok "a write on a after E's checkpoint" qio a "" "write -P 0x43 28M 64k"
ok "kill -9 a's fleece-colod mid-epoch" kill9_colod a
ok "kill -9 a's nbdkit" crash_nbdkit a
wait "$cp_pid" 2>/dev/null || :
ok "b: failover completed by itself" wait_for 30 status_is b failover completed
is "$(status b last-committed-epoch)" "$A" "b dropped epoch E and took over at epoch $A"
ok "nbdkit serves the promoted disk" wait_for 10 test -S "$tmp/b.sock"
is "$(live_sum b)" "$sum_a" "the promoted disk is exactly epoch $A"

# The new primary writes 3 clusters at 24M, just past E's run [8M, 24M).
ok "writes on b" qio b "" "write -P 0x51 24M 192k"

ok "nbdkit on a again (its store is persistent)" start_plugin a
ok "demote a" eval 'colod a demote --fleece "$tmp/a.ctl" --nbd "$(live_uri a)" >"$tmp/demote.out"'
diag "$(cat "$tmp/demote.out")"
ok "demote counted E's 256 clusters and the 1 written after E" \
  grep -q "^demoted: 257 clusters" "$tmp/demote.out"
ok "a's nbdkit stops" stop_nbdkit a
ok "b's secondary daemon stops" stop_colod b
pa=$(free_port)
ok "a starts as a secondary" start_colod a secondary --listen "127.0.0.1:$pa" \
  --disk "$tmp/a/disk" --insecure --hb-interval 100 --hb-timeout 1000
ok "b starts as the primary" start_colod b primary --fleece "$tmp/b.ctl" \
  --nbd "$(live_uri b)" --peer "127.0.0.1:$pa" --insecure --interval 0 \
  --hb-interval 100 --hb-timeout 1000
ok "they pair, and the resync epoch goes at once" \
  wait_for 30 status_ge b epochs-durable 1
is "$(status b last-epoch-full)" False "the resync is not a full copy"
# a: [8M, 24M) (256) and 28M (1); b: [24M, 24M + 192k) (3).
is "$(status b last-epoch-bytes)" "$(( 260 * cs ))" \
  "it moved exactly the 260 diverged clusters (E's 256, 1 after E, b's 3)"
is "$(file_sum "$tmp/a/disk")" "$(live_sum b)" "a's disk equals b's"
ok "the diverged file is gone" test ! -e "$tmp/a/state/diverged"
ok "b's primary stops" stop_colod b
ok "a's secondary stops" stop_colod a
ok "b's nbdkit stops" kill_by_pidfile "$tmp/b.nbdkit.pid"
