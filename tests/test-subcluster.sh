#!/usr/bin/env bash
# Sub-cluster copy-before-write (subcluster=true, the default): a 4 KiB
# write into a snapshot's 64 KiB cluster copies 4 KiB, not 64 KiB, and
# the snapshot still pulls as the disk was; with subcluster=false the same
# writes copy whole clusters.  Real clients: qemu-io, nbdcopy, fleecectl.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires nbdcopy --version

help=$(nbdkit_once "$FLEECE_PLUGIN" --help 2>&1)
ok "--help lists subcluster" grep -q '^subcluster=true|false' <<<"$help"
dump=$(nbdkit_once "$FLEECE_PLUGIN" --dump-plugin 2>&1)
ok "--dump-plugin gives the default" \
   grep -qx 'fleece_subcluster_default=true' <<<"$dump"

disk=$tmp/disk
make_disk "$disk" 8M 0x5a

# run NAME SUBCLUSTER: ten 4 KiB writes, each into another 64 KiB
# cluster, then one more into the first cluster; prints how much the
# store's copies grew (bytes-copied, store-file-bytes).
check_growth ()
{
  local name=$1 sub=$2 copy=$3
  local before after i
  cp "$disk" "$tmp/ref-$name"
  ok "snapshot create ($name)" ctl "$name" snapshot create s
  is "$(jget "$(ctl "$name" --json status)" 'd["subcluster"]')" \
     "$sub" "query-status says subcluster=$sub"
  before=$(ctl "$name" --json stats)
  for i in $(seq 0 9); do
    qio "$name" "" "write -P $((0x60 + i)) $((i * 128 + 12))k 4k" \
      >/dev/null || return 1
  done
  after=$(ctl "$name" --json stats)
  for f in bytes-copied store-file-bytes; do
    local grew=$(( $(jget "$after" "d['$f']") - $(jget "$before" "d['$f']") ))
    is "$grew" $((10 * copy)) \
       "subcluster=$sub: ten 4 KiB writes grow $f by 10 x $copy bytes"
  done
  ok "pull the snapshot ($name)" pull "$name" s "$tmp/out-$name"
  is "$(sum "$tmp/out-$name")" "$(sum "$tmp/ref-$name")" \
     "subcluster=$sub: the snapshot equals the disk as it was (sha256)"
}

ok "nbdkit starts (default: subcluster)" start_nbdkit a -- disk="$disk" \
   store="$tmp/store-a" control="$tmp/a.ctl" cluster-size=64K
check_growth a True 4096
# The rest of a partly copied cluster: only the blocks not copied yet.
before=$(ctl a --json stats)
ok "write over a copied block and its neighbour" \
   qio a "" "write -P 0x70 12k 8k"
after=$(ctl a --json stats)
is "$(( $(jget "$after" 'd["bytes-copied"]') - $(jget "$before" 'd["bytes-copied"]') ))" \
   4096 "only the one block not yet copied is copied"
ok "a whole cluster written" qio a "" "write -P 0x71 0 64k"
after=$(ctl a --json stats)
is "$(jget "$after" 'd["copies"]') $(jget "$after" 'd["partial-clusters"]')" \
   "1 9" "the cluster is now one whole copy; nine clusters still partly copied"
ok "pull again" pull a s "$tmp/out-a2"
is "$(sum "$tmp/out-a2")" "$(sum "$tmp/ref-a")" \
   "the snapshot still equals the disk as it was"
ok "snapshot delete" ctl a snapshot delete s
after=$(ctl a --json stats)
is "$(jget "$after" 'd["partial-clusters"]') $(jget "$after" 'd["store-clusters-used"]')" \
   "0 0" "deleting the snapshot frees the partly copied clusters"
stop_nbdkit a

ok "nbdkit starts (subcluster=false)" start_nbdkit b -- disk="$disk" \
   store="$tmp/store-b" control="$tmp/b.ctl" cluster-size=64K \
   subcluster=false
