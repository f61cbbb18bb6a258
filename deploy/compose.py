"""Write the docker-compose file of a federation with N benign and M attacking SuperNodes.

    python deploy/compose.py --benign 3 --attackers 1 > docker-compose.yml

Services: the SuperLink (Flower's official image, process isolation, TLS, SuperNode
authentication), the Fleet API proxy (``fleet-proxy``: nginx from the project image, running
``deploy/fleet-proxy.sh``), the ServerApp's SuperExec (project image; results in ./results/compose), a
one-shot ``register`` service that adds every SuperNode's public key to the SuperLink's allowed
list, and per SuperNode the official SuperNode image plus the ClientApp's SuperExec (project
image).
Every service uses the host's network (DOCKER.md of this project's docs: containers reach each
other on loopback) and runs as Flower's non-root user (49999).

What each container gets is only what it needs: every one the CA certificate; the SuperLink and
the proxy (which serves the SuperNodes TLS with it) the server's certificate and key; each
SuperNode its own private key (never another's); the register service
the public keys; each Flower process and its SuperExec a shared secret
(``--superexec-auth-secret-file``), so that no other process can take over their runtime API.
``deploy/compose-demo.sh`` makes the keys and secrets owned by 49999 with mode 0600.

The SuperLink serves its Fleet, Control and runtime APIs on one port, and whoever reaches the
Control API can submit and stop runs, so it listens on loopback only (127.0.0.1:8000), where the
ServerApp, the register service and the operator's CLI (on the server, or through an SSH tunnel)
reach it. SuperNodes connect to the proxy at ``${SUPERLINK_HOST:-127.0.0.1}:9092`` (the address
they use to reach the server; the certificate must name it), which forwards the Fleet API and
nothing else. Images can be replaced with SUPERLINK_IMAGE, SUPERNODE_IMAGE and PROJECT_IMAGE.
"""

from __future__ import annotations

import argparse

import yaml

FLOWER_VERSION = "1.41.0"
SUPERLINK_PORT = 8000
FLEET_PORT = 9092
"""The Fleet API proxy's port, on the address SuperNodes use (Flower's former Fleet API port)."""
FIRST_NODE_PORT = 9094
FLOWER_USER = "49999:49999"
"""The non-root user of Flower's official images; the project image runs as the same."""
CA = "./deploy/certs/ca.crt:/certs/ca.crt:ro"
SERVER_CERT = ["./deploy/certs/server.pem:/certs/server.pem:ro",
               "./deploy/certs/server.key:/certs/server.key:ro"]


def _service(image: str, entrypoint: str, command: list[str], volumes: list[str],
             depends_on: dict[str, str] | None = None, **extra) -> dict:
    service = {"image": image, "entrypoint": [entrypoint], "command": command,
               "network_mode": "host", "user": FLOWER_USER,
               "environment": {"HOME": "/tmp", "FLWR_HOME": "/tmp/flwr"},  # any image, any user
               "volumes": volumes, **extra}
    if depends_on:
        service["depends_on"] = {name: {"condition": c} for name, c in depends_on.items()}
    return service


def _secret(name: str) -> tuple[str, list[str]]:
    """The volume and flag that give a Flower process and its SuperExec the secret ``name``."""
    return (f"./deploy/secrets/{name}:/secrets/{name}:ro",
            ["--superexec-auth-secret-file", f"/secrets/{name}"])


def compose(benign: int, attackers: int) -> dict:
    """The compose document (a dict) for ``benign`` + ``attackers`` SuperNodes."""
    if benign < 1 or attackers < 0:
        raise ValueError("need at least one benign SuperNode and a non-negative number of attackers")
    project = "${PROJECT_IMAGE:-layercam-ae-fl:latest}"
    link = f"127.0.0.1:{SUPERLINK_PORT}"  # loopback only: the operator's side
    fleet = f"${{SUPERLINK_HOST:-127.0.0.1}}:{FLEET_PORT}"  # the SuperNodes' side
    nodes = benign + attackers
    link_secret, link_secret_flag = _secret("superlink")
    services = {
        "superlink": _service(
            f"${{SUPERLINK_IMAGE:-flwr/superlink:{FLOWER_VERSION}}}", "flower-superlink",
            ["--isolation", "process", "--host", link.rsplit(":", 1)[0],
             "--port", str(SUPERLINK_PORT),
             "--ssl-ca-certfile", "/certs/ca.crt", "--ssl-certfile", "/certs/server.pem",
             "--ssl-keyfile", "/certs/server.key", "--enable-supernode-auth",
             "--disable-runtime-dependency-installation", *link_secret_flag],
            [CA, *SERVER_CERT, link_secret]),
        "fleet-proxy": _service(
            project, "/app/deploy/fleet-proxy.sh", ["/tmp/fleet-proxy", "/certs", link, fleet],
            [CA, *SERVER_CERT], {"superlink": "service_started"}, restart="on-failure"),
        "serverapp": _service(
            project, "flower-superexec",
            ["--runtime-api-address", link, "--root-certificates", "/certs/ca.crt",
             *link_secret_flag],
            [CA, link_secret, "./results/compose:/work/results"], {"superlink": "service_started"},
            working_dir="/work", restart="on-failure"),
        "register": _service(
            project, "/app/deploy/register-supernodes.sh",
            [link, "/certs/ca.crt", *(f"/keys/node-{i}.pub" for i in range(nodes))],
            [CA, *(f"./deploy/keys/node-{i}.pub:/keys/node-{i}.pub:ro" for i in range(nodes))],
            {"superlink": "service_started"}),
    }
    for i in range(nodes):
        role = "attacker" if i >= benign else "benign"
        port = FIRST_NODE_PORT + i
        secret, secret_flag = _secret(f"node-{i}")
        services[f"supernode-{i}"] = _service(
            f"${{SUPERNODE_IMAGE:-flwr/supernode:{FLOWER_VERSION}}}", "flower-supernode",
            ["--superlink", fleet, "--root-certificates", "/certs/ca.crt",
             "--auth-supernode-private-key", f"/keys/node-{i}", "--isolation", "process",
             "--port", str(port), *secret_flag,
             "--node-config", f"partition-id={i} num-partitions={nodes} role='{role}'"],
            [CA, f"./deploy/keys/node-{i}:/keys/node-{i}:ro", secret],
            {"register": "service_completed_successfully", "fleet-proxy": "service_started"})
        services[f"clientapp-{i}"] = _service(
            project, "flower-superexec",
            ["--runtime-api-address", f"127.0.0.1:{port}", "--insecure", *secret_flag], [secret],
            {f"supernode-{i}": "service_started"}, restart="on-failure")
    return {"services": services}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benign", type=int, default=3)
    parser.add_argument("--attackers", type=int, default=1)
    args = parser.parse_args()
    header = (f"# Generated by: python deploy/compose.py --benign {args.benign} --attackers "
              f"{args.attackers}\n")
    print(header + yaml.safe_dump(compose(args.benign, args.attackers), sort_keys=False), end="")


if __name__ == "__main__":
    main()
