#!/usr/bin/env bash
# make-pki.sh DIR: throwaway credentials for the TLS tests, made with
# GnuTLS's certtool and psktool at test time (the layout is the one
# libnbd's tests/make-pki.sh makes, which nbdkit --tls-certificates and
# libnbd's tls-certificates both read).
#
#   DIR/        ca-cert.pem ca-key.pem            the test CA
#               server-cert.pem server-key.pem    cn=localhost, dns_name
#                                                 localhost, 127.0.0.1, ::1
#               client-cert.pem client-key.pem    signed by the test CA
#   DIR-other/  ca-cert.pem                       a copy of DIR's CA, so a
#                                                 client using DIR-other
#                                                 still trusts the server
#               client-cert.pem client-key.pem    signed by an unrelated CA,
#                                                 which a server with
#                                                 --tls-verify-peer refuses
#               other-ca-cert.pem other-ca-key.pem  that unrelated CA
#   DIR/keys.psk        user alice, a random key (psktool)
#   DIR/wrong-keys.psk  user alice, another random key
#
# Keys are ECDSA P-256 (GnuTLS's default priorities refuse smaller curves),
# which certtool makes in milliseconds.
set -e

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 DIR" >&2
  exit 1
fi
dir=$1
other=$1-other
mkdir -p "$dir" "$other"

key ()
{
  certtool --generate-privkey --key-type=ecdsa --curve=secp256r1 \
    --outfile "$1" 2>/dev/null
  chmod 0600 "$1"
}

# ca DIR PREFIX CN: a self-signed CA in DIR/PREFIX-cert.pem, -key.pem
ca ()
{
  key "$1/$2-key.pem"
  cat >"$1/$2.info" <<EOF
cn = $3
ca
cert_signing_key
expiration_days = 2
EOF
  certtool --generate-self-signed --load-privkey "$1/$2-key.pem" \
    --template "$1/$2.info" --outfile "$1/$2-cert.pem" 2>/dev/null
}

# leaf CA-PREFIX OUT-PREFIX TEMPLATE-LINES: a certificate signed by a CA
leaf ()
{
  local ca=$1 out=$2; shift 2
  key "$out-key.pem"
  printf '%s\n' "$@" "expiration_days = 2" >"$out.info"
  certtool --generate-certificate \
    --load-ca-certificate "$ca-cert.pem" --load-ca-privkey "$ca-key.pem" \
    --load-privkey "$out-key.pem" --template "$out.info" \
    --outfile "$out-cert.pem" 2>/dev/null
}

ca "$dir" ca "Fleece test CA"
leaf "$dir/ca" "$dir/server" "organization = Fleece test" "cn = localhost" \
  "dns_name = localhost" "ip_address = 127.0.0.1" "ip_address = ::1" \
  tls_www_server encryption_key signing_key
leaf "$dir/ca" "$dir/client" "organization = Fleece test" "cn = alice" \
  tls_www_client encryption_key signing_key

ca "$other" other-ca "Some other CA"
cp "$dir/ca-cert.pem" "$other/ca-cert.pem"
leaf "$other/other-ca" "$other/client" "organization = Elsewhere" \
  "cn = mallory" tls_www_client encryption_key signing_key

rm -f "$dir/keys.psk" "$dir/wrong-keys.psk"
psktool -u alice -p "$dir/keys.psk" >/dev/null
psktool -u alice -p "$dir/wrong-keys.psk" >/dev/null
chmod 0600 "$dir/keys.psk" "$dir/wrong-keys.psk"
rm -f "$dir"/*.info "$other"/*.info
