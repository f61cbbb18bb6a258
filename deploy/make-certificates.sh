#!/usr/bin/env bash
# Make the TLS material of a federation: a certificate authority, and the SuperLink's key and
# certificate signed by it. SuperNodes and the `flwr` CLI trust the CA (ca.crt); the SuperLink
# serves server.pem/server.key.
#
#   deploy/make-certificates.sh OUT_DIR [SUBJECT_ALT_NAME ...]
#
# Each SUBJECT_ALT_NAME is how clients reach the SuperLink, e.g. IP:10.0.0.5 or
# DNS:superlink.example.org; localhost and 127.0.0.1 are always included.
set -euo pipefail
out=${1:?usage: make-certificates.sh OUT_DIR [SUBJECT_ALT_NAME ...]}
shift
mkdir -p "$out"
sans="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do sans="$sans,$name"; done
days=${CERT_DAYS:-365}

openssl ecparam -name secp384r1 -genkey -noout -out "$out/ca.key"
openssl req -x509 -new -key "$out/ca.key" -sha384 -days "$days" -subj "/CN=Federation CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$out/ca.crt"

openssl ecparam -name secp384r1 -genkey -noout -out "$out/server.key"
openssl req -new -key "$out/server.key" -subj "/CN=superlink" -out "$out/server.csr"
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\nextendedKeyUsage=serverAuth\n' \
  "$sans" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -days "$days" -sha384 -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 600 "$out/ca.key" "$out/server.key"
echo "TLS material in $out: ca.crt (give to SuperNodes and the CLI), server.pem + server.key (SuperLink); SANs: $sans"
