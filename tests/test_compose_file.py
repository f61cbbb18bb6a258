"""docker-compose.yml is what deploy/compose.py generates, the generator scales, and only the
Fleet API proxy faces the SuperNodes' address."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.compose import compose

ROOT = Path(__file__).resolve().parents[1]
NODES_ADDRESS = "${SUPERLINK_HOST:-127.0.0.1}"


def test_checked_in_compose_file_is_the_generated_one():
    assert yaml.safe_load((ROOT / "docker-compose.yml").read_text()) == compose(3, 1)


def test_generator_gives_every_node_its_partition_role_key_and_clientapp():
    services = compose(benign=5, attackers=2)["services"]
    nodes = [s for name, s in services.items() if name.startswith("supernode-")]
    assert len(nodes) == 7 and sum(n.startswith("clientapp-") for n in services) == 7
    configs = [n["command"][n["command"].index("--node-config") + 1] for n in nodes]
    assert configs[0] == "partition-id=0 num-partitions=7 role='benign'"
    assert configs[6] == "partition-id=6 num-partitions=7 role='attacker'"
    assert {n["command"][n["command"].index("--auth-supernode-private-key") + 1] for n in nodes} == {
        f"/keys/node-{i}" for i in range(7)}
    register = services["register"]["command"]
    assert register[2:] == [f"/keys/node-{i}.pub" for i in range(7)]
    link = services["superlink"]["command"]
    assert "--enable-supernode-auth" in link and "--insecure" not in link


def test_each_container_gets_only_the_secrets_it_needs():
    services = compose(benign=2, attackers=1)["services"]
    for name, service in services.items():
        assert service["user"] == "49999:49999", name  # Flower's non-root user
        hosts = [v.split(":")[0] for v in service["volumes"]]
        assert "./deploy/certs" not in hosts and "./deploy/keys" not in hosts, name  # no folders
        assert not any(h.endswith("ca.key") for h in hosts), name  # the CA's key stays out
    link = services["superlink"]
    assert {v.split(":")[0] for v in link["volumes"]} == {
        "./deploy/certs/ca.crt", "./deploy/certs/server.pem", "./deploy/certs/server.key",
        "./deploy/secrets/superlink"}
    assert {v.split(":")[0] for v in services["fleet-proxy"]["volumes"]} == {
        "./deploy/certs/ca.crt", "./deploy/certs/server.pem", "./deploy/certs/server.key"}
    for i in range(3):
        node = {v.split(":")[0] for v in services[f"supernode-{i}"]["volumes"]}
        assert node == {"./deploy/certs/ca.crt", f"./deploy/keys/node-{i}",
                        f"./deploy/secrets/node-{i}"}
        assert {v.split(":")[0] for v in services[f"clientapp-{i}"]["volumes"]} == {
            f"./deploy/secrets/node-{i}"}
    assert all(v.split(":")[0].endswith(".pub") or v.startswith("./deploy/certs/ca.crt")
               for v in services["register"]["volumes"])


def test_flower_processes_and_their_superexecs_share_a_secret():
    services = compose(benign=1, attackers=1)["services"]

    def secret(service):
        command = services[service]["command"]
        return command[command.index("--superexec-auth-secret-file") + 1]

    assert secret("superlink") == secret("serverapp") == "/secrets/superlink"
    for i in range(2):
        assert secret(f"supernode-{i}") == secret(f"clientapp-{i}") == f"/secrets/node-{i}"


def _option(service: dict, flag: str) -> str:
    return service["command"][service["command"].index(flag) + 1]


def test_the_link_binds_loopback_and_supernodes_reach_only_the_fleet_proxy():
    services = compose(benign=2, attackers=1)["services"]
    link = services["superlink"]
    assert _option(link, "--host") == "127.0.0.1" and _option(link, "--port") == "8000"
    # The operator's side reaches the SuperLink on loopback ...
    assert _option(services["serverapp"], "--runtime-api-address") == "127.0.0.1:8000"
    assert services["register"]["command"][0] == "127.0.0.1:8000"
    # ... the SuperNodes' address is the proxy's, which forwards to the SuperLink there.
    proxy = services["fleet-proxy"]
    assert proxy["entrypoint"] == ["/app/deploy/fleet-proxy.sh"]
    assert proxy["command"][1:] == ["/certs", "127.0.0.1:8000", f"{NODES_ADDRESS}:9092"]
    assert proxy["network_mode"] == "host" and proxy["user"] == "49999:49999"
    assert proxy["depends_on"] == {"superlink": {"condition": "service_started"}}
    for i in range(3):
        node = services[f"supernode-{i}"]
        assert _option(node, "--superlink") == f"{NODES_ADDRESS}:9092"
        assert node["depends_on"]["fleet-proxy"] == {"condition": "service_started"}
    facing_nodes = {name for name, service in services.items()
                    if any("SUPERLINK_HOST" in part for part in service["command"])}
    assert facing_nodes == {"fleet-proxy", *(f"supernode-{i}" for i in range(3))}


def test_the_project_image_carries_the_proxy():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "nginx-light" in dockerfile and "deploy/fleet-proxy.conf.template" in dockerfile


@pytest.mark.skipif(not (shutil.which("nginx") or os.access("/usr/sbin/nginx", os.X_OK)),
                    reason="needs nginx (Debian: apt-get install nginx-light)")
def test_the_proxy_configuration_nginx_accepts_forwards_only_the_fleet_api(tmp_path):
    """The proxy service's command, on this machine: the configuration it writes passes
    ``nginx -t``, listens only where told, and proxies one location, the Fleet API's."""
    certs = tmp_path / "certs"
    subprocess.run([ROOT / "deploy/make-certificates.sh", certs], check=True, capture_output=True)
    run_dir = tmp_path / "proxy"
    written = subprocess.run(
        [ROOT / "deploy/fleet-proxy.sh", run_dir, certs, "127.0.0.1:8000", "127.0.0.1:9092"],
        env={**os.environ, "FLEET_PROXY_CHECK": "1"}, capture_output=True, text=True)
    assert written.returncode == 0, written.stderr
    config = (run_dir / "nginx.conf").read_text()
    lines = [line.strip() for line in config.splitlines() if not line.strip().startswith("#")]
    assert not [line for line in lines if "@" in line]  # every field filled in
    assert [line for line in lines if line.startswith("listen ")] == ["listen 127.0.0.1:9092 ssl;"]
    assert [line for line in lines if line.startswith("location ")] == [
        "location ~ ^/v1/fleet/[a-z-]+$ {", "location / {"]
    assert [line for line in lines if line.startswith("proxy_pass ")] == [
        "proxy_pass https://superlink;"]
    assert "server 127.0.0.1:8000;" in lines and "proxy_ssl_verify on;" in lines
    refusal = 'return 404 "not found: this address serves only the Fleet API (/v1/fleet/)\\n";'
    assert refusal in lines
