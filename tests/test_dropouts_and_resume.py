"""Rounds that lose nodes, and runs that lose their server: through the ServerApp's harness with
the real ClientApp answering in-process (``tests.local_grid``). A round goes on without the
nodes that do not reply and names them; a node that comes back is used again; a run killed
after round k and resumed from its folder ends exactly as the uninterrupted run (so the rounds
both wrote are the same: one seed, the same files). The same over Flower's real transport
(SuperLink, SuperNodes): ``test_deployment_failures.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server_app.app import run_experiment
from task.config import ConfigError, RunConfig
from tests.conftest import rows_without_timings
from tests.local_grid import LocalGrid

pytestmark = pytest.mark.e2e

CLIENTS = 5
KEYS = {"num-clients": CLIENTS, "num-attackers": 1, "attack": "sign-flip", "sign-flip-scale": 4.0,
        "defense": "layercam-ae", "local-epochs": 1, "layercam-ae-epochs": 50, "min-replies": 3}


class ScheduledGrid(LocalGrid):
    """A ``LocalGrid`` that applies ``schedule[r](grid)`` once round ``r`` has been answered
    and raises ``ServerKilled`` when round ``kill_before`` is sent (the server dies there)."""

    def __init__(self, config: RunConfig, schedule=None, kill_before: int | None = None,
                 node_offset: int = 0) -> None:
        super().__init__(config.to_run_config(), CLIENTS, config.num_attackers,
                         num_partitions=4 * CLIENTS)  # small partitions: quick local training
        self.contexts = {node + node_offset: context for node, context in self.contexts.items()}
        self.schedule, self.kill_before = schedule or {}, kill_before

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        rounds = {int(m.content["config"]["server-round"]) for m in messages if "config" in m.content}
        if self.kill_before in rounds:
            raise ServerKilled
        replies = super().send_and_receive(messages, timeout=timeout)
        for server_round in rounds:
            self.schedule.get(server_round, lambda grid: None)(self)
        return replies


class ServerKilled(BaseException):
    """The ServerApp's process ends here (nothing in the harness may catch it)."""


def run(tmp_path: Path, schedule=None, kill_before=None, node_offset=0, **keys) -> Path:
    """One run into ``tmp_path``; its run folder."""
    config = RunConfig.from_run_config({**KEYS, "results-dir": str(tmp_path), **keys})
    try:
        summary = run_experiment(ScheduledGrid(config, schedule, kill_before, node_offset), config)
        return Path(summary["results_dir"])
    except ServerKilled:
        (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        return folder


def test_a_round_goes_on_without_a_silent_or_offline_node_and_uses_it_again_when_back(tmp_path):
    def silent(grid):
        grid.silent = {2}

    def offline(grid):
        grid.silent, grid.offline = set(), {2}

    def back(grid):
        grid.offline = set()

    folder = run(tmp_path, {1: silent, 2: offline, 3: back}, **{"num-server-rounds": 4})
    records = [row["defense"] for row in rows_without_timings(folder)[1:]]
    assert [r["missing"] for r in records] == [[], [2], [2], []]
    assert [2 in r["received"] for r in records] == [True, False, False, True]
    assert all(r["aggregated"] for r in records)
    assert all(not r["rejected"] for r in records)  # a dropout is not a rejection


def test_too_few_nodes_keep_the_previous_model_and_never_wait_past_the_timeout(tmp_path):
    def mostly_offline(grid):
        grid.offline = {1, 2, 3}

    folder = run(tmp_path, {1: mostly_offline},
                 **{"num-server-rounds": 2, "round-timeout": 1.0})
    rows = rows_without_timings(folder)
    second = rows[2]["defense"]
    # nodes 4 and 5 were connected but asked nothing: left out, not missing
    assert second["received"] == [] and sorted(second["missing"]) == [1, 2, 3]
    assert not second["aggregated"] and "previous global model" in second["note"]
    assert rows[2]["accuracy"] == rows[1]["accuracy"]  # the model of round 1 was kept


def test_a_run_killed_after_round_k_and_resumed_ends_as_the_uninterrupted_run(tmp_path):
    uninterrupted = run(tmp_path / "a", **{"num-server-rounds": 3})
    killed = run(tmp_path / "b", kill_before=3, **{"num-server-rounds": 3})
    assert [r["round"] for r in rows_without_timings(killed)] == [0, 1, 2]
    assert not (killed / "model.pt").exists()
    rows = (killed / "rounds.jsonl").read_text().splitlines()
    crashed = {**json.loads(rows[-1]), "round": 3}  # a crash between round 3's row and checkpoint
    (killed / "rounds.jsonl").write_text("\n".join([*rows, json.dumps(crashed)]) + "\n")
    resumed = run(tmp_path / "c", **{"num-server-rounds": 3, "resume-from": str(killed)})
    assert resumed == killed  # the resumed run continues in the same folder
    assert rows_without_timings(resumed) == rows_without_timings(uninterrupted)
    final, expected = torch.load(resumed / "model.pt"), torch.load(uninterrupted / "model.pt")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["detection"] == json.loads((uninterrupted / "summary.json").read_text())["detection"]


def test_a_resumed_run_whose_nodes_have_new_ids_starts_their_history_afresh(tmp_path):
    """As a restarted simulation, whose nodes Flower numbers anew: the old ids are not missing."""
    killed = run(tmp_path / "b", kill_before=2, **{"num-server-rounds": 2})
    resumed = run(tmp_path / "c", node_offset=100, **{"num-server-rounds": 2,
                                                       "resume-from": str(killed)})
    second = rows_without_timings(resumed)[2]["defense"]
    assert sorted(second["received"]) == [101, 102, 103, 104, 105] and second["missing"] == []
    assert second["aggregated"]


def test_resume_refuses_another_config_and_a_folder_without_a_checkpoint(tmp_path):
    killed = run(tmp_path / "b", kill_before=2, **{"num-server-rounds": 2})
    with pytest.raises(ConfigError, match=r"other values of \['seed'\]"):
        run(tmp_path / "c", **{"num-server-rounds": 2, "resume-from": str(killed), "seed": 7})
    with pytest.raises(ConfigError, match="resume-from"):
        run(tmp_path / "d", **{"resume-from": str(tmp_path / "nowhere")})
