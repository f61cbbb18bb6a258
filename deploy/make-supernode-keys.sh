#!/usr/bin/env bash
# Make SuperNode authentication key pairs (ECDSA P-384, OpenSSH format, as Flower expects).
#
#   deploy/make-supernode-keys.sh OUT_DIR NAME [NAME ...]
#
# OUT_DIR/NAME is the private key (stays on that SuperNode: --auth-supernode-private-key);
# OUT_DIR/NAME.pub is registered on the SuperLink: flwr supernode register OUT_DIR/NAME.pub <federation>
set -euo pipefail
out=${1:?usage: make-supernode-keys.sh OUT_DIR NAME [NAME ...]}
shift
[ $# -ge 1 ] || { echo "name at least one SuperNode" >&2; exit 2; }
mkdir -p "$out"
for name in "$@"; do
  rm -f "$out/$name" "$out/$name.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$out/$name"
done
echo "SuperNode keys in $out: $*"
