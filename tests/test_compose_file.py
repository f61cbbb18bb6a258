"""docker-compose.yml is what deploy/compose.py generates, and the generator scales."""

from pathlib import Path

import yaml

from deploy.compose import compose

ROOT = Path(__file__).resolve().parents[1]


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
    for i in range(3):
        node = {v.split(":")[0] for v in services[f"supernode-{i}"]["volumes"]}
        assert node == {"./deploy/certs/ca.crt", f"./deploy/keys/node-{i}",
                        f"./deploy/secrets/node-{i}"}
        assert {v.split(":")[0] for v in services[f"clientapp-{i}"]["volumes"]} == {
            f"./deploy/secrets/node-{i}"}
    assert all(v.split(":")[0].endswith(".pub") or v.startswith("./deploy/certs/ca.crt")
               for v in services["register"]["volumes"])


def test_flower_processes_and_their_superexecs_share_a_secret_and_the_link_binds_loopback():
    services = compose(benign=1, attackers=1)["services"]

    def secret(service):
        command = services[service]["command"]
        return command[command.index("--superexec-auth-secret-file") + 1]

    assert secret("superlink") == secret("serverapp") == "/secrets/superlink"
    for i in range(2):
        assert secret(f"supernode-{i}") == secret(f"clientapp-{i}") == f"/secrets/node-{i}"
    command = services["superlink"]["command"]
    assert command[command.index("--host") + 1] == "${SUPERLINK_HOST:-127.0.0.1}"
