"""Every defense through the ServerApp's harness and its round loop (the steps of Flower's
``Strategy.start``), with the real ClientApp answering in-process (``tests.local_grid``): one
round of 7 clients, one of them flipping its update, written to a results folder as
``flwr run`` writes it. The defenses' runs send the clients the same messages, so the clients
train in the first of them and answer the rest from ``REPLIES`` (``tests.local_grid``)."""

import json
from pathlib import Path

import pytest
import torch

from server_app.app import run_experiment
from strategies.registry import DEFENSES
from task.config import RunConfig
from tests.conftest import read_rounds, rows_without_timings
from tests.helpers import check_faa_dl_round
from tests.local_grid import LocalGrid

pytestmark = pytest.mark.e2e

CLIENTS = 7
HEATMAP_DEFENSES = ("layercam-ae", "gradcam-ae", "layercam-krum")
REPLIES: dict = {}
"""The clients' replies, shared by the runs of this module (``tests.local_grid``)."""


def run_locally(tmp_path, partitions: int = CLIENTS, replies: dict | None = REPLIES, **keys
                ) -> tuple[dict, list[dict]]:
    """One run of ``keys`` over a ``LocalGrid`` whose clients hold partitions of the data
    split into ``partitions`` (answering from ``replies`` where they can); its summary and
    rounds.jsonl rows."""
    config = RunConfig.from_run_config({
        "num-server-rounds": 1, "num-clients": CLIENTS, "num-attackers": 1, "attack": "sign-flip",
        "sign-flip-scale": 4.0, "krum-f": 1, "local-epochs": 1, "layercam-ae-epochs": 50,
        "layercam-ae-save-heatmaps": True,
        "results-dir": str(tmp_path), **keys})
    grid = LocalGrid(config.to_run_config(), CLIENTS, config.num_attackers, partitions, replies)
    summary = run_experiment(grid, config)
    run_dir, rows = read_rounds(tmp_path)
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    return summary, rows


@pytest.mark.parametrize("defense", [d for d in DEFENSES.names() if d != "faa-dl"])
def test_defense_runs_and_records_whom_it_kept(tmp_path, defense):
    summary, rows = run_locally(tmp_path, defense=defense)
    record, detection = rows[1]["defense"], rows[1]["detection"]
    assert record["defense"] == defense and record["aggregated"]
    assert len(record["received"]) == CLIENTS and sorted(record["kept"] + record["excluded"]) == sorted(
        record["received"])
    assert detection["tp"] + detection["fn"] == 1
    if defense == "fedavg":  # keeps everyone, scores no one
        assert not record["excluded"] and detection["auc"] is None
    else:
        assert detection["auc"] is not None
    assert rows[-1]["accuracy"] > 0.3
    heatmap_png = Path(summary["results_dir"]) / "heatmaps-round001.png"
    assert heatmap_png.exists() == (defense in HEATMAP_DEFENSES)  # save-heatmaps is on


def test_a_run_answered_from_the_cache_is_the_run_the_clients_train(tmp_path):
    """``REPLIES``'s premise: the ClientApp answers the same message alike, so a run answered
    from replies cached in another defense's run writes what a run whose clients train writes."""
    run_locally(tmp_path / "other", defense="median")  # fills REPLIES if this test runs alone
    (fresh, _), (cached, _) = (run_locally(tmp_path / name, replies=replies, defense="fedavg")
                               for name, replies in (("fresh", None), ("cached", REPLIES)))
    folders = [Path(summary["results_dir"]) for summary in (fresh, cached)]
    assert rows_without_timings(folders[0]) == rows_without_timings(folders[1])
    models = [torch.load(folder / "model.pt") for folder in folders]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


# Solved exactly, the OC-SVM at nu = 0.5 puts most of six clients on its boundary and may flag
# none; nu = 0.9 makes it flag most of them, so these runs test the verification. The server
# trains again for each suspect, so each client holds half a partition: training is the slow part.
@pytest.mark.parametrize("attack", ["gaussian", "alie"])
def test_faa_dl_verifies_suspects_and_never_removes_a_benign_client(tmp_path, attack):
    _, rows = run_locally(tmp_path, 2 * CLIENTS, defense="faa-dl", attack=attack, **{
        "num-clients": 6, "num-attackers": 2, "faa-dl-nu": 0.9, "eavesdrop-in-deployment": True})
    check_faa_dl_round(rows[1], attackers_flagged=attack != "alie")  # ALIE hides among them
