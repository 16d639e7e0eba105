#!/usr/bin/env bash
# fleece-backup refuses bad input with a clear message and a non-zero
# exit (2 for a usage error): unknown bitmap, incremental from a bitmap
# that is still recording, bad URIs, an unreachable server, a target too
# small, wrong option combinations; --fallback-full turns an unusable
# bitmap into a full pull; NBD targets and --verify work.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires_pull

disk=$tmp/disk
make_disk "$disk" 16M 0x11
ok "nbdkit starts" start_nbdkit s -- disk="$disk" store="$tmp/store" \
   control="$tmp/s.ctl" cluster-size=64K
ok "checkpoint c1" ctl s checkpoint c1
cp "$disk" "$tmp/ref1"
ok "full pull of c1" fleece-backup --sync=full "$(snap_uri s c1)" "$tmp/base.img"
is "$(sum "$tmp/base.img")" "$(sum "$tmp/ref1")" "base equals c1"

# status CMD...: the exit status of CMD (its output in $tmp/status.out).
status () { local st=0; "$@" >"$tmp/status.out" 2>&1 || st=$?; echo "$st"; }

# --- checkpoints and bitmaps ---
cp "$tmp/base.img" "$tmp/t.img"
ok_fails "incremental from bitmap c1 while it is still recording" \
   "bitmap 'c1' is not frozen" \
   fleece-backup --sync=incremental --since=c1 "$(snap_uri s c1)" "$tmp/t.img"
ok "the target is untouched" cmp "$tmp/t.img" "$tmp/base.img"
ok "live write" qio s "" "write -P 0x22 1M 64k"
ok "checkpoint c2" ctl s checkpoint c2
cp "$disk" "$tmp/ref2"
ok_fails "unknown bitmap" "bitmap 'nosuch' does not exist" \
   fleece-backup --sync=incremental --since=nosuch "$(snap_uri s c2)" "$tmp/t.img"
ok "the target is untouched" cmp "$tmp/t.img" "$tmp/base.img"
ok_fails "unknown snapshot" "snapshot/nosuch.*No such file" \
   fleece-backup --sync=full "$(snap_uri s nosuch)" "$tmp/nosuch.img"
cp "$tmp/.out" "$tmp/nosuch.out"
ok "... on a plaintext server, the message says so" \
   grep -q "the server does not serve this export, and it offers no TLS" \
   "$tmp/nosuch.out"
ok "... and does not suggest TLS" sh -c "! grep -q 'nbds' '$tmp/nosuch.out'"
ok_fails "a missing tls-certificates directory is named" \
   "tls-certificates=$tmp/nodir: No such file or directory" \
   fleece-backup --sync=full \
   "nbds+unix:///snapshot/c2?socket=$tmp/s.sock&tls-certificates=$tmp/nodir" \
   "$tmp/nosuch.img"
ok_fails "a tls-certificates that is not a directory is named" \
   "tls-certificates=$tmp/disk: Not a directory" \
   fleece-backup --sync=full \
   "nbds+unix:///snapshot/c2?tls-certificates=$tmp/disk&socket=$tmp/s.sock" \
   "$tmp/nosuch.img"
ok_fails "a missing tls-psk-file is named" \
   "tls-psk-file=$tmp/no.psk: No such file or directory" \
   fleece-backup --sync=full \
   "nbds+unix:///snapshot/c2?socket=$tmp/s.sock&tls-psk-file=$tmp/no.psk" \
   "$tmp/nosuch.img"
ok "--fallback-full with an unknown bitmap pulls everything" \
   backup "$tmp/fb.err" --sync=incremental --since=nosuch --fallback-full \
   "$(snap_uri s c2)" "$tmp/fb.img"
diag "$(cat "$tmp/fb.err")"
is "$(sum "$tmp/fb.img")" "$(sum "$tmp/ref2")" "the fallback pull equals c2"
is "$(summary "$tmp/fb.err" sync)" full "its summary says sync=full"
ok "incremental --since=c1 with --verify" fleece-backup --verify \
   --sync=incremental --since=c1 "$(snap_uri s c2)" "$tmp/t.img"
is "$(sum "$tmp/t.img")" "$(sum "$tmp/ref2")" "base + inc equals c2"

