"""The extension points: every registered defense and attack builds by name from the run
config; names, Flower keywords and values a defense cannot use are refused, naming the key; a
new module is found without editing any list."""

import sys
import textwrap

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord

from attacks import ATTACKS, Attack, build_attack
from server_app.defenses import build_defense, server_assets
from strategies.base import DetectingFedAvg
from strategies.registry import DEFENSES
from task.config import ConfigError, RunConfig
from task.data import load_federated_data
from task.models import build_model
from task.train import state_to_numpy
from tests.helpers import reply


class UnusedGrid:
    """FAA-DL asks its suspects over the Grid; building it sends nothing."""


@pytest.fixture(scope="module")
def reference():
    return load_federated_data("mnist-embedded", 0).test


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_registered_defense_builds_from_the_default_config(name, reference):
    config = RunConfig(defense=name)
    strategy = build_defense(config, server_assets(config, reference, UnusedGrid()))
    assert isinstance(strategy, DetectingFedAvg) and strategy.name == name
    assert strategy.min_replies == config.min_replies and strategy.fraction_evaluate == 0.0


def test_every_attack_has_the_interface_the_client_uses():
    for name in ATTACKS.names():
        attack = build_attack(RunConfig(attack=name), build_model("cnn", 1, 10, 28))
        assert isinstance(attack, Attack) and attack.name == name
        for capability in ("needs_benign_uploads", "needs_local_probes", "poisons_data"):
            assert isinstance(getattr(attack, capability), bool)
        # only a data-poisoning attack changes what the client trains on
        assert attack.poisons_data == (type(attack).poison is not Attack.poison)


@pytest.mark.parametrize("registry,key", [(DEFENSES, "defense"), (ATTACKS, "attack")])
def test_an_unknown_name_is_refused_naming_the_key_and_the_choices(registry, key):
    with pytest.raises(ConfigError, match=rf"{key}='magic' is not one of \[.*'{registry.names()[0]}'"):
        registry.get("magic")


def test_bulyan_takes_no_multi_krum_m(reference):
    """Bulyan selects its own theta = n - 2f: Multi-Krum's m neither applies nor refuses it."""
    config = RunConfig(defense="bulyan", num_clients=24, krum_f=3, multi_krum_m=22)
    strategy = build_defense(config, server_assets(config, reference))
    assert strategy.selection_size(24) == 18
    with pytest.raises(ConfigError, match="multi-krum-m=22 exceeds"):
        config = RunConfig(defense="multi-krum", num_clients=24, krum_f=3, multi_krum_m=22)
        build_defense(config, server_assets(config, reference))


@pytest.mark.parametrize("defense,clients,needed", [
    ("krum", 8, 9), ("multi-krum", 8, 9), ("layercam-krum", 8, 9), ("bulyan", 14, 15),
])
def test_krum_f_is_checked_against_the_clients(defense, clients, needed, reference):
    config = RunConfig(defense=defense, krum_f=3, num_attackers=0, num_clients=clients)
    with pytest.raises(ConfigError, match=f"krum-f=3 needs num-clients >= .* = {needed}"):
        build_defense(config, server_assets(config, reference))
    config = RunConfig(defense=defense, krum_f=3, num_attackers=0, num_clients=needed)
    build_defense(config, server_assets(config, reference))
    # with partial participation a round has clients-per-round uploads, not num-clients
    config = RunConfig(defense=defense, krum_f=3, num_attackers=0, num_clients=100,
                       clients_per_round=needed - 1)
    with pytest.raises(ConfigError, match=f"krum-f=3 needs clients-per-round >= .* = {needed}"):
        build_defense(config, server_assets(config, reference))
    config = RunConfig(defense=defense, krum_f=3, num_attackers=0, num_clients=100,
                       clients_per_round=needed)
    build_defense(config, server_assets(config, reference))


def test_multi_krum_m_above_n_minus_f_is_refused(reference):
    config = RunConfig(defense="multi-krum", krum_f=3, num_attackers=0, num_clients=24,
                       multi_krum_m=22)
    with pytest.raises(ConfigError, match="multi-krum-m=22 exceeds n - f = 21"):
        build_defense(config, server_assets(config, reference))
    config = RunConfig(defense="multi-krum", krum_f=3, num_attackers=0, num_clients=100,
                       clients_per_round=24, multi_krum_m=22)
    with pytest.raises(ConfigError, match="multi-krum-m=22 exceeds n - f = 21"):
        build_defense(config, server_assets(config, reference))
    config = RunConfig(defense="multi-krum", krum_f=3, num_attackers=0, num_clients=24,
                       multi_krum_m=21)
    assert build_defense(config, server_assets(config, reference)).selection_size(24) == 21
    assert build_defense(config, server_assets(config, reference)).selection_size(20) == 17


