#!/usr/bin/env bash
# The control socket's idle clients (docs/control-protocol.md "Limits"):
# connections that send nothing cannot lock real clients out.
#  - with 32 idle connections (the most clients at once), fleecectl
#    status is answered at once: it takes the place of the one idle
#    longest, which is told why;
#  - idle connections are closed after the idle timeout (lowered to 2 s
#    here with -D fleece.ctl_idle_timeout_ms=2000), whether they never
#    sent a request or are idle after one, and each is told why;
#  - an events subscriber (fleecectl events) is neither closed nor
#    evicted however long it is idle, and still gets its events.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires python3 --version
requires qemu-io --version

disk=$tmp/disk
make_disk "$disk" 8M 0x21

# idle.py SOCKET N SECONDS READY [REQUEST]: N connections that send
# nothing (or one REQUEST line each), held for SECONDS; then, for each,
# "closed" or "open" and the last line it got, one per line.
cat >"$tmp/idle.py" <<'PY'
import socket, sys, time, selectors
path, n, secs, ready = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
req = sys.argv[5].encode() + b"\n" if len(sys.argv) > 5 else b""
sel = selectors.DefaultSelector()
conns = []
for i in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    if req:
        s.sendall(req)
    c = {"s": s, "buf": b"", "closed": False, "t": None}
    conns.append(c)
    sel.register(s, selectors.EVENT_READ, c)
with open(ready, "w") as f:
    f.write("%d\n" % n)
t0 = time.monotonic()
end = t0 + secs
while time.monotonic() < end and not all(c["closed"] for c in conns):
    for key, _ in sel.select(timeout=0.05):
        c = key.data
        data = key.fileobj.recv(65536)
        if data:
            c["buf"] += data
        else:
            sel.unregister(key.fileobj)
            c["closed"] = True
            c["t"] = time.monotonic() - t0
for c in conns:
    lines = c["buf"].decode().strip().split("\n")
    print("%s %s %s" % ("closed" if c["closed"] else "open",
                        "%.1f" % c["t"] if c["t"] is not None else "-",
                        lines[-1]))
PY

# idle NAME N SECONDS [REQUEST]: run idle.py in the background (PID
# $tmp/NAME.pid, report $tmp/NAME.out); wait until it is connected.
idle ()
{
  local n=$1; shift
  python3 "$tmp/idle.py" "$tmp/s.ctl" "$1" "$2" "$tmp/$n.ready" "${@:3}" \
    >"$tmp/$n.out" 2>&1 &
  echo $! >"$tmp/$n.pid"
  cleanup_fn "kill_by_pidfile '$tmp/$n.pid'"
  wait_for 10 test -s "$tmp/$n.ready"
}
# done_idle NAME: wait for it to exit by itself (bounded), assert it is gone.
done_idle ()
{
  local pid
  pid=$(cat "$tmp/$1.pid") || return 1
  pid_gone "$pid" 20 || return 1   # cleanup kills it by its PID file
  wait "$pid"
  rm -f "$tmp/$1.pid"
}
now_ms () { echo $(( $(date +%s%N) / 1000000 )); }

ok "nbdkit starts, idle timeout 2 s" start_nbdkit s \
  -D fleece.ctl_idle_timeout_ms=2000 -- disk="$disk" store="$tmp/store" \
  control="$tmp/s.ctl" store-max=1M store-warn=50

watch_events "$tmp/s.ctl" "$tmp/events" 60

# 31 idle connections and the subscriber: every place is taken.
ok "31 idle connections" idle i1 31 20
sleep 1.2                     # idle long enough to be evicted
t0=$(now_ms)
ok "fleecectl status answers with every place taken" \
  timeout 10 fleecectl -s "$tmp/s.ctl" status
elapsed=$(( $(now_ms) - t0 ))
diag "fleecectl status answered in $elapsed ms"
ok "within 1 s" test "$elapsed" -lt 1000
ok "the idle connections are all closed" done_idle i1
diag "$(sort "$tmp/i1.out" | uniq -c | head -5)"
is "$(grep -c '^closed ' "$tmp/i1.out")" 31 "all 31 closed by the server"
is "$(grep -c 'no complete request for [0-9]* ms, and a new client needs its place (the limit is 32 clients)' "$tmp/i1.out")" 1 \
  "one of them to make room for fleecectl, told why"
is "$(grep -c 'closing the connection: no complete request for [0-9]* ms"' "$tmp/i1.out")" 30 \
  "the others after the idle timeout, told why"
ok "none before 2 s" eval "! awk '\$2 != \"-\" && \$2 < 1.9 && !/new client/' '$tmp/i1.out' | grep -q ."

# A client idle after a request is closed too.
ok "3 connections that send one request, then idle" \
  idle i2 3 20 '{"execute":"query-status"}'
ok "... are closed" done_idle i2
is "$(grep -c '^closed .*closing the connection: idle for [0-9]* ms' "$tmp/i2.out")" 3 \
  "after the idle timeout, told why"

# The subscriber has been idle for more than the timeout all along.
ok "fleecectl events is still connected" kill -0 "$events_pid"
ok "... and gets events" eval '
  ctl s snapshot create s1 &&
  qio s "" "write -P 0x31 0 640k" >/dev/null'
ok "STORE_HIGH_WATER reached the subscriber" \
  timeout 10 sh -c "until grep -q STORE_HIGH_WATER '$tmp/events'; do sleep 0.1; done"
ok "32 more idle connections" idle i3 32 20
sleep 1.2
ok "fleecectl status still answers" timeout 10 fleecectl -s "$tmp/s.ctl" status
ok "the subscriber was not evicted" kill -0 "$events_pid"
ok "the idle connections are closed" done_idle i3
kill "$events_pid"; wait "$events_pid" 2>/dev/null
ok "fleecectl events is gone" eval "! kill -0 $events_pid 2>/dev/null"
ok "its output holds only events" eval "! grep -v '\"event\"' '$tmp/events' | grep -q ."
ok "nbdkit stops" stop_nbdkit s
