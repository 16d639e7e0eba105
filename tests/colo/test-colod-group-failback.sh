#!/usr/bin/env bash
# fleece-colod: failback of a consistency group of two disks moves only
# what diverged, disk by disk.
#  - host a (nbdkits p0, p1 and the primary) replicates to host b (the
#    secondary with two --disk and a --promote-store each); epochs on
#    request (--interval 0), 64 KiB clusters;
#  - after an acknowledged epoch A, a writes to both disks (4 clusters
#    of disk 0, 3 of disk 1, none shipped), then the whole host dies
#    (kill -9 of the daemon and both nbdkits);
#  - b is promoted at A and serves both disks (nbdkits q0, q1 on the
#    promote stores), which are written (2 clusters of disk 0; 1 of
#    disk 1, one a wrote too);
#  - demote of a with p1 on a store without bitmap colo-A is refused,
#    names disk 1 and leaves nothing; with the real stores it records
#    both disks (4 and 3 clusters); a secondary of one --disk on that
#    state directory is refused;
#  - a becomes b's secondary: the first epoch carries, per disk, the
#    union of both sides' clusters (6 of disk 0, 3 of disk 1), not a
#    full copy; then each of a's disks equals b's and diverged is gone;
#  - a damaged diverged record (disk 1's) makes the next pairing's first
#    epoch a full copy of both disks, with a message naming it.
# COLOD_FAILBACK_OLD_PRIMARY=1 (test-colod-group-failback-v2.sh): b's
# primary speaks protocol 2, as a fleece-colod from before group
# failback (--debug max-version=2), which takes one DIVERGED for the
# whole group: the first epoch is then a full copy of both disks, which
# a's log explains, and the disks are equal all the same.
source "${abs_top_srcdir:-../..}/tests/colo/colod-functions.sh"
# KEEP=1: leave $tmp and the daemons behind, for debugging by hand.
[ -n "${KEEP:-}" ] && trap - EXIT
requires qemu-io --version
requires nbdcopy --version

cs=65536
size=$((8 << 20))
mkdir -p "$tmp/b"
for d in 0 1; do
  mkdir -p "$tmp/p$d"
  truncate -s "$size" "$tmp/p$d/disk" "$tmp/b/disk$d"
  qemu-io -f raw -c "write -P $((0x21 + d)) 0 2M" "$tmp/p$d/disk" >/dev/null
done
pb=$(free_port)

secondary_b ()
{
  start_colod b secondary --listen "127.0.0.1:$pb" \
    --disk "$tmp/b/disk0" --disk "$tmp/b/disk1" --insecure \
    --hb-interval 100 --hb-timeout 2000 \
    --promote-store "$tmp/b/store0" --promote-store "$tmp/b/store1"
}
# group_args HOST...: a --fleece/--nbd pair for each nbdkit named.
group_args ()
{
  local h
  for h in "$@"; do printf '%s\n' --fleece "$tmp/$h.ctl" --nbd "$(live_uri "$h")"; done
}
mapfile -t a_group < <(group_args p0 p1)
mapfile -t b_group < <(group_args q0 q1)

ok "nbdkit p0" start_plugin p0
ok "nbdkit p1" start_plugin p1
ok "secondary b of two disks starts" secondary_b
ok "primary a of two disks starts" start_colod a primary "${a_group[@]}" \
  --peer "127.0.0.1:$pb" --insecure --interval 0 --hb-interval 100 \
  --hb-timeout 2000
ok "the first (full) epoch is durable" \
  wait_for 30 status_ge a last-committed-epoch 1
ok "writes on both disks" eval \
  'qio p0 "" "write -P 0x31 2M 128k" >/dev/null && qio p1 "" "write -P 0x32 5M 64k" >/dev/null'
# Not `checkpoint' with its 10 s wait: under valgrind an epoch of two
# disks can take longer.
A=$(( $(s a last-committed-epoch) + 1 ))
ok "epoch $A requested" colod a checkpoint --no-wait
ok "epoch $A (A) is durable" wait_for 60 status_ge a last-committed-epoch "$A"

# Never shipped: disk 0 at 1M (4 clusters); disk 1 at 3M (1) and 6M (2).
ok "a writes to both disks after A" eval \
  'qio p0 "" "write -P 0x41 1M 256k" >/dev/null && qio p1 "" "write -P 0x42 3M 64k" "write -P 0x43 6M 128k" >/dev/null'
ok "kill -9 a's fleece-colod" kill9_colod a
for d in 0 1; do
  crash_nbdkit "p$d"
  ok "a's nbdkit p$d is gone" \
    eval '! kill -0 "$(cat "$tmp/p$d.pid" 2>/dev/null)" 2>/dev/null'
done

