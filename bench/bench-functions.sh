# Helpers shared by the bench scripts (run-bench.sh, scale-bench.sh,
# ab-pull-busy.sh, delete-bench.sh), sourced after they set $prog.

die ()
{
  echo "$prog: error: $*" >&2
  exit 1
}

log ()
{
  printf '[%4ds] %s\n' "$SECONDS" "$*" >&2
}

# stop_pid PID: SIGTERM, then wait for the process to be gone; SIGKILL
# if it is still there after 10 s.
stop_pid ()
{
  local pid=$1 i
  kill "$pid" 2>/dev/null || return 0
  for (( i = 0; i < 500; i++ )); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.02
  done
  echo "$prog: PID $pid did not exit on SIGTERM, sending SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || :
}

# stop_pidfile PIDFILE: stop_pid of the process it names (if any), and
# remove it.
stop_pidfile ()
{
  [ -s "$1" ] || return 0
  stop_pid "$(<"$1")"
  rm -f "$1"
}
