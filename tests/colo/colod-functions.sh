# Helpers for the fleece-colod tests (tests/colo/test-colod-*.sh), on top of
# tests/functions.sh.  Each "host" is a directory $tmp/NAME holding its
# disk, its fleece store and its fleece-colod state; the two daemons talk
# over 127.0.0.1 and are stopped by PID.

source "${abs_top_srcdir:-../..}/tests/functions.sh"

COLOD="${abs_top_builddir:-../..}/colo/fleece-colod"

# colod NAME ARGS...: run a client subcommand against host NAME's daemon.
colod () { local n=$1; shift; "$COLOD" "$1" --state "$tmp/$n/state" "${@:2}"; }

# status NAME FIELD: one field of `fleece-colod status --json`.
status ()
{
  local j
  j=$("$COLOD" status --json --state "$tmp/$1/state" 2>/dev/null) || return 1
  jget "$j" "d.get('$2')"
}

status_is () { [ "$(status "$1" "$2")" = "$3" ]; }
status_ge () { local v; v=$(status "$1" "$2") && [ "$v" != None ] && [ "$v" -ge "$3" ]; }

# seed_random VAR: seed $RANDOM from $VAR, or from the clock if it is
# unset, and say how to replay the run.
seed_random ()
{
  seed=${!1:-$(( $(date +%s) % 32768 ))}
  RANDOM=$seed
  diag "seed $seed ($1=$seed replays it)"
}

# s NAME FIELD: a status field, from the human output (no python: fast
# enough to poll every few milliseconds).
s () { "$COLOD" status --state "$tmp/$1/state" 2>/dev/null | sed -n "s/^$2: //p"; }

# wait_arriving NAME: poll NAME until an epoch's extents arrive
# (bytes-in-flight > 0), for at most 10 s; the last value in bif.
wait_arriving ()
{
  local t
  for (( t = 0; t < 1000; t++ )); do
    bif=$(s "$1" bytes-in-flight)
    [ -n "$bif" ] && (( bif > 0 )) && return 0
    sleep 0.01
  done
  return 1
}

# restart_b_alone I PORT: kill b with -9, wait until a notices (its
# reconnects counter passes $reconnects), then start b again with
# secondary_b on PORT, where a cannot reach it, so that what b's
# recovery left can be read before any catch-up.  Sets note: what b's
# log says of its journal after the restart.
restart_b_alone ()
{
  local n0
  ok "$1: kill -9 b" kill9_colod b
  ok "$1: a notices" \
    wait_for 10 eval '[ "$(s a reconnects)" -gt "$reconnects" ]'
  n0=$(wc -l <"$tmp/b/colod.log")
  ok "$1: b restarts (alone)" secondary_b "$2"
  note=$(tail -n +"$((n0 + 1))" "$tmp/b/colod.log" |
           sed -n 's/.*journal: //p' | head -1)
}

# start_colod NAME ROLE ARGS...: start a daemon for host NAME in the
# background (log $tmp/NAME/colod.log: --log stderr, PID
# $tmp/NAME/colod.pid) and wait
# for its control socket.
start_colod ()
{
  local n=$1 role=$2 i; shift 2
  mkdir -p "$tmp/$n"
  rm -f "$tmp/$n/state/control.sock"
  # shellcheck disable=SC2086
  $VG "$COLOD" "$role" --state "$tmp/$n/state" --log stderr "$@" \
    >>"$tmp/$n/colod.log" 2>&1 &
  echo $! >"$tmp/$n/colod.pid"
  cleanup_fn "kill_by_pidfile '$tmp/$n/colod.pid'"
  for (( i = 0; i < 300; i++ )); do
    [ -S "$tmp/$n/state/control.sock" ] && return 0
    if ! kill -0 "$(cat "$tmp/$n/colod.pid")" 2>/dev/null; then
      echo "# fleece-colod $n exited during start:"
      sed 's/^/#   /' "$tmp/$n/colod.log" | tail -20
      return 1
    fi
    sleep 0.1
  done
  echo "# fleece-colod $n: no control socket in 30 s"
  return 1
}

# stop_colod NAME: SIGTERM, and it must be gone within stop_seconds
# (else it is killed with SIGKILL and the stop fails) and have exited 0
# (119 under valgrind: an error it reported).
stop_colod ()
{
  local pidfile="$tmp/$1/colod.pid" pid status=0
  pid=$(cat "$pidfile") || return 1
  kill "$pid" 2>/dev/null
  if ! pid_gone "$pid" "$(stop_seconds)"; then
    echo "# fleece-colod $1 still ran $(stop_seconds) s after SIGTERM: killed with SIGKILL"
    kill -9 "$pid" 2>/dev/null
    pid_gone "$pid" 5
    status=137
  fi
  wait "$pid" || status=$?
  rm -f "$pidfile"
  if [ "$status" -ne 0 ]; then
    echo "# fleece-colod $1 exited with status $status; log:"
    sed 's/^/#   /' "$tmp/$1/colod.log" | tail -30
    return 1
  fi
}

# exit_status_colod NAME: set colod_status to the exit status of NAME's
# daemon, which the caller expects to have exited already; one still
# running is killed with SIGKILL (status 137) rather than waited for
# without a bound.  Not in a subshell: only this shell can wait for it.
exit_status_colod ()
{
  local pidfile="$tmp/$1/colod.pid" pid
  pid=$(cat "$pidfile") || return 1
  if kill -0 "$pid" 2>/dev/null; then
    echo "# fleece-colod $1 still runs: killed with SIGKILL" >&2
    kill -9 "$pid" 2>/dev/null
    pid_gone "$pid" 5
  fi
  colod_status=0
  wait "$pid" || colod_status=$?
  rm -f "$pidfile"
}

# kill9_colod NAME: kill -9 by PID.
kill9_colod ()
{
  local pidfile="$tmp/$1/colod.pid" pid
  pid=$(cat "$pidfile") || return 1
  kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  rm -f "$pidfile"
  return 0
}

# start_plugin NAME: nbdkit with the fleece plugin on host NAME's disk
# (persistent store), socket $tmp/NAME.sock, control $tmp/NAME.ctl.
start_plugin ()
{
  local n=$1; shift
  start_nbdkit "$n" -- disk="$tmp/$n/disk" store="$tmp/$n/store" \
    control="$tmp/$n.ctl" persistent=true "$@"
}

# file_sum FILE [SIZE]: sha256 of the first SIZE bytes (default: all).
file_sum ()
{
  if [ $# -gt 1 ]; then head -c "$2" "$1" | sha256sum | cut -d' ' -f1
  else sha256sum "$1" | cut -d' ' -f1; fi
}

# live_sum NAME: sha256 of host NAME's live export (through NBD).
live_sum ()
{
  nbdcopy "$(live_uri "$1")" - | sha256sum | cut -d' ' -f1
}
