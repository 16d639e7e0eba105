#!/usr/bin/env bash
# The plugin as nbdkit users meet it: --help, --dump-plugin, the live
# export's flags, reads and writes, flush/FUA, zero, trim, extents, and
# fleecectl's basic commands.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires nbdinfo --version
requires qemu-io --version

help=$(nbdkit_once "$FLEECE_PLUGIN" --help 2>&1)
ok "--help lists the parameters" grep -q 'cluster-size=<SIZE>' <<<"$help"
dump=$(nbdkit_once "$FLEECE_PLUGIN" --dump-plugin 2>&1)
ok "--dump-plugin" grep -q '^fleece_cluster_size_default=65536' <<<"$dump"
ok "--dump-plugin shows the thread model" \
   grep -q '^thread_model=parallel' <<<"$dump"
is "$(grep '^fleece_exports=' <<<"$dump")" \
   'fleece_exports="" snapshot/NAME bitmap/NAME' \
   "--dump-plugin lists the three kinds of export"

disk=$tmp/disk
make_disk "$disk" 10M 0x01 4M
ok "nbdkit starts" start_nbdkit s -- disk="$disk" store="$tmp/store"
ok "default control socket is STORE.sock" test -S "$tmp/store.sock"
is "$(stat -c %a "$tmp/store.sock")" 600 "control socket mode is 0600"

js=$(nbdinfo --json "$(live_uri s)")
for f in can_flush can_fua can_trim can_zero can_fast_zero can_multi_conn; do
  is "$(jget "$js" "d['exports'][0]['$f']")" True "live export $f"
done
is "$(jget "$js" "d['exports'][0]['is_read_only']")" False "live export is writable"
is "$(jget "$js" "d['exports'][0]['export-size']")" 10485760 "size"
is "$(jget "$js" "d['exports'][0]['block_size_preferred']")" 65536 \
   "preferred block size is the cluster size"

ok "read initial data" qio s "" "read -P 0x01 0 4M" "read -P 0 4M 6M"
ok "write with FUA" qio s "" "write -f -P 0x02 1M 64k"
ok "flush" qio s "" "flush"
ok "zero" qio s "" "write -z 2M 1M" "read -P 0 2M 1M"
ok "trim" qio s "" "discard 3M 1M"
ok "data is on the disk file" qemu-io -r -f raw -c 'read -P 0x02 1M 64k' "$disk"
map=$(nbdinfo --map "$(live_uri s)")
diag "live map: $(tr '\n' ';' <<<"$map")"
ok "extents show the data at the start" grep -Eq '^ *0 +[0-9]+ +0 +data' <<<"$map"
ok "extents show the hole at the end" \
   awk '$1 + $2 == 10485760 && $4 == "hole,zero" { found = 1 } END { exit !found }' <<<"$map"

export FLEECE_SOCKET=$tmp/store.sock
ok "fleecectl status (FLEECE_SOCKET)" sh -c "fleecectl status | grep -q '$disk'"
st=$(fleecectl --json status)
is "$(jget "$st" 'd["cluster-size"]')" 65536 "status: cluster size"
is "$(jget "$st" 'd["disk-size"]')" 10485760 "status: disk size"
is "$(jget "$st" 'd["on-cbw-error"]')" break-snapshot "status: policy"
ok "snapshot create via FLEECE_SOCKET" fleecectl snapshot create one
ok "snapshot list (human)" sh -c "fleecectl snapshot list | grep -q '^one '"
is "$(jget "$(fleecectl --json snapshot list)" 'd[0]["export"]')" \
   snapshot/one "snapshot list --json names the export"
ok "stats (human)" sh -c "fleecectl stats | grep -qi 'copied'"
is "$(jget "$(fleecectl --json stats)" 'd["snapshots"]')" 1 "stats: one snapshot"
ok "snapshot export is listed" \
   sh -c "nbdinfo --list '$(live_uri s)' | grep -q 'snapshot/one'"
js=$(nbdinfo --json "$(snap_uri s one)")
is "$(jget "$js" "d['exports'][0]['can_trim']")" True "snapshot export can trim"
ok_fails "zeroing the snapshot export is refused" "Operation not permitted" \
   qio s snapshot/one "write -z 0 64k"
ok "snapshot delete" fleecectl snapshot delete one
ok_fails "fleecectl without a socket says so" "no control socket" \
   env -u FLEECE_SOCKET fleecectl status
ok_fails "fleecectl with a wrong socket says so" "connect: .*No such file" \
   fleecectl -s "$tmp/nothing.sock" status
ok_fails "a second server cannot take a live control socket" "in use" \
   nbdkit_once -f -U "$tmp/other.sock" "$FLEECE_PLUGIN" disk="$disk" \
     store="$tmp/store2" control="$tmp/store.sock"
ok "nbdkit stops cleanly" stop_nbdkit s
ok "control socket removed at exit" test ! -e "$tmp/store.sock"
