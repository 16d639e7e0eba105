#!/usr/bin/env bash
# Each installed service's ExecStart run the way systemd runs it (issue
# 18): the environment from the unit and from /etc/fleece/INSTANCE.conf,
# the command line expanded by systemd's rules (tests/unit-argv.py), the
# NBD socket passed by socket activation (systemd-socket-activate, from
# the .socket unit's ListenStream), and NOTIFY_SOCKET bound and read by
# this test.  Two "hosts" on this machine: a (nbdkit with the plugin, the
# primary, the backup cycle) and b (the secondary), over 127.0.0.1.
# /etc/fleece, /run/fleece, /var/lib/fleece and the programs' directory
# are stand-ins under $tmp; the installed files (make install DESTDIR)
# are the ones run, the plugin by its installed path.
#
#  - nbdkit starts on the first connection to the unit's socket, and its
#    control socket and a snapshot pull work;
#  - the secondary says READY=1 once it listens, the primary once paired,
#    both STATUS= with the committed epoch and the lag, WATCHDOG=1 when
#    WATCHDOG_USEC asks for it (and never when it does not), STOPPING=1
#    on SIGTERM, and exit 0;
#  - the nightly backup service runs its cycle into a repository.
source "${abs_top_srcdir:-..}/tests/colo/colod-functions.sh"
requires systemd-socket-activate --version
requires python3 --version
requires nbdinfo --version
requires qemu-img --version
requires qemu-io --version
requires make --version
requires timeout --version

life=120
[ -n "$VG" ] && life=600
root=$tmp/root
ok "make install DESTDIR=..." install_tree "$root"
install_dirs
units=$root$systemdsystemunitdir
plugin=$root$nbdkit_plugindir/nbdkit-fleece-plugin.so

# unit HOST UNIT: set unit_type, unit_env, unit_argv, unit_listen for
# UNIT's instance vm1 on HOST.
unit ()
{
  local h=$tmp/$1
  mkdir -p "$h/etc" "$h/run" "$h/lib"
  eval "$(python3 "$abs_top_srcdir/tests/unit-argv.py" "$units/$2" vm1 \
            "/etc/fleece/=$h/etc/" "/run/fleece/=$h/run/" \
            "/var/lib/fleece/=$h/lib/" "$bindir/=$root$bindir/")"
}

# notify_listen NAME: bind $tmp/NAME.notify (a datagram socket, as
# systemd's NOTIFY_SOCKET) and append each message's lines to
# $tmp/NAME.notify.log.
notify_listen ()
{
  local sock=$tmp/$1.notify
  timeout -k 5 "$life" python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a") as log:
    while True:
        log.write(s.recv(4096).decode() + "\n")
        log.flush()
' "$sock" "$tmp/$1.notify.log" &
  echo $! >"$tmp/$1.notify.pid"
  cleanup_fn "kill_by_pidfile '$tmp/$1.notify.pid' 1"
  wait_for 10 test -S "$sock"
}
notified () { grep -Eq -- "$2" "$tmp/$1.notify.log"; }
show_notified () { sed "s/^/# $1 notify: /" "$tmp/$1.notify.log" | tail -8; }

# start_unit NAME HOST UNIT [VAR=VALUE...]: run UNIT's ExecStart for HOST
# in the background with a clean environment, the unit's, NOTIFY_SOCKET
# and the VARs (WATCHDOG_USEC), and as its main PID ($$ of the exec'd
# shell: WATCHDOG_PID); PID in $tmp/NAME.pid, log $tmp/NAME.log.
# In an --enable-sanitizers build nbdkit needs the ASan runtime first
# (tests/functions.sh); a clean environment must keep that, as
# start_nbdkit does.
san_env=()
[ -n "${FLEECE_ASAN_PRELOAD:-}" ] && san_env=(LD_PRELOAD="$FLEECE_ASAN_PRELOAD")

start_unit ()
{
  local name=$1 host=$2 u=$3; shift 3
  unit "$host" "$u"
  notify_listen "$name" || return 1
  # shellcheck disable=SC2016,SC2086
  timeout -k 5 "$life" env -i PATH="$PATH" "${unit_env[@]}" \
    NOTIFY_SOCKET="$tmp/$name.notify" "$@" \
    sh -c 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"' sh \
    $VG "${unit_argv[@]}" >"$tmp/$name.log" 2>&1 &
  echo $! >"$tmp/$name.runner"
  cleanup_fn "kill_by_pidfile '$tmp/$name.runner' 1"
}

# main_pid NAME: the PID of the unit's program, the child of its timeout.
main_pid () { ps -o pid= --ppid "$(cat "$tmp/$1.runner")" | tr -d ' '; }

# stop_unit NAME: SIGTERM to the program, which must be gone within the
# stop bound and exit 0.
stop_unit ()
{
  local pid runner st=0
  pid=$(main_pid "$1") && [ -n "$pid" ] || return 1
  runner=$(cat "$tmp/$1.runner")
  kill "$pid"
  pid_gone "$pid" "$(stop_seconds)" || { kill -9 "$pid"; return 1; }
  wait "$runner" || st=$?
  [ "$st" = 0 ] || { echo "# $1 exited with status $st"; tail -5 "$tmp/$1.log"; }
  [ "$st" = 0 ]
}

size=$((32 << 20))
truncate -s $size "$tmp/a.disk" "$tmp/b.disk"
port=$(free_port)
mkdir -p "$tmp/a/etc" "$tmp/b/etc"
cat >"$tmp/a/etc/vm1.conf" <<CONF
# host a: the disk served, replicated and backed up
DISK=$tmp/a.disk
COLOD_PEER=127.0.0.1:$port
COLOD_TLS=--insecure
COLOD_ARGS="--interval 200"
BACKUP_REPO=$tmp/repo
CONF
cat >"$tmp/b/etc/vm1.conf" <<CONF
# host b: the replica
DISK=$tmp/b.disk
COLOD_LISTEN=127.0.0.1:$port
COLOD_TLS='--insecure'
CONF

