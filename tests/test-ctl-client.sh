#!/usr/bin/env bash
# The control client of lib/ctl-client.c (driven by tests/ctlc-driver)
# and fleecectl relay, against a real plugin:
#  - the same request answers the same through the socket and through
#    "fleecectl -s SOCKET relay" run as the client's child command (as
#    ssh would run it on the server's host);
#  - an error reply names the command and carries the server's words;
#  - events reach a subscriber through the relay;
#  - a child that cannot start, that exits without a greeting (its
#    stderr passed through, its status in the message), that never
#    greets (the timeout), or that does not exit when closed (killed):
#    each is an error that says so, and the child is always reaped;
#  - the child does not inherit the caller's ignored SIGPIPE;
#  - a request piped through fleecectl relay gets the greeting and its
#    reply, and the relay exits 0 once the server closed.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version

drv=$abs_top_builddir/tests/ctlc-driver
disk=$tmp/disk
truncate -s 8M "$disk"
qemu-io -f raw -c "write -P 0x21 0 8M" "$disk" >/dev/null

# shellcheck disable=SC2086
driver () { $VG "$drv" "$@"; }
relay=(fleecectl -s "$tmp/s.ctl" relay)

ok "nbdkit starts" start_nbdkit s -- disk="$disk" store="$tmp/store" \
  control="$tmp/s.ctl" store-max=1M store-warn=50

# ---- requests ----
# The same status but for its uptime.
sans_uptime () { "$@" | sed 's/"uptime":[0-9]*,//'; }
direct=$(sans_uptime driver socket "$tmp/s.ctl" query-status)
ok "query-status through the socket" grep -q '"disk-size": *8388608' <<<"$direct"
relayed=$(sans_uptime driver spawn relay query-status - "${relay[@]}")
is "$relayed" "$direct" "query-status through fleecectl relay answers the same"
ok "snapshot-create through the relay" \
  driver spawn relay snapshot-create '{"name":"r1"}' "${relay[@]}"
ok "... the snapshot exists" grep -q '"r1"' <<<"$(ctl s --json snapshot list)"
ok_fails "an error reply names the command and the server's error" \
  "^ctlc-driver: snapshot-delete: .*nope" \
  driver spawn relay snapshot-delete '{"name":"nope"}' "${relay[@]}"

# ---- events through the relay ----
driver events relay 1 "${relay[@]}" >"$tmp/events" 2>&1 &
events_pid=$!
cleanup_fn "kill $events_pid 2>/dev/null"
ok "subscribed through the relay" wait_for 10 grep -q subscribed "$tmp/events"
ok "a write past store-warn" qio s "" "write -P 0x31 0 640k"
ok "the subscriber gets STORE_HIGH_WATER and exits 0" \
  eval 'pid_gone $events_pid 10 && wait $events_pid'
ok "... as the line the server sent" grep -q '^{"event": *"STORE_HIGH_WATER"' "$tmp/events"

# ---- children that fail ----
# posix_spawnp says why; under valgrind the child exits 127 instead.
ok_fails "a command that does not exist" \
  "^ctlc-driver: control socket ssh://x/y: (no-such-command-here: No such file|greeting: .*exited with status 127)" \
  driver spawn ssh://x/y query-status - no-such-command-here
ok_fails "a command that exits without a greeting: its stderr, its status" \
  "control socket c: greeting: the server closed the connection \(the command exited with status 3\)" \
  driver spawn c query-status - sh -c 'echo child-says-why >&2; exit 3'
cp "$tmp/.out" "$tmp/c.out"
ok "... and the child's stderr is passed through" grep -q child-says-why "$tmp/c.out"
# The driver ignores SIGPIPE (as fleece-colod does); the child must not.
driver spawn c query-status - sh -c 'grep ^SigIgn: /proc/self/status >&2' \
  >"$tmp/sig.out" 2>&1
sigign=$(sed -n 's/^SigIgn:[[:space:]]*//p' "$tmp/sig.out")
diag "the child's ignored signals: ${sigign:-?}"
ok "the child starts with SIGPIPE not ignored" \
  test -n "$sigign" -a "$(( 16#${sigign:-0} & 0x1000 ))" -eq 0
ok_fails "a relay to a socket that does not exist says why, through stderr" \
  "fleecectl: control socket $tmp/none.ctl: connect: No such file" \
  driver spawn relay query-status - fleecectl -s "$tmp/none.ctl" relay
cp "$tmp/.out" "$tmp/c.out"
ok "... and the client names the relay's exit status" \
  grep -q "the command exited with status 1" "$tmp/c.out"
ok_fails "a command that never greets: the timeout" \
  "control socket quiet: greeting: no reply within 1 s" \
  env CTLC_TIMEOUT_MS=1000 "$drv" spawn quiet query-status - sleep 20
t0=$(date +%s)
ok "a child that does not exit when closed is killed and reaped" \
  driver spawn stubborn query-status - \
  sh -c 'fleecectl -s "$1" relay; exec sleep 60' sh "$tmp/s.ctl"
t=$(( $(date +%s) - t0 ))
ok "... within 10 s (took ${t} s)" test "$t" -le 10

# ---- fleecectl relay with a pipe ----
out=$(printf '%s\n' '{"execute":"query-status","id":7}' |
        timeout 10 fleecectl -s "$tmp/s.ctl" relay)
is "$?" 0 "a piped request: the relay exits 0 when the server closes"
ok "... the greeting passes untouched" grep -q '^{"QMP"' <<<"$(head -1 <<<"$out")"
ok "... then the reply, with its id" \
  grep -q '"return".*"id": *7\|"id": *7.*"return"' <<<"$(sed -n 2p <<<"$out")"
ok_fails "fleecectl relay takes no argument" "relay: unexpected argument" \
  fleecectl -s "$tmp/s.ctl" relay extra

ok "nbdkit stops cleanly" stop_nbdkit s
