#!/usr/bin/env bash
# A persistent store written by the Fleece before persistent sub-cluster
# copies (tests/fixtures/store-v1, made by make-store-v1.sh: no
# FLEECE_SB_PARTIAL flag, no PARTIAL record) still loads: its snapshots
# pull as they were created (the image's copy table and the COPY and
# DIRTY records after it, left by kill -9), its checkpoint bitmaps are
# there.  Opened with subcluster=false it stays readable by the old code
# (no flag set); opened with subcluster=true (the default) it gets the
# flag before its first PARTIAL record, copies single blocks, and keeps
# them across a restart.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version
requires gzip --version
rebind=$abs_top_builddir/tests/store-rebind
requires test -x "$rebind"
fx=$abs_top_srcdir/tests/fixtures/store-v1

# sb_flags: the superblock's flags (little-endian 32 bits at byte 12).
sb_flags () { od -An -tu4 -j12 -N4 "$1" | tr -d ' '; }

unpack ()
{
  gzip -dc "$fx/disk.gz" >"$tmp/disk" &&
  gzip -dc "$fx/store.gz" >"$tmp/store" &&
  "$rebind" "$tmp/store" "$tmp/disk"
}
start () { start_nbdkit p -- disk="$tmp/disk" store="$tmp/store" \
             control="$tmp/p.ctl" persistent=true "$@"; }
check_snaps ()
{
  local x
  for x in s1 s2; do
    pull p "$x" "$tmp/$x.out"
    is "$(sum "$tmp/$x.out")" "$(awk -v x="$x" '$2 == x { print $1 }' "$fx/SHA256SUMS")" \
       "$1: snapshot $x equals the disk at its creation (sha256)"
  done
}

ok "unpack the fixture, bound to this disk" unpack
is "$(sb_flags "$tmp/store")" 1 \
   "the fixture: persistent, not clean (kill -9), no FLEECE_SB_PARTIAL"

ok "nbdkit loads it with subcluster=false" start subcluster=false
is "$(jget "$(ctl p --json snapshot list)" '" ".join("%s:%d" % (s["name"], s["broken"]) for s in d)')" \
   "s1:0 c1:0 s2:0 c2:0" "its four snapshots, none broken"
is "$(jget "$(ctl p --json bitmap list)" '" ".join(b["name"] for b in d)')" \
   "c1 c2" "its two checkpoint bitmaps"
check_snaps "subcluster=false"
ok "a write" qio p "" "write -P 0xc1 300k 4k"
ok "nbdkit stops cleanly" stop_nbdkit p
is "$(( $(sb_flags "$tmp/store") & 4 ))" 0 \
   "subcluster=false leaves the store readable by the old code (no FLEECE_SB_PARTIAL)"

ok "unpack the fixture again" unpack
ok "nbdkit loads it with subcluster=true (the default)" start
check_snaps "subcluster=true"
is "$(( $(sb_flags "$tmp/store") & 4 ))" 4 \
   "the store says FLEECE_SB_PARTIAL before any partial copy"
before=$(ctl p --json stats)
ok "a 4 KiB write into a cluster s2 reads live" qio p "" "write -P 0xc2 768k 4k"
after=$(ctl p --json stats)
is "$(( $(jget "$after" 'd["bytes-copied"]') - $(jget "$before" 'd["bytes-copied"]') )) $(jget "$after" 'd["partial-clusters"]')" \
   "4096 1" "it copies one 4 KiB block: one cluster partly copied"
crash_nbdkit p
ok "nbdkit restarts after kill -9" start
is "$(jget "$(ctl p --json stats)" 'd["partial-clusters"]')" 1 \
   "the partly copied cluster is back"
check_snaps "after the restart"
ok "nbdkit stops cleanly" stop_nbdkit p