def _replies_around_a_cnn(strategy, count):
    """``count`` replies, each the strategy's new global CNN plus small noise."""
    torch.manual_seed(0)
    strategy.global_state = state_to_numpy(build_model("cnn", 1, 10, 28))
    rng = np.random.default_rng(0)
    return [reply(10 + i, {k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype)
                           for k, v in strategy.global_state.items()}, {"num-examples": 10})
            for i in range(count)]


def _first_heat_map_not_finite(strategy):
    maps_of = strategy.heatmaps
    strategy.heatmaps = lambda uploads: maps_of(uploads).index_fill(0, torch.tensor([0]), float("nan"))


def test_layercam_krum_keeps_the_previous_model_below_krums_n(reference):
    config = RunConfig(defense="layercam-krum", krum_f=1, num_attackers=0, num_clients=8,
                       layercam_ae_epochs=5)
    strategy = build_defense(config, server_assets(config, reference))
    replies = _replies_around_a_cnn(strategy, 5)
    arrays, _ = strategy.aggregate_train(1, replies[:4])
    assert arrays is None and "4 valid upload(s), fewer than the 5 needed" in strategy.last_record.note
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None and strategy.last_record.kept
    # enough uploads, but one's heat map is not finite: Krum's n is checked on those left
    _first_heat_map_not_finite(strategy)
    arrays, _ = strategy.aggregate_train(3, replies)
    record = strategy.last_record
    assert arrays is None and len(record.rejected) == 1 and not record.kept
    assert "4 upload(s) with finite heat maps, fewer than the 5 needed" in record.note
    assert not record.scores


def test_layercam_ae_keeps_the_previous_model_below_min_replies_after_the_heat_maps(reference):
    """min-replies counts the uploads the heat maps can judge too: two screened uploads, one
    whose map is not finite, leave one, fewer than the 2 a round needs."""
    config = RunConfig(num_attackers=0, num_clients=8, layercam_ae_epochs=5)
    strategy = build_defense(config, server_assets(config, reference))
    replies = _replies_around_a_cnn(strategy, 2)
    _first_heat_map_not_finite(strategy)
    arrays, _ = strategy.aggregate_train(1, replies)
    record = strategy.last_record
    assert arrays is None and len(record.rejected) == 1 and not record.kept
    assert "1 upload(s) with finite heat maps, fewer than the 2 needed" in record.note


def test_an_aont_lambda_singular_for_the_image_height_is_refused(reference):
    config = RunConfig(defense="faa-dl", faa_dl_aont_lambda=27)
    with pytest.raises(ConfigError, match="faa-dl-aont-lambda"):
        build_defense(config, server_assets(config, reference, UnusedGrid()))


def test_flower_keywords_are_honoured_or_refused():
    calls = []

    def sum_of_losses(contents, weighted_by_key):
        calls.append([c["metrics"][weighted_by_key] for c in contents])
        return MetricRecord({"loss-sum": sum(c["metrics"]["loss"] for c in contents)})

    strategy = DetectingFedAvg(train_metrics_aggr_fn=sum_of_losses)
    torch.manual_seed(0)
    strategy.global_state = state_to_numpy(build_model("cnn", 1, 10, 28))
    replies = [reply(n, strategy.global_state, {"num-examples": 10 * n, "loss": float(n)})
               for n in (1, 2, 3)]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["loss-sum"] == 6.0 and sorted(calls[0]) == [10, 20, 30]
    with pytest.raises(TypeError, match="no_such_keyword"):
        DetectingFedAvg(no_such_keyword=1)


def test_the_default_metrics_are_the_kept_uploads_weighted_mean():
    strategy = DetectingFedAvg()
    torch.manual_seed(0)
    strategy.global_state = state_to_numpy(build_model("cnn", 1, 10, 28))
    replies = [reply(1, strategy.global_state, {"num-examples": 10, "loss": 1.0, "odd": [1.0]}),
               reply(2, strategy.global_state, {"num-examples": 30, "loss": 3.0, "odd": 2.0,
                                                "nan": float("nan")})]
    _, metrics = strategy.aggregate_train(1, replies)
    assert dict(metrics) == {"num-examples": 40.0, "loss": pytest.approx(2.5)}


def test_a_new_module_in_a_package_is_found_and_names_are_taken_once(tmp_path, monkeypatch):
    package = tmp_path / "extensions"
    package.mkdir()
    (package / "__init__.py").write_text("from task.registry import Registry\n"
                                         "THINGS = Registry('extensions', 'thing')\n")
    (package / "spinner.py").write_text(textwrap.dedent("""
        from extensions import THINGS

        @THINGS.register
        class Spinner:
            name = "spinner"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        from extensions import THINGS

        assert THINGS.names() == ["spinner"]
        assert THINGS.get("spinner").__name__ == "Spinner"
        with pytest.raises(ValueError, match="taken"):
            THINGS.register(type("Other", (), {"name": "spinner"}))
        with pytest.raises(TypeError, match="'name'"):
            THINGS.register(type("Nameless", (THINGS.get("spinner"),), {}))
    finally:
        for module in [m for m in sys.modules if m.split(".")[0] == "extensions"]:
            del sys.modules[module]

