# Shell test helpers, sourced by tests/test-*.sh.  Shaped like nbdkit's
# tests/functions.sh: requires, cleanup_fn, start_nbdkit; plus a small TAP
# writer.  Tests run through ../run, which sets PATH, FLEECE_PLUGIN and,
# under make check-valgrind, $VG.
#
# Every test works in its own temporary directory ($tmp), starts servers
# on Unix sockets only, and stops them by PID from an EXIT trap.

set -u

: "${FLEECE_PLUGIN:?tests must be run through ../run (make check)}"
: "${VG:=}"

[ -n "$VG" ] && echo "# daemons run under: $VG"
[ -n "${FLEECE_ASAN_PRELOAD:-}" ] && echo "# nbdkit runs with LD_PRELOAD=$FLEECE_ASAN_PRELOAD"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/fleece-test.XXXXXX")
_cleanup_fns=()
_tap_n=0
_tap_failed=0
_tap_planned=

cleanup_fn ()
{
  _cleanup_fns+=("$*")
}

_run_cleanup ()
{
  local status=$? i
  for (( i = ${#_cleanup_fns[@]} - 1; i >= 0; i-- )); do
    eval "${_cleanup_fns[$i]}" || :
  done
  rm -rf "$tmp"
  if [ -z "$_tap_planned" ]; then
    echo "1..$_tap_n"
  fi
  if [ "$_tap_failed" -gt 0 ]; then
    exit 1
  fi
  exit "$status"
}
trap _run_cleanup EXIT
trap 'exit 130' INT TERM

# A test that needs something missing fails loudly: it never skips.
requires ()
{
  if ! "$@" >/dev/null 2>&1; then
    echo "Bail out! required command failed: $* (run scripts/install-deps)"
    exit 1
  fi
}

# ---- TAP ----

plan ()
{
  _tap_planned=1
  echo "1..$1"
}

# _not_ok DESC: test $_tap_n failed; the tail of its output ($tmp/.out)
# goes to the log.
_not_ok ()
{
  echo "not ok $_tap_n - $1"
  sed 's/^/# /' "$tmp/.out" | tail -20
  _tap_failed=$((_tap_failed + 1))
}

ok ()
{
  local desc=$1; shift
  _tap_n=$((_tap_n + 1))
  if "$@" >"$tmp/.out" 2>&1; then
    echo "ok $_tap_n - $desc"
  else
    _not_ok "$desc"
  fi
}

# ok_fails DESC PATTERN CMD...: CMD must fail and its output match PATTERN
# (grep -E), so that an error is both reported and explained.
ok_fails ()
{
  local desc=$1 pattern=$2; shift 2
  _tap_n=$((_tap_n + 1))
  if "$@" >"$tmp/.out" 2>&1; then
    _not_ok "$desc (command succeeded)"
  elif grep -Eq -- "$pattern" "$tmp/.out"; then
    echo "ok $_tap_n - $desc"
  else
    _not_ok "$desc (no message matching /$pattern/)"
  fi
}

is ()
{
  local got=$1 expected=$2 desc=$3
  _tap_n=$((_tap_n + 1))
  if [ "$got" = "$expected" ]; then
    echo "ok $_tap_n - $desc"
  else
    echo "not ok $_tap_n - $desc"
    echo "#   got:      '$got'"
    echo "#   expected: '$expected'"
    _tap_failed=$((_tap_failed + 1))
  fi
}

diag ()
{
  printf '%s\n' "$*" | sed 's/^/# /'
}

# ---- set-up ----

# make_disk PATH SIZE [PATTERN [LENGTH [CMD...]]]: a raw disk image of
# SIZE (as truncate takes it: 8M) whose first LENGTH bytes (all of it if
# not given) hold the byte PATTERN, then the qemu-io commands CMD... (such
# as 'write -P 0x05 20M 100k'), all in one qemu-io.
make_disk ()
{
  local path=$1 size=$2 c cmds=()
  truncate -s "$size" "$path" || return 1
  [ $# -ge 3 ] || return 0
  cmds=(-c "write -P $3 0 ${4:-$size}")
  for c in "${@:5}"; do cmds+=(-c "$c"); done
  qemu-io -f raw "${cmds[@]}" "$path" >/dev/null
}

# persistent_setup: the persistence tests' set-up: $disk (8 MiB of
# 0x21), $store, and the functions start [PLUGIN ARGS] (nbdkit p on them
# with persistent=true and control socket $tmp/p.ctl) and crash (nbdkit
# p killed with -9, as a power cut would).
persistent_setup ()
{
  disk=$tmp/disk
  store=$tmp/store
  make_disk "$disk" 8M 0x21 || return 1
  start () {
    start_nbdkit p -- disk="$disk" store="$store" control="$tmp/p.ctl" \
                 persistent=true "$@"
  }
  crash () { crash_nbdkit p; }
}

# watch_events CTL FILE SECONDS: fleecectl subscribes to the events of
# control socket CTL for at most SECONDS, in the background, writing
# them to FILE as JSON; its PID is $events_pid, killed at exit.
watch_events ()
{
  fleecectl -s "$1" --json events --timeout "$3" >"$2" 2>&1 &
  events_pid=$!
  cleanup_fn "kill $events_pid 2>/dev/null"
}

# start_journal: a stand-in for journald (tests/journal-listen.py) on
# /run/systemd/journal/socket, in a tmpfs over /run/systemd: only in a
# test that runs in its own mount namespace (unshare -m).  Each record
# sd_journal_send sends is a JSON line in $tmp/journal.
start_journal ()
{
  mount -t tmpfs tmpfs /run/systemd || return 1
  cleanup_fn "umount /run/systemd"
  mkdir /run/systemd/journal || return 1
  python3 "${abs_top_srcdir:-..}/tests/journal-listen.py" \
    /run/systemd/journal/socket "$tmp/journal" &
  echo $! >"$tmp/journal.pid"
  cleanup_fn "kill_by_pidfile '$tmp/journal.pid'"
  wait_for 5 test -S /run/systemd/journal/socket
}

# ---- servers ----

# _started WHAT SOCK PIDFILE LOG: a server WHAT was just started in the
# background, its PID in PIDFILE: register its kill by PID, then wait up
# to 30 s for it to create SOCK.  1, with its log, if it exits first.
_started ()
{
  local what=$1 sock=$2 pidfile=$3 log=$4 i
  cleanup_fn "kill_by_pidfile '$pidfile'"
  for (( i = 0; i < 300; i++ )); do
    [ -S "$sock" ] && return 0
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "# $what exited during start:"
      sed 's/^/#   /' "$log"
      return 1
    fi
    sleep 0.1
  done
  echo "# $what did not create $sock in 30 s"
  return 1
}

# start_nbdkit NAME [nbdkit args...] -- PLUGIN-ARGS...
# Starts nbdkit with the fleece plugin in the foreground, in the
# background of this shell, on socket $tmp/NAME.sock, with its log in
# $tmp/NAME.log and its PID in $tmp/NAME.pid; waits for the socket and
# the control socket.  The plugin arguments follow "--".
start_nbdkit ()
{
  local name=$1; shift
  local sock="$tmp/$name.sock" pidfile="$tmp/$name.pid" log="$tmp/$name.log"
  local args=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    args+=("$1"); shift
  done
  [ $# -gt 0 ] && shift
  rm -f "$sock"
  # shellcheck disable=SC2086
  env ${FLEECE_ASAN_PRELOAD:+LD_PRELOAD="$FLEECE_ASAN_PRELOAD"} \
    $VG nbdkit -f -U "$sock" "${args[@]}" "$FLEECE_PLUGIN" "$@" \
    >"$log" 2>&1 &
  echo $! >"$pidfile"
  _started "nbdkit $name" "$sock" "$pidfile" "$log"
}

# start_disks NAME...: for each NAME, a 4 MiB disk of 0x11 ($tmp/disk.NAME)
# served by nbdkit NAME (start_nbdkit, control socket $tmp/NAME.ctl); then
# group holds "-s CTL" for each, the servers of a fleecectl group.
start_disks ()
{
  local d
  group=()
  for d in "$@"; do
    make_disk "$tmp/disk.$d" 4M 0x11 &&
      start_nbdkit "$d" -- disk="$tmp/disk.$d" store="$tmp/store.$d" \
                   control="$tmp/$d.ctl" cluster-size=64K || return 1
    group+=(-s "$tmp/$d.ctl")
  done
}

# custom_slices: true when the kernel keeps the scheduler slice a
# SCHED_OTHER thread asks for (EEVDF's custom slices, Linux 6.12 and
# later; older kernels accept the request and ignore it).
custom_slices ()
{
  local kmaj kmin
  IFS=. read -r kmaj kmin _ <<<"$(uname -r)"
  (( kmaj > 6 || (kmaj == 6 && kmin >= 12) ))
}

# has_slice FILE: /proc's sched FILE of a thread shows a 100 us slice,
# the one the threads that answer a group's messages ask for (slice.h).
has_slice ()
{
  grep -Eq '^se\.slice +: +100000$' "$1"
}

# pid_gone PID [SECONDS]: true once process PID is gone, polling for at
# most SECONDS (default 5).  Works for a daemon that is not a child of
# this shell, where "wait" cannot (bash reaps its own children as they
# exit, so an exited child is gone too).
pid_gone ()
{
  local pid=$1 t=${2:-5} i
  for (( i = 0; i < t * 10; i++ )); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  ! kill -0 "$pid" 2>/dev/null
}

# How long a server has to exit after SIGTERM: a few seconds, more under
# valgrind (its leak check runs at exit).
stop_seconds () { [ -n "$VG" ] && echo 60 || echo "${FLEECE_STOP_SECONDS:-10}"; }

# stop_pid WHAT PID [SECONDS]: SIGTERM, then PID must be gone within
# SECONDS (default stop_seconds).  If it is not, say so, kill -9 it (so
# that no test leaves a server behind) and fail: a stop that did not stop
# is a failure, whatever kill returned.
stop_pid ()
{
  local what=$1 pid=$2 t=${3:-$(stop_seconds)}
  kill "$pid" 2>/dev/null || :
  if pid_gone "$pid" "$t"; then
    wait "$pid" 2>/dev/null || :     # reap it if it is our child
    return 0
  fi
  kill -9 "$pid" 2>/dev/null || :
  pid_gone "$pid" 5 && wait "$pid" 2>/dev/null
  if [ -n "${FLEECE_ASAN_PRELOAD:-}" ]; then
    # The libp11-kit hang at exit of stop_nbdkit, below.
    echo "# $what (PID $pid) hung at exit (ASan + libp11-kit), killed"
    return 0
  fi
  echo "# $what (PID $pid) still ran $t s after SIGTERM: killed with SIGKILL"
  return 1
}

# kill_by_pidfile PIDFILE [SECONDS]: stop_pid on the PID in PIDFILE, then
# remove it; true if there is nothing to stop.  Cleanup uses it for every
# server (a daemon that ignores SIGTERM gets SIGKILL, never outlives the
# test); a test that asserts a stop may use it too.
kill_by_pidfile ()
{
  local pid st=0
  pid=$(cat "$1" 2>/dev/null) || return 0
  [ -n "$pid" ] || return 0
  stop_pid "$1" "$pid" "${2:-}" || st=$?
  rm -f "$1"
  return "$st"
}

# wait_for SECONDS CMD...: poll CMD every 0.1 s until it succeeds.
wait_for ()
{
  local t=$1 i; shift
  for (( i = 0; i < t * 10; i++ )); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

# ctl_ready NAME: wait until nbdkit NAME's control socket ($tmp/NAME.ctl)
# answers: after kill -9 a stale socket is left, which start_nbdkit's
# wait for the NBD socket does not tell from a live one.
ctl_ready ()
{
  local i
  for (( i = 0; i < 100; i++ )); do
    ctl "$1" -t 5 status >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "control socket $tmp/$1.ctl does not answer"
  return 1
}

# crash_nbdkit NAME: kill -9 nbdkit NAME by PID, as a power cut would
# stop it (minus the page cache), and wait until it is gone.
crash_nbdkit ()
{
  local pid
  pid=$(cat "$tmp/$1.pid") || return 1
  kill -9 "$pid"
  wait "$pid" 2>/dev/null || :
  rm -f "$tmp/$1.pid"
}

# stop_nbdkit NAME: stop it by PID and check that it exits cleanly (under
# valgrind, that it reported no error: valgrind exits 119; in a sanitizer
# build, that its log holds no sanitizer report).
stop_nbdkit ()
{
  local name=$1 pidfile="$tmp/$1.pid" log="$tmp/$1.log" pid status
  pid=$(cat "$pidfile")
  kill "$pid"
  if ! pid_gone "$pid" "$(stop_seconds)"; then
    kill -9 "$pid" 2>/dev/null
    pid_gone "$pid" 5
    if [ -z "${FLEECE_ASAN_PRELOAD:-}" ]; then
      echo "# nbdkit $name still ran $(stop_seconds) s after SIGTERM: killed with SIGKILL; log:"
      sed 's/^/#   /' "$log" | tail -40
      wait "$pid" 2>/dev/null
      rm -f "$pidfile"
      return 1
    fi
    # With the ASan runtime preloaded, nbdkit sometimes hangs in
    # libp11-kit's destructor at exit (after LeakSanitizer has run):
    # judge it by its log.
    echo "# nbdkit $name hung at exit (ASan + libp11-kit), killed"
  fi
  status=0
  wait "$pid" || status=$?
  rm -f "$pidfile"
  nbdkit_exited_cleanly "$name" "$status" "$log"
}

# nbdkit_exited_cleanly NAME STATUS LOG: true if nbdkit NAME, which
# exited with STATUS and wrote LOG, stopped cleanly: status 0 and no
# sanitizer report, where a LeakSanitizer report of nbdkit's own blocks
# only (and the exit status it caused) is forgiven, and so is a SIGKILL
# of a sanitizer build hung at exit.
nbdkit_exited_cleanly ()
{
  local name=$1 status=$2 log=$3
  if grep -q 'ERROR: LeakSanitizer' "$log" && nbdkit_own_leaks_only "$log"; then
    echo "# nbdkit $name: LeakSanitizer reported only nbdkit's own blocks (see valgrind.supp)"
    # LeakSanitizer's report is what made the exit status non-zero.
    [ "$status" -ne 0 ] && ! grep -q 'ERROR: AddressSanitizer\|runtime error:' "$log" && status=0
  elif grep -Eq 'ERROR: (Address|Leak)Sanitizer|runtime error:' "$log"; then
    echo "# nbdkit $name: sanitizer report:"
    sed 's/^/#   /' "$log" | tail -60
    return 1
  fi
  if [ "$status" -ne 0 ] && ! { [ -n "${FLEECE_ASAN_PRELOAD:-}" ] && [ "$status" -eq 137 ]; }; then
    grep -q "raw_send_socket: Assertion \`sock >= 0' failed" "$log" &&
      echo "# nbdkit $name aborted: a client hung up with replies queued" \
           "(nbdkit 1.32.4-1.33.9; see nbdkit-fleece-plugin(1)): the test" \
           "must stop its clients before it stops nbdkit"
    echo "# nbdkit $name exited with status $status; log:"
    sed 's/^/#   /' "$log" | tail -40
    return 1
  fi
}

# True if every direct leak in an LeakSanitizer report was malloc'ed by
# nbdkit's own code (its frame #1 is in /usr/bin/nbdkit), the nbdkit
# 1.32.5 teardown leak described in valgrind.supp, and nothing else went
# wrong.  A leak allocated by the plugin has the plugin as frame #1 and
# still fails.
nbdkit_own_leaks_only ()
{
  grep -Eq 'ERROR: AddressSanitizer|runtime error:' "$1" && return 1
  awk '/Direct leak of/ { want = 1; next }
       want && /#1 / { if ($0 !~ /\/usr\/bin\/nbdkit\+/) bad = 1; want = 0 }
       END { exit bad }' "$1"
}

# nbdkit_once ARGS...: run nbdkit that is expected to exit by itself
# (--help, --dump-plugin, a refused start), bounded in time (see run.in
# for why).
nbdkit_once ()
{
  timeout -s KILL "${FLEECE_FAIL_TIMEOUT:-60}" \
    env ${FLEECE_ASAN_PRELOAD:+LD_PRELOAD="$FLEECE_ASAN_PRELOAD"} \
    nbdkit "$@"
}

# URIs and checksums.
live_uri () { echo "nbd+unix:///?socket=$tmp/$1.sock"; }
snap_uri () { echo "nbd+unix:///snapshot/$2?socket=$tmp/$1.sock"; }
sum () { sha256sum "$1" | cut -d' ' -f1; }

# pull NAME SNAPSHOT FILE: copy a snapshot export to a file with nbdcopy.
pull ()
{
  rm -f "$3"
  nbdcopy "$(snap_uri "$1" "$2")" "$3"
}

# qio NAME [EXPORT] -- qemu-io commands...: run qemu-io on an export.
qio ()
{
  local name=$1 export=$2; shift 2
  local uri
  if [ -z "$export" ]; then uri=$(live_uri "$name")
  else uri="nbd+unix:///$export?socket=$tmp/$name.sock"; fi
  local cmds=()
  for c in "$@"; do cmds+=(-c "$c"); done
  qemu-io -f raw "$uri" "${cmds[@]}"
}

# ctl NAME ARGS...: fleecectl on server NAME's control socket.
ctl ()
{
  local name=$1; shift
  fleecectl -s "$tmp/$name.ctl" "$@"
}

# jget JSON EXPR: a value out of JSON, with python3's json (jq-like).
jget ()
{
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {"d": d}))' "$1" "$2"
}

# ---- TLS (test-tls-*.sh, test-backup-*.sh) ----

# make_pki: throwaway credentials made by tests/make-pki.sh: X.509 in
# $tmp/pki (CA, server, client) and $tmp/pki-other (a client certificate
# from an unrelated CA), PSK user alice in $tmp/pki/keys.psk and a
# different key for alice in $tmp/pki/wrong-keys.psk.
make_pki ()
{
  requires certtool --version
  requires psktool --version
  if ! bash "${abs_top_srcdir:-..}/tests/make-pki.sh" "$tmp/pki"; then
    echo "Bail out! tests/make-pki.sh $tmp/pki failed"
    exit 1
  fi
}

# x509_uri NAME EXPORT [PKI-DIR], psk_uri NAME EXPORT [PSK-FILE]: TLS
# URIs (libnbd syntax) of EXPORT ("" or snapshot/S or bitmap/B) on NAME.
x509_uri () { echo "nbds+unix:///$2?socket=$tmp/$1.sock&tls-certificates=${3:-$tmp/pki}"; }
psk_uri () { echo "nbds+unix://alice@/$2?socket=$tmp/$1.sock&tls-psk-file=${3:-$tmp/pki/keys.psk}"; }

# qio_x509 NAME EXPORT -- qemu-io commands...: qemu-io over X.509 TLS with
# $tmp/pki (qemu checks the server's name: localhost).
qio_x509 ()
{
  local name=$1 export=$2; shift 2
  [ "${1:-}" = "--" ] && shift
  local cmds=() c
  for c in "$@"; do cmds+=(-c "$c"); done
  qemu-io --object "tls-creds-x509,id=tls0,endpoint=client,dir=$tmp/pki" \
    --image-opts "driver=nbd,path=$tmp/$name.sock,${export:+export=$export,}tls-creds=tls0,tls-hostname=localhost" \
    "${cmds[@]}"
}

# ---- pulls through a proxy (test-backup-*.sh) ----

# start_proxy NAME UPSTREAM [nbdkit options and filter parameters...] --
# [nbd plugin args...]: a plain nbdkit nbd-plugin proxy on $tmp/NAME.sock in front of
# server UPSTREAM ($tmp/UPSTREAM.sock), passing export names through
# (dynamic-export=true), so that a test can count what a client reads
# (--filter=stats statsfile=...), slow it down (--filter=rate) or kill the
# connection halfway (kill_by_pidfile $tmp/NAME.pid).  The plugin
# arguments after "--" add, say, tls=require tls-certificates=DIR to reach
# a TLS upstream.
start_proxy ()
{
  local name=$1 up=$2; shift 2
  local sock="$tmp/$name.sock" pidfile="$tmp/$name.pid" log="$tmp/$name.log"
  local opts=() params=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case $1 in
      -*) opts+=("$1") ;;
      *) params+=("$1") ;;     # filter parameters go after the plugin
    esac
    shift
  done
  [ $# -gt 0 ] && shift
  rm -f "$sock"
  nbdkit -f -U "$sock" "${opts[@]}" nbd socket="$tmp/$up.sock" \
    dynamic-export=true "${params[@]}" "$@" >"$log" 2>&1 &
  echo $! >"$pidfile"
  _started "proxy $name" "$sock" "$pidfile" "$log"
}

# stats_read_bytes FILE: bytes read according to the last "read:" line of
# an nbdkit stats filter file (written when the proxy exits; nbdkit
# prints sizes with two decimals, so this is exact to 1 % or 10 KiB).
stats_read_bytes ()
{
  awk '$1 == "read:" { v = $6; u = $7 }
       END { sub (/,$/, "", u);
             m = 1;
             if (u == "KiB") m = 1024;
             if (u == "MiB") m = 1048576;
             if (u == "GiB") m = 1073741824;
             printf "%d\n", (v == "" ? 0 : v * m) }' "$1"
}

# summary FILE FIELD: FIELD (sync, read, written, zeroed, granules,
# seconds) of the "fleece-backup: sync=... read=N ..." line in FILE.
summary ()
{
  sed -n 's/.*fleece-backup: sync=/sync=/p' "$1" | tail -1 |
    tr ' ' '\n' | sed -n "s/^$2=//p"
}

# bitmap_bits URI: the indices of the bits set in a bitmap export
# (docs/bitmap-export.md: a header, then one bit per granule, least
# significant bit first), one per line; checks the header's magic.
bitmap_bits ()
{
  nbdcopy "$1" - | python3 -c '
import struct, sys
d = sys.stdin.buffer.read()
assert d[:8] == b"FLEECEBM", "bad bitmap export magic"
hdr = struct.unpack_from("<IIIIQQQ", d, 8)
size, nbits = hdr[3], hdr[5]
for i in range(nbits):
    if d[size + i // 8] >> (i % 8) & 1:
        print(i)
'
}

# bitmap_count NAME BITMAP: the "count" of BITMAP in query-bitmaps.
bitmap_count ()
{
  jget "$(ctl "$1" --json bitmap list)" \
    "[b['count'] for b in d if b['name'] == '$2'][0]"
}

# backup LOG ARGS...: fleece-backup ARGS, its stderr (errors and the
# summary line) kept in LOG as well, for "summary LOG FIELD" ("ok"
# captures the command's own output).
backup ()
{
  local log=$1 st=0; shift
  fleece-backup "$@" 2>"$log" || st=$?
  cat "$log" >&2
  return "$st"
}

# install_dirs: set the directories "make install" uses (prefix, bindir,
# ..., systemdsystemunitdir), as configure set them in the build's top
# Makefile, each expanded (${prefix}, ${libdir} ... in them).
install_dirs ()
{
  local v
  for v in prefix exec_prefix bindir libdir datarootdir datadir mandir \
           PACKAGE_TARNAME docdir nbdkit_plugindir systemdsystemunitdir \
           sysusersdir bashcompletiondir; do
    eval "$v=\"$(sed -n "s|^$v = ||p" "$abs_top_builddir/Makefile")\""
  done
}

# install_tree ROOT: "make install DESTDIR=ROOT" of this build, bounded;
# the outer make's jobserver and flags are not this make's.
install_tree ()
{
  timeout -k 5 300 env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL \
    make -C "$abs_top_builddir" install DESTDIR="$1"
}

# ---- repositories of restore points (test-backup-repo*.sh, ...) ----

# requires_pull: what a fleece-backup pull test runs (qemu-io writes the
# disk, nbdcopy makes the reference copies).
requires_pull ()
{
  requires qemu-io --version
  requires nbdcopy --version
  requires fleece-backup --help
}

# requires_repo: what every repository test runs (QEMU writes the
# points; nbdcopy pulls the references).
requires_repo ()
{
  requires qemu-img --version
  requires qemu-nbd --version
  requires_pull
}

# start_repo_server NAME DISK: the Fleece server of DISK, 64 KiB
# clusters, control socket $tmp/NAME.ctl.
start_repo_server ()
{
  start_nbdkit "$1" -- disk="$2" store="$tmp/$1.store" \
    control="$tmp/$1.ctl" cluster-size=64K
}

# free_port: a TCP port on 127.0.0.1 nobody listens on right now.
free_port ()
{
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# ---- ssh to this machine (fleece-backup --control ssh://...) ----

requires_sshd ()
{
  requires ssh -V
  requires test -x "$(command -v ssh-keygen)"
  requires test -x /usr/sbin/sshd
}

# start_sshd: sshd on 127.0.0.1 (port $sshd_port), with a throwaway host
# key and user key, stopped by the test's cleanup; $tmp/ssh is ssh with
# that configuration, and FLEECE_BACKUP_SSH names it.  Wait for it with
# wait_for 10 "$tmp/ssh" 127.0.0.1 true.
start_sshd ()
{
  sshd_port=$(free_port)
  ssh-keygen -q -t ed25519 -N '' -f "$tmp/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$tmp/user_key"
  cp "$tmp/user_key.pub" "$tmp/authorized_keys"
  chmod 600 "$tmp/authorized_keys"
  cat >"$tmp/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $sshd_port
HostKey $tmp/host_key
PidFile $tmp/sshd.pid
AuthorizedKeysFile $tmp/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding no
X11Forwarding no
EOF
  # As root, sshd needs its privilege separation directory (made at boot
  # by systemd-tmpfiles on a normal system).
  [ "$(id -u)" = 0 ] && mkdir -p /run/sshd
  timeout -k 5 300 /usr/sbin/sshd -D -e -f "$tmp/sshd_config" \
    2>"$tmp/sshd.log" &
  echo $! >"$tmp/sshd.tpid"
  cleanup_fn "kill_by_pidfile '$tmp/sshd.tpid'"
  echo "[127.0.0.1]:$sshd_port $(cut -d' ' -f1,2 "$tmp/host_key.pub")" \
    >"$tmp/known_hosts"
  cat >"$tmp/ssh_config" <<EOF
Host 127.0.0.1
  Port $sshd_port
  User $(id -un)
  IdentityFile $tmp/user_key
  IdentitiesOnly yes
  UserKnownHostsFile $tmp/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
EOF
  printf '#!/bin/sh\nexec ssh -F %s "$@"\n' "$tmp/ssh_config" >"$tmp/ssh"
  chmod +x "$tmp/ssh"
  export FLEECE_BACKUP_SSH=$tmp/ssh
}
