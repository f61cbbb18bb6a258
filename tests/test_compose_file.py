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
