#!/usr/bin/env bash
# fleece-colod's secondary under hostile peers (docs/replication.md
# "Hostile peers"): connections that never finish their TLS handshake or
# their HELLO neither delay the real primary nor count as it.
#  - host a (nbdkit + primary) and b (secondary, --auto-failover,
#    --hb-timeout 3000, --handshake-timeout 3000) pair over PSK TLS on
#    127.0.0.1; the time of that first pairing, and of a pairing after a
#    kill -9 and restart of the primary, are measured without hostile
#    peers;
#  - the primary is killed and restarted again while 20 idle TCP
#    connections and garbage ones (random bytes, a half TLS client
#    hello, a plaintext greeting and HELLO on the TLS port) are held
#    open, each reopened as soon as the secondary closes it: the pairing
#    takes at most 2 s more than without them, and b does not fail over;
#  - a fresh secondary c pairs for the first time with 30 idle
#    connections open, within 2 s more than the first pairing took;
#  - 80 connections at once: those beyond the 64 allowed in their
#    handshake are closed at once, each with a log line naming the peer;
#    the rest are closed within --handshake-timeout, and the primary
#    pairs again;
#  - the primary's control connection to the plugin (subscribed) is kept
#    however long it is idle.
source "${abs_top_srcdir:-../..}/tests/colo/colod-functions.sh"
requires psktool --version
requires python3 --version
requires qemu-io --version

make_pki >/dev/null
tls=(--tls-psk "$tmp/pki/keys.psk")
# Under valgrind (make check-valgrind) a daemon starts and handshakes
# several times slower: longer timeouts, and more slack in the bounds.
if [ -n "$VG" ]; then hbt=15000 hst=10000 slack=10000
else hbt=3000 hst=3000 slack=2000; fi
hb=(--hb-interval 100 --hb-timeout "$hbt" --handshake-timeout "$hst")
mkdir -p "$tmp/a" "$tmp/b" "$tmp/c"
truncate -s 16M "$tmp/a/disk" "$tmp/b/disk" "$tmp/c/disk"
qemu-io -f raw -c 'write -P 0x41 0 8M' "$tmp/a/disk" >/dev/null
pb=$(free_port)
pc=$(free_port)

# The hostile peers: python3 hostile.py PORT SECONDS READY KIND:N ...
# [--once] opens N connections of each KIND, writes their count to READY,
# and holds them for SECONDS, reopening each one the secondary closes
# (unless --once); then it prints what it saw.
cat >"$tmp/hostile.py" <<'PY'
import os, selectors, socket, sys, time
port, secs, ready = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
once = "--once" in sys.argv
kinds = [a.split(":") for a in sys.argv[4:] if a != "--once"]
payload = {
    "idle": b"",
    "random": os.urandom(300),
    # a TLS record header, then garbage
    "random16": b"\x16\x03\x01\x01\x00" + os.urandom(300),
    # a client hello that announces 512 bytes and stops after 10
    "half": bytes.fromhex("1603010200") + bytes.fromhex("010001fc0303") +
            os.urandom(4),
    # --insecure's greeting and a frame header, on the TLS port
    "plain": b"FLCOLOC\x01FLCO" + bytes(36),
}
sel = selectors.DefaultSelector()
opened = closed = 0
def open_one(kind):
    global opened
    s = socket.create_connection(("127.0.0.1", port))
    if payload[kind]:
        s.sendall(payload[kind])
    sel.register(s, selectors.EVENT_READ, kind)
    opened += 1
for kind, n in kinds:
    for _ in range(int(n)):
        open_one(kind)
with open(ready, "w") as f:
    f.write("%d\n" % opened)
end = time.monotonic() + secs
while time.monotonic() < end and (not once or closed < opened):
    for key, _ in sel.select(timeout=0.05):
        try:
            data = key.fileobj.recv(4096)
        except OSError:
            data = b""
        if data:
            continue
        sel.unregister(key.fileobj)
        key.fileobj.close()
        closed += 1
        if not once:
            time.sleep(0.02)
            open_one(key.data)
print("opened %d, closed by the secondary %d" % (opened, closed))
PY

# hostile NAME PORT SECONDS KIND:N ...: start hostile.py in the background
# (PID $tmp/NAME.pid, output $tmp/NAME.out) and wait until its first
# connections are open.
hostile ()
{
  local n=$1; shift
  python3 "$tmp/hostile.py" "$1" "$2" "$tmp/$n.ready" "${@:3}" \
    >"$tmp/$n.out" 2>&1 &
  echo $! >"$tmp/$n.pid"
  cleanup_fn "kill_by_pidfile '$tmp/$n.pid'"
  wait_for 10 test -s "$tmp/$n.ready"
}

# stop_hostile NAME: SIGTERM by PID; it must be gone within a bound
# (kill_by_pidfile: else SIGKILL, and the stop fails).
stop_hostile ()
{
  [ -s "$tmp/$1.pid" ] || return 1
  kill_by_pidfile "$tmp/$1.pid"
}

now_ms () { echo $(( $(date +%s%N) / 1000000 )); }

