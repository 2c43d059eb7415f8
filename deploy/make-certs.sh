#!/usr/bin/env bash
# A private CA, a server certificate and a client certificate (PEM, ECDSA P-256) for lipsync's TLS and mutual TLS.
#   deploy/make-certs.sh OUT_DIR [NAME ...]
# The server certificate names localhost, 127.0.0.1, ::1 and every NAME (a DNS name or an IP address).
# Meant for development and tests; in production use your organisation's CA or cert-manager.
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: $0 OUT_DIR [SERVER_NAME ...]" >&2; exit 2; fi
out=$1; shift
command -v openssl >/dev/null || { echo "$0: openssl is needed" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
umask 077
names="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then names="$names,IP:$name"; else names="$names,DNS:$name"; fi
done
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca.key
openssl req -x509 -new -key ca.key -sha256 -days 825 -subj "/CN=lipsync CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem
sign() {  # sign NAME SUBJECT EXTENSIONS
  key "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  printf '%b\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 825 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
sign server "/CN=lipsync server" "subjectAltName=$names\nextendedKeyUsage=serverAuth"
sign client "/CN=lipsync client" "extendedKeyUsage=clientAuth"
rm -f ca.srl
chmod 644 ./*.pem
echo "wrote $(pwd)/{ca,server,client}.{pem,key} (server names: $names)"
