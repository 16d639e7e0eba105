#!/usr/bin/env bash
# Fleece quickstart: install what is missing, build, then test or demo.
#
#   ./quickstart.sh check   build and run the test suite (make check)
#   ./quickstart.sh demo    build, then snapshot a live disk and pull the
#                           snapshot over NBD, checking every step
#   ./quickstart.sh help    this text
#
# Environment:
#   FLEECE_CONFIGURE_FLAGS  flags for ./configure (default: --enable-werror)
#   FLEECE_DEMO_KEEP=1      keep the demo's temporary directory
#   TMPDIR                  where the demo makes its directory (default /tmp)

set -euo pipefail

prog=${0##*/}
top=$(cd "$(dirname "$0")" && pwd)
cd "$top"

say ()
{
  printf '%s: %s\n' "$prog" "$*"
}

die ()
{
  printf '%s: error: %s\n' "$prog" "$*" >&2
  exit 1
}

usage ()
{
  sed -n '2,13s/^# \{0,1\}//p' "$0"
}

# ---- Dependencies and build ----

ensure_deps ()
{
  if scripts/install-deps --check 2>/dev/null; then
    return 0
  fi
  scripts/install-deps --check || true
  if (( EUID != 0 )); then
    die "some packages are missing; install them with:
  sudo $top/scripts/install-deps"
  fi
  say "installing missing packages"
  scripts/install-deps
}

build ()
{
  if [[ ! -x configure || configure.ac -nt configure ]]; then
    say "autoreconf -fi"
    autoreconf -fi
  fi
  # Word splitting is wanted: the variable holds several flags.
  # shellcheck disable=SC2086
  set -- ${FLEECE_CONFIGURE_FLAGS---enable-werror}
  if [[ ! -f Makefile || ! -f config.status || config.status -ot configure ]]
  then
    say "./configure $*"
    ./configure "$@"
  elif [[ -n ${FLEECE_CONFIGURE_FLAGS+set} &&
          $(./config.status --config) != "$*" ]]; then
    # Asked for other flags than the tree was configured with: objects
    # built with the old flags must go.
    say "./configure $* (was: $(./config.status --config))"
    ./configure "$@"
    make clean
  fi
  say "make -j$(nproc)"
  make -j"$(nproc)"
}

# ---- check ----

# Print the log of every test whose result is not a pass or a skip.
show_failed_tests ()
{
  local trs log
  if [[ -f tests/test-suite.log ]]; then
    echo "==== tail of tests/test-suite.log ===="
    tail -n 40 tests/test-suite.log
  fi
  for trs in tests/*.trs; do
    [[ -e $trs ]] || continue
    if grep -Eq '^:test-result: (FAIL|ERROR|XPASS)' "$trs"; then
      log=${trs%.trs}.log
      echo "==== $log ===="
      if [[ -f $log ]]; then cat "$log"; else echo "(no log)"; fi
    fi
  done
}

do_check ()
{
  local rc=0
  ensure_deps
  build
  say "make check"
  make check || rc=$?
  if (( rc != 0 )); then
    show_failed_tests
    say "make check FAILED (status $rc)"
  else
    say "make check passed"
  fi
  return "$rc"
}

# ---- demo ----

plugin=$top/plugin/.libs/nbdkit-fleece-plugin.so
fleecectl=$top/tools/fleecectl
demo_dir=
nbdkit_bg=
step_no=0
step_total=13
step_name="setting up"
cmd_timeout=120
last_output=

step ()
{
  step_no=$((step_no + 1))
  step_name=$*
  printf '\n==> [%d/%d] %s\n' "$step_no" "$step_total" "$*"
}

fail ()
{
  printf '\n%s: demo FAILED at step %d (%s):\n  %s\n' \
         "$prog" "$step_no" "$step_name" "$*" >&2
  if [[ -n $demo_dir && -s $demo_dir/nbdkit.log ]]; then
    printf '%s: last lines of the nbdkit log:\n' "$prog" >&2
    tail -n 20 "$demo_dir/nbdkit.log" | sed 's/^/    /' >&2
  fi
  exit 1
}

# Print text (command output) indented under the command.
indent ()
{
  local line
  while IFS= read -r line; do
    printf '      %s\n' "$line"
  done <<<"$1"
}

# Print a command the way one would type it.
show_cmd ()
{
  local a out=
  for a in "$@"; do
    a=${a//"$top"/.}
    if [[ $a =~ ^[][A-Za-z0-9_./:=,+@%-]+$ ]]; then
      out+=" $a"
    else
      out+=" '${a//\'/\'\\\'\'}'"
    fi
  done
  printf '    $%s\n' "$out"
}

# run CMD...: show it, run it with a time limit, show its output (only
# the lines matching $only_lines if that is set); fail the step if it
# fails.  The whole output is left in last_output.
run ()
{
  local rc=0
  show_cmd "$@"
  last_output=$(timeout "$cmd_timeout" "$@" 2>&1) || rc=$?
  if [[ -n ${only_lines-} && $rc == 0 ]]; then
    indent "$(grep -E -- "$only_lines" <<<"$last_output" || true)"
  elif [[ -n $last_output ]]; then
    indent "$last_output"
  fi
  if (( rc == 124 )); then
    fail "$1 timed out after ${cmd_timeout}s"
  elif (( rc != 0 )); then
    fail "$1 exited with status $rc"
  fi
}

# qemu-io reports a failed pattern check on its output: look there too.
run_qemu_io ()
{
  run qemu-io "$@"
  if grep -Eqi 'failed|error' <<<"$last_output"; then
    fail "qemu-io reported a failure"
  fi
}

nbdkit_pid ()
{
  local pid=
  if [[ -s $demo_dir/nbdkit.pid ]]; then
    pid=$(<"$demo_dir/nbdkit.pid")
  fi
  echo "${pid:-$nbdkit_bg}"
}

# Stop nbdkit by its PID and wait for it; prints its exit status.
stop_nbdkit ()
{
  local pid i rc=0
  pid=$(nbdkit_pid)
  [[ -n $pid ]] || return 0
  if kill "$pid" 2>/dev/null; then
    for (( i = 0; i < 100; i++ )); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$prog: nbdkit (pid $pid) ignored SIGTERM, sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  if [[ -n $nbdkit_bg ]]; then
    wait "$nbdkit_bg" 2>/dev/null || rc=$?
  fi
  nbdkit_bg=
  rm -f "$demo_dir/nbdkit.pid"
  return "$rc"
}

demo_cleanup ()
{
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $demo_dir ]]; then
    stop_nbdkit >/dev/null 2>&1 || true
    if [[ ${FLEECE_DEMO_KEEP-} == 1 ]]; then
      echo "$prog: kept $demo_dir" >&2
    else
      rm -rf "$demo_dir"
    fi
  fi
  exit "$rc"
}

start_nbdkit ()
{
  local i
  show_cmd nbdkit -U nbd.sock -P nbdkit.pid -f "$plugin" \
           disk=disk.img store=store.img control=ctl.sock
  nbdkit -U nbd.sock -P nbdkit.pid -f "$plugin" \
         disk="$demo_dir/disk.img" store="$demo_dir/store.img" \
         control="$demo_dir/ctl.sock" >nbdkit.log 2>&1 &
  nbdkit_bg=$!
  for (( i = 0; i < 300; i++ )); do
    if [[ -s nbdkit.pid && -S nbd.sock && -S ctl.sock ]]; then
      echo "      nbdkit is running, pid $(<nbdkit.pid)"
      return 0
    fi
    if ! kill -0 "$nbdkit_bg" 2>/dev/null; then
      wait "$nbdkit_bg" || true
      nbdkit_bg=
      fail "nbdkit exited at start"
    fi
    sleep 0.1
  done
  fail "nbdkit did not create nbd.sock, ctl.sock and nbdkit.pid in 30s"
}

sha256 ()
{
  sha256sum "$1" | cut -d' ' -f1
}

do_demo ()
{
  local live="nbd+unix:///?socket=nbd.sock"
  local snap="nbd+unix:///snapshot/demo?socket=nbd.sock"
  local ref_sum pulled_sum

  ensure_deps
  build
  [[ -f $plugin ]] || die "$plugin was not built"
  [[ -x $fleecectl ]] || die "$fleecectl was not built"
  export PATH="$top/tools:$PATH"

  demo_dir=$(mktemp -d "${TMPDIR:-/tmp}/fleece-demo.XXXXXX")
  trap demo_cleanup EXIT
  trap 'exit 130' INT TERM
  set -E
  trap 'fail "unexpected failure of a command (quickstart.sh line $LINENO)"' ERR
  cd "$demo_dir"
  say "demo directory: $demo_dir"

  step "Make a 64 MiB demo disk filled with bytes 0x11"
  run qemu-img create -f raw disk.img 64M
  run_qemu_io -f raw -c 'write -P 0x11 0 64M' disk.img

  step "Serve it with nbdkit and the fleece plugin"
  start_nbdkit

  step "Write 0xaa to the first 4 MiB through the live export"
  run_qemu_io -f raw "$live" -c 'write -P 0xaa 0 4M'

  step "Save a reference copy of the disk: what the snapshot must show"
  run cp --sparse=never disk.img reference.img
  ref_sum=$(sha256 reference.img)
  echo "      sha256 $ref_sum"

  step "Take snapshot 'demo'"
  run fleecectl -s ctl.sock snapshot create demo

  step "Overwrite the first 8 MiB and 1 MiB at 32 MiB with 0xbb (live)"
  run_qemu_io -f raw "$live" -c 'write -P 0xbb 0 8M' \
              -c 'write -P 0xbb 32M 1M'

  step "Engine statistics and snapshots"
  run fleecectl -s ctl.sock stats
  run fleecectl -s ctl.sock snapshot list

  step "Exports of the server"
  only_lines='^export=|description:|export-size:' run nbdinfo --list "$live"
  grep -q 'snapshot/demo' <<<"$last_output" ||
    fail "nbdinfo --list does not show export snapshot/demo"

  step "The snapshot export refuses writes"
  show_cmd qemu-io -f raw "$snap" -c 'write -P 0xee 0 64k'
  if last_output=$(timeout "$cmd_timeout" \
                   qemu-io -f raw "$snap" -c 'write -P 0xee 0 64k' 2>&1) &&
     ! grep -qi 'failed' <<<"$last_output"; then
    indent "$last_output"
    fail "a write to snapshot/demo succeeded"
  fi
  indent "$last_output"

  step "Pull the snapshot with nbdcopy while the live disk has moved on"
  run nbdcopy "$snap" pulled.img

  step "Check: the pulled image is the disk at snapshot time"
  echo "      pulled image, first 4 MiB: 0xaa (as at the snapshot)"
  run_qemu_io -f raw -c 'read -P 0xaa 0 4M' -c 'read -P 0x11 4M 60M' \
              pulled.img
  echo "      live disk, first 8 MiB and 32 MiB+1 MiB: 0xbb (after it)"
  run_qemu_io -f raw "$live" -c 'read -P 0xbb 0 8M' -c 'read -P 0xbb 32M 1M'
  pulled_sum=$(sha256 pulled.img)
  echo "      sha256 reference.img $ref_sum"
  echo "      sha256 pulled.img    $pulled_sum"
  [[ $pulled_sum == "$ref_sum" ]] ||
    fail "pulled.img differs from reference.img"

  step "Delete snapshot 'demo'"
  run fleecectl -s ctl.sock snapshot delete demo
  run fleecectl -s ctl.sock snapshot list
  ! grep -qw demo <<<"$last_output" ||
    fail "snapshot 'demo' is still listed after deletion"
  echo "      its copies are freed:"
  only_lines='store-|copies' run fleecectl -s ctl.sock stats

  step "Stop nbdkit"
  local pid rc=0
  pid=$(nbdkit_pid)
  echo "      kill $pid"
  stop_nbdkit || rc=$?
  (( rc == 0 )) || fail "nbdkit exited with status $rc"

  cd "$top"
  printf '\n%s: demo OK: a snapshot of a live 64 MiB disk, taken between\n' \
         "$prog"
  printf '  two writes, was pulled over NBD with nbdcopy and matches the\n'
  printf '  disk as it was when the snapshot was taken (sha256 %s...).\n' \
         "${ref_sum:0:16}"
}

case "${1-}" in
  check) do_check ;;
  demo) do_demo ;;
  help|-h|--help) usage ;;
  "") usage; exit 1 ;;
  *) usage >&2; die "unknown command '$1'" ;;
esac