# --- usage errors: exit status 2 ---
is "$(status fleece-backup --sync=incremental "$(snap_uri s c2)" "$tmp/u.img")" 2 \
   "incremental without --since: exit 2"
ok "... and says so" grep -q -- '--since' "$tmp/status.out"
is "$(status fleece-backup --sync=sideways "$(snap_uri s c2)" "$tmp/u.img")" 2 \
   "unknown --sync: exit 2"
ok "... and says so" grep -q 'sideways' "$tmp/status.out"
is "$(status fleece-backup "$(snap_uri s c2)")" 2 "one argument only: exit 2"
is "$(status fleece-backup "$(snap_uri s c2)" "$tmp/u.img" extra)" 2 \
   "an extra argument: exit 2"
is "$(status fleece-backup --bogus "$(snap_uri s c2)" "$tmp/u.img")" 2 \
   "an unknown option: exit 2"
is "$(status fleece-backup "$(snap_uri s c2)" "$tmp/u.img" --rate)" 2 \
   "an option without its argument: exit 2"
is "$(status fleece-backup --rate=fast "$(snap_uri s c2)" "$tmp/u.img")" 2 \
   "bad --rate: exit 2"
is "$(status fleece-backup --rate=99999999999T "$(snap_uri s c2)" "$tmp/u.img")" 2 \
   "--rate=99999999999T: exit 2"
ok "... and says it is out of range" \
   grep -q -- "--rate: '99999999999T' is out of range" "$tmp/status.out"
is "$(status fleece-backup --rate=99999999999999999999999 "$(snap_uri s c2)" "$tmp/u.img")" 2 \
   "--rate beyond 64 bits: exit 2"
ok "... and says it is out of range" grep -q "is out of range" "$tmp/status.out"
ok_fails "bad URI (unknown scheme)" "unsupported URI scheme 'http'" \
   fleece-backup --sync=full "http://example.invalid/snapshot/c2" "$tmp/u.img"
ok_fails "bad URI (garbage)" "parse URI" \
   fleece-backup --sync=full "nbd+unix://[::" "$tmp/u.img"
ok_fails "incremental from an export that is not snapshot/NAME" \
   "pulls a snapshot export" \
   fleece-backup --sync=incremental --since=c1 "$(live_uri s)" "$tmp/t.img"

# --- unreachable server, target too small ---
ok_fails "unreachable server" "nothing.sock.*connect: No such file" \
   fleece-backup --sync=full "nbd+unix:///snapshot/c2?socket=$tmp/nothing.sock" \
   "$tmp/u.img"
ok_fails "unreachable TCP server" "Connection refused" \
   fleece-backup --sync=full "nbd://127.0.0.1:1/snapshot/c2" "$tmp/u.img"
truncate -s 1M "$tmp/small.img"
ok_fails "incremental into a file smaller than the snapshot" \
   "small.img is 1048576 bytes, the source is 16777216" \
   fleece-backup --sync=incremental --since=c1 "$(snap_uri s c2)" "$tmp/small.img"
ok "nbdkit memory target (1M) starts" sh -c \
   "nbdkit -U '$tmp/m.sock' -P '$tmp/m.pid' memory 1M && sleep 0.5"
cleanup_fn "kill_by_pidfile '$tmp/m.pid'"
ok_fails "full pull into an NBD target smaller than the snapshot" \
   "too small.*1048576 bytes" \
   fleece-backup --sync=full "$(snap_uri s c2)" "nbd+unix:///?socket=$tmp/m.sock"

# --- an NBD target that fits ---
ok "nbdkit memory target (16M) starts" sh -c \
   "nbdkit -U '$tmp/m16.sock' -P '$tmp/m16.pid' memory 16M && sleep 0.5"
cleanup_fn "kill_by_pidfile '$tmp/m16.pid'"
ok "full pull into an NBD target" fleece-backup --sync=full \
   "$(snap_uri s c2)" "nbd+unix:///?socket=$tmp/m16.sock"
ok "read the target back" nbdcopy "nbd+unix:///?socket=$tmp/m16.sock" "$tmp/m16.img"
is "$(sum "$tmp/m16.img")" "$(sum "$tmp/ref2")" "the NBD target equals c2"
ok "nbdkit stops cleanly" stop_nbdkit s
