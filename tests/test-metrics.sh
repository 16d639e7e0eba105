#!/usr/bin/env bash
# The plugin's metrics (fleecectl metrics, the control command metrics):
# Prometheus text that a strict parser (prom-check.py) accepts, whose
# values follow what clients do: N bytes written make
# fleece_written_bytes_total grow by N, a write over a snapshot makes
# copies and copy latency observations.  The same text over HTTP
# (metrics-listen=PORT: 127.0.0.1), scraped with curl.
source "${abs_top_srcdir:-..}/tests/functions.sh"
requires qemu-io --version
requires curl --version
check="python3 ${abs_top_srcdir:-..}/tests/prom-check.py"

# The checker itself refuses what it must (else it could not fail).
printf '# HELP x_bytes a\n# TYPE x_bytes counter\nx_bytes 1\n' >"$tmp/bad1"
ok_fails "prom-check refuses a counter not named *_total" "_total" \
   $check "$tmp/bad1"
printf '# HELP h a\n# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n' >"$tmp/bad2"
ok_fails "prom-check refuses buckets that are not cumulative" "cumulative" \
   $check "$tmp/bad2"
printf 'x_total 1\n' >"$tmp/bad3"
ok_fails "prom-check refuses a sample without HELP and TYPE" "before" \
   $check "$tmp/bad3"

disk=$tmp/disk
make_disk "$disk" 16M 0x11
port=$(free_port)
ok "nbdkit starts with metrics-listen=$port" start_nbdkit m -- \
   disk="$disk" store="$tmp/store" control="$tmp/m.ctl" metrics-listen="$port"

# metrics FILE: scrape through fleecectl into FILE, check it strictly.
metrics () { ctl m metrics >"$1" && $check "$1"; }
val () { $check "$1" "$2"; }

ok "fleecectl metrics, checked strictly" metrics "$tmp/m0"
ok "it has HELP and TYPE lines" grep -q '^# TYPE fleece_copy_duration_seconds histogram$' "$tmp/m0"
w0=$(val "$tmp/m0" fleece_written_bytes_total)
ok "qemu-io writes 1 MiB + 4 KiB" qio m "" "write -P 0x22 1M 1M" "write -P 0x23 8M 4k"
ok "metrics again" metrics "$tmp/m1"
w1=$(val "$tmp/m1" fleece_written_bytes_total)
is "$(( w1 - w0 ))" 1052672 "fleece_written_bytes_total grew by the bytes written"
is "$(val "$tmp/m1" fleece_copies_total)" 0 "no snapshot: no copies"

ok "snapshot create s" ctl m snapshot create s
ok "bitmap add b" ctl m bitmap add b
ok "qemu-io overwrites 256 KiB under the snapshot" qio m "" "write -P 0x33 0 256k"
ok "metrics after the copies" metrics "$tmp/m2"
c2=$(val "$tmp/m2" fleece_copies_total)
ok "copies grew: 4 clusters of 64 KiB ($c2)" test "$c2" -eq 4
is "$(val "$tmp/m2" fleece_copied_bytes_total)" 262144 "fleece_copied_bytes_total: 256 KiB"
n2=$(val "$tmp/m2" fleece_copy_duration_seconds_count)
ok "the copy latency histogram observed the copies ($n2)" test "$n2" -ge 1
is "$(val "$tmp/m2" 'fleece_copy_duration_seconds_bucket{le="+Inf"}')" "$n2" \
   "... every one of them in the +Inf bucket"
is "$(val "$tmp/m2" 'fleece_snapshots{state="ok"}')" 1 "one snapshot, not broken"
is "$(val "$tmp/m2" 'fleece_snapshots{state="broken"}')" 0 "none broken"
is "$(val "$tmp/m2" fleece_bitmaps)" 1 "one bitmap"
is "$(val "$tmp/m2" fleece_store_used_bytes)" 262144 "store used: the 256 KiB copied"
ok "the last drain is a number of seconds" val "$tmp/m2" fleece_last_drain_seconds
url=http://127.0.0.1:$port/metrics
ok "curl scrapes $url" eval 'curl -sS -f -D "$tmp/headers" -o "$tmp/h2" "$url"'
ok "... text that the strict parser accepts" $check "$tmp/h2"
ok "... served as Prometheus text 0.0.4" \
   grep -qi '^Content-Type: text/plain; version=0.0.4' "$tmp/headers"
is "$(val "$tmp/h2" fleece_copied_bytes_total)" 262144 "... with the same values"
is "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/other")" \
   404 "another path is 404"
is "$(curl -s -o /dev/null -w '%{http_code}' -X POST -d x "$url")" \
   405 "another method is 405"
truncate -s 1M "$tmp/disk2"
ok_fails "a second nbdkit on the same port fails, naming it" \
   "metrics-listen=127.0.0.1:$port: socket, bind or listen: Address already in use" \
   timeout -k 5 20 nbdkit -f -U "$tmp/x.sock" "$FLEECE_PLUGIN" \
   disk="$tmp/disk2" store="$tmp/store2" metrics-listen="127.0.0.1:$port"
js=$(ctl m --json metrics)
is "$(jget "$js" 'd["content-type"]')" "text/plain; version=0.0.4" \
   "--json: the reply names the format"

ok "nbdkit stops cleanly" stop_nbdkit m
ok_fails "the endpoint is gone with it" "Failed to connect" \
   curl -sS -f "$url"

