"""LayerCAM-AE as a Flower strategy: crafted attackers are excluded, both rules are scored on
the same rounds, bad uploads are rejected, the empty set is never aggregated, and no decision
depends on a client's ground-truth role."""


import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from attacks import AttackInput, build_attack
from strategies.aggregation import weighted_average
from strategies.base import DetectingFedAvg
from strategies.layercam_ae import LayerCamAe, LayerCamAeSettings
from strategies.records import ClientUpload, Detection
from task.config import RunConfig
from task.models import build_model
from task.train import evaluate, load_numpy_state
from tests.helpers import benign_errors, benign_trajectory, reply

ROUNDS, CLIENTS, ATTACKERS = 3, 24, 3
ATTACKER_IDS = list(range(CLIENTS - ATTACKERS, CLIENTS))


@pytest.fixture(scope="module")
def trajectory():
    return benign_trajectory(ROUNDS, CLIENTS)


ATTACKS = {"ipm": RunConfig(attack="ipm", ipm_epsilon=3.0),  # 3 identical uploads: -3 x mean update
           "gaussian": RunConfig(attack="gaussian", gaussian_sigma=0.05),  # independent noise
           "sign-flip": RunConfig(attack="sign-flip")}


def craft(attack, global_state, own, benign, rng):
    """What the 3 of 24 attackers upload, crafted by the attack of ``attacks/``."""
    attack = build_attack(ATTACKS[attack])
    return [attack.craft(AttackInput(global_state, state, rng, tuple(benign))) for state in own]


def attacked_round(trajectory, t, attack, rng):
    """Round ``t``'s uploads, the attackers' replaced by what ``attack`` crafts."""
    globals_, states, _, _ = trajectory
    round_states = list(states[t])
    for c, s in zip(ATTACKER_IDS, craft(attack, globals_[t], [states[t][c] for c in ATTACKER_IDS],
                                      states[t][: CLIENTS - ATTACKERS], rng)):
        round_states[c] = s
    return round_states


def make_strategy(data, probe_labels=None, device=None, **settings):
    order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(0))
    return LayerCamAe(model_fn=lambda: build_model("cnn", 1, 10, 28),
                      probes=data.test.as_float(order[:4]), target_layer="conv2",
                      settings=LayerCamAeSettings(seed=0, **settings),
                      probe_labels=probe_labels, device=device)


def node(c):
    return 100 + c


def run_rounds(strategy, trajectory, attack):
    globals_, states, sizes, data = trajectory
    rng = np.random.default_rng(0)
    aucs, excluded, result = {"upper": [], "two-sided": [], "decision": []}, [], None
    for t in range(ROUNDS):
        round_states = attacked_round(trajectory, t, attack, rng)
        strategy.global_state = globals_[t]
        replies = [reply(node(c), s, {"num-examples": sizes[c], "train-loss": 0.1})
                   for c, s in enumerate(round_states)]
        result, _ = strategy.aggregate_train(t + 1, replies)
        record = strategy.last_record
        truth = [c in ATTACKER_IDS for c in range(CLIENTS)]
        d = record.details
        aucs["upper"].append(roc_auc_score(truth, [d["upper_scores"][node(c)] for c in range(CLIENTS)]))
        aucs["two-sided"].append(roc_auc_score(truth, [d["two_sided_scores"][node(c)] for c in range(CLIENTS)]))
        aucs["decision"].append(roc_auc_score(truth, [record.scores[node(c)] for c in range(CLIENTS)]))
        excluded.append(set(record.excluded))
    return aucs, excluded, result


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_default_rule_excludes_crafted_attackers_and_accuracy_holds(trajectory, attack, capsys):
    globals_, states, sizes, data = trajectory
    aucs, excluded, result = run_rounds(make_strategy(data), trajectory, attack)
    attackers = {node(c) for c in ATTACKER_IDS}
    assert excluded[-1] >= attackers, f"voting round must exclude all attackers: {excluded}"
    assert all(len(e - attackers) <= 2 for e in excluded), f"too many benign excluded: {excluded}"
    # the scores the defense decides on (heat-map evidence, views) rank the attackers first in
    # every round; the heat maps' own two-sided score does on average, except against
    # sign-flip, whose late rounds it ranks poorly (0.556 in round 3 here): the update views
    # catch what it misses (docs/defense-in-depth.md)
    assert min(aucs["decision"]) >= 0.9, aucs["decision"]
    if attack != "sign-flip":
        assert np.mean(aucs["two-sided"]) >= 0.9
    model = build_model("cnn", 1, 10, 28)
    load_numpy_state(model, {k: v.numpy() for k, v in result.items()})
    _, accuracy = evaluate(model, data.test, torch.device("cpu"))
    clean = build_model("cnn", 1, 10, 28)
    load_numpy_state(clean, weighted_average(
        [ClientUpload(c, s, float(sizes[c])) for c, s in enumerate(states[-1]) if c not in ATTACKER_IDS]))
    _, clean_accuracy = evaluate(clean, data.test, torch.device("cpu"))
    assert accuracy >= clean_accuracy - 0.02
    with capsys.disabled():
        print(f"\n[{attack}] AUC per round: paper's upper rule {np.round(aucs['upper'], 3).tolist()}, "
              f"two-sided {np.round(aucs['two-sided'], 3).tolist()}, the defense's scores "
              f"{np.round(aucs['decision'], 3).tolist()}; accuracy {accuracy:.4f} "
              f"(clean {clean_accuracy:.4f})")


