#!/usr/bin/env bash
# The plugin in every mode users run nbdkit (issue 14): in the background
# with -P (nbdkit's default), in the foreground (-f), captive (--run) and
# socket-activated (systemd-socket-activate).  The other tests start
# nbdkit with -f only, where the process that runs .get_ready also serves;
# in the background and with --run a forked child serves, and a thread the
# plugin started before the fork is missing there.
#
# In each mode, with persistent=true and cluster-size=4K:
#  - the control socket answers before any NBD client has connected (under
#    socket activation nbdkit starts on the first connection: a client
#    that connects and says nothing starts it);
#  - under checkpoint c1, 1 GiB of first writes in 1 MiB requests
#    completes within a bound: each fills the metadata log with a COPY
#    record, and the log must be compacted twice on the way (a server
#    without its compactor thread stopped at about 500 MiB);
#  - snapshot c1 still reads the disk as it was;
#  - under checkpoint c2, while a writer rewrites the disk (copying to the
#    store, waiting for its records), SIGTERM (for --run: the end of the
#    command) stops the server within a few seconds, and its PID is gone.
# Every server runs under "timeout -k", or, once it has forked into the
# background, under a watchdog that kills it by PID.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires qemu-img --version
requires systemd-socket-activate --version
requires timeout --version
requires python3 --version

# Bounds, in seconds (the writes take about 6 s here; valgrind is slower).
scale=1
[ -n "$VG" ] && scale=10
write_s=$(( ${FLEECE_WRITE_SECONDS:-60} * scale ))
stop_s=$(( ${FLEECE_STOP_SECONDS:-10} * scale ))
life_s=$(( write_s + 60 * scale ))       # each server's whole life

now_ms () { echo $(( $(date +%s%N) / 1000000 )); }

# The disk as it is at c1: 1 GiB, sparse, data at the start, around the
# point where the log first fills, and at the end.
template=$tmp/template.img
truncate -s 1G "$template"
qemu-io -f raw -c 'write -P 0x11 0 4M' -c 'write -P 0x22 511M 2M' \
  -c 'write -P 0x33 1020M 4M' "$template" >/dev/null

writes=() writes2=()
for (( i = 0; i < 1024; i++ )); do
  writes+=(-c "write -q -P 0x55 ${i}M 1M")
  writes2+=(-c "write -q -P 0x66 ${i}M 1M")
done

# nbdkit with the ASan runtime and $VG when the suite asks for them.
nbdkit_env=(env ${FLEECE_ASAN_PRELOAD:+LD_PRELOAD="$FLEECE_ASAN_PRELOAD"})

# watchdog PID SECONDS: SIGKILL to PID after SECONDS unless the test
# stops it first (kill $watchdog_pid): a daemon outlives "timeout", this
# bounds it instead.
watchdog ()
{
  ( trap 'kill $s 2>/dev/null; exit 0' TERM
    sleep "$2" & s=$!
    wait $s
    kill -9 "$1" 2>/dev/null && echo "# watchdog: killed PID $1 after $2 s"
  ) >>"$tmp/watchdog.log" 2>&1 &
  watchdog_pid=$!
  cleanup_fn "kill $watchdog_pid 2>/dev/null"
}

# status_answers CONTROL: fleecectl status answers on CONTROL (once it
# appears).
status_answers ()
{
  wait_for 30 test -S "$1" && fleecectl -s "$1" --timeout 10 status
}

# connected_raw SOCKET: a client that connects and says nothing for 60 s
# (its PID in $raw_pid).
connected_raw ()
{
  python3 -c 'import socket, sys, time
s = socket.socket (socket.AF_UNIX)
s.connect (sys.argv[1])
time.sleep (60)' "$1" &
  raw_pid=$!
  cleanup_fn "kill $raw_pid 2>/dev/null"
}

# exercise MODE SOCKET CONTROL: the checkpoint, the writes, the snapshot.
exercise ()
{
  local m=$1 sock=$2 ctl=$3 t0 stats
  ok "$m: checkpoint c1" fleecectl -s "$ctl" --timeout 10 checkpoint c1
  t0=$(now_ms)
  ok "$m: 1 GiB of 1 MiB first writes completes within $write_s s" \
    timeout -k 5 "$write_s" qemu-io -f raw "nbd+unix:///?socket=$sock" \
    "${writes[@]}"
  diag "$m: the writes took $(( $(now_ms) - t0 )) ms"
  stats=$(fleecectl -s "$ctl" --timeout 10 --json stats)
  is "$(jget "$stats" "d['cbw-clusters']")" 262144 \
    "$m: every one of the 262144 clusters was preserved for c1"
  ok "$m: snapshot c1 is the disk as it was at c1" \
    qemu-img compare -f raw -F raw \
    "nbd+unix:///snapshot/c1?socket=$sock" "$template"
  ok "$m: ... byte for byte where it holds data" \
    timeout 60 qemu-io -f raw "nbd+unix:///snapshot/c1?socket=$sock" \
    -c 'read -q -P 0x11 0 4M' -c 'read -q -P 0 4M 1M' \
    -c 'read -q -P 0 510M 1M' -c 'read -q -P 0x22 511M 2M' \
    -c 'read -q -P 0 513M 1M' -c 'read -q -P 0x33 1020M 4M'
}

