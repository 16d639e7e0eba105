#!/usr/bin/env bash
# fleece-colod failover, split brain and failback, with real plugins on
# both hosts (PSK over TLS 1.3, 127.0.0.1):
#  - host a (nbdkit + primary) and b (secondary, --auto-failover) pair;
#    epochs are made on request (--interval 0) so that the test knows
#    what each holds;
#  - a writes more, then nbdkit and the primary daemon on a are killed
#    with -9: b goes NONE -> REQUIRE -> ACTIVE -> COMPLETED by itself, runs
#    --on-promote (which starts nbdkit on its disk with the store made by
#    --promote-store), and serves exactly the last durable epoch;
#  - the old primary, restarted as a primary, is refused: split brain;
#  - b is written; a is demoted and comes back as b's secondary: the
#    resync moves exactly the union of the clusters a wrote after the
#    last durable epoch and those b wrote after promotion, and leaves
#    both disks equal; later epochs go the other way round;
#  - a planned switchover back, with the same state directories;
#  - a primary of another volume is refused, then accepted with a full
#    copy once the secondary is started with --discard-diverged.
source "${abs_top_srcdir:-../..}/tests/colo/colod-functions.sh"
# KEEP=1: leave $tmp and the daemons behind, for debugging by hand.
[ -n "${KEEP:-}" ] && trap - EXIT
requires qemu-io --version
requires nbdcopy --version
requires psktool --version

cs=65536
make_pki >/dev/null
tls=(--tls-psk "$tmp/pki/keys.psk")
mkdir -p "$tmp/a" "$tmp/b"
truncate -s 32M "$tmp/a/disk" "$tmp/b/disk"
qemu-io -f raw -c 'write -P 0x41 0 24M' "$tmp/a/disk" >/dev/null
pb=$(free_port)

ok "nbdkit on a" start_plugin a
ok "secondary b starts" start_colod b secondary --listen "127.0.0.1:$pb" \
  --disk "$tmp/b/disk" "${tls[@]}" --hb-interval 100 --hb-timeout 1000 \
  --auto-failover --promote-store "$tmp/b/store" \
  --on-promote "${FLEECE_ASAN_PRELOAD:+LD_PRELOAD=$FLEECE_ASAN_PRELOAD }nbdkit -U $tmp/b.sock -P $tmp/b.nbdkit.pid $FLEECE_PLUGIN disk=\$FLEECE_COLOD_DISK store=\$FLEECE_COLOD_STORE persistent=true control=$tmp/b.ctl; echo \$FLEECE_COLOD_EPOCH >$tmp/b/promoted-epoch"
cleanup_fn "kill_by_pidfile '$tmp/b.nbdkit.pid'"
primary_a () {
  start_colod a primary --fleece "$tmp/a.ctl" --nbd "$(live_uri a)" \
    --peer "127.0.0.1:$pb" "${tls[@]}" --interval 0 --hb-interval 100 \
    --hb-timeout 1000 "$@"
}
ok "primary a starts" primary_a
ok "the first (full) epoch is durable on b" wait_for 30 status_ge b last-committed-epoch 1
ok "writes on a" qio a "" "write -P 0x42 1M 2M" "write -P 0x43 20M 64k"
e=$(colod a checkpoint | sed 's/[^0-9]//g')
ok "epoch $e durable" test -n "$e"
sum_e=$(live_sum a)
is "$(file_sum "$tmp/b/disk")" "$sum_e" "b's disk equals a's disk at epoch $e"

# a writes after epoch e: never shipped.  4 clusters at 4M, 1 at 30M.
ok "unshipped writes on a" qio a "" "write -P 0x44 4M 256k" "write -P 0x45 30M 64k"
ok "kill -9 a's primary daemon" kill9_colod a
ok "kill -9 a's nbdkit" eval 'kill -9 $(cat "$tmp/a.pid"); wait $(cat "$tmp/a.pid") 2>/dev/null; rm -f "$tmp/a.pid"; :'

