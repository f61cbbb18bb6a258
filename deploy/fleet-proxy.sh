#!/usr/bin/env bash
# Run the Fleet API proxy (nginx) in the foreground: SuperNodes connect to it over TLS, and it
# forwards only the SuperLink's Fleet API (/v1/fleet/) to the SuperLink; the Control API (start,
# stop runs, register keys), the runtime API and everything else get 404 from the proxy. The
# SuperLink itself then listens on loopback only (flower-superlink --host 127.0.0.1), where the
# operator's `flwr` CLI (on the server, or through `ssh -L 8000:127.0.0.1:8000 server`) and the
# ServerApp reach it. The configuration is deploy/fleet-proxy.conf.template.
#
#   deploy/fleet-proxy.sh RUN_DIR CERT_DIR SUPERLINK_ADDRESS LISTEN_ADDRESS [LISTEN_ADDRESS ...]
#
# RUN_DIR    where nginx.conf (written here), the pid file and nginx's (unused) temp dirs go
# CERT_DIR   deploy/make-certificates.sh's output: server.pem and server.key (served to the
#            SuperNodes: their SANs must name every LISTEN_ADDRESS) and ca.crt (to check the
#            SuperLink's certificate)
# SUPERLINK_ADDRESS  where the SuperLink listens, e.g. 127.0.0.1:8000
# LISTEN_ADDRESS     the address:port SuperNodes use, e.g. 10.0.0.5:9092 (one or more)
#
# Environment: NGINX, the nginx binary (default: nginx on PATH, else /usr/sbin/nginx; Debian:
# apt-get install nginx-light). FLEET_PROXY_CHECK=1 only writes and tests the configuration.
set -euo pipefail
usage="usage: fleet-proxy.sh RUN_DIR CERT_DIR SUPERLINK_ADDRESS LISTEN_ADDRESS [LISTEN_ADDRESS ...]"
[ $# -ge 4 ] || { echo "$usage" >&2; exit 2; }
run_dir=$(mkdir -p "$1" && realpath "$1")
certs=$(realpath "$2")
superlink=$3
shift 3
for file in server.pem server.key ca.crt; do
  [ -r "$certs/$file" ] || { echo "fleet-proxy: cannot read $certs/$file" >&2; exit 1; }
done
for value in "$run_dir" "$certs" "$superlink" "$@"; do  # each goes into the config as is
  case $value in *'"'* | *';'* | *'{'* | *'}'* | *[[:space:]]* | '')
    echo "fleet-proxy: unusable path or address: '$value'" >&2; exit 2;;
  esac
done
listen=""
for address in "$@"; do
  listen+="        listen $address ssl;"$'\n'
done
template=$(cat "$(dirname "$0")/fleet-proxy.conf.template")
shopt -u patsub_replacement 2>/dev/null || true  # bash 5.2: "&" in a replacement stays "&"
conf=${template//@RUN_DIR@/$run_dir}
conf=${conf//@CERTS@/$certs}
conf=${conf//@SUPERLINK@/$superlink}
conf=${conf//@LISTEN@$'\n'/$listen}
printf '%s\n' "$conf" > "$run_dir/nginx.conf"

nginx=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
if [ ! -x "$nginx" ]; then
  echo "fleet-proxy: nginx not found (Debian: apt-get install nginx-light)" >&2
  exit 1
fi
"$nginx" -q -t -p "$run_dir" -c "$run_dir/nginx.conf" -e stderr
[ "${FLEET_PROXY_CHECK:-}" = 1 ] && exit 0
echo "fleet-proxy: Fleet API on $* -> SuperLink $superlink (config $run_dir/nginx.conf)"
exec "$nginx" -p "$run_dir" -c "$run_dir/nginx.conf" -e stderr