# busy MODE SOCKET CONTROL: under a new checkpoint c2, a writer rewrites
# the disk (each write now copies data to the store and waits for its
# record), and is under way: the server is then stopped while it writes.
busy ()
{
  local m=$1 sock=$2 ctl=$3 i n
  ok "$m: checkpoint c2" fleecectl -s "$ctl" --timeout 10 checkpoint c2
  timeout -k 5 "$write_s" qemu-io -f raw "nbd+unix:///?socket=$sock" \
    "${writes2[@]}" >/dev/null 2>&1 &
  writer=$!
  cleanup_fn "kill $writer 2>/dev/null"
  for (( i = 0; i < 100; i++ )); do
    n=$(jget "$(fleecectl -s "$ctl" --timeout 10 --json stats)" \
        "d['bytes-written']") || n=0
    [ "$n" -ge $(( (1024 + 32) * 1048576 )) ] && break
    sleep 0.1
  done
  ok "$m: a writer is under way (32 MiB written)" \
    test "$n" -ge $(( (1024 + 32) * 1048576 ))
}

# writer_ends MODE: the writer sees its connection end.
writer_ends ()
{
  ok "$1: the writer ends with the server" pid_gone "$writer" 10
  wait "$writer" 2>/dev/null
}

# stopped MODE PIDFILE: SIGTERM, then its PID must be gone within stop_s.
stopped ()
{
  local t0 r=0
  t0=$(now_ms)
  kill_by_pidfile "$2" "$stop_s" || r=1
  echo "$(( $(now_ms) - t0 ))" >"$tmp/stop-ms"
  return $r
}
stop_diag () { diag "$1: it was gone $(cat "$tmp/stop-ms") ms after SIGTERM"; }

# after MODE DISK STORE: the disk has the writes (the first writer's at
# its end, the second one's at its start); free the space.
after ()
{
  ok "$1: the disk has the writes" qemu-io -f raw -c 'read -q -P 0x66 0 1M' \
    -c 'read -q -P 0x55 1020M 4M' "$2"
  rm -f "$2" "$3"
}

# new_disk MODE: a fresh copy of the template and paths for MODE.
new_disk ()
{
  disk=$tmp/$1.img store=$tmp/$1.store ctl=$tmp/$1.ctl
  pidfile=$tmp/$1.pid log=$tmp/$1.log
  cp --sparse=always "$template" "$disk"
  plugin=("$FLEECE_PLUGIN" disk="$disk" store="$store" control="$ctl"
          persistent=true cluster-size=4K)
}

# ---- background (nbdkit's default), with -P ----
new_disk bg
sock=$tmp/bg.sock
cleanup_fn "kill_by_pidfile '$pidfile' 1"
# shellcheck disable=SC2086
ok "background: nbdkit forks and returns 0" \
  timeout -k 5 $(( 30 * scale )) "${nbdkit_env[@]}" $VG nbdkit -U "$sock" -P "$pidfile" \
  "${plugin[@]}"
ok "background: the PID file is written" wait_for 10 test -s "$pidfile"
watchdog "$(cat "$pidfile")" "$life_s"
ok "background: the control socket answers before any NBD client" \
  status_answers "$ctl"
exercise background "$sock" "$ctl"
busy background "$sock" "$ctl"
ok "background: SIGTERM stops nbdkit within $stop_s s" \
  stopped background "$pidfile"
stop_diag background
kill "$watchdog_pid"
writer_ends background
after background "$disk" "$store"

# ---- foreground (-f) ----
new_disk fg
sock=$tmp/fg.sock
# shellcheck disable=SC2086
timeout -k 5 "$life_s" "${nbdkit_env[@]}" $VG nbdkit -f -U "$sock" \
  -P "$pidfile" "${plugin[@]}" >"$log" 2>&1 &
runner=$!
cleanup_fn "kill_by_pidfile '$pidfile' 1"
ok "-f: the PID file is written" wait_for 30 test -s "$pidfile"
ok "-f: the control socket answers before any NBD client" \
  status_answers "$ctl"
exercise -f "$sock" "$ctl"
busy -f "$sock" "$ctl"
ok "-f: SIGTERM stops nbdkit within $stop_s s" stopped -f "$pidfile"
stop_diag -f
writer_ends -f
st=0; wait "$runner" || st=$?
ok "-f: nbdkit exits cleanly (status 0, no sanitizer report)" \
  nbdkit_exited_cleanly fg "$st" "$log"
