#!/usr/bin/env bash
# fleece-colod -v: the transport's debug messages (colo/tls.c, through
# colo_tls_set_log) reach the daemon's log: the listening socket, and a
# completed handshake with the peer's identity (a TLS client with the
# test CA's client certificate, gnutls-cli).  Without -v they do not,
# for the same listening and the same handshake.
source "${abs_top_srcdir:-../..}/tests/colo/colod-functions.sh"
requires gnutls-cli --version

make_pki
mkdir -p "$tmp/b" "$tmp/q"
truncate -s 1M "$tmp/b/disk" "$tmp/q/disk"
port=$(free_port)

# handshake PORT: a TLS client (the test CA's client certificate, CN
# alice) completes a handshake with the daemon on PORT, then leaves.
handshake ()
{
  timeout -k 5 20 gnutls-cli -p "$1" 127.0.0.1 \
    --x509cafile "$tmp/pki/ca-cert.pem" \
    --x509certfile "$tmp/pki/client-cert.pem" \
    --x509keyfile "$tmp/pki/client-key.pem" </dev/null >"$tmp/cli.log" 2>&1
}

ok "a secondary with -v starts" start_colod b secondary -v \
  --listen "127.0.0.1:$port" --disk "$tmp/b/disk" \
  --tls-certificates "$tmp/pki"
# The control socket comes first: the listener may follow it.
ok "-v logs the transport's listening socket" \
  wait_for 30 grep -Eq "listening on 127\.0\.0\.1:$port\$" "$tmp/b/colod.log"
ok "a TLS client completes a handshake" \
  handshake "$port"
ok "-v logs the handshake and the peer's identity" \
  wait_for 30 grep -Eq "TLS with 127\.0\.0\.1:[0-9]+: \(TLS1\.3\).*peer CN=alice" "$tmp/b/colod.log"
pid=$(cat "$tmp/b/colod.pid")
ok "the secondary stops" stop_colod b
ok "... and is gone" eval "! kill -0 $pid 2>/dev/null"

port=$(free_port)
ok "a secondary without -v starts" start_colod q secondary \
  --listen "127.0.0.1:$port" --disk "$tmp/q/disk" \
  --tls-certificates "$tmp/pki"
ok "... and listens (its own log line, not the transport's)" \
  wait_for 30 grep -q "listening on 127\.0\.0\.1:$port, disk" \
  "$tmp/q/colod.log"
ok "a TLS client completes a handshake with it" \
  handshake "$port"
ok "... which the daemon logs when it has closed" \
  wait_for 30 grep -q "closed before its HELLO" "$tmp/q/colod.log"
ok "without -v the transport logs nothing" \
  eval '! grep -Eq "listening on 127\.0\.0\.1:$port\$|TLS with" \
    "$tmp/q/colod.log"'
pid=$(cat "$tmp/q/colod.pid")
ok "the secondary stops" stop_colod q
ok "... and is gone" eval "! kill -0 $pid 2>/dev/null"