def test_malformed_uploads_are_rejected_with_reasons_and_never_aggregated(trajectory):
    globals_, states, sizes, data = trajectory
    strategy = DetectingFedAvg()
    strategy.global_state = globals_[1]
    good = states[1][:3]
    bad_nan = {k: v.copy() for k, v in good[0].items()}
    bad_nan["fc2.bias"][0] = np.nan
    bad_shape = {k: v for k, v in good[0].items()}
    bad_shape["fc2.weight"] = np.zeros((3, 3), dtype=np.float32)
    bad_dtype = {k: v.astype(np.float64) if k == "conv1.weight" else v for k, v in good[0].items()}
    missing = {k: v for k, v in good[0].items() if k != "fc1.bias"}
    huge = {k: v * 1e6 for k, v in good[0].items()}
    replies = [reply(1, good[0], {"num-examples": 10}), reply(2, good[1], {"num-examples": 30}),
               reply(3, bad_nan, {"num-examples": 10}), reply(4, bad_shape, {"num-examples": 10}),
               reply(5, bad_dtype, {"num-examples": 10}), reply(6, missing, {"num-examples": 10}),
               reply(7, huge, {"num-examples": 10}), reply(8, good[2], {"loss": 1.0}),
               reply(9, None, {"num-examples": 10}), reply(10, good[2], {"num-examples": -5})]
    arrays, _ = strategy.aggregate_train(2, replies)
    record = strategy.last_record
    assert record.kept == [1, 2]
    reasons = record.rejected
    assert set(reasons) == {3, 4, 5, 6, 7, 8, 9, 10}
    assert "NaN" in reasons[3] and "fc2.weight" in reasons[4] and "float64" in reasons[5]
    assert "fc1.bias" in reasons[6] and "norm" in reasons[7] and "num-examples" in reasons[8]
    assert "ArrayRecord" in reasons[9] and "positive" in reasons[10]
    expected = (good[0]["fc2.bias"] * 10 + good[1]["fc2.bias"] * 30) / 40
    np.testing.assert_allclose(arrays["fc2.bias"].numpy(), expected, rtol=1e-5)


def test_everything_flagged_keeps_the_previous_global_model(trajectory):
    globals_, states, sizes, data = trajectory

    class RejectAll(DetectingFedAvg):
        def detect(self, server_round, uploads):
            return Detection(kept=[])

    strategy = RejectAll()
    strategy.global_state = globals_[0]
    arrays, metrics = strategy.aggregate_train(1, [reply(1, states[0][0], {"num-examples": 5})])
    assert arrays is None and metrics is None
    assert not strategy.last_record.aggregated and "previous global model" in strategy.last_record.note


def test_a_second_reply_from_one_node_is_ignored(trajectory):
    globals_, states, sizes, data = trajectory
    strategy = DetectingFedAvg()
    strategy.global_state = globals_[1]
    arrays, _ = strategy.aggregate_train(2, [reply(1, states[1][0], {"num-examples": 10}),
                                             reply(2, states[1][1], {"num-examples": 10}),
                                             reply(1, states[1][2], {"num-examples": 10})])
    record = strategy.last_record
    assert record.kept == [1, 2] and not record.rejected and sorted(record.received) == [1, 2]
    expected = (states[1][0]["fc2.bias"] + states[1][1]["fc2.bias"]) / 2
    np.testing.assert_allclose(arrays["fc2.bias"].numpy(), expected, rtol=1e-5)


def test_auto_engine_is_chosen_by_device_and_recorded(trajectory):
    _, _, _, data = trajectory
    strategy = make_strategy(data)
    assert strategy.engine == ("vmap" if torch.cuda.is_available() else "loop")
    assert make_strategy(data, engine="vmap").engine == "vmap"
    with pytest.raises(ValueError, match="engine"):
        make_strategy(data, engine="fastest")
    with pytest.raises(ValueError, match="map_size"):
        make_strategy(data, map_size="huge")


def test_each_heatmap_worker_gets_its_own_template_copy_on_a_cpu(trajectory):
    _, _, _, data = trajectory
    cpu = torch.device("cpu")
    templates = make_strategy(data, workers=3, device=cpu).templates
    assert len({id(t) for t in templates}) == 3
    assert all(not t.training for t in templates)
    assert len(make_strategy(data, workers=3, engine="vmap", device=cpu).templates) == 1
    with pytest.raises(ValueError, match="workers"):
        make_strategy(data, workers=0)


