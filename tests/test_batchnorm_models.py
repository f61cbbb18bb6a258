"""The paper's BatchNorm models train end to end: the real ClientApp trains them, their 0-d
buffers (``num_batches_tracked``) keep their shape on the way, the server's screening accepts
every honest upload, LayerCAM-AE maps them at a convolutional stage, and the global model moves,
for two rounds."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from server_app.defenses import build_defense, server_assets
from task.config import RunConfig
from task.data import load_federated_data
from tests.local_grid import LocalGrid

NODES, ATTACKERS = 4, 1


@pytest.mark.parametrize("model", ["resnet18", "regnety-800mf"])
def test_a_batchnorm_model_trains_through_the_client_app_and_the_strategy(model):
    run_config = {**RunConfig().to_run_config(), "model": model, "num-clients": NODES,
                  "num-attackers": ATTACKERS, "attack": "sign-flip", "sign-flip-scale": 4.0,
                  "local-epochs": 1, "layercam-ae-probes": 1, "layercam-ae-epochs": 20,
                  "min-replies": 2}
    config = RunConfig.from_run_config(run_config)
    # 400 partitions of the 8,000 training images: 20 images a node keeps it quick
    grid = LocalGrid(run_config, NODES, ATTACKERS, num_partitions=400)
    assets = server_assets(config, load_federated_data(config.dataset, config.seed).test)
    config.validate_for(10, assets.model_fn(), assets.probes[:1])
    strategy = build_defense(config, assets)
    arrays = ArrayRecord(assets.model_fn().state_dict())
    first = {k: v.numpy().copy() for k, v in arrays.items()}
    assert all(first[k].shape == () for k in first if k.endswith("num_batches_tracked"))
    for server_round in (1, 2):
        replies = grid.send_and_receive(strategy.configure_train(
            server_round, arrays, ConfigRecord({"local-epochs": 1}), grid))
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        record = strategy.last_record
        # every honest upload passes the screening; the attacker's flipped update may not: it
        # flips the variances' updates too, and a negative variance is rejected as impossible
        assert set(record.rejected) <= {4}, record.rejected
        assert sorted(record.received) == [1, 2, 3, 4] and record.aggregated
        assert all(np.isfinite(s) for s in record.scores.values())
        arrays = new_arrays
    final = {k: v.numpy() for k, v in arrays.items()}
    tracked = [k for k in final if k.endswith("num_batches_tracked")]
    assert tracked and all(final[k].shape == () and final[k] > 0 for k in tracked)
    assert any(not np.array_equal(final[k], first[k]) for k in final if final[k].dtype.kind == "f")
