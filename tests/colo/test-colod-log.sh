#!/usr/bin/env bash
# fleece-colod's log and metrics (issue 18):
#  - the steady state is summarised (--log-summary-interval 1 here, 60 s
#    by default), not logged an epoch at a time; an anomaly (a lost
#    peer, the failover state it starts) is logged at once, after the
#    pending summary;
#  - with --log journal (secondary b) each record goes to the journal
#    with its priority and fields (FLEECE_ROLE, FLEECE_EVENT, FLEECE_DATA,
#    FLEECE_<MEMBER>), so that an event nobody subscribed to is kept;
#    journald is stood in for by tests/journal-listen.py on
#    /run/systemd/journal/socket, in a tmpfs mounted in this test's own
#    mount namespace (the test re-executes itself under unshare -m);
#  - without --log, stderr that is the journal's stream (JOURNAL_STREAM)
#    makes the journal the default;
#  - --log syslog: syslog(3) records on /dev/log (a stand-in socket on a
#    tmpfs over /dev, with /dev/null and the random devices bound back),
#    with facility daemon and the priority, errors also on stderr;
#  - fleece-colod metrics and --metrics-listen: Prometheus text that a
#    strict parser (tests/prom-check.py) accepts, with the epochs made.
if [ -z "${FLEECE_IN_NS:-}" ]; then
  exec env FLEECE_IN_NS=1 unshare -m --propagation private bash "$0" "$@"
fi
source "${abs_top_srcdir:-../..}/tests/colo/colod-functions.sh"
requires qemu-io --version
requires curl --version
check="python3 ${abs_top_srcdir:-../..}/tests/prom-check.py"