def test_decisions_and_the_aggregate_depend_neither_on_arrival_order_nor_on_node_ids(trajectory):
    """Flower delivers replies in arrival order and draws node ids at random each run; the
    round's bits must not change with either."""
    globals_, states, sizes, data = trajectory
    random_ids = np.random.default_rng(4).integers(1, 2**62, CLIENTS).tolist()
    runs = [(list(range(CLIENTS)), [node(c) for c in range(CLIENTS)]),
            (list(reversed(range(CLIENTS))), [node(c) for c in range(CLIENTS)]),
            (np.random.default_rng(3).permutation(CLIENTS).tolist(), random_ids)]
    outcomes = []
    for order, ids in runs:
        strategy, rng, rounds = make_strategy(data), np.random.default_rng(0), []
        client_of = {n: c for c, n in enumerate(ids)}
        for t in range(2):
            round_states = attacked_round(trajectory, t, "ipm", rng)
            strategy.global_state = globals_[t]
            replies = [reply(ids[c], round_states[c], {"num-examples": sizes[c]}) for c in order]
            arrays, _ = strategy.aggregate_train(t + 1, replies)
            record = strategy.last_record
            rounds.append((sorted(client_of[n] for n in record.excluded),
                           {client_of[n]: v for n, v in record.scores.items()},
                           {k: v.numpy().tobytes() for k, v in arrays.items()}))
        outcomes.append(rounds)
    assert outcomes[0] == outcomes[1] == outcomes[2]


def test_the_settings_are_read_from_their_run_config_keys_defaults_included():
    from dataclasses import fields

    assert LayerCamAeSettings.from_config(RunConfig()) == LayerCamAeSettings()
    other = dict(target_class=3, map_size="probe", engine="vmap", threads=2, workers=3,
                 keep_heatmaps=True, hidden=64, epochs=50, lr=1e-2, weight_decay=0.0,
                 tolerance=1e-3, seed=7, decision="voting", robust_z=3.0, low_z=3.5, memory=0.5,
                 evidence_decay="rounds", score_cap=4.0, scale_rounds=1, group_z=2.25,
                 group_size=0, hold=False, threshold="upper", beta=2.0, window=4, votes=3,
                 views=("norm",), view_z=5.0, view_pair=0.9, rejudge=False, rejudge_margin=2.0,
                 clip=False, clip_z=0.0)
    assert set(other) == {f.name for f in fields(LayerCamAeSettings)}
    assert all(v != getattr(LayerCamAeSettings(), f) for f, v in other.items())
    config = RunConfig.from_run_config({LayerCamAeSettings.key_of(f): ",".join(v) if f == "views"
                                        else v for f, v in other.items()})
    assert LayerCamAeSettings.from_config(config) == LayerCamAeSettings(**other)


def test_the_papers_rule_stays_selectable_and_both_scores_are_recorded(trajectory):
    globals_, states, sizes, data = trajectory
    paper = make_strategy(data, decision="voting", threshold="upper", views=(), clip=False)
    paper.global_state = globals_[0]
    paper.aggregate_train(1, [reply(node(c), s, {"num-examples": sizes[c]})
                              for c, s in enumerate(states[0])])
    details = paper.last_record.details
    assert details["decision"] == "voting" and details["rule"] == "upper"
    assert paper.last_record.scores == details["upper_scores"]
    assert len(details["two_sided_scores"]) == CLIENTS and "evidence" not in details
    assert "views" not in details and details["clip_bound"] is None
    with pytest.raises(ValueError, match="voting"):
        make_strategy(data, threshold="upper")


def test_probes_are_scored_for_their_labels_unless_a_class_is_fixed(trajectory):
    globals_, _, _, data = trajectory
    order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(0))
    labels = data.test.labels[order[:4]]
    strategy = make_strategy(data, probe_labels=labels)
    strategy.global_state = globals_[0]
    assert torch.equal(strategy.probe_classes(), labels)
    fixed = make_strategy(data, probe_labels=labels, target_class=3)
    assert fixed.probe_classes().tolist() == [3, 3, 3, 3]
    predicted = make_strategy(data)
    predicted.global_state = globals_[0]
    model = build_model("cnn", 1, 10, 28)
    load_numpy_state(model, globals_[0])
    with torch.no_grad():
        assert torch.equal(predicted.probe_classes(), model.eval()(predicted.probes).argmax(dim=1))
    with pytest.raises(ValueError, match="probe_labels"):
        make_strategy(data, probe_labels=labels[:3])