ok "b: failover completed by itself" wait_for 30 status_is b failover completed
ok "b logged NONE -> REQUIRE" grep -q '"from":"none","to":"require"' "$tmp/b/colod.log"
ok "b logged REQUIRE -> ACTIVE" grep -q '"from":"require","to":"active"' "$tmp/b/colod.log"
ok "b logged ACTIVE -> COMPLETED" grep -q '"from":"active","to":"completed"' "$tmp/b/colod.log"
ok "--on-promote ran" wait_for 10 test -s "$tmp/b/promoted-epoch"
is "$(cat "$tmp/b/promoted-epoch")" "$e" "--on-promote saw the last durable epoch"
ok "nbdkit serves the promoted disk" wait_for 10 test -S "$tmp/b.sock"
is "$(live_sum b)" "$sum_e" "the promoted disk is exactly epoch $e"
is "$(status b history | python3 -c 'import ast,sys; print(len(ast.literal_eval(sys.stdin.read())))')" 2 \
  "b's history has a new generation"
first=$(status b history | python3 -c 'import ast,sys; print(ast.literal_eval(sys.stdin.read())[-1]["first-epoch"])')
is "$first" "$((e + 1))" "the new generation starts after epoch $e"

# The old primary comes back as a primary: refused.
ok "nbdkit on a again (its store is persistent)" start_plugin a
primary_a >/dev/null || :     # it may exit before the check sees it up
ok "it exits: split brain" wait_for 20 eval '! kill -0 $(cat "$tmp/a/colod.pid") 2>/dev/null'
exit_status_colod a
is "$colod_status" 3 "the refused primary exits with status 3"
ok "its log names the split brain" grep -q "refused the pairing (split brain)" "$tmp/a/colod.log"
ok "b raised SPLIT_BRAIN" grep -q "event SPLIT_BRAIN" "$tmp/b/colod.log"
is "$(status b failover)" completed "b is still the promoted side"

# b is written after promotion: 3 clusters at 8M, and one a also wrote (30M).
ok "writes on b" qio b "" "write -P 0x51 8M 192k" "write -P 0x52 30M 64k"

# Failback: a is demoted and becomes b's secondary.
ok "demote a" eval 'colod a demote --fleece "$tmp/a.ctl" --nbd "$(live_uri a)" >"$tmp/demote.out"'
diag "$(cat "$tmp/demote.out")"
ok "demote counted a's 5 unshipped clusters" grep -q "^demoted: 5 clusters" "$tmp/demote.out"
ok "a's nbdkit stops" stop_nbdkit a
ok "a's primary state is refused once demoted" \
  eval '! "$COLOD" primary --state "$tmp/a/state" --fleece "$tmp/a.ctl" --nbd x --peer 127.0.0.1:1 --insecure 2>"$tmp/demoted.err"'
ok "... saying so" grep -q "demoted" "$tmp/demoted.err"
ok "b's secondary daemon stops" stop_colod b
pa=$(free_port)
ok "a starts as a secondary" start_colod a secondary --listen "127.0.0.1:$pa" \
  --disk "$tmp/a/disk" "${tls[@]}" --hb-interval 100 --hb-timeout 1000 \
  --promote-store "$tmp/a/store2"
ok "b starts as the primary" start_colod b primary --fleece "$tmp/b.ctl" \
  --nbd "$(live_uri b)" --peer "127.0.0.1:$pa" "${tls[@]}" --interval 0 \
  --hb-interval 100 --hb-timeout 1000
ok "they pair, and the resync epoch goes at once" wait_for 20 status_ge b epochs-durable 1
r=$(status b last-epoch)
diag "resync epoch $r"
is "$(status b last-epoch-full)" False "the resync is not a full copy"
# a wrote 4M+256k (4 clusters) and 30M (1); b wrote 8M+192k (3) and 30M:
# the union is 8 clusters.
is "$(status b last-epoch-bytes)" "$(( 8 * cs ))" \
  "it moved exactly the 8 diverged clusters (4 + 1 + 3, 30M counted once)"
is "$(file_sum "$tmp/a/disk")" "$(live_sum b)" "a's disk equals b's"
ok "the diverged file is gone" test ! -e "$tmp/a/state/diverged"

ok "more writes on b" qio b "" "write -P 0x53 12M 64k"
r2=$(colod b checkpoint | sed 's/[^0-9]//g')
ok "the next epoch ($r2) is durable" test "$r2" -gt "$r"
is "$(status b last-epoch-bytes)" "$cs" "one cluster"
is "$(file_sum "$tmp/a/disk")" "$(live_sum b)" "still equal"
is "$(status a last-committed-epoch)" "$r2" "a committed it"

