"""The run config: pyproject defaults match the typed defaults; bad values name their key."""

import tomllib
from pathlib import Path

import pytest

from task.config import ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_declares_every_key_with_the_typed_default():
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == RunConfig().to_run_config()
    assert RunConfig.from_run_config(declared) == RunConfig()


@pytest.mark.parametrize("key,value,match", [
    ("dirichlet-alpha", -1.0, "dirichlet-alpha"),
    ("model", "vgg", "model"),
    ("dataset", "imagenet", "dataset"),
    ("num-clients", 1, "num-clients"),
    ("num-server-rounds", "ten", "num-server-rounds"),
    ("learning-rate", 0.0, "learning-rate"),
    ("layercam-ae-threshold", "lower", "layercam-ae-threshold"),
    ("layercam-ae-votes", 4, "layercam-ae-votes"),
    ("num-attackers", 24, "num-attackers"),
    ("no-such-key", 1, "no-such-key"),
    ("layercam-ae-map-size", "huge", "layercam-ae-map-size"),
    ("layercam-ae-tolerance", -0.1, "layercam-ae-tolerance"),
    ("layercam-ae-threads", -1, "layercam-ae-threads"),
    ("layercam-ae-workers", 0, "layercam-ae-workers"),
    ("layercam-ae-decision", "majority", "layercam-ae-decision"),
    ("layercam-ae-memory", 1.0, "layercam-ae-memory"),
    ("layercam-ae-memory", -0.1, "layercam-ae-memory"),
    ("layercam-ae-memory", float("nan"), "layercam-ae-memory"),
    ("layercam-ae-score-cap", 0.0, "layercam-ae-score-cap"),
    ("layercam-ae-group-z", -1.0, "layercam-ae-group-z"),
    ("layercam-ae-group-size", -1, "layercam-ae-group-size"),
    ("seed", -1, "seed"),
    ("seed", 2**32, "seed"),
    ("learning-rate", float("inf"), "learning-rate.*finite"),
    ("dirichlet-alpha", float("inf"), "dirichlet-alpha"),
    ("round-timeout", float("inf"), "round-timeout"),
    ("layercam-ae-robust-z", float("inf"), "layercam-ae-robust-z"),
    ("layercam-ae-target-class", -2, "layercam-ae-target-class"),
    ("faa-dl-aont-lambda", 10**9, "faa-dl-aont-lambda"),
    ("min-replies", 0, "min-replies"),
    ("min-replies", 25, "min-replies.*num-clients"),
    # upper bounds: values that would exhaust the machine or make no sense
    ("layercam-ae-workers", 1_000_000, r"layercam-ae-workers must be in \[1, 256\]"),
    ("learning-rate", 1e9, r"learning-rate must be in \(0, 10\]"),
    ("dirichlet-alpha", 1e9, "dirichlet-alpha must be in"),
    ("round-timeout", 1e12, "round-timeout must be in"),
    ("node-wait-timeout", 1e9, "node-wait-timeout must be in"),
    ("layercam-ae-robust-z", 1e9, "layercam-ae-robust-z must be in"),
    ("layercam-ae-lr", 1e9, "layercam-ae-lr must be in"),
    ("gae-graph-nodes", 10**6, "gae-graph-nodes must be in"),
    ("gae-candidate-nodes", 10, "gae-candidate-nodes"),
    ("layercam-ae-views", "norm,heatmap", "layercam-ae-views='heatmap' is not one of"),
    ("layercam-ae-view-z", 0.0, "layercam-ae-view-z"),
    ("flame-noise", 2.0, "flame-noise"),
    ("model-replacement-boost", -1.0, "model-replacement-boost"),
    # names that would build a path
    ("attack", "x/../../../outside", "attack='x/../../../outside' is not a name"),
    ("defense", "../up", "defense='../up' is not a name"),
])
def test_bad_value_raises_naming_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_run_config({key: value})


def test_views_parse_to_names_and_empty_is_the_heat_maps_alone():
    assert RunConfig().layercam_ae_view_names == ("norm", "direction", "outside-range", "collusion")
    assert RunConfig.from_run_config({"layercam-ae-views": " norm , collusion"}
                                     ).layercam_ae_view_names == ("norm", "collusion")
    assert RunConfig.from_run_config({"layercam-ae-views": ""}).layercam_ae_view_names == ()


def test_ints_given_as_whole_floats_are_accepted():
    assert RunConfig.from_run_config({"num-server-rounds": 3.0}).num_server_rounds == 3


def test_the_papers_upper_threshold_needs_the_voting_decision():
    with pytest.raises(ConfigError, match="layercam-ae-decision='voting'"):
        RunConfig.from_run_config({"layercam-ae-threshold": "upper"})
    paper = RunConfig.from_run_config({"layercam-ae-threshold": "upper",
                                       "layercam-ae-decision": "voting"})
    assert paper.layercam_ae_threshold == "upper"


def test_dataset_and_model_dependent_keys_are_checked_once_both_are_known():
    import torch

    from task.models import build_model

    model, example = build_model("cnn", 1, 10, 28), torch.zeros(1, 1, 28, 28)
    RunConfig().validate_for(10, model, example)
    cases = [({"layercam-ae-target-class": 10}, "layercam-ae-target-class must be < 10"),
             ({"layercam-ae-target-layer": "conv9"}, "layercam-ae-target-layer='conv9'"),
             ({"layercam-ae-target-layer": "fc1"}, r"'fc1' gives \(1, 320\)-shaped outputs"),
             ({"layercam-ae-target-layer": "fc2"}, r"'fc2' gives \(1, 10\)-shaped outputs"),
             ({"layercam-ae-target-layer": "pool"}, "'pool' runs 2 times in a forward pass")]
    for keys, match in cases:
        config = RunConfig.from_run_config(keys)
        with pytest.raises(ConfigError, match=match):
            config.validate_for(10, model, example)
    RunConfig.from_run_config({"layercam-ae-target-layer": "conv1"}).validate_for(10, model, example)


def test_every_numeric_key_has_a_range_and_the_defaults_are_inside():
    from dataclasses import fields
    from typing import get_type_hints

    from task.config import NUMERIC_RANGES

    hints = get_type_hints(RunConfig)
    numeric = {RunConfig.key_of(f.name) for f in fields(RunConfig) if hints[f.name] in (int, float)}
    assert set(NUMERIC_RANGES) == numeric
    RunConfig().validate()  # the defaults are inside every range