def test_an_upload_whose_heat_map_overflows_is_rejected_and_the_round_goes_on():
    """A ResNet-18 scaled x100 passes the screening (its distance is inside the norm bound) but
    its outputs on the probes overflow to NaN: its heat map is not finite. It is rejected with
    the reason, the other uploads are decided on as if it had not come, and nothing non-finite
    reaches a score, the evidence or the model."""
    torch.manual_seed(0)
    model_fn = lambda: build_model("resnet18", 1, 10, 16)  # noqa: E731
    global_state = {k: v.numpy().copy() for k, v in model_fn().state_dict().items()}
    rng = np.random.default_rng(0)
    benign = [{k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) if v.dtype.kind == "f"
               else v for k, v in global_state.items()} for _ in range(5)]
    scaled = {k: v * np.float32(100) if v.dtype.kind == "f" and not k.endswith("running_var")
              else v for k, v in benign[0].items()}
    probes = torch.rand(2, 1, 16, 16)

    def decide(states):
        strategy = LayerCamAe(model_fn=model_fn, probes=probes, target_layer="layer4",
                              settings=LayerCamAeSettings(seed=0, epochs=20), min_replies=2)
        strategy.global_state = global_state
        arrays, _ = strategy.aggregate_train(1, [reply(c, s, {"num-examples": 10})
                                                 for c, s in enumerate(states)])
        return arrays, strategy

    arrays, strategy = decide(benign + [scaled])
    record = strategy.last_record
    assert record.rejected == {5: "heat map is not finite (the model's output on the server's "
                                  "probes overflows or is NaN)"}
    assert 5 not in record.kept + record.excluded and 5 in record.received
    assert all(np.isfinite(s) for s in record.scores.values()) and 5 not in record.scores
    assert all(np.isfinite(e) for e in strategy.evidence.sums.values()) and 5 not in strategy.evidence.sums
    _, clean = decide(benign)
    assert record.kept == clean.last_record.kept
    assert record.scores == pytest.approx(clean.last_record.scores)
    for view, scores in clean.last_record.details["views"].items():  # over the five, not six
        assert record.details["views"][view] == pytest.approx(scores), view
    assert all(np.isfinite(v.numpy()).all() for v in arrays.values())


def test_the_head_direction_view_sees_an_upload_whose_output_layer_alone_is_turned(trajectory):
    """An honest upload whose classifier head (fc2) update is reversed, as training on flipped
    labels turns it, the rest of its update as trained: the whole update's direction hardly
    moves (fc2 is 3,210 of 383,306 coordinates), the head's direction sees it. The recorded
    head-direction scores are the view's definition on the float64 update matrix, to float32
    rounding."""
    from strategies.detection.thresholds import robust_z
    from strategies.detection.update_views import VIEWS
    from task.params import columns_of, flatten_updates

    globals_, states, sizes, data = trajectory
    round_states = [dict(s) for s in states[1]]
    turned = round_states[-1]
    for name in ("fc2.weight", "fc2.bias"):
        turned[name] = (2 * globals_[1][name] - turned[name]).astype(turned[name].dtype)
    replies = [reply(node(c), s, {"num-examples": sizes[c]}) for c, s in enumerate(round_states)]
    records = {}
    for views in (("norm", "direction", "outside-range", "collusion"),
                  ("norm", "direction", "outside-range", "collusion", "head-direction")):
        strategy = make_strategy(data, views=views)
        strategy.global_state = globals_[1]
        strategy.aggregate_train(2, replies)
        records[views] = strategy.last_record
    without_head, with_head = records.values()
    assert node(CLIENTS - 1) not in without_head.details["flagged_by_views"]
    assert without_head.details["views"]["direction"][node(CLIENTS - 1)] < 6.0
    assert node(CLIENTS - 1) in with_head.details["flagged_by_views"]
    nodes = [node(c) for c in range(CLIENTS)]
    head = [with_head.details["views"]["head-direction"][n] for n in nodes]
    assert int(np.argmax(head)) == CLIENTS - 1 and head[-1] > 6.0
    updates, _ = flatten_updates(round_states, globals_[1])
    expected = robust_z(VIEWS["head-direction"](
        updates, np.median(updates, axis=0),
        head=columns_of(globals_[1], ("fc2.weight", "fc2.bias"))))
    assert head == pytest.approx(expected, rel=1e-4, abs=1e-4)  # float32 sums over the head


def test_a_model_without_a_linear_output_layer_stops_at_start_with_the_views_key_named():
    """The head-direction view, a default one, reads the last ``nn.Linear``: a model without one
    stops the strategy when it is made, naming the key to change; without that view it runs."""
    from task.config import ConfigError

    def convolutional():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())

    arguments = dict(model_fn=convolutional, probes=torch.rand(2, 1, 8, 8), target_layer="0")
    with pytest.raises(ConfigError, match=r"layercam-ae-views: Sequential has no nn.Linear output"
                                          r" layer; leave `head-direction` out"):
        LayerCamAe(settings=LayerCamAeSettings(), **arguments)
    views = ("norm", "direction", "outside-range", "collusion")
    assert LayerCamAe(settings=LayerCamAeSettings(views=views), **arguments).head_names == ()