after -f "$disk" "$store"

# ---- captive (--run): nbdkit forks the server off the process that runs
# the command, and stops it with SIGTERM when the command ends; here the
# command ends when the test says so ----
new_disk run
# shellcheck disable=SC2016,SC2086
timeout -k 5 "$life_s" "${nbdkit_env[@]}" $VG nbdkit -U - -P "$pidfile" \
  "${plugin[@]}" --run 'echo "$unixsocket" >'"'$tmp/run.sock'"'
    while [ ! -e '"'$tmp/run.stop'"' ]; do sleep 0.1; done' \
  >"$log" 2>&1 &
runner=$!
cleanup_fn "touch '$tmp/run.stop'; kill_by_pidfile '$pidfile' 1"
ok "--run: the command runs" wait_for 30 test -s "$tmp/run.sock"
ok "--run: the PID file is written" wait_for 10 test -s "$pidfile"
sock=$(cat "$tmp/run.sock") pid=$(cat "$pidfile")
ok "--run: the control socket answers before any NBD client" \
  status_answers "$ctl"
exercise --run "$sock" "$ctl"
busy --run "$sock" "$ctl"
t0=$(now_ms)
touch "$tmp/run.stop"
ok "--run: the command's end stops the server within $stop_s s" \
  pid_gone "$pid" "$stop_s"
diag "--run: the server stopped $(( $(now_ms) - t0 )) ms after the command ended"
ok "--run: nbdkit returns" pid_gone "$runner" 5
writer_ends --run
st=0; wait "$runner" || st=$?
is "$st" 0 "--run: nbdkit exits with the command's status, 0"
kill_by_pidfile "$pidfile" 1
after --run "$disk" "$store"

# ---- --run, short: the command ends at once, many times (the server's
# .cleanup used to block now and then, on a condition variable whose
# waiter had stayed in the parent) ----
truncate -s 64M "$tmp/short.img"
short_runs ()
{
  local i st bad=0
  for (( i = 1; i <= 10; i++ )); do
    st=0
    # shellcheck disable=SC2016,SC2086
    timeout -k 2 "$stop_s" "${nbdkit_env[@]}" $VG nbdkit -U - \
      "$FLEECE_PLUGIN" disk="$tmp/short.img" store="$tmp/short.store" \
      control="$tmp/short.ctl" persistent=true \
      --run 'nbdinfo --size "$uri" >/dev/null' >>"$tmp/short.log" 2>&1 ||
      st=$?
    if [ "$st" -ne 0 ]; then
      echo "run $i: status $st$([ "$st" -ge 124 ] && echo " (still running after $stop_s s: killed)")"
      bad=$((bad + 1))
    fi
  done
  [ "$bad" -eq 0 ]
}
ok "--run: 10 runs whose command ends at once each return within $stop_s s" \
  short_runs
rm -f "$tmp/short.img" "$tmp/short.store"

# ---- socket activation: systemd-socket-activate listens, and starts
# nbdkit (in its own process, no fork) on the first connection ----
new_disk sa
sock=$tmp/sa.sock
# shellcheck disable=SC2086
timeout -k 5 "$life_s" systemd-socket-activate -l "$sock" \
  "${nbdkit_env[@]}" $VG nbdkit -P "$pidfile" "${plugin[@]}" >"$log" 2>&1 &
runner=$!
cleanup_fn "kill_by_pidfile '$pidfile' 1"
ok "socket activation: the NBD socket listens" wait_for 30 test -S "$sock"
ok "socket activation: nbdkit waits for a first connection" test ! -e "$ctl"
connected_raw "$sock"
ok "socket activation: a client that says nothing starts nbdkit" \
  wait_for 30 test -s "$pidfile"
ok "socket activation: the control socket answers while that client has not negotiated" \
  eval 'status_answers "$ctl" && kill -0 "$raw_pid"'
kill "$raw_pid" 2>/dev/null; wait "$raw_pid" 2>/dev/null
exercise "socket activation" "$sock" "$ctl"
busy "socket activation" "$sock" "$ctl"
ok "socket activation: SIGTERM stops nbdkit within $stop_s s" \
  stopped "socket activation" "$pidfile"
stop_diag "socket activation"
writer_ends "socket activation"
st=0; wait "$runner" || st=$?
ok "socket activation: nbdkit exits cleanly (status 0, no sanitizer report)" \
  nbdkit_exited_cleanly sa "$st" "$log"
after "socket activation" "$disk" "$store"

if [ -s "$tmp/watchdog.log" ]; then diag "$(cat "$tmp/watchdog.log")"; fi