# A planned switchover back to a, with the same state directories (the
# second role swap): b's primary stops cleanly, which is not a failure;
# a is promoted by hand, b is demoted and becomes a's secondary.
ok "b's primary stops cleanly" stop_colod b
ok "a was told: no failover" wait_for 10 grep -q "the primary stopped cleanly" "$tmp/a/colod.log"
sleep 1.5                     # past --hb-timeout
is "$(status a failover)" none "a did not fail over by itself"
ok "fleece-colod promote on a" eval 'colod a promote >"$tmp/promote.out"'
diag "$(cat "$tmp/promote.out")"
is "$(status a failover)" completed "a is promoted"
ok "nbdkit on a's promoted disk" start_nbdkit a -- disk="$tmp/a/disk" \
  store="$tmp/a/store2" control="$tmp/a.ctl" persistent=true
ok "writes on a after its promotion" qio a "" "write -P 0x61 16M 128k"
ok "demote b" eval 'colod b demote --fleece "$tmp/b.ctl" --nbd "$(live_uri b)" >"$tmp/demote2.out"'
ok "b had no unshipped writes" grep -q "^demoted: 0 clusters" "$tmp/demote2.out"
# It runs in the background (nbdkit's default), not as our child: it
# must be gone, not merely sent SIGTERM.
ok "b's nbdkit stops" kill_by_pidfile "$tmp/b.nbdkit.pid"
ok "a's secondary daemon stops" stop_colod a
pb2=$(free_port)
ok "b starts as a secondary again" start_colod b secondary \
  --listen "127.0.0.1:$pb2" --disk "$tmp/b/disk" "${tls[@]}" \
  --hb-interval 100 --hb-timeout 1000
is "$(status b failover)" none "b is no longer the promoted side"
ok "a starts as the primary again" primary_a --peer "127.0.0.1:$pb2"
ok "they pair" wait_for 20 status_ge a epochs-durable 1
is "$(status a last-epoch-full)" False "the switchover resync is not a full copy"
is "$(status a last-epoch-bytes)" "$(( 2 * cs ))" \
  "it moved exactly the 2 clusters a wrote after its promotion"
ok "b applied it" wait_for 10 eval '[ "$(status b last-applied-epoch)" = "$(status a last-committed-epoch)" ]'
is "$(file_sum "$tmp/b/disk")" "$(live_sum a)" "b's disk equals a's after the second swap"

ok "a's primary stops" stop_colod a

# Another volume (a new primary on host c) is refused by b, until b is
# told that its data may go (--discard-diverged): then a full copy.
mkdir -p "$tmp/c"
truncate -s 32M "$tmp/c/disk"
qemu-io -f raw -c 'write -P 0x71 0 32M' "$tmp/c/disk" >/dev/null
ok "nbdkit on c" start_plugin c
primary_c () {
  start_colod c primary --fleece "$tmp/c.ctl" --nbd "$(live_uri c)" \
    --peer "127.0.0.1:$pb2" "${tls[@]}" --interval 0 --hb-interval 100 \
    --hb-timeout 1000
}
sum_b=$(file_sum "$tmp/b/disk")
primary_c >/dev/null || :
ok "c's primary exits, refused" wait_for 20 eval '! kill -0 $(cat "$tmp/c/colod.pid") 2>/dev/null'
exit_status_colod c
is "$colod_status" 3 "with status 3"
ok "it names another volume" grep -q "refused the pairing (another volume)" "$tmp/c/colod.log"
is "$(file_sum "$tmp/b/disk")" "$sum_b" "b's disk is untouched"
ok "b's secondary stops" stop_colod b
ok "b restarts with --discard-diverged" start_colod b secondary \
  --listen "127.0.0.1:$pb2" --disk "$tmp/b/disk" "${tls[@]}" \
  --hb-interval 100 --hb-timeout 1000 --discard-diverged
ok "c pairs" primary_c
ok "c's first epoch is durable" wait_for 30 status_ge c epochs-durable 1
is "$(status c last-epoch-full)" True "a full copy"
ok "b applied it" wait_for 10 eval '[ "$(status b last-applied-epoch)" = "$(status c last-committed-epoch)" ]'
is "$(file_sum "$tmp/b/disk")" "$(live_sum c)" "b's disk is c's"
is "$(status b volume-id)" "$(status c volume-id)" "b follows c's volume now"

ok "c's primary stops" stop_colod c
ok "b's secondary stops" stop_colod b
ok "c's nbdkit stops" stop_nbdkit c
ok "a's nbdkit stops" stop_nbdkit a