def test_a_boosted_upload_is_excluded_the_round_it_arrives_and_clipping_bounds_a_kept_one(trajectory):
    from attacks.model_replacement import ModelReplacement
    from strategies.detection.thresholds import robust_z
    from strategies.detection.update_views import VIEW_TAILS, VIEWS, norm_bound, view_excess
    from task.params import columns_of, flatten_updates

    globals_, states, sizes, data = trajectory
    round_states = list(states[0])
    boosted = ModelReplacement(boost=CLIENTS).craft(
        AttackInput(globals_[0], states[0][-1], np.random.default_rng(0), server_round=1))
    round_states[-1] = boosted
    replies = [reply(node(c), s, {"num-examples": sizes[c]}) for c, s in enumerate(round_states)]

    strategy = make_strategy(data)  # every view, clipping on
    strategy.global_state = globals_[0]
    strategy.aggregate_train(1, replies)
    # far past the norm cut: excluded without a second judgement (the margin)
    assert strategy.last_record.details["set_aside_by_views"] == []
    assert strategy.last_record.details["first_excess"][node(CLIENTS - 1)] > 3.0
    assert node(CLIENTS - 1) in strategy.last_record.excluded
    strategy = make_strategy(data, rejudge_margin=1e6)  # every excluded upload judged again
    strategy.global_state = globals_[0]
    strategy.aggregate_train(1, replies)
    judged_again = strategy.last_record
    strategy = make_strategy(data, rejudge=False)  # one judgement: the definitions below
    strategy.global_state = globals_[0]
    strategy.aggregate_train(1, replies)
    record = strategy.last_record
    assert node(CLIENTS - 1) in record.excluded
    # the boosted upload, and at most one benign client: in this untrained round one benign
    # update points 6.5 robust deviations away from the median direction (the cut is 6)
    flagged = record.details["flagged_by_views"]
    assert node(CLIENTS - 1) in flagged and len(flagged) <= 2
    assert record.details["views"]["norm"][node(CLIENTS - 1)] > strategy.settings.view_z
    assert len(record.excluded) <= 3
    # the recorded norms and view scores (block sums in the model's float32, beside the heat
    # maps) are the views' definitions on the whole float64 update matrix, to float32 rounding
    updates, _ = flatten_updates(round_states, globals_[0])
    centre = np.median(updates, axis=0)
    nodes = [node(c) for c in range(CLIENTS)]
    assert [record.details["update_norms"][n] for n in nodes] == pytest.approx(
        np.linalg.norm(updates, axis=1), rel=1e-6)
    assert strategy.settings.views == ("norm", "direction", "outside-range", "collusion",
                                       "head-direction")
    head = columns_of(globals_[0], ("fc2.weight", "fc2.bias"))
    for view in strategy.settings.views:
        expected = robust_z(VIEWS[view](updates, centre, head=head))
        close = 1e-4 if view == "head-direction" else 1e-5  # float32 sums over the head
        assert [record.details["views"][view][n] for n in nodes] == pytest.approx(
            expected, rel=close, abs=close), view
    # the flagged uploads are those whose views pass one cut or two 0.6 shares of theirs; the
    # head's direction and the whole update's are one side, by the larger
    relative = {v: np.array([record.details["views"][v][n] for n in nodes])
                / (strategy.settings.view_z * VIEW_TAILS[v]) for v in strategy.settings.views}
    relative["direction"] = np.maximum(relative["direction"], relative.pop("head-direction"))
    excess = view_excess(np.stack(list(relative.values())), record.details["view_pair"])
    assert record.details["view_pair"] == 0.6
    assert record.details["flagged_by_views"] == sorted(n for n, e in zip(nodes, excess) if e > 1)
    # the uploads the first judgement excluded are judged again against the ones it kept (the
    # reference): the same definitions around their median, with their spreads; the kept keep
    # their first scores
    aside = judged_again.details["set_aside_by_views"]
    assert aside == record.details["flagged_by_views"]
    assert node(CLIENTS - 1) in judged_again.excluded
    reference = [i for i, n in enumerate(nodes) if n not in aside]
    centre = np.median(updates[reference], axis=0)
    deviation = np.abs(updates - centre)
    sigma = 1.4826 * np.median(deviation[reference], axis=0)
    sigma = np.where(sigma > 0, sigma, deviation[reference].mean(axis=0))
    outside = np.where(deviation > 4.0 * sigma, deviation ** 2, 0.0).sum(axis=1)
    definitions = {**{v: VIEWS[v](updates, centre, head=head)
                      for v in ("norm", "direction", "collusion", "head-direction")},
                   "outside-range": outside / (deviation ** 2).sum(axis=1)}
    for view, values in definitions.items():
        expected = robust_z(values, np.array(reference))
        close = 1e-4 if view == "head-direction" else 1e-5
        assert [judged_again.details["views"][view][n] for n in aside] == pytest.approx(
            [expected[nodes.index(n)] for n in aside], rel=close, abs=close), view
        assert ({n: judged_again.details["views"][view][n] for n in nodes if n not in aside}
                == {n: record.details["views"][view][n] for n in nodes if n not in aside})

    # the heat maps alone: whatever they decide, a kept update moves the model no farther than
    # the round's clipping bound, taken from each upload's own norm
    strategy = make_strategy(data, views=(), clip=True)
    strategy.global_state = globals_[0]
    arrays, _ = strategy.aggregate_train(1, replies)
    record = strategy.last_record
    norms = np.linalg.norm(updates, axis=1)
    assert [record.details["update_norms"][n] for n in nodes] == pytest.approx(norms, rel=1e-12)
    assert record.details["clip_bound"] == pytest.approx(
        norm_bound(norms, strategy.settings.clip_z), rel=1e-12)
    new_global = {k: v.numpy() for k, v in arrays.items()}
    step = flatten_updates([new_global], globals_[0])[0][0]
    assert np.linalg.norm(step) <= record.details["clip_bound"] * (1 + 1e-6)
    assert "views" not in record.details