ok "a stand-in journald listens" start_journal
# journal FIELD VALUE: the journal has a record with FIELD=VALUE.
journal () { python3 -c 'import json,sys
sys.exit(not any(json.loads(l).get(sys.argv[2]) == sys.argv[3] for l in open(sys.argv[1])))' "$tmp/journal" "$1" "$2"; }

mkdir -p "$tmp/a" "$tmp/b"
truncate -s 8M "$tmp/a/disk" "$tmp/b/disk"
pb=$(free_port)
pm=$(free_port)
ok "nbdkit on a" start_plugin a
ok "secondary b starts (--log journal)" start_colod b secondary \
  --listen "127.0.0.1:$pb" --disk "$tmp/b/disk" --insecure --hb-interval 100 \
  --hb-timeout 1000 --log journal --log-summary-interval 1
ok "primary a starts (stderr, --metrics-listen $pm)" start_colod a primary \
  --fleece "$tmp/a.ctl" --nbd "$(live_uri a)" --peer "127.0.0.1:$pb" \
  --insecure --interval 100 --hb-interval 100 --hb-timeout 1000 \
  --log-summary-interval 1 --metrics-listen "$pm"
ok "epochs become durable" wait_for 30 status_ge b last-committed-epoch 5
ok "writes on a" qio a "" "write -P 0x42 1M 1M"
ok "... shipped in an epoch (checkpoint)" eval 'colod a checkpoint >/dev/null'
sleep 1.5

# --- summaries, not a line per epoch ---
ok "a logged a summary of its epochs" grep -Eq \
  "fleece-colod: primary: epochs [0-9]+-[0-9]+: [0-9]+ durable in [0-9]+ s, [0-9]+ bytes, duration avg [0-9]+ ms max [0-9]+ ms, lag max [0-9]+ ms" \
  "$tmp/a/colod.log"
n=$(status a epochs-durable)
lines=$(grep -c "^.*epochs [0-9]*-[0-9]*: " "$tmp/a/colod.log")
ok "fewer summary lines ($lines) than epochs ($n)" test "$lines" -lt "$n"
ok "and no line per epoch" eval '! grep -q "EPOCH_DURABLE" "$tmp/a/colod.log"'
ok "b's summaries went to the journal" python3 -c 'import json,sys
sys.exit(not any(json.loads(l).get("MESSAGE", "").startswith("epochs ") for l in open(sys.argv[1])))' "$tmp/journal"
ok "... with FLEECE_ROLE=secondary" journal FLEECE_ROLE secondary
ok "b's PEER_CONNECTED event is in the journal" journal FLEECE_EVENT PEER_CONNECTED

# --- metrics ---
ok "fleece-colod metrics (a), checked strictly" \
  eval 'colod a metrics >"$tmp/ma" && $check "$tmp/ma"'
ok "fleece-colod metrics (b), checked strictly" \
  eval 'colod b metrics >"$tmp/mb" && $check "$tmp/mb"'
val () { $check "$1" "$2"; }
last=$(val "$tmp/mb" fleece_colod_last_committed_epoch)
ok "b: last committed epoch $last >= 5" test "$last" -ge 5
is "$(val "$tmp/ma" fleece_colod_peer_connected)" 1 "a: peer connected"
is "$(val "$tmp/ma" 'fleece_colod_failover_state{state="none"}')" 1 "a: failover none"
c=$(val "$tmp/ma" fleece_colod_epoch_duration_seconds_count)
ok "a: the duration histogram counted the epochs ($c)" test "$c" -ge 5
bs=$(val "$tmp/ma" fleece_colod_epoch_bytes_sum)
ok "a: the epochs' bytes include the 1 MiB written ($bs)" test "$bs" -ge 1048576
ok "a: RPO lag in seconds" val "$tmp/ma" fleece_colod_rpo_lag_seconds
ok "curl scrapes a's --metrics-listen $pm (127.0.0.1)" \
  eval 'curl -sS -f -o "$tmp/mh" "http://127.0.0.1:$pm/metrics" && $check "$tmp/mh"'
is "$(val "$tmp/mh" fleece_colod_peer_connected)" 1 "... with the same values"

# --- an anomaly at once, with the summary before it ---
ok "kill -9 a's primary daemon" kill9_colod a
ok "b logged PEER_LOST at once, with priority 4 (warning)" \
  wait_for 10 journal FLEECE_EVENT PEER_LOST
rec=$(grep '"FLEECE_EVENT": "PEER_LOST"' "$tmp/journal" | head -1)
diag "$rec"
is "$(jget "$rec" 'd["PRIORITY"]')" 4 "PEER_LOST: PRIORITY 4"
ok "FAILOVER_STATE none -> require, with FLEECE_TO" journal FLEECE_TO require
ok "the data in FLEECE_DATA" grep -q '"FLEECE_DATA": "{\\"from\\":\\"none\\",\\"to\\":\\"require\\"' "$tmp/journal"
ok "nothing of b on its stderr but what the journal did not take" \
  eval '! grep -q "PEER_LOST" "$tmp/b/colod.log"'
ok "b stops cleanly" stop_colod b

# --- the default under systemd: stderr is the journal's stream ---
: >"$tmp/c.log"
mkdir -p "$tmp/c"
# env: a plain command, which this shell's child execs (a child that
# kept its shell would run the EXIT trap when stopped).
stream=$(stat -c '%d:%i' "$tmp/c.log")
pc=$(free_port)
env JOURNAL_STREAM="$stream" $VG "$COLOD" secondary \
  --state "$tmp/c/state" --listen "127.0.0.1:$pc" --disk "$tmp/b/disk" \
  --insecure >>"$tmp/c.log" 2>&1 &
echo $! >"$tmp/c/colod.pid"
cleanup_fn "kill_by_pidfile '$tmp/c/colod.pid'"
ok "without --log, c logs to the journal" wait_for 10 python3 -c 'import json,sys
sys.exit(not any(json.loads(l).get("MESSAGE", "").startswith("listening on 127.0.0.1:" + sys.argv[2]) and json.loads(l).get("PRIORITY") == "5" for l in open(sys.argv[1])))' "$tmp/journal" "$pc"
ok "c stops cleanly" stop_colod c
ok "the plugin on a stops cleanly" stop_nbdkit a

# --- syslog ---
mkdir "$tmp/hostdev"
mount --bind /dev "$tmp/hostdev"
mount -t tmpfs tmpfs /dev
cleanup_fn "umount -R /dev; umount '$tmp/hostdev'"
for d in null zero random urandom; do
  : >"/dev/$d" && mount --bind "$tmp/hostdev/$d" "/dev/$d"
done
python3 "${abs_top_srcdir:-../..}/tests/journal-listen.py" --raw /dev/log \
  "$tmp/syslog" &
echo $! >"$tmp/syslog.pid"
cleanup_fn "kill_by_pidfile '$tmp/syslog.pid'"
ok "a stand-in /dev/log listens" wait_for 5 test -S /dev/log
start_colod d secondary --listen "127.0.0.1:$(free_port)" --disk "$tmp/b/disk" \
  --insecure --log syslog
ok "d's notice is in syslog: facility daemon, priority notice (<29>)" \
  wait_for 10 grep -Eq '^<29>.*fleece-colod\[[0-9]+\]: secondary: listening on 127.0.0.1' "$tmp/syslog"
ok "... and not on its stderr" eval '! grep -q "listening on" "$tmp/d/colod.log"'
ok "d stops cleanly" stop_colod d
ok_fails "an error is on stderr too: a second daemon on d's state" \
  "another fleece-colod is running|control socket" eval '
  start_colod d secondary --listen 127.0.0.1:1 --disk "$tmp/b/disk" --insecure --log syslog &&
  "$COLOD" secondary --state "$tmp/d/state" --listen 127.0.0.1:1 \
    --disk "$tmp/b/disk" --insecure --log syslog'
ok "... and in syslog at priority err (<27>)" \
  grep -Eq '^<27>.*another fleece-colod is running' "$tmp/syslog"
ok "d stops cleanly" stop_colod d