ok "b notices: failover state require" \
  wait_for 15 eval '[ "$(s b failover)" = require ]'
ok "fleece-colod promote on b" eval 'colod b promote >"$tmp/promote.out"'
diag "$(cat "$tmp/promote.out")"
is "$(s b last-committed-epoch)" "$A" "b was promoted at epoch A"
for d in 0 1; do
  ok "nbdkit q$d on b's promoted disk $d" start_nbdkit "q$d" -- \
    disk="$tmp/b/disk$d" store="$tmp/b/store$d" control="$tmp/q$d.ctl" \
    persistent=true
done
# b's writes: disk 0 at 5M (2 clusters); disk 1 at 3M (a wrote it too).
ok "writes on b after its promotion" eval \
  'qio q0 "" "write -P 0x51 5M 128k" >/dev/null && qio q1 "" "write -P 0x52 3M 64k" >/dev/null'

# Demote, with disk 1's nbdkit on a store that has no bitmap colo-A.
ok "nbdkit p0 again (its store is persistent)" start_plugin p0
ok "nbdkit p1 on a new store" start_nbdkit p1 -- disk="$tmp/p1/disk" \
  store="$tmp/p1/store.new" control="$tmp/p1.ctl" persistent=true
# demote: under $VG, as the daemons (make check-valgrind).
demote_a () { $VG "$COLOD" demote --state "$tmp/a/state" "${a_group[@]}"; }
st=0
demote_a >"$tmp/demote-bad.out" 2>&1 || st=$?
diag "$(cat "$tmp/demote-bad.out")"
is "$st" 1 "demote is refused (exit status 1)"
ok "it names disk 1 and its control socket" grep -qE \
  "disk 1 \(--fleece [^)]*/p1\.ctl\): cannot tell which clusters" \
  "$tmp/demote-bad.out"
ok "it says nothing was recorded" \
  grep -q "nothing was recorded for any disk" "$tmp/demote-bad.out"
ok "no diverged record is left" test ! -e "$tmp/a/state/diverged" -a \
  ! -e "$tmp/a/state/diverged.tmp"
ok "primary.json is not demoted" \
  grep -q '"demoted": false' "$tmp/a/state/primary.json"
ok "nbdkit p1 on the new store stops" stop_nbdkit p1
ok "nbdkit p1 on its own store" start_plugin p1

ok "demote a's group" eval 'demote_a >"$tmp/demote.out"'
diag "$(cat "$tmp/demote.out")"
ok "demote counted 7 clusters since epoch $A" \
  grep -q "^demoted: 7 clusters written since epoch $A " "$tmp/demote.out"
ok "4 of disk 0" grep -qF "disk 0 (--fleece $tmp/p0.ctl): 4 clusters" \
  "$tmp/demote.out"
ok "3 of disk 1" grep -qF "disk 1 (--fleece $tmp/p1.ctl): 3 clusters" \
  "$tmp/demote.out"
is "$(head -c 8 "$tmp/a/state/diverged")" FLCODIV2 "diverged is a group's record"
cp "$tmp/a/state/diverged" "$tmp/diverged.saved"
for d in 0 1; do
  ok "a's nbdkit p$d stops" stop_nbdkit "p$d"
  mv "$tmp/p$d/store" "$tmp/p$d/store.old"
done

ok "b's secondary daemon stops" stop_colod b
pa=$(free_port)
secondary_a ()
{
  start_colod a secondary --listen "127.0.0.1:$pa" \
    --disk "$tmp/p0/disk" --disk "$tmp/p1/disk" --insecure \
    --hb-interval 100 --hb-timeout 3000
}
ok_fails "a secondary with one --disk is refused" \
  "a demoted primary of 2 disks, started with 1 --disk" \
  timeout -k 5 20 "$COLOD" secondary --listen "127.0.0.1:$pa" \
    --disk "$tmp/p0/disk" --state "$tmp/a/state" --insecure --log stderr
ok "it left the demoted state as it was" eval \
  'grep -q "\"demoted\": true" "$tmp/a/state/primary.json" && cmp -s "$tmp/a/state/diverged" "$tmp/diverged.saved"'
ok "a starts as the group's secondary" secondary_a
ok "it adopted the demoted identity for the group" \
  grep -q "the demoted primary's identity, at epoch $A, for the group" \
  "$tmp/a/colod.log"
ok "... and recorded that a failback is pending" test -e "$tmp/a/state/failback"
old=()
[ -n "${COLOD_FAILBACK_OLD_PRIMARY:-}" ] && old=(--debug max-version=2)
ok "b starts as the group's primary${old:+ (protocol 2)}" \
  start_colod b primary "${b_group[@]}" "${old[@]}" \
  --peer "127.0.0.1:$pa" --insecure --interval 0 --hb-interval 100 \
  --hb-timeout 3000