@pytest.mark.parametrize("probes", [3, 10])
def test_kept_heat_maps_cover_every_probe_and_come_with_the_probes(probes):
    """``keep_heatmaps``: the record holds each upload's map for each probe (the first
    ``KEPT_PROBES``) and those probes, for the harness to draw the maps over them; without it,
    neither."""
    from strategies.layercam_ae import KEPT_PROBES

    torch.manual_seed(0)
    model_fn = lambda: build_model("cnn", 1, 10, 28)  # noqa: E731
    global_state = {k: v.numpy().copy() for k, v in model_fn().state_dict().items()}
    rng = np.random.default_rng(0)
    states = [{k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) for k, v in
               global_state.items()} for _ in range(4)]
    images = torch.randn(probes, 1, 28, 28)
    for keep in (True, False):
        strategy = LayerCamAe(model_fn=model_fn, probes=images, target_layer="conv2",
                              settings=LayerCamAeSettings(seed=0, epochs=5, keep_heatmaps=keep),
                              min_replies=2)
        strategy.global_state = global_state
        strategy.aggregate_train(1, [reply(c, s, {"num-examples": 10}) for c, s in enumerate(states)])
        record = strategy.last_record
        if not keep:
            assert record.heatmaps is None and record.probes is None
            continue
        kept = min(probes, KEPT_PROBES)
        assert record.heatmaps.shape[:2] == (4, kept) and record.heatmaps.ndim == 4
        np.testing.assert_array_equal(record.probes, images[:kept].numpy())
        # in the record's order (uploads are taken in the order of their content)
        maps = strategy.heatmaps([ClientUpload(c, states[c], 10) for c in record.received])
        np.testing.assert_allclose(record.heatmaps, maps[:, :kept].numpy(), atol=1e-6)


def test_the_autoencoder_beside_the_views_changes_nothing_but_the_time(trajectory, monkeypatch):
    """On a CPU with two workers the autoencoder trains on a pool thread while the views' sums
    are added: every decision, score, view and aggregate equals the one-thread run's bit for
    bit, and the round's timings still add up to no more than the time it took (the views
    count only what they add beyond the autoencoder)."""
    import threading
    import time

    globals_, states, sizes, data = trajectory
    trained_on, walls, summed = [], {"autoencoder_and_sums": 0.0, "judge_by_views": 0.0}, []
    train, update_sums = LayerCamAe.train_autoencoder, LayerCamAe.update_sums

    def recorded_train(self, maps, server_round):
        trained_on.append(threading.current_thread().name)
        return train(self, maps, server_round)

    def counted_sums(self, uploads, **second):
        summed.append((len(uploads), second.get("reference") is not None))
        return update_sums(self, uploads, **second)

    def timed(name):
        method = getattr(LayerCamAe, name)

        def run(self, *args):
            start = time.perf_counter()
            try:
                return method(self, *args)
            finally:
                walls[name] += time.perf_counter() - start
        return run

    monkeypatch.setattr(LayerCamAe, "train_autoencoder", recorded_train)
    monkeypatch.setattr(LayerCamAe, "update_sums", counted_sums)
    for name in walls:
        monkeypatch.setattr(LayerCamAe, name, timed(name))
    outcomes, timings = {}, []
    for workers in (1, 2):
        strategy, rng, rounds = make_strategy(data, workers=workers, device=torch.device("cpu")), \
            np.random.default_rng(0), []
        walls.update(dict.fromkeys(walls, 0.0))
        for t in range(2):
            round_states = attacked_round(trajectory, t, "ipm", rng)
            strategy.global_state = globals_[t]
            replies = [reply(node(c), s, {"num-examples": sizes[c]}) for c, s in enumerate(round_states)]
            arrays, _ = strategy.aggregate_train(t + 1, replies)
            record = strategy.last_record
            details = {k: v for k, v in record.details.items() if k != "ae_epochs"}
            rounds.append((record.excluded, record.scores, details,
                           {k: v.numpy().tobytes() for k, v in arrays.items()}))
            if workers == 2:
                timings.append(record.timings)
        outcomes[workers] = rounds
    assert outcomes[1] == outcomes[2]
    assert trained_on[:2] == ["MainThread"] * 2
    assert all(name.startswith("update-views") for name in trained_on[2:])
    assert len(trained_on) == 4
    # once a round: the sums made beside the AE are the ones used (and the second judgement's
    # against the uploads the views keep, when they exclude some)
    assert [first for first in summed if not first[1]] == [(CLIENTS, False)] * 4
    # the overlap is the autoencoder's whole time (tens of ms a round); counted twice, it would
    # pass the wall far beyond the microseconds that the calls themselves add
    spent = sum(t["autoencoder"] + t["views"] for t in timings)
    assert 0 < spent <= walls["autoencoder_and_sums"] + walls["judge_by_views"] + 2e-3
    assert sum(t["autoencoder"] for t in timings) > 10e-3


