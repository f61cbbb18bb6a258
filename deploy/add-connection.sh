#!/usr/bin/env bash
# Add a TLS connection to a SuperLink to the flwr CLI's config ($FLWR_HOME/config.toml,
# default ~/.flwr/config.toml), so that `flwr run . NAME` and `flwr supernode ... NAME` use it.
#
#   deploy/add-connection.sh NAME SUPERLINK_ADDRESS CA_CERT
set -euo pipefail
name=${1:?usage: add-connection.sh NAME SUPERLINK_ADDRESS CA_CERT}
address=${2:?SuperLink address, e.g. 10.0.0.5:8000}
ca=$(realpath "${3:?CA certificate}")
config=${FLWR_HOME:-$HOME/.flwr}/config.toml
mkdir -p "$(dirname "$config")"
if [ ! -s "$config" ]; then
  printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n' > "$config"
fi
if grep -q "^\[superlink\.$name\]" "$config"; then
  echo "connection '$name' already in $config; edit it there" >&2
  exit 1
fi
printf '\n[superlink.%s]\naddress = "%s"\nroot-certificates = "%s"\n' "$name" "$address" "$ca" >> "$config"
echo "added connection '$name' ($address, CA $ca) to $config"