ok "the first epoch is durable" wait_for 60 status_ge b epochs-durable 1
ok "a applied it" wait_for 30 eval \
  '[ "$(s a last-applied-epoch)" = "$(s b last-committed-epoch)" ]'
j=$("$COLOD" status --json --state "$tmp/b/state")
if [ -n "${old[*]}" ]; then
  is "$(jget "$j" "d['last-epoch-full']")" True \
     "a primary of protocol 2: a full copy"
  is "$(jget "$j" "d['last-epoch-bytes']")" $((2 * size)) "of both disks"
  ok "a's log says why" grep -q "the pairing speaks protocol 2 (the primary's HELLO says 2), which takes no diverged clusters of a group: the resync will be a full copy of every disk" \
     "$tmp/a/colod.log"
else
  is "$(jget "$j" "d['last-epoch-full']")" False "it is not a full copy"
  is "$(jget "$j" "d['disks'][0]['last-epoch-bytes']")" $((6 * cs)) \
    "disk 0: the 6 clusters of both sides (4 of a, 2 of b)"
  is "$(jget "$j" "d['disks'][1]['last-epoch-bytes']")" $((3 * cs)) \
    "disk 1: the 3 clusters of both sides (3M counted once)"
  is "$(jget "$j" "d['last-epoch-bytes']")" $((9 * cs)) \
    "9 clusters in all, of two disks of $size bytes"
fi
for d in 0 1; do
  is "$(file_sum "$tmp/p$d/disk")" "$(live_sum "q$d")" \
    "a's disk $d equals b's"
done
ok "the diverged record is removed" test ! -e "$tmp/a/state/diverged"
ok "... and the pending failback with it" test ! -e "$tmp/a/state/failback"
ok "a logged its removal" grep -q "the diverged clusters are replaced" \
  "$tmp/a/colod.log"

# full_resync WHAT LOG-PATTERN: a starts again (WHAT), b pairs with it,
# and the first epoch is a full copy that a's log explains (LOG-PATTERN)
# and after which both of a's disks equal b's.
full_resync ()
{
  local n d j
  n=$(s b epochs-durable)
  ok "a starts again, $1" secondary_a
  ok "b pairs again and its first epoch is durable" \
    wait_for 60 eval '[ "$(s b epochs-durable)" -gt "'"$n"'" ]'
  ok "a applied it" wait_for 30 eval \
    '[ "$(s a last-applied-epoch)" = "$(s b last-committed-epoch)" ]'
  ok "a's log says why it is a full copy" grep -q "$2" "$tmp/a/colod.log"
  j=$("$COLOD" status --json --state "$tmp/b/state")
  is "$(jget "$j" "d['last-epoch-full']")" True "a full copy"
  is "$(jget "$j" "d['last-epoch-bytes']")" $((2 * size)) "of both disks"
  for d in 0 1; do
    is "$(file_sum "$tmp/p$d/disk")" "$(live_sum "q$d")" \
      "a's disk $d equals b's after the full copy"
  done
}

# A damaged record (a byte of disk 1's bitmap): a full copy of both.
ok "a's secondary stops" stop_colod a
python3 -c 'import sys; b = bytearray(open(sys.argv[1], "rb").read()); b[-20] ^= 0xff; open(sys.argv[2], "wb").write(b)' \
  "$tmp/diverged.saved" "$tmp/a/state/diverged"
ok "writes on b" eval 'qio q1 "" "write -P 0x53 7M 64k" >/dev/null'
full_resync "with the damaged record" \
  "diverged: the record of disk 1 of 2 is damaged .*: ignored; the resync will be a full copy of every disk"
ok "the damaged record is removed" test ! -e "$tmp/a/state/diverged"

# A failback pending with its diverged record gone (deleted after the
# old primary took the identity, before the first epoch was durable;
# here its state is made so): a's own writes are known only through that
# record, so the resync must be a full copy, not an incremental one
# that keeps them (a's write at 6M must be gone).
ok "a's secondary stops" stop_colod a
: >"$tmp/a/state/failback"
ok "a write on a's disk 0 that b never had" eval \
  'qemu-io -f raw -c "write -P 0x6e 6M 64k" "$tmp/p0/disk" >/dev/null'
ok "writes on b" eval 'qio q0 "" "write -P 0x54 5M 64k" >/dev/null'
full_resync "a failback pending and no diverged record" \
  "diverged clusters are gone before the first epoch after that was durable: the resync will be a full copy"
ok "the pending failback is cleared" test ! -e "$tmp/a/state/failback"

ok "b's primary stops" stop_colod b
ok "a's secondary stops" stop_colod a
for d in 0 1; do ok "nbdkit q$d stops" stop_nbdkit "q$d"; done
