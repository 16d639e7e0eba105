#!/usr/bin/env bash
# Bad input gets an error that says what is wrong, the server keeps
# serving, and no data on the live disk or in a snapshot changes.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires socat -V
requires unshare --version

disk=$tmp/disk
make_disk "$disk" 8M 0x5a
orig=$(sum "$disk")

# --- start-up errors: nbdkit refuses to start and says why ---
nbd () { nbdkit_once -f -U "$tmp/x.sock" "$FLEECE_PLUGIN" "$@"; }
ok_fails "missing disk" "disk: open: .*nothing: No such file" \
  nbd disk="$tmp/nothing" store="$tmp/st"
mkdir "$tmp/dir"
ok_fails "disk is a directory" "disk: open: .*dir: Is a directory" \
  nbd disk="$tmp/dir" store="$tmp/st"
ok_fails "no store parameter" "disk and store parameters are required" \
  nbd disk="$disk"
ok_fails "cluster-size not a power of two" "cluster-size=3000: must be a power of two" \
  nbd disk="$disk" store="$tmp/st" cluster-size=3000
ok_fails "cluster-size too big" "cluster-size=8M: must be a power of two between 4K and 4M" \
  nbd disk="$disk" store="$tmp/st" cluster-size=8M
ok_fails "cluster-size too small" "cluster-size=2K" \
  nbd disk="$disk" store="$tmp/st" cluster-size=2K
ok_fails "cluster-size not a size" "cluster-size|could not parse" \
  nbd disk="$disk" store="$tmp/st" cluster-size=banana
ok_fails "unknown parameter" "unknown parameter 'colour'" \
  nbd disk="$disk" store="$tmp/st" colour=blue
ok_fails "bad on-cbw-error" "on-cbw-error=maybe: expected break-snapshot or fail-write" \
  nbd disk="$disk" store="$tmp/st" on-cbw-error=maybe
ok_fails "persistent=maybe" "persistent=maybe: expected true or false" \
  nbd disk="$disk" store="$tmp/st" persistent=maybe
ok_fails "cbw-timeout=0" "cbw-timeout=0: expected seconds" \
  nbd disk="$disk" store="$tmp/st" cbw-timeout=0
ok_fails "cbw-timeout=soon" "cbw-timeout=soon: expected seconds" \
  nbd disk="$disk" store="$tmp/st" cbw-timeout=soon
ok_fails "store is the disk" "is the disk itself" \
  nbd disk="$disk" store="$disk"
ok_fails "store in a missing directory" "store: open: .*No such file" \
  nbd disk="$disk" store="$tmp/no/such/dir/st"

# Read-only and full filesystems, in a private mount namespace.
mkdir -p "$tmp/ro" "$tmp/full"
cat >"$tmp/mounts.sh" <<EOS
set -e
mount -t tmpfs -o size=1M,ro tmpfs '$tmp/ro'
mount -t tmpfs -o size=64k tmpfs '$tmp/full'
head -c 64k /dev/zero > '$tmp/full/filler' 2>/dev/null || :
what=\$1; shift
case \$what in
  ro) store='$tmp/ro/st' ;;
  full) store='$tmp/full/st' ;;
esac
$(declare -f nbdkit_once)
nbdkit_once -f -U '$tmp/x.sock' '$FLEECE_PLUGIN' disk='$disk' store="\$store"
EOS
ok_fails "store on a read-only filesystem" "store: open: .*Read-only file system" \
  unshare -m bash "$tmp/mounts.sh" ro
ok_fails "store on a full filesystem" "store superblock: pwrite: .*No space left on device" \
  unshare -m bash "$tmp/mounts.sh" full
is "$(sum "$disk")" "$orig" "failed starts left the disk unchanged"
cp "$disk" "$tmp/ref"

# --- fleecectl: a wrong command line exits 2, before it connects ---
status_of () { local st=0; "$@" >"$tmp/.st" 2>&1 || st=$?; echo "$st"; }
nosock=$tmp/no-server.ctl
is "$(status_of fleecectl -s "$nosock" --bogus status)" 2 \
   "fleecectl: an unknown option exits 2"
is "$(status_of fleecectl -s)" 2 "fleecectl: -s without its argument exits 2"
is "$(status_of fleecectl -s "$nosock" status extra)" 2 \
   "fleecectl: an extra argument exits 2, without a server"
ok "... and names it" grep -q "status: unexpected argument 'extra'" "$tmp/.st"
is "$(status_of fleecectl -s "$nosock" snapshot delete)" 2 \
   "fleecectl: a missing argument exits 2, without a server"
is "$(status_of fleecectl -s "$nosock" status)" 1 \
   "fleecectl: a right command line without a server exits 1"

# --- a running server gets bad requests ---
ok "nbdkit starts" start_nbdkit s -- disk="$disk" store="$tmp/store" \
   control="$tmp/s.ctl"
ok "snapshot create keep" ctl s snapshot create keep
ok "overwrite after snapshot" qio s "" "write -P 0x66 1M 1M"
cp "$disk" "$tmp/live-ref"