primary_a ()
{
  start_colod a primary --fleece "$tmp/a.ctl" --nbd "$(live_uri a)" \
    --peer "127.0.0.1:$1" "${tls[@]}" --interval 0 "${hb[@]}"
}

# pair PORT: start a's primary (in this shell, so that stop_colod can
# wait for it) towards PORT and wait until it is connected (both
# channels): ms is how long that took.
pair ()
{
  local t0
  ms=
  t0=$(now_ms)
  primary_a "$1" || return 1
  wait_for 30 status_is a connection connected || return 1
  ms=$(( $(now_ms) - t0 ))
}

# restart PORT: kill -9 a's primary and restart it; as pair.
restart () { kill9_colod a && pair "$1"; }

# The plugin closes idle control clients after 1 s here: the primary's
# connection must be subscribed to survive --interval 0's idle spells.
ok "nbdkit on a" start_nbdkit a -D fleece.ctl_idle_timeout_ms=1000 -- \
  disk="$tmp/a/disk" store="$tmp/a/store" control="$tmp/a.ctl" \
  persistent=true
ok "secondary b starts, with --auto-failover" start_colod b secondary \
  --listen "127.0.0.1:$pb" --disk "$tmp/b/disk" "${tls[@]}" "${hb[@]}" \
  --auto-failover
ok "a pairs with b" pair "$pb"
first_ms=$ms
ok "the first epoch is durable on b" wait_for 30 status_ge b last-committed-epoch 1

ok "a pairs again after kill -9 and restart" restart "$pb"
base_ms=$ms
ok "an epoch after the restart" eval 'colod a checkpoint >/dev/null'
is "$(status b failover)" none "b did not fail over for that restart"

# The same restart with hostile peers on b's port.
ok "hostile peers on b" hostile h1 "$pb" 60 idle:20 random:2 random16:2 \
  half:4 plain:2
sleep 0.5
ok "a pairs again with hostile peers on b" restart "$pb"
hostile_ms=$ms
diag "pairing after a restart: $base_ms ms alone, ${hostile_ms:-none} ms with hostile peers"
ok "within $slack ms more than without them" test "${hostile_ms:-99999}" -le $(( base_ms + slack ))
ok "an epoch after the restart" eval 'colod a checkpoint >/dev/null'
sleep $(( hbt / 1000 + 1 ))   # past --hb-timeout, the peers still there
is "$(status b failover)" none "b did not fail over"
ok "b never judged the primary lost" eval '! grep -q "\"to\":\"require\"" "$tmp/b/colod.log"'
ok "b heard heartbeats lately" eval '[ "$(status b heartbeat-age-ms)" -lt 1000 ]'
ok "an epoch after a's plugin connection idled past its idle timeout" \
  eval 'colod a checkpoint >/dev/null'
ok "b refused the garbage peers, naming them" \
  grep -q "TLS handshake with 127.0.0.1:[0-9]* failed: the peer does not speak TLS" "$tmp/b/colod.log"
ok "... and timed out the idle ones" \
  grep -q "TLS handshake with 127.0.0.1:[0-9]* failed: no TLS client hello within $hst ms" "$tmp/b/colod.log"
ok "the hostile peers stop" stop_hostile h1

# A first pairing, with 30 idle connections open on a fresh secondary.
ok "a's primary stops cleanly" stop_colod a
ok "secondary c starts" start_colod c secondary --listen "127.0.0.1:$pc" \
  --disk "$tmp/c/disk" "${tls[@]}" "${hb[@]}"
ok "30 idle connections to c" hostile h2 "$pc" 60 idle:30
sleep 0.5
ok "a pairs with c" pair "$pc"
c_ms=$ms
diag "first pairing: $first_ms ms alone, ${c_ms:-none} ms with 30 idle connections"
ok "within $slack ms more than the first pairing alone" test "${c_ms:-99999}" -le $(( first_ms + slack ))
ok "c's full copy is durable" wait_for 30 status_ge c last-committed-epoch 1
ok "the idle peers stop" stop_hostile h2

# More connections than may be pending at once.
mark=$(stat -c %s "$tmp/c/colod.log")
ok "80 connections to c at once" hostile h3 "$pc" 60 idle:80 --once
ok "they are all closed by c" wait_for $(( hst / 1000 + 15 )) eval '! kill -0 $(cat "$tmp/h3.pid") 2>/dev/null'
diag "$(cat "$tmp/h3.out")"
ok "... all 80" grep -q "closed by the secondary 80" "$tmp/h3.out"
n=$(tail -c +$(( mark + 1 )) "$tmp/c/colod.log" | grep -c "connection from 127.0.0.1:[0-9]* closed at once: 64 connections are already in their TLS handshake or HELLO")
diag "$n connections closed at once"
ok "those beyond 64 were closed at once, each logged" test "$n" -ge 10
ok "the hostile process is gone" stop_hostile h3
ok "a pairs with c again afterwards" restart "$pc"
diag "pairing after a restart: ${ms:-none} ms"

for n in a b c; do
  pid=$(cat "$tmp/$n/colod.pid")
  ok "$n's daemon stops" stop_colod "$n"
  ok "... and is gone" eval "! kill -0 $pid 2>/dev/null"
done
ok "a's nbdkit stops" stop_nbdkit a
