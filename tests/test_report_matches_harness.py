"""The report's detection figures are the harness's, on a run with every kind of round the
harness treats apart: an upload the screening rejects (no score), a client that fails (no
ground truth) and a round the defense makes no decision in (too few valid uploads). Through the
ServerApp's harness with the real ClientApp in-process (``tests.local_grid``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from experiments import report as report_cli
from server_app.app import run_experiment
from server_app.metrics import round_decisions
from task.config import RunConfig
from tests.local_grid import LocalGrid

pytestmark = pytest.mark.e2e

NODES = 6
POISONED, FAILING, SILENT_IN_ROUND_2 = 2, 3, 4
KEYS = {"num-clients": NODES, "num-attackers": 1, "attack": "sign-flip", "sign-flip-scale": 4.0,
        "defense": "layercam-ae", "local-epochs": 1, "layercam-ae-epochs": 50,
        "min-replies": 4, "num-server-rounds": 3}


class TroubledGrid(LocalGrid):
    """Node 2 uploads a NaN (the screening rejects it), node 3's ClientApp fails every round,
    and node 4 is silent in round 2: that round has 3 valid uploads, fewer than min-replies."""

    def _answer(self, message, context):
        node = message.metadata.dst_node_id
        if node == FAILING:
            raise RuntimeError("this client's training failed")
        reply = super()._answer(message, context)
        if node == POISONED and not reply.has_error():
            arrays = reply.content.array_records["arrays"]
            name = next(iter(arrays))
            poisoned = arrays[name].numpy().copy()
            poisoned.flat[0] = np.nan
            arrays[name] = type(arrays[name])(poisoned)
        return reply

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        rounds = {int(m.content["config"]["server-round"]) for m in messages
                  if "config" in m.content}
        self.silent = {SILENT_IN_ROUND_2} if 2 in rounds else set()
        return super().send_and_receive(messages, timeout=timeout)


def test_round_decisions_by_hand():
    truth = {1: False, 2: False, 4: False, 6: True}
    scores = {1: 0.1, 4: 5.0, 6: 9.0}
    assert round_decisions(truth, excluded=[6, 4], rejected=[2, 3], scores=scores,
                           skipped=False) == (truth, {2, 4, 6}, scores)  # node 3: no truth
    assert round_decisions(truth, excluded=[1, 4, 6], rejected=[2, 3], scores=None,
                           skipped=True) == ({2: False}, {2}, {})  # no decision: the rejection


def test_the_report_counts_what_the_harness_counts(tmp_path):
    config = RunConfig.from_run_config({**KEYS, "results-dir": str(tmp_path / "results")})
    summary = run_experiment(TroubledGrid(config.to_run_config(), NODES, 1,
                                          num_partitions=4 * NODES), config)
    folder = Path(summary["results_dir"])
    rows = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()][1:]
    assert [sorted(r["defense"]["rejected"]) for r in rows] == [["2", "3"]] * 3
    assert "fewer than the 4 needed" in rows[1]["defense"]["note"]
    assert [r["attackers"] for r in rows] == [[6], [6], [6]]
    assert rows[0]["benign"] == [1, 2, 4, 5] and rows[1]["benign"] == [1, 2, 5]  # no node 3
    counted = [sum(r["detection"][k] for k in ("tp", "fp", "tn", "fn")) for r in rows]
    assert counted == [5, 1, 5]  # round 2 made no decision: its rejected upload alone
    harness = json.loads((folder / "summary.json").read_text())["detection"]
    assert harness["tp"] + harness["fn"] == 2  # the attacker in rounds 1 and 3
    assert harness["fp"] + harness["tn"] == 4 + 1 + 4  # node 3 never; round 2 node 2 only

    assert report_cli.main([str(folder.parent), "--out", str(tmp_path / "report")]) == 0
    (row,) = list(csv.DictReader((tmp_path / "report" / "table.csv").open()))
    assert harness["auc"] is not None  # the skipped round's rejected upload ranks on top
    for metric in ("recall", "precision", "fpr", "accuracy", "f1", "auc"):
        assert float(row[metric]) == pytest.approx(harness[metric]), metric
