#!/usr/bin/env bash
# The docker-compose demo in one command: make TLS material and SuperNode keys (if missing),
# build the project image, start the federation of docker-compose.yml (SuperLink on loopback,
# the Fleet API proxy the SuperNodes connect through, ServerApp, 3 benign + 1 attacking
# SuperNode, TLS and SuperNode authentication on), run 2 rounds of LayerCAM-AE from a CLI
# container on the SuperLink's loopback address, check that the SuperNodes' address refuses the
# Control API and the results in ./results/compose (the attacker's upload removed in every
# round), and stop everything.
#
#   deploy/compose-demo.sh
#
# Environment:
#   BASE_IMAGE       base of the project image (default python:3.11-slim-bookworm)
#   PROJECT_IMAGE    the project image's tag (default layercam-ae-fl:latest)
#   SUPERLINK_IMAGE, SUPERNODE_IMAGE
#                    default Flower's official flwr/superlink:1.41.0 and flwr/supernode:1.41.0;
#                    where no registry is reachable set both to $PROJECT_IMAGE (it carries Flower)
#   PIP_OFFLINE=1    build the image from the wheels in docker/wheels only
#   DEMO_RUN_CONFIG  extra --run-config for the experiment
#   SUPERLINK_HOST   the address SuperNodes use to reach the server (default 127.0.0.1)
set -euo pipefail
cd "$(dirname "$0")/.."
export PROJECT_IMAGE=${PROJECT_IMAGE:-layercam-ae-fl:latest}
nodes=(node-0 node-1 node-2 node-3)  # as docker-compose.yml: 3 benign, then 1 attacker

host=${SUPERLINK_HOST:-127.0.0.1}
if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then kind=IP; check=-checkip; else kind=DNS; check=-checkhost; fi
sans=()  # make-certificates.sh always names localhost and 127.0.0.1
[[ $host == 127.0.0.1 || $host == localhost ]] || sans=("$kind:$host")
[ -f deploy/certs/ca.crt ] || deploy/make-certificates.sh deploy/certs "${sans[@]}"
# certificates made earlier for another address would fail the SuperNodes' TLS handshake
openssl x509 -in deploy/certs/server.pem -noout "$check" "$host" | grep -q "does match" || {
  echo "FAILED: deploy/certs/server.pem does not name $host (SUPERLINK_HOST); remove" \
    "deploy/certs to make certificates that do" >&2; exit 1; }
[ -f deploy/keys/node-0 ] || deploy/make-supernode-keys.sh deploy/keys "${nodes[@]}"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
mkdir -p deploy/secrets
# an earlier demo may have given results/ itself to 49999
mkdir -p results/compose 2>/dev/null || as_root mkdir -p results/compose
for name in superlink "${nodes[@]}"; do  # one SuperExec secret per Flower process
  [ -s "deploy/secrets/$name" ] || head -c 32 /dev/urandom > "deploy/secrets/$name"
done
# The containers run as Flower's non-root user 49999: it owns what they read that is secret,
# readable by it alone (docker-compose.yml mounts each file into the one container that needs it).
# results/compose, not results/: a local flwr run by the user still writes to results/
as_root chown 49999:49999 deploy/certs/server.key deploy/keys/node-? deploy/secrets/* results/compose
as_root chmod 600 deploy/certs/server.key deploy/keys/node-? deploy/secrets/*

docker build --network host -t "$PROJECT_IMAGE" \
  --build-arg "BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}" \
  --build-arg "PIP_OFFLINE=${PIP_OFFLINE:-}" .

marker=$(mktemp)
# results/compose is Flower's user's (49999): the log is written as root there too
trap 'docker-compose logs --no-color 2>&1 | as_root tee results/compose/compose.log > /dev/null || true; docker-compose down --remove-orphans; rm -f "$marker"' EXIT
docker-compose up -d

# DEMO_RUN_CONFIG reaches the container as a variable: its quotes stay as written
docker run --rm --network host -e "DEMO_RUN_CONFIG=${DEMO_RUN_CONFIG:-}" \
  -v "$PWD/deploy/certs/ca.crt:/certs/ca.crt:ro" "$PROJECT_IMAGE" bash -c '
  export FLWR_HOME=/tmp/flwr
  /app/deploy/add-connection.sh demo 127.0.0.1:8000 /certs/ca.crt
  for _ in $(seq 60); do [ "$(flwr supernode list demo --format json 2>/dev/null | grep -c "\"online\"")" -ge 4 ] && break; sleep 3; done
  flwr supernode list demo
  flwr run /app demo --stream --run-config "num-server-rounds=2 num-clients=4 num-attackers=1 attack='"'"'sign-flip'"'"' sign-flip-scale=4.0 defense='"'"'layercam-ae'"'"' local-epochs=1 layercam-ae-epochs=50 $DEMO_RUN_CONFIG"
'

# The address the SuperNodes use serves the Fleet API only: a Control call gets the proxy's 404.
python3 - "${SUPERLINK_HOST:-127.0.0.1}" <<'PY'
import http.client, ssl, sys, urllib.error, urllib.request
url = f"https://{sys.argv[1]}:9092/v1/control/list-runs"
context = ssl.create_default_context(cafile="deploy/certs/ca.crt")
try:
    urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=10,
                           context=context)
except urllib.error.HTTPError as error:
    if error.code != 404:
        raise SystemExit(f"FAILED: {url} answered {error.code}, not the proxy's 404")
except (OSError, http.client.HTTPException) as error:  # no HTTP answer: TLS, the
    # connection, a timeout or a reply that is not HTTP
    raise SystemExit(f"FAILED: {url}: {getattr(error, 'reason', error)!s}")
else:
    raise SystemExit(f"FAILED: {url} answered: the Control API is open to SuperNodes")
PY

summary=$(find results/compose -name summary.json -newer "$marker" | head -1)
[ -n "$summary" ] || { echo "FAILED: no summary.json was written; see results/compose/compose.log" >&2; exit 1; }
python3 - "$summary" <<'PY'
import json, os, sys
summary = json.load(open(sys.argv[1]))
detection = summary["detection"]
assert summary["rounds"] == 2 and summary["defense"] == "layercam-ae", summary
assert detection["tp"] + detection["fn"] == 2, detection  # 1 attacker x 2 rounds
if detection["tp"] != 2:  # the demo shows the defense working, or says it did not
    raise SystemExit(f"FAILED: the attacker's upload was aggregated in {detection['fn']} of 2 "
                     f"rounds (final accuracy {summary['final_accuracy']:.4f}): {detection}")
print(f"OK: {summary['rounds']} rounds, final accuracy {summary['final_accuracy']:.4f}, "
      f"attacker uploads removed {detection['tp']}/2, benign removed {detection['fp']}/6; "
      f"{os.path.dirname(sys.argv[1])}")
PY