check_growth b False 65536
stop_nbdkit b

# ten_writes NAME FILL LEN: ten writes of LEN bytes, at 12 KiB into each
# of ten clusters; grew BEFORE AFTER FIELD: how much a stat grew.
ten_writes ()
{
  local i
  for i in $(seq 0 9); do
    qio "$1" "" "write -P $(($2 + i)) $((i * 128 + 12))k $3" >/dev/null ||
      return 1
  done
}
grew () { echo $(( $(jget "$2" "d['$3']") - $(jget "$1" "d['$3']") )); }

# persistent=true: the same, and the partly copied clusters survive a
# restart (their PARTIAL records, docs/store-format.md): the snapshot
# still pulls as the disk was, the copied blocks are not copied again,
# and the rest of a cluster is copied block by block.
ok "nbdkit starts (persistent, default subcluster)" start_nbdkit p -- \
   disk="$disk" store="$tmp/store-p" control="$tmp/p.ctl" \
   cluster-size=64K persistent=true
cp "$disk" "$tmp/ref-p"
ok "snapshot create (persistent)" ctl p snapshot create s
is "$(jget "$(ctl p --json status)" 'd["subcluster"]')" True \
   "persistent=true: query-status says subcluster=True"
before=$(ctl p --json stats)
ok "ten 4 KiB writes" ten_writes p $((0x40)) 4k
after=$(ctl p --json stats)
is "$(grew "$before" "$after" bytes-copied)" 40960 \
   "persistent: ten 4 KiB writes copy 40 KiB, not 640 KiB"
is "$(grew "$before" "$after" store-clusters-used)" 10 \
   "persistent: one slot per partly copied cluster"
g=$(grew "$before" "$after" store-file-bytes)
ok "persistent: the store file grew by about 40 KiB ($g bytes), not 640 KiB" \
   test "$g" -le $((10 * 4096 + 8192))
stop_nbdkit p
ok "nbdkit restarts on the persistent store" start_nbdkit p -- \
   disk="$disk" store="$tmp/store-p" control="$tmp/p.ctl" \
   cluster-size=64K persistent=true
st=$(ctl p --json stats)
is "$(jget "$st" 'd["partial-clusters"]') $(jget "$st" 'd["copies"]')" \
   "10 0" "after the restart: ten clusters still partly copied, no copy"
ok "pull the snapshot after the restart" pull p s "$tmp/out-p"
is "$(sum "$tmp/out-p")" "$(sum "$tmp/ref-p")" \
   "persistent: the snapshot equals the disk as it was, after a restart"
before=$(ctl p --json stats)
ok "ten 8 KiB writes over the copied blocks" ten_writes p $((0x50)) 8k
after=$(ctl p --json stats)
is "$(grew "$before" "$after" bytes-copied)" 40960 "after the restart: ten 8 KiB writes over a copied block copy only the ten blocks not copied yet"
ok "a whole cluster written after the restart" qio p "" "write -P 0x71 0 64k"
after=$(ctl p --json stats)
is "$(jget "$after" 'd["copies"]') $(jget "$after" 'd["partial-clusters"]')" \
   "1 9" "the restored cluster completes into one whole copy"
stop_nbdkit p
ok "nbdkit restarts again" start_nbdkit p -- disk="$disk" \
   store="$tmp/store-p" control="$tmp/p.ctl" cluster-size=64K \
   persistent=true
ok "pull the snapshot after the second restart" pull p s "$tmp/out-p2"
is "$(sum "$tmp/out-p2")" "$(sum "$tmp/ref-p")" \
   "persistent: the snapshot still equals the disk as it was"
stop_nbdkit p

ok "subcluster=true is accepted with persistent=true" \
   nbdkit -f -U "$tmp/c.sock" "$FLEECE_PLUGIN" disk="$disk" \
   store="$tmp/store-c" persistent=true subcluster=true --run true