def test_the_clients_the_views_exclude_reach_the_evidence_decision(trajectory, monkeypatch):
    """A round through ``aggregate_train``: the uploads the views flag are the ones the
    evidence decision is told are out (they make no low group), and they are excluded."""
    globals_, states, sizes, data = trajectory
    strategy = make_strategy(data)
    strategy.global_state = globals_[0]
    judge, decide, told = LayerCamAe.judge_by_views, LayerCamAe.decide_by_evidence, []

    def flag_two(self, uploads, sums=None):
        excess, details = judge(self, uploads, sums)
        excess.update({node(0): 1.5, node(1): 2.0})
        return excess, details

    def recorded(self, server_round, node_ids, errors, flagged=()):
        told.append(set(flagged))
        return decide(self, server_round, node_ids, errors, flagged)

    monkeypatch.setattr(LayerCamAe, "judge_by_views", flag_two)
    monkeypatch.setattr(LayerCamAe, "decide_by_evidence", recorded)
    replies = [reply(node(c), s, {"num-examples": sizes[c]}) for c, s in enumerate(states[0])]
    strategy.aggregate_train(1, replies)
    assert told[0] >= {node(0), node(1)}
    assert {node(0), node(1)} <= set(strategy.last_record.excluded)
    assert strategy.last_record.scores[node(1)] == pytest.approx(
        2.0 * strategy.settings.robust_z)


def deciding_strategy(**settings) -> LayerCamAe:
    """A LayerCAM-AE to drive ``decide_by_evidence`` with crafted errors (its probes are random:
    no heat map is computed)."""
    return LayerCamAe(model_fn=lambda: build_model("cnn", 1, 10, 28),
                      probes=torch.rand(4, 1, 28, 28), target_layer="conv2",
                      settings=LayerCamAeSettings(seed=0, **settings))


def test_a_benign_client_is_not_swept_out_with_the_clients_the_views_exclude():
    """Three attackers sit 2.5 sd low every round, a benign client 1.8 sd low: from round 6 it
    is in the band with them. Told the views exclude the three, the decision leaves it in (they
    are out already, and it is no group alone); not told, the four make a group."""
    def excluded(flagged):
        strategy = deciding_strategy()
        rng, out = np.random.default_rng(0), []
        for server_round in range(1, 9):
            errors = benign_errors(rng)
            errors[21:] = 1.0 - 2.5 * 0.05 + rng.normal(0, 0.002, 3)
            errors[5] = 1.0 - 1.8 * 0.05
            kept, _, _ = strategy.decide_by_evidence(server_round, list(range(24)), errors,
                                                     flagged)
            out.append(5 not in kept)
        return out

    assert excluded(()) == [False] * 5 + [True] * 3
    assert not any(excluded({21, 22, 23}))


def test_a_client_the_views_exclude_is_held_while_its_evidence_stays_low():
    """Two colluders sit 2.5 sd low every round, too few for a group; the views exclude them in
    round 3 alone. Held, they stay out in round 4 (evidence about -3.9, below -group_z), until
    their evidence crosses the lone cut (round 5); without the hold they are back in round 4.
    Flagged again in round 4, they are the views' exclusions there, not named as held."""
    def excluded(flag_rounds=(3,), **settings):
        strategy = deciding_strategy(**settings)
        rng, out = np.random.default_rng(0), []
        for server_round in range(1, 9):
            errors = benign_errors(rng)
            errors[22:] = 1.0 - 2.5 * 0.05 + rng.normal(0, 0.002, 2)
            flagged = {22, 23} if server_round in flag_rounds else set()
            kept, _, details = strategy.decide_by_evidence(server_round, list(range(24)),
                                                           errors, flagged)
            out.append(((set(range(24)) - set(kept)) | flagged, set(details["held"])))
        return out

    pair = {22, 23}
    held = excluded()
    assert [e for e, _ in held] == [set(), set()] + [pair] * 6
    assert [h for _, h in held] == [set()] * 3 + [pair] + [set()] * 4
    assert [e for e, _ in excluded(hold=False)] == [set(), set(), pair, set()] + [pair] * 4
    flagged_twice = excluded(flag_rounds=(3, 4))
    assert [e for e, _ in flagged_twice] == [e for e, _ in held]
    assert all(h == set() for _, h in flagged_twice)