ok_fails "empty snapshot name" "snapshot name is empty" ctl s snapshot create ""
ok_fails "snapshot name too long" "200 bytes long, the limit is 128" \
  ctl s snapshot create "$(head -c 200 /dev/zero | tr '\0' x)"
ok_fails "snapshot name with /" "contains '/'" ctl s snapshot create "a/b"
ok_fails "snapshot name with a control character" "control character 0x01" \
  ctl s raw '{"execute":"snapshot-create","arguments":{"name":"a\u0001b"}}'
ok_fails "snapshot name with DEL" "control character 0x7f" \
  ctl s raw '{"execute":"snapshot-create","arguments":{"name":"a\u007fb"}}'
ok_fails "snapshot name '..'" "'.' and '..' are not names" \
  ctl s snapshot create ..
ok_fails "checkpoint name of spaces" "checkpoint name is only whitespace" \
  ctl s checkpoint "   "
ok_fails "bitmap name with RIGHT-TO-LEFT OVERRIDE" \
  "bidirectional control character U\\+202E" \
  ctl s bitmap add "$(printf 'ab\342\200\256c')"
ok_fails "duplicate snapshot" "snapshot 'keep' already exists" \
  ctl s snapshot create keep
ok_fails "delete unknown snapshot" "snapshot 'ghost' does not exist" \
  ctl s snapshot delete ghost
ok_fails "malformed JSON" "GenericError|malformed JSON" ctl s raw '{"execute":'
ok_fails "not an object" "GenericError" ctl s raw '[1,2,3]'
ok_fails "unknown command" "CommandNotFound" ctl s raw '{"execute":"format-disk"}'
ok_fails "unknown argument" "Parameter 'colour' is unexpected" \
  ctl s raw '{"execute":"snapshot-create","arguments":{"name":"x","colour":1}}'
ok_fails "missing argument" "Parameter 'name' is missing" \
  ctl s raw '{"execute":"snapshot-delete","arguments":{}}'
ok_fails "wrong argument type" "Parameter 'name' expects a string" \
  ctl s raw '{"execute":"snapshot-delete","arguments":{"name":7}}'

# A line of 5 MB, then a good request on the same connection.
reply=$( { head -c 5000000 /dev/zero | tr '\0' a; echo;
           echo '{"execute":"query-status","id":"after"}'; } |
         timeout 20 socat -t 5 - "UNIX-CONNECT:$tmp/s.ctl" )
ok "megabyte line refused with a reason" grep -q 'request line too long' <<<"$reply"
ok "same connection still answers" grep -q '"id": *"after"' <<<"$reply"

ok_fails "write to a snapshot export" "Operation not permitted" \
  qio s snapshot/keep "write -P 0x77 0 4k"
ok_fails "zero on a snapshot export" "Operation not permitted|not supported" \
  qio s snapshot/keep "write -z 0 64k"
ok_fails "unknown export refused" "export not available" \
  qio s nonsense "read 0 4k"
ok "server log says which export is unknown" \
  grep -q "unknown export 'nonsense'" "$tmp/s.log"
ok_fails "unknown snapshot export refused" "export not available" \
  qio s snapshot/ghost "read 0 4k"
ok "server log says which snapshot does not exist" \
  grep -q "snapshot 'ghost' does not exist" "$tmp/s.log"

# A snapshot deleted while a client has it open: that client's next
# read fails with EINVAL (what NBD can carry; the docs say so), and the
# server's log says the snapshot was deleted.  qemu-io reads its commands
# from a FIFO so that the deletion comes between two reads.
ok "snapshot create doomed" ctl s snapshot create doomed
mkfifo "$tmp/qio.in"
timeout -k 5 30 qemu-io -f raw "$(snap_uri s doomed)" <"$tmp/qio.in" \
  >"$tmp/qio.out" 2>&1 &
qio_pid=$!
cleanup_fn "kill $qio_pid 2>/dev/null"
exec 3>"$tmp/qio.in"
echo "read 0 64k" >&3
for (( i = 0; i < 100; i++ )); do
  grep -q "^qemu-io> read 65536/65536" "$tmp/qio.out" && break
  sleep 0.1
done
ok "the open snapshot is read" grep -q "read 65536/65536" "$tmp/qio.out"
ok "snapshot delete doomed, with a client on it" ctl s snapshot delete doomed
echo "read 0 64k" >&3
echo "quit" >&3
exec 3>&-
wait "$qio_pid"
diag "$(cat "$tmp/qio.out")"
ok "the client's next read fails with EINVAL" \
  grep -q "read failed: Invalid argument" "$tmp/qio.out"
ok "the server's log says the snapshot was deleted" \
  grep -q "snapshot 'doomed' was deleted (snapshot-delete) while this client had it open" \
  "$tmp/s.log"

# Nothing changed, and the server still serves.
ok "server still serves the live disk" qio s "" "read -P 0x66 1M 1M"
is "$(sum "$disk")" "$(sum "$tmp/live-ref")" "live disk unchanged by bad input"
ok "pull snapshot keep" pull s keep "$tmp/keep.img"
is "$(sum "$tmp/keep.img")" "$(sum "$tmp/ref")" "snapshot unchanged by bad input"
ok "status still answers" ctl s status
ok "nbdkit stops cleanly" stop_nbdkit s