# ---- nbdkit, socket-activated ----
unit a fleece-nbdkit@.socket
listen=${unit_listen[0]}
unit a fleece-nbdkit@.service
is "$unit_type" simple "fleece-nbdkit@: Type=simple (nbdkit in the foreground)"
for i in "${!unit_argv[@]}"; do
  [ "${unit_argv[$i]}" = fleece ] && unit_argv[$i]=$plugin
done
diag "nbdkit: ${unit_argv[*]}"
sa_env=()
for e in "${unit_env[@]}" "${san_env[@]}"; do sa_env+=(-E "$e"); done
# shellcheck disable=SC2086
timeout -k 5 "$life" env -i PATH="$PATH" systemd-socket-activate \
  -l "$listen" "${sa_env[@]}" $VG "${unit_argv[@]}" >"$tmp/nbdkit.log" 2>&1 &
echo $! >"$tmp/nbdkit.runner"
cleanup_fn "kill_by_pidfile '$tmp/nbdkit.runner' 1"
ok "the socket unit's socket listens" wait_for 30 test -S "$listen"
ok "nbdkit waits for the first connection" test ! -e "$tmp/a/run/vm1.ctl"
uri="nbd+unix:///?socket=$listen"
ok "the first connection starts nbdkit, which serves the disk" \
   timeout 60 nbdinfo --size "$uri"
ok "nbdkit made its control socket where the unit says" \
   wait_for 30 test -S "$tmp/a/run/vm1.ctl"
ok "and its store where the unit says" test -s "$tmp/a/lib/vm1.store"
ok "a live write" timeout 60 qemu-io -f raw -c "write -P 0x5a 1M 2M" "$uri"
ctl=("$root$bindir/fleecectl" -s "$tmp/a/run/vm1.ctl")
ok "fleecectl (installed) creates a snapshot" timeout 60 "${ctl[@]}" snapshot create s1
ok "fleece-backup (installed) pulls it" \
   timeout 60 "$root$bindir/fleece-backup" --quiet \
     "nbd+unix:///snapshot/s1?socket=$listen" "$tmp/s1.img"
ok "the pull is the disk" cmp "$tmp/s1.img" "$tmp/a.disk"
ok "the snapshot is deleted" timeout 60 "${ctl[@]}" snapshot delete s1

# ---- the secondary (no watchdog asked) and the primary (1 s watchdog) ----
unit b fleece-colod-secondary@.service
is "$unit_type" notify "fleece-colod-secondary@: Type=notify"
start_unit secondary b fleece-colod-secondary@.service
ok "the secondary says READY=1 once it listens" \
   wait_for 60 notified secondary '^READY=1$'
ok "its status line says where it listens, and that no epoch is there yet" \
   notified secondary "^STATUS=listening 127.0.0.1:$port; no epoch committed yet\$"

unit a fleece-colod-primary@.service
is "$unit_type" notify "fleece-colod-primary@: Type=notify"
start_unit primary a fleece-colod-primary@.service WATCHDOG_USEC=1000000
ok "the primary says READY=1 once paired" \
   wait_for 60 notified primary '^READY=1$'
ok "its status line names the peer" \
   notified primary "^STATUS=connected 127.0.0.1:$port"
ok "the primary's status line gives the committed epoch and the lag" \
   wait_for 60 notified primary '^STATUS=connected .*; epoch [1-9][0-9]* committed, lag [0-9]+ ms$'
ok "the secondary's too" \
   wait_for 60 notified secondary '^STATUS=connected.*; epoch [1-9][0-9]* committed, lag [0-9]+ ms$'
pings () { grep -c '^WATCHDOG=1$' "$tmp/$1.notify.log"; }
three_pings () { [ "$(pings primary)" -ge 3 ]; }
t0=$(date +%s%N)
ok "the primary pings its 1 s watchdog again and again" wait_for 10 three_pings
diag "3 pings within $(( ($(date +%s%N) - t0) / 1000000 )) ms of this check"
ok "the secondary, not asked, never pings" \
   test "$(pings secondary)" = 0
ok "READY=1 is said once" \
   test "$(grep -c '^READY=1$' "$tmp/primary.notify.log")" = 1
show_notified primary

# ---- the nightly backup cycle (fleece-backup backup, issue 16) ----
unit a fleece-backup@.service
is "$unit_type" oneshot "fleece-backup@: Type=oneshot"
ok "fleece-backup init makes the unit's repository" \
   timeout 60 "$root$bindir/fleece-backup" init "$tmp/repo"
ok "the backup service's cycle succeeds" \
   timeout -k 5 "$life" env -i PATH="$PATH" "${unit_env[@]}" \
     "${unit_argv[@]}"
point=$(find "$tmp/repo" -name '*.qcow2' | head -1)
ok "the repository holds a qcow2 restore point ($point)" test -n "$point"
ok "which is the disk (nothing was written since)" \
   timeout 60 qemu-img compare -f raw -F qcow2 "$tmp/a.disk" "$point"

# ---- stops ----
ok "the primary stops on SIGTERM, exit status 0" stop_unit primary
ok "having said STOPPING=1" notified primary '^STOPPING=1$'
ok "the secondary stops on SIGTERM, exit status 0" stop_unit secondary
ok "having said STOPPING=1" notified secondary '^STOPPING=1$'
nbdkit_pid=$(main_pid nbdkit)
ok "nbdkit stops on SIGTERM" stop_pid nbdkit "$nbdkit_pid"