def test_the_hold_keeps_a_group_out_as_its_members_cross_the_lone_cut():
    """Three colluders sit 2.5 sd low every round: a low group from round 3. From round 4 one
    of them sits 8 sd low and crosses the lone cut first, leaving two in the band, no group of
    three, until they cross it too (round 6). With the hold (the default) the two stay
    excluded in rounds 4-5, named in ``held``, and a resumed strategy (``checkpoint_state``)
    holds them as well; without it they are readmitted. A held client not scored in a round
    (partial participation) is still held when it comes back."""
    rng = np.random.default_rng(0)
    rounds = []
    for server_round in range(1, 9):
        errors = benign_errors(rng)
        errors[21:] = 1.0 - 2.5 * 0.05 + rng.normal(0, 0.002, 3)
        if server_round >= 4:
            errors[21] = 1.0 - 8 * 0.05
        rounds.append(errors)

    def run(decider, first, last, absent=()):
        out = []
        for server_round in range(first, last + 1):
            nodes = [n for n in range(24) if not (server_round == 4 and n in absent)]
            kept, _, details = decider.decide_by_evidence(server_round, nodes,
                                                          rounds[server_round - 1][nodes])
            out.append((set(nodes) - set(kept), set(details["held"])))
        return out

    group = {21, 22, 23}
    without = run(deciding_strategy(hold=False), 1, 8)
    assert [e for e, _ in without] == [set(), set(), group, {21}, {21}, group, group, group]
    assert all(held == set() for _, held in without)

    held = run(deciding_strategy(), 1, 8)
    assert [e for e, _ in held] == [set(), set(), group, group, group, group, group, group]
    assert [h for _, h in held] == [set(), set(), set(), {22, 23}, {22, 23}, set(), set(), set()]

    first = deciding_strategy()
    run(first, 1, 3)
    resumed = deciding_strategy()
    resumed.restore_state(first.checkpoint_state())
    assert resumed.held == group
    assert run(resumed, 4, 8) == held[3:]

    away = deciding_strategy()
    out = run(away, 1, 5, absent={22})
    assert out[3] == ({21, 23}, {23}) and 22 in away.held  # not scored in round 4: still held
    assert out[4] == (group, {22, 23})


def test_the_decision_takes_the_low_side_cut_and_scores_relative_to_it():
    """A client held 1.5 sd below the round's median errors is kept under the default low-side
    cut, excluded when the low side's cut is the high side's; its recorded score is its
    evidence on the high side's scale, beyond ``robust_z`` exactly when it is excluded. A
    client held as far above keeps its evidence as its score."""
    def decide(**settings):
        strategy = deciding_strategy(**settings)
        rng, out = np.random.default_rng(5), []
        for server_round in range(1, 17):
            errors = benign_errors(rng)
            errors[5], errors[6] = 1.0 - 1.5 * 0.05, 1.0 + 1.5 * 0.05
            kept, scores, details = strategy.decide_by_evidence(server_round, list(range(24)),
                                                                errors)
            assert details["evidence"][6] > 0 and scores[6] == details["evidence"][6]
            evidence = details["evidence"][5]
            assert scores[5] == pytest.approx(-evidence * strategy.settings.robust_z
                                              / strategy.settings.low_z)
            assert (5 not in kept) == (scores[5] > strategy.settings.robust_z)
            out.append(5 not in kept)
        return out

    assert not any(decide())
    assert sum(decide(low_z=LayerCamAeSettings().robust_z)) >= 6


def test_the_views_judge_again_against_the_uploads_they_keep():
    """The hand-computed round of tests/test_update_views.py's second judgement, as uploads:
    21 honest updates in random directions, their log norms 0.05 apart, one of them
    the longest, and three identical uploads at the median norm. One judgement excludes the
    honest client with the three; judged again (the default), against the 20 others, it is
    kept, and the record names it as judged again; the three, far past the collusion cut, are
    not (the margin), unless the margin lets every excluded upload be judged again."""
    rng = np.random.default_rng(0)
    logs = np.concatenate([np.arange(-10, 11) * 0.05, [0.0] * 3])
    logs[20] = 5.5 * 1.4826 * 0.25
    directions = rng.normal(0.0, 1.0, (24, 500))
    directions[21:] = directions[21]
    updates = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    updates *= np.exp(logs)[:, None]
    uploads = [ClientUpload(c, {"w": u.astype(np.float32)}, 10.0) for c, u in enumerate(updates)]

    def judged(**settings):
        strategy = deciding_strategy(views=("norm", "collusion"), **settings)
        strategy.global_state = {"w": np.zeros(500, np.float32)}
        excess, details = strategy.judge_by_views(uploads)
        return sorted(n for n, e in excess.items() if e > 1.0), details

    once, details = judged(rejudge=False)
    assert once == [20, 21, 22, 23] and details["set_aside_by_views"] == []
    again, details = judged()
    assert again == [21, 22, 23] == details["flagged_by_views"]
    assert details["set_aside_by_views"] == [20] and sorted(details["first_excess"]) == once
    assert 1.0 < details["first_excess"][20] < 3.0 < min(details["first_excess"][n] for n in again)
    assert 5.5 < details["views"]["norm"][20] < 6.0
    every, details = judged(rejudge_margin=1e6)
    assert every == again and details["set_aside_by_views"] == [20, 21, 22, 23]
