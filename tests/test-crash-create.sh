#!/usr/bin/env bash
# A crash while a snapshot is being created (persistent=true, sub-cluster
# copies): writers are let in as soon as the snapshot exists, before its
# creation is durable, and copy blocks for it.  Killed in that window,
# nbdkit restarts without the snapshot, but the log holds the PARTIAL
# record of a cluster copied in part for its generation, an entry that an
# older snapshot still reads.  The next snapshot must get a newer
# generation than that entry's: otherwise it reads the blocks copied for
# the lost snapshot, older than its own point in time, without an error
# (found by test-crash-loop's snapcheck, fixed in meta-load.c).
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version
plan 16

disk=$tmp/disk store=$tmp/store
make_disk "$disk" 8M 0x21 || exit 1
C7=$((7 * 65536))               # cluster 7, untouched until the window

server () # [nbdkit args...]
{
  start_nbdkit p "$@" -- disk="$disk" store="$store" \
    control="$tmp/p.ctl" persistent=true subcluster=true && ctl_ready p
}
# expect FILE BYTE: an 8 MiB image of 0x21 whose block at C7 holds BYTE.
expect ()
{
  make_disk "$1" 8M 0x21 8M "write -P $2 $C7 4k"
}
same () # SNAPSHOT EXPECTED
{
  pull p "$1" "$tmp/got" && cmp "$tmp/got" "$2"
}
both_same () { same s3 "$tmp/exp3" && same s1 "$tmp/exp1"; }

ok "nbdkit starts" server
ok "snapshot s1" ctl p snapshot create s1
ok "nbdkit stops cleanly" stop_nbdkit p

# The window: s2 is created and writers copy for it, its image waits.
ok "nbdkit starts with a 4 s window before each creation's image" \
   server -D fleece.create_image_delay_ms=4000
ctl p -t 20 snapshot create s2 >"$tmp/s2.out" 2>&1 &
s2pid=$!
sleep 1                         # s2 exists within milliseconds
# The first write to cluster 7 copies its first block for s2 (and s1,
# which has not seen the cluster change either): a PARTIAL record.
ok "in the window: 4 KiB writes into cluster 7, the first copied in part" \
   qio p "" "write -P 0x41 $C7 4k" "write -P 0x42 $C7 4k"
crash_nbdkit p
ok "the create of s2 was cut by the crash" eval '! wait "$s2pid"'
diag "$(tail -1 "$tmp/s2.out")"

ok "nbdkit restarts" server
listed () { ctl p snapshot list | grep -qw "$1"; }
ok "s2 is gone (its creation never became durable), s1 is there" \
   eval 'listed s1 && ! listed s2'
p=$(jget "$(ctl p --json stats)" 'd["partial-clusters"]')
is "$p" 1 "cluster 7 is partly copied, for s1 and the lost s2"
ok "snapshot s3 after the restart" ctl p snapshot create s3
expect "$tmp/exp1" 0x21
expect "$tmp/exp3" 0x42
ok "s3 reads what the disk held when it was created" same s3 "$tmp/exp3"
ok "s1 still reads its own point in time" same s1 "$tmp/exp1"

# Writes to cluster 7 now copy for s3 (the old entry is finished for
# s1 first); both snapshots keep their data, across a restart too.
ok "writes into cluster 7 after s3" \
   qio p "" "write -P 0x43 $C7 4k" "write -P 0x44 $((C7 + 8192)) 4k"
ok "s3 and s1 unchanged by them" both_same
crash_nbdkit p
server >/dev/null
ok "s3 and s1 unchanged after another crash" both_same
ok "nbdkit stops cleanly" stop_nbdkit p
