#!/usr/bin/env bash
# fleece-colod: a group whose two sides do not match is refused at the
# handshake, with an error naming the disk: another number of disks, a
# secondary disk too small, a primary disk whose size changed since the
# pairing.  A state directory of a group restarted with another number
# of --disk, and --fleece without its --nbd (primary or demote), are
# refused too (demote of a group: test-colod-group-failback.sh).  The primary exits with status 3 (refused), its log and
# the secondary's status saying why.
source "${abs_top_srcdir:-../..}/tests/colo/colod-functions.sh"
requires nbdcopy --version

mb=$((1 << 20))
mkdir -p "$tmp/p0" "$tmp/p1" "$tmp/one" "$tmp/small" "$tmp/b"
truncate -s $((8 * mb)) "$tmp/p0/disk" "$tmp/p1/disk" "$tmp/one/disk0" \
  "$tmp/small/disk0" "$tmp/b/disk0" "$tmp/b/disk1"
truncate -s $((4 * mb)) "$tmp/small/disk1"

ok "nbdkit p0" start_plugin p0
ok "nbdkit p1" start_plugin p1

# secondary NAME PORT DISK...: a secondary with these disks.
secondary ()
{
  local n=$1 port=$2 d args=(); shift 2
  for d in "$@"; do args+=(--disk "$tmp/$n/$d"); done
  start_colod "$n" secondary --listen "127.0.0.1:$port" "${args[@]}" \
    --insecure
}
# refused_primary PORT PATTERN WHAT: a primary of p0 and p1 paired with
# the secondary on PORT exits 3, its log matching PATTERN.
refused_primary ()
{
  local port=$1 pattern=$2 what=$3
  rm -rf "$tmp/a"
  start_colod a primary --fleece "$tmp/p0.ctl" --nbd "$(live_uri p0)" \
    --fleece "$tmp/p1.ctl" --nbd "$(live_uri p1)" \
    --peer "127.0.0.1:$port" --insecure --interval 0
  wait_for 15 eval '! kill -0 "$(cat "$tmp/a/colod.pid")" 2>/dev/null'
  exit_status_colod a
  is "$colod_status" 3 "$what: the primary exits with status 3"
  ok "$what: its log says why" grep -Eq "$pattern" "$tmp/a/colod.log"
}

p1=$(free_port)
ok "a secondary of one disk starts" secondary one "$p1" disk0
refused_primary "$p1" "refused the pairing \(another volume\): the primary's group has 2 disks, this secondary's 1 \(--disk $tmp/one/disk0\)" \
  "2 disks against 1"
ok "the secondary's status names the refusal" \
  grep -q "has 2 disks, this secondary's 1" <<<"$(colod one status)"
ok "that secondary stops cleanly" stop_colod one

p2=$(free_port)
ok "a secondary whose disk 1 is smaller starts" secondary small "$p2" \
  disk0 disk1
refused_primary "$p2" "disk 1 \(--disk $tmp/small/disk1\): 4194304 bytes, smaller than the primary's disk 1 \(8388608 bytes\)" \
  "disk 1 too small"
ok "that secondary stops cleanly" stop_colod small

p3=$(free_port)
ok "a secondary of two disks starts" secondary b "$p3" disk0 disk1
rm -rf "$tmp/a"
ok "a primary of two disks pairs with it" start_colod a primary \
  --fleece "$tmp/p0.ctl" --nbd "$(live_uri p0)" \
  --fleece "$tmp/p1.ctl" --nbd "$(live_uri p1)" \
  --peer "127.0.0.1:$p3" --insecure --interval 0
ok "the first epoch is durable" wait_for 30 status_ge b last-applied-epoch 1
j=$("$COLOD" status --json --state "$tmp/b/state")
is "$(jget "$j" "[x['disk'] for x in d['disks']]")" \
  "['$tmp/b/disk0', '$tmp/b/disk1']" "the status lists both disks"
ok "the primary stops cleanly" stop_colod a
ok "nbdkit p1 stops" stop_nbdkit p1
truncate -s $((12 * mb)) "$tmp/p1/disk"
rm -f "$tmp/p1/store"            # of the old size
ok "nbdkit p1 restarts on a larger disk" start_plugin p1
refused_primary "$p3" "disk 1 \(--disk $tmp/b/disk1\): the primary's is 12582912 bytes in clusters of [0-9]+, this secondary's 8388608" \
  "disk 1 grown"
ok "the secondary stops cleanly" stop_colod b
ok_fails "its state (2 disks) with 1 --disk is refused" \
  "state: a group of 2 disks, not the 1 --disk given" \
  timeout -k 5 20 "$COLOD" secondary --listen "127.0.0.1:$p3" \
    --disk "$tmp/b/disk0" --state "$tmp/b/state" --insecure --log stderr

ok_fails "--fleece without its --nbd is a usage error" \
  "2 --fleece and 1 --nbd" \
  "$COLOD" primary --fleece "$tmp/p0.ctl" --nbd "$(live_uri p0)" \
    --fleece "$tmp/p1.ctl" --peer "127.0.0.1:$p3" --state "$tmp/x" --insecure
ok_fails "demote of a group with a --fleece without its --nbd is a usage error" \
  "fleece-colod demote: 2 --fleece and 1 --nbd" \
  "$COLOD" demote --fleece "$tmp/p0.ctl" --nbd "$(live_uri p0)" \
    --fleece "$tmp/p1.ctl" --state "$tmp/x"
ok "nbdkit p0 stops cleanly" stop_nbdkit p0
ok "nbdkit p1 stops cleanly" stop_nbdkit p1
