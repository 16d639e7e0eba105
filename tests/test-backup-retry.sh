#!/usr/bin/env bash
# An incremental pull whose server goes away halfway exits non-zero with
# a clear error; the frozen bitmap and the snapshot are still there, so a
# retry succeeds and gives the exact checkpoint.  Snapshots live only as
# long as the nbdkit process, so "the server goes away" is a slow proxy
# (nbdkit nbd plugin + rate filter) in front of the real server, killed by
# PID in the middle of the pull; the retry goes to the server directly.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires_pull
make_pki

disk=$tmp/disk
make_disk "$disk" 32M 0x11
ok "nbdkit starts (--tls=require)" \
   start_nbdkit s --tls=require --tls-certificates="$tmp/pki" --tls-verify-peer \
   -- disk="$disk" store="$tmp/store" control="$tmp/s.ctl" cluster-size=64K
ok "checkpoint c1" ctl s checkpoint c1
ok "full pull of c1" fleece-backup --sync=full \
   "$(x509_uri s snapshot/c1)" "$tmp/base.img"
ok "day 2: 24 MiB rewritten" qio_x509 s "" -- "write -P 0x22 0 24M"
ok "checkpoint c2" ctl s checkpoint c2
cp "$disk" "$tmp/ref2"
n=$(bitmap_count s c1)
is "$n" 384 "bitmap c1 counts 384 granules"

# 24 MiB at 4 MB/s (the rate filter counts bits): about 6 s.
ok "slow proxy starts" start_proxy p s --filter=rate rate=32M \
   -- tls=require tls-certificates="$tmp/pki"
cp "$tmp/base.img" "$tmp/backup.img"
timeout 60 fleece-backup --sync=incremental --since=c1 \
   "nbd+unix:///snapshot/c2?socket=$tmp/p.sock" "$tmp/backup.img" \
   >"$tmp/pull.out" 2>&1 &
pull=$!
sleep 1.5
ok "the pull is still running halfway" kill -0 "$pull"
ok "kill the proxy by PID" kill_by_pidfile "$tmp/p.pid"
status=0
wait "$pull" || status=$?
diag "fleece-backup exited with status $status:"
diag "$(cat "$tmp/pull.out")"
ok "the interrupted pull exits non-zero (not by timeout)" \
   test "$status" -ne 0 -a "$status" -ne 124
ok "it says what failed" grep -Eqi 'error|fail|disconnect|closed|reset' "$tmp/pull.out"
ok "the target is only partly updated" \
   test "$(sum "$tmp/backup.img")" != "$(sum "$tmp/ref2")"

bl=$(ctl s --json bitmap list)
is "$(jget "$bl" '[(b["frozen"], b["count"]) for b in d if b["name"] == "c1"]')" \
   "[(True, $n)]" "bitmap c1 still there, frozen, all $n granules"
ok "snapshot c2 still there" grep -q '"c2"' <<<"$(ctl s --json snapshot list)"

ok "retry, directly over TLS" backup "$tmp/retry.err" --sync=incremental --since=c1 \
   "$(x509_uri s snapshot/c2)" "$tmp/backup.img"
diag "$(cat "$tmp/retry.err")"
is "$(sum "$tmp/backup.img")" "$(sum "$tmp/ref2")" "the retry gives exactly c2"
is "$(summary "$tmp/retry.err" granules)" "$n" "it moved the $n granules"
ok "nbdkit stops cleanly" stop_nbdkit s
