#!/usr/bin/env bash
# deploy/make-pki.sh DIR [PRINCIPAL...] — the platform's Kafka certificates, made with openssl.
#
# In DIR (created mode 0700; nothing is overwritten when DIR/ca.pem exists):
#   ca.pem, ca.key              the platform CA (keep ca.key to the operator: it issues principals)
#   broker.pem/.key             the broker (CN=broker; SANs 127.0.0.1, localhost, kafka)
#   broker.keystore.pem         broker.pem + its key PKCS#8-encrypted with broker.password:
#                               Kafka reads a PEM key store file only with ssl.key.password
#                               (PBE-SHA1-3DES: Java 17 reads no PBES2 key from a PEM file)
#   <principal>.pem/.key        a client certificate (CN=<principal>) per principal; default
#                               admin registration inventory policy replication failover
#   admin.keystore.pem          admin's, for Java tools (with broker.password)
#   admin.properties            --command-config of Kafka's Java tools as admin
#   edge-ca.pem, edge-ca.key    the edge-issuing CA: an intermediate of the platform CA
#                               (pathlen 0, 5 years) whose key only the registration service
#                               holds; it signs each edge's certificate from the CSR the edge
#                               sends with its registration. The broker trusts it through
#                               ca.pem (an edge presents its certificate with edge-ca.pem).
#                               Made also in a DIR made before it existed (needs ca.key).
#   postgres.pem/.key           PostgreSQL's server certificate (CN=postgres; SANs 127.0.0.1,
#                               localhost, postgres): clients check it with ca.pem
#                               (sslmode=verify-full). Also added to an older DIR (needs ca.key).
# EC P-256 keys; certificates valid 825 days (the CA 10 years). Used by deploy/local/stack.sh
# (make up) and, once by hand, for docker-compose.yml (`deploy/make-pki.sh deploy/pki`).
set -euo pipefail

DIR="$(realpath -m "${1:?usage: make-pki.sh DIR [PRINCIPAL...]}")"
shift
PRINCIPALS=("$@")
((${#PRINCIPALS[@]})) || PRINCIPALS=(admin registration inventory policy replication failover)

command -v openssl >/dev/null 2>&1 || { echo "openssl not found (Debian package: openssl)" >&2; exit 2; }

new_key() { openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$1"; }

edge_ca() { # the edge-issuing CA, signed by the platform CA
  [[ -f edge-ca.pem ]] && return 0
  [[ -f ca.key ]] || { echo "$DIR/ca.key is needed to make the edge-issuing CA" >&2; exit 2; }
  new_key edge-ca.key
  openssl req -new -key edge-ca.key -subj "/CN=dr-edge-ca" -out edge-ca.csr 2>/dev/null
  printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n' >edge-ca.ext
  openssl x509 -req -in edge-ca.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 1825 \
    -extfile edge-ca.ext -out edge-ca.pem 2>/dev/null
  rm -f edge-ca.csr edge-ca.ext
  chmod 644 edge-ca.pem
  chmod 600 edge-ca.key
}

issue() { # NAME [SAN [EXTENDED KEY USAGE]]
  new_key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$1" -out "$1.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\n%s\n' \
    "${3:-clientAuth}" "${2:+subjectAltName=$2}" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 825 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

postgres_cert() { # PostgreSQL's server certificate, signed by the platform CA
  [[ -f postgres.pem ]] && return 0
  [[ -f ca.key ]] || { echo "$DIR/ca.key is needed to make PostgreSQL's certificate" >&2; exit 2; }
  issue postgres "IP:127.0.0.1,DNS:localhost,DNS:postgres" serverAuth
  chmod 644 postgres.pem
  chmod 600 postgres.key
}

if [[ -f "$DIR/ca.pem" ]]; then
  cd "$DIR"
  umask 077
  edge_ca
  postgres_cert
  exit 0
fi
mkdir -p "$DIR"
chmod 700 "$DIR"
cd "$DIR"
umask 077

new_key ca.key
openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=dr-platform-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.pem 2>/dev/null

keystore() { # NAME: cert + encrypted key in one PEM file, for Java
  openssl pkcs8 -topk8 -in "$1.key" -v1 PBE-SHA1-3DES -passout "file:broker.password" -out "$1.key.enc"
  cat "$1.pem" "$1.key.enc" >"$1.keystore.pem"
  rm -f "$1.key.enc"
}

issue broker "IP:127.0.0.1,DNS:localhost,DNS:kafka" "serverAuth,clientAuth"
openssl rand -hex 24 >broker.password
keystore broker
for p in "${PRINCIPALS[@]}"; do issue "$p"; done
keystore admin
{
  echo "security.protocol=SSL"
  echo "ssl.keystore.type=PEM"
  echo "ssl.keystore.location=$DIR/admin.keystore.pem"
  echo "ssl.key.password=$(cat broker.password)"
  echo "ssl.truststore.type=PEM"
  echo "ssl.truststore.location=$DIR/ca.pem"
} >admin.properties
edge_ca
postgres_cert
# certificates readable by anyone; keys, the CA key and the key store password by the owner only
chmod 644 ./*.pem
chmod 600 ./*.key broker.password admin.properties ./*.keystore.pem
