#!/usr/bin/env bash
# Add SuperNode public keys to a SuperLink's list of allowed nodes (flwr supernode register),
# once the SuperLink answers.
#
#   deploy/register-supernodes.sh SUPERLINK_ADDRESS CA_CERT PUBLIC_KEY [PUBLIC_KEY ...]
set -euo pipefail
address=${1:?usage: register-supernodes.sh SUPERLINK_ADDRESS CA_CERT PUBLIC_KEY...}
ca=${2:?CA certificate}
shift 2
export FLWR_HOME=$(mktemp -d)  # a CLI config of its own, with just this connection
"$(dirname "$0")/add-connection.sh" federation "$address" "$ca" > /dev/null
for _ in $(seq 90); do
  flwr supernode list federation > /dev/null 2>&1 && break
  sleep 2
done
for key in "$@"; do
  flwr supernode register "$key" federation
done
