"""The run configuration: one typed, validated object built once from Flower's run config.

Keys are Flower-style kebab-case (``num-server-rounds``); each field of ``RunConfig`` is the
snake_case spelling of its key. Each key is declared once, on its field (``setting``): default,
meaning, and the range of a numeric key or the values of a string key. The checks of single
keys (``Key.check``: the range or the choices) and the key table of ``docs/configuration.md``
(``key_table``, ``python -m task.config --table``) are derived from those declarations; the
checks that relate several keys are written out in ``RunConfig.validate`` (LayerCAM-AE's in
``check_layercam_ae_decision``, which its settings built without a run config share).
``RunConfig.from_run_config`` is the only place that reads raw run-config values; a bad key or
value raises ``ConfigError`` naming it. The names ``defense`` and ``attack`` select from the
registries of ``strategies`` and ``attacks``, which check them (and what a defense needs of the
other keys) when they build one.

Defaults are those of the embedded default experiment (``pyproject.toml`` declares the same
values). The LayerCAM-AE keys default to the paper's settings (section 5.1): autoencoder hidden
size 128, Adam lr 1e-3, weight decay 1e-5, 200 epochs, voting window xi = 3, threshold epsilon = 2.
The paper's local training (25 epochs of Adam at lr 1e-4, batch 64, 100 rounds) is one
``--run-config`` away; the default trains less per round so the demo finishes in minutes on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, get_type_hints

from task.data import DATASETS
from task.models import MODELS, default_cam_layer, feature_map_problem, output_layer_names
from task.partition import PARTITIONINGS

if TYPE_CHECKING:
    from torch import nn

FAA_DL_ATTACKER_RESPONSES = ("true-data", "forged-data")
LAYERCAM_AE_DECISIONS = ("evidence", "voting")
LAYERCAM_AE_THRESHOLDS = ("upper", "two-sided")
HEATMAP_ENGINES = ("auto", "loop", "vmap")
HEATMAP_SIZES = ("probe", "native")
EVIDENCE_DECAYS = ("participation", "rounds")
"""How evidence fades while a client is not sampled (``strategies.detection.evidence``)."""
UPDATE_VIEWS = ("norm", "direction", "outside-range", "collusion", "head-direction")
"""The views of the updates beside the heat maps (``strategies.detection.update_views``), all
of them on by default."""
ADAPTIVE_CAM_OFFSETS = ("span", "isotropic")
"""How ``adaptive-cam`` draws its offset against the collusion view (``attacks.adaptive_cam``)."""


class ConfigError(ValueError):
    """A run-config key or value is invalid; the message names the key (or the field of settings
    built without a run config, ``strategies.layercam_ae.LayerCamAeSettings``)."""


MAX_AONT_LAMBDA = 1000
"""Bound on |faa-dl-aont-lambda|: the server's discrete-log table grows with it."""

NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
"""What a registry name looks like (``defense``, ``attack``): it names the run's folder."""


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take: [low, high], either end open."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False

    def check(self, key: str, value: float) -> None:
        above = self.low < value if self.open_low else self.low <= value
        below = value < self.high if self.open_high else value <= self.high
        if not (above and below):
            raise ConfigError(f"{key} must be in {self.interval()}, got {value}")

    def interval(self, number: Callable[[float], str] = "{:g}".format) -> str:
        """``[low, high]`` with ``(`` or ``)`` at an open end, each bound written by ``number``."""
        return (f"{'(' if self.open_low else '['}{number(self.low)}, "
                f"{number(self.high)}{')' if self.open_high else ']'}")


POSITIVE = Range(0, 1e6, open_low=True)
"""A scale or strength with no natural ceiling: any value past 1e6 is a typo."""
WEEK = 7 * 24 * 3600.0
"""The longest a timeout may be, in seconds."""


def setting(default: Any, help: str, *, bounds: Range | None = None,
            choices: Collection[str] | None = None, separator: str | None = None) -> Any:
    """Declare one run-config key on its ``RunConfig`` field: its default; ``help``, its meaning
    (markdown, rendered into ``docs/configuration.md``; links relative to ``docs/``); ``bounds``,
    the range of a numeric key (every numeric key has one); ``choices``, the values a string key
    may take: a tuple, or a registry (a mapping of names) read when a value is checked.
    ``separator``: the value is a list of choices joined by it (blanks around them ignored, an
    empty list allowed)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "bounds": bounds, "choices": choices, "separator": separator})


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key of the project, typed, with its default and declaration."""

    num_server_rounds: int = setting(12, "federated rounds", bounds=Range(1, 100_000))
    num_clients: int = setting(
        24, "clients (SuperNodes) per round; the server waits for this many",
        bounds=Range(2, 100_000))
    num_attackers: int = setting(
        3, "attacking clients (needs an `attack`; set 0 with `attack='none'`); in simulation "
        "the last `num-attackers` partitions", bounds=Range(0, 100_000))
    dataset: str = setting(
        "mnist-embedded", "`mnist-embedded` (ships with the package, offline), `mnist`, "
        "`fashion-mnist`, `svhn`, `cifar10`, `cifar100`, `tiny-imagenet`, `celeba` (downloaded "
        "on first use into `~/.cache/layercam-ae/data` or `$LAYERCAM_AE_DATA`)", choices=DATASETS)
    model: str = setting(
        "cnn", "`cnn` (FAA-DL's MNIST CNN), `resnet18`, `resnet50`, `regnety-800mf` "
        "(torchvision, adapted to channels, size and classes)", choices=MODELS)
    partitioning: str = setting(
        "iid", "`iid` or `dirichlet` (flwr-datasets' splits, by `seed`)",
        choices=PARTITIONINGS)
    dirichlet_alpha: float = setting(
        0.5, "Dirichlet concentration (smaller = more skewed; the paper uses 0.1 … 0.9)",
        bounds=Range(0, 1e4, open_low=True))
    local_epochs: int = setting(2, "local Adam training: epochs per round",
                                bounds=Range(1, 10_000))
    batch_size: int = setting(64, "local Adam training: batch size", bounds=Range(1, 100_000))
    learning_rate: float = setting(1e-3, "local Adam training: learning rate",
                                   bounds=Range(0, 10, open_low=True))
    weight_decay: float = setting(0.0, "local Adam training: weight decay", bounds=Range(0, 10))
    seed: int = setting(42, "data split, partitions, initialisation, autoencoder",
                        bounds=Range(0, 2**32 - 1))
    defense: str = setting(
        "layercam-ae", "`layercam-ae`, `flame`, `fedavg`, `krum`, `multi-krum`, `bulyan`, "
        "`median`, `trimmed-mean`, `geomed`, `auror`, `faa-dl`, `gradcam-ae`, `layercam-krum`, "
        "`cosdefense` (see [Defenses](defenses.md))")
    attack: str = setting(
        "gae", "`none`, `gae`, `sign-flip`, `gaussian`, `uniform-noise`, `label-flip`, `alie`, "
        "`ipm`, `min-max`, `min-sum`, `adaptive-cam`, `model-replacement`, and GAE's controls "
        "`radius-noise`, `undo-update` (see [Attackers](attacks.md)); the attacking clients "
        "check the name (the server imports no attack): with an unknown one every attacker's "
        "reply is rejected, its reason one line naming the key; `layercam-sweep` checks the "
        "name before any cell runs")
    results_dir: str = setting(
        "results", "parent folder of each run's results (relative to where the SuperLink was "
        "started)")
    round_timeout: float = setting(
        600.0, "seconds a round waits for replies (and sampling for `min-replies` connected "
        "nodes; FAA-DL's verification waits as long for its suspects' replies, then decrypts "
        "them within as long again)", bounds=Range(0, WEEK, open_low=True))
    node_wait_timeout: float = setting(
        120.0, "seconds the run waits at its start for `num-clients` SuperNodes",
        bounds=Range(0, WEEK, open_low=True))
    min_replies: int = setting(
        2, "a round aggregates when at least this many uploads pass the screening (and the "
        "defense's own minimum: Krum family n ≥ 2f + 3, Bulyan 4f + 3); with fewer it keeps the "
        "previous global model. See [Dropouts](experiments.md#dropouts-and-crashes)",
        bounds=Range(1, 100_000))
    clients_per_round: int = setting(
        0, "clients sampled for training each round (partial participation; 0: every connected "
        "client, the paper's setting); the sample is drawn by `seed` and the round, and each "
        "round's record lists it", bounds=Range(0, 100_000))
    resume_from: str = setting(
        "", "a results folder to continue after a crash, from its last checkpoint (same run "
        "config; `num-server-rounds` and the timeouts may differ). See "
        "[Crashes](experiments.md#dropouts-and-crashes)")
    eavesdrop_in_deployment: bool = setting(
        False, "serve the benign uploads to attacks that eavesdrop (GAE, ALIE, IPM, min-max, "
        "min-sum, adaptive-cam, the GAE controls) in a deployment too; in a simulation they "
        "always are. Off, a node that asks gets nothing: in a real federation this channel would "
        "leak every upload")
    # attacks (run on the attacking clients)
    sign_flip_scale: float = setting(1.0, "attack strength (`sign-flip`)", bounds=POSITIVE)
    gaussian_sigma: float = setting(0.1, "attack strength (`gaussian`)", bounds=POSITIVE)
    uniform_noise_scale: float = setting(0.1, "attack strength (`uniform-noise`)",
                                         bounds=POSITIVE)
    alie_z: float = setting(0.0, "ALIE's z (0: Baruch et al.'s z_max from the clients n and "
                            "attackers m of a round: `clients-per-round` and the attackers' "
                            "share of it when set)",
                            bounds=Range(0, 1e3))
    ipm_epsilon: float = setting(0.5, "IPM's ε", bounds=POSITIVE)
    # GAE (attacks/gae.py) and its controls (attacks/controls.py, which share gae-radius)
    gae_graph_nodes: int = setting(
        500, "GAE: the graph's nodes (M), drawn at random from the `gae-candidate-nodes` "
        "coordinates", bounds=Range(2, 10_000))  # the graph's dense M x M adjacency
    gae_candidate_nodes: int = setting(
        1000, "GAE: the graph's nodes are drawn at random from this many coordinates with the "
        "largest mean benign update magnitude", bounds=Range(2, 1_000_000))
    gae_edge_threshold: float = setting(
        0.5, "GAE: correlation across clients at which two coordinates are linked (τ)",
        bounds=Range(-1, 1))  # a cosine
    gae_edge_ramp: float = setting(
        0.2, "GAE: edge weights rise linearly from 0 to 1 over τ ± ramp/2 (0: a binary cut)",
        bounds=Range(0, 1))
    gae_epochs: int = setting(
        150, "GAE: Adam steps training the graph autoencoder to reconstruct the graph",
        bounds=Range(0, 100_000))
    gae_adversarial: bool = setting(
        True, "GAE: then ascend its reconstruction loss (the paper's adversarial step; false "
        "keeps the reconstruction)")
    gae_adversarial_epochs: int = setting(
        20, "GAE: the adversarial step's projected steps on the latent embedding",
        bounds=Range(0, 100_000))
    gae_perturbation: float = setting(
        0.05, "GAE: the adversarial step changes the decoded graph by at most this mean "
        "absolute amount", bounds=Range(0, 1, open_low=True))
    gae_learning_rate: float = setting(
        0.005, "GAE: rate of the Adam steps training the graph autoencoder",
        bounds=Range(0, 10, open_low=True))
    gae_budget: float = setting(
        0.5, "GAE: knapsack capacity Γ as a fraction of the benign models' summed distances to "
        "their mean", bounds=Range(0, 1, open_low=True))  # a share of the distances' sum
    gae_radius: float = setting(
        0.0, "GAE, `radius-noise`, `undo-update`: d_T in ‖w′ − w_g‖ ≤ d_T (0: the largest benign "
        "distance ‖w_i − w_g‖ this round)", bounds=Range(0, 1e6))
    # baseline defenses (strategies/robust.py, auror.py, cosdefense.py, cam_baselines.py)
    krum_f: int = setting(3, "attackers assumed by Krum, Multi-Krum, Bulyan and LayerCAM-Krum",
                          bounds=Range(0, 100_000))
    multi_krum_m: int = setting(0, "uploads Multi-Krum averages, at most n − f (0: n − f)",
                                bounds=Range(0, 100_000))
    trimmed_mean_beta: float = setting(0.2, "fraction trimmed from each end per coordinate",
                                       bounds=Range(0, 0.5, open_high=True))
    auror_features: int = setting(100, "AUROR: indicative features", bounds=Range(1, 1_000_000))
    auror_separation: float = setting(0.8, "AUROR: variance a 2-means split must explain",
                                      bounds=Range(0, 1, open_low=True))
    auror_tau: float = setting(0.5, "AUROR: fraction of marks that excludes",
                               bounds=Range(0, 1, open_low=True))
    auror_minority: float = setting(
        0.25, "AUROR: a separated feature marks its smaller cluster when that holds at most this "
        "share of the uploads, and at least one upload (benign updates split near evenly in many "
        "high-variance coordinates)", bounds=Range(0, 0.5, open_low=True))
    cosdefense_margin: float = setting(
        1.0, "CosDefense: exclude normalised scores above mean + margin · std",
        bounds=Range(0, 1e3))
    # FAA-DL (strategies/faa_dl.py; paper section IV: OC-SVM nu, AONT lambda)
    faa_dl_nu: float = setting(0.5, "FAA-DL: OC-SVM ν", bounds=Range(0, 1, open_low=True))
    faa_dl_tolerance: float = setting(
        1e-3, "FAA-DL: largest relative difference of a cleared suspect's recomputed update",
        bounds=Range(0, 1, open_low=True))
    faa_dl_aont_lambda: int = setting(
        2, "FAA-DL: λ of the AONT",
        bounds=Range(-MAX_AONT_LAMBDA, MAX_AONT_LAMBDA))  # the discrete-log table
    faa_dl_attacker_response: str = setting(
        "true-data", "what attackers answer FAA-DL's verification with: their real data, or "
        "`forged-data` (labels they did not train on)", choices=FAA_DL_ATTACKER_RESPONSES)
    # LayerCAM-AE (paper section 4; equation numbers of the ACM TOPS version)
    layercam_ae_decision: str = setting(
        "evidence", "`evidence` = robust scores accumulated over rounds (see [the "
        "decision](defenses.md#the-decision-evidence-over-rounds)); `voting` = a per-round rule "
        "plus the paper's vote", choices=LAYERCAM_AE_DECISIONS)
    layercam_ae_memory: float = setting(
        0.8, "forgetting factor of the evidence (0: this round's score alone)",
        bounds=Range(0, 1, open_high=True))
    layercam_ae_evidence_decay: str = setting(
        "participation", "how a client's evidence fades over rounds it is not sampled in "
        "(`clients-per-round`): `participation`, only by the rounds it takes part in; `rounds`, "
        "by every round that passes", choices=EVIDENCE_DECAYS)
    layercam_ae_score_cap: float = setting(
        3.0, "a round's score enters the evidence clipped to ±cap (below the cut: one round "
        "alone excludes only as part of a low group)", bounds=Range(0, 100, open_low=True))
    layercam_ae_scale_rounds: int = setting(
        5, "the scores' robust spread (1.4826·MAD/median) is pooled, as a median, over this many "
        "rounds (1: this round's alone)", bounds=Range(1, 10_000))
    layercam_ae_group_z: float = setting(
        2.75, "clients whose evidence is between −low-z and −group-z are excluded together "
        "when there are at least `layercam-ae-group-size` of them (colluders)",
        bounds=Range(0, 100, open_low=True))
    layercam_ae_group_size: int = setting(
        3, "clients whose evidence is between −low-z and −group-z are excluded together when "
        "there are at least this many of them (colluders; 0 disables)",
        bounds=Range(0, 100_000))
    layercam_ae_hold: bool = setting(
        True, "a client excluded (by the evidence or the views) stays excluded while its "
        "evidence stays below −group-z (`evidence`): colluders cross the low side's cut, or "
        "leave the views' ranges, one at a time, and without the hold the rest fall short of a "
        "group and are readmitted while their evidence still says low (false: readmitted once "
        "within the cuts and no group)")
    layercam_ae_threshold: str = setting(
        "two-sided", "per-round rule of `voting`: `upper` = the paper's (eq. 13–15), `two-sided` "
        "= robust; the paper's rule on the paper's input, heat maps alone, is "
        "`layercam-ae-decision='voting' layercam-ae-threshold='upper' "
        "layercam-ae-map-size='probe' layercam-ae-views='' layercam-ae-clip=false`",
        choices=LAYERCAM_AE_THRESHOLDS)
    layercam_ae_beta: float = setting(1.0, "the paper's β: δ = mean(R) + β·std(R)",
                                      bounds=Range(0, 100))
    layercam_ae_robust_z: float = setting(
        3.75, "the cut: exclude while evidence > z (`evidence`; the low side's: "
        "`layercam-ae-low-z`), or flag |R − median(R)| > z · 1.4826 · MAD(R) in a round "
        "(`voting` with `two-sided`)",
        bounds=Range(0, 100, open_low=True))
    layercam_ae_low_z: float = setting(
        4.2, "the cut on the low side: exclude a client alone while its evidence < −low-z "
        "(`evidence`); above it, a client the autoencoder reconstructs better than the rest "
        "is excluded only within a group (`layercam-ae-group-z`): alone it is the most typical "
        "client, as an honest one whose class mix is nearest the round's average is",
        bounds=Range(0, 100, open_low=True))
    layercam_ae_window: int = setting(
        3, "`voting`: every ξ rounds; malicious if an outlier in ≥ ε (`layercam-ae-votes`) of "
        "them", bounds=Range(1, 10_000))
    layercam_ae_votes: int = setting(
        2, "`voting`: ε; malicious if an outlier in ≥ ε of every ξ (`layercam-ae-window`) rounds",
        bounds=Range(1, 10_000))
    layercam_ae_probes: int = setting(
        4, "probe images (server test set, fixed by seed); their maps are concatenated",
        bounds=Range(1, 1024))  # K x probes maps per round
    layercam_ae_target_layer: str = setting(
        "", "module whose activations LayerCAM reads; empty = the model's last conv stage "
        "(`conv2`, `layer4`, `trunk_output`)")
    layercam_ae_target_class: int = setting(
        -1, "class c scored; -1 = each probe's label (or, with "
        "`layercam-ae-probe-labels=false`, the global model's prediction for it)",
        bounds=Range(-1, 1_000_000))  # -1: the probe's label or prediction
    layercam_ae_probe_labels: bool = setting(
        True, "score the probes' own labels: the server's probes are labelled, and an untrained "
        "model's predictions are arbitrary (compared in [Defenses](defenses.md))")
    layercam_ae_hidden: int = setting(128, "autoencoder hidden size (the paper's value)",
                                      bounds=Range(1, 65_536))
    layercam_ae_epochs: int = setting(200, "autoencoder training epochs (the paper's value)",
                                      bounds=Range(1, 1_000_000))
    layercam_ae_lr: float = setting(1e-3, "autoencoder learning rate (the paper's value)",
                                    bounds=Range(0, 10, open_low=True))
    layercam_ae_weight_decay: float = setting(1e-5, "autoencoder weight decay (the paper's value)",
                                              bounds=Range(0, 10))
    layercam_ae_tolerance: float = setting(
        0.0, "stop the AE once its loss has not improved by this relative amount for 10 epochs "
        "(0: all epochs, the paper's; at K = 24 a stop in the first 50–100 epochs reorders the "
        "scores, see [Benchmarks](benchmarks.md))", bounds=Range(0, 1))
    layercam_ae_map_size: str = setting(
        "native", "the AE's input: maps at the target layer's resolution (`native`: 8×8 for the "
        "CNN: the information of the probe-size map in fewer values, and cheaper detection) "
        "or upsampled to the probe size (`probe`, the paper's; with it the previous decision "
        "keys suit better: `robust-z` and `low-z` 3.0, `score-cap` 4.0, `group-z` 2.25). Both "
        "compared in [Benchmarks](benchmarks.md)", choices=HEATMAP_SIZES)
    layercam_ae_threads: int = setting(
        1, "intra-op CPU threads of each detection operation (0: torch's default); one keeps "
        "detection fast when other processes share the cores", bounds=Range(0, 1024))
    layercam_ae_workers: int = setting(
        2, "threads that compute, on a CPU, the heat maps (each on its share of the uploads, "
        "with its own copy of the model) and the update views (each on its share of the "
        "coordinates); they join once a round, so they cost little when the cores are shared "
        "(measured in "
        "[Benchmarks](benchmarks.md))", bounds=Range(1, 256))  # each holds a copy of the model
    layercam_ae_engine: str = setting(
        "auto", "heat-map engine: `loop`, `vmap`, or `auto` (by device: vmap on a GPU, the loop "
        "on a CPU; never by timing, so the machine's load cannot change a decision)",
        choices=HEATMAP_ENGINES)
    layercam_ae_save_heatmaps: bool = setting(
        False, "save a PNG grid of each round's heat maps, each laid over its probe: a row per "
        "client, a column per probe, excluded clients framed red (see [the heat-map "
        "grid](experiments.md#the-heat-map-grid))")
    layercam_ae_views: str = setting(
        ",".join(UPDATE_VIEWS), "the views of the updates beside the heat maps (see [Defense in "
        "depth](defense-in-depth.md)); empty (`\"\"`) = the paper's heat maps alone; "
        "`head-direction` (the direction of the output layer's update alone) needs a model whose "
        "last `nn.Linear` is its output layer",
        choices=UPDATE_VIEWS, separator=",")
    layercam_ae_view_z: float = setting(
        6.0, "exclude an upload in the round it arrives when one of its view scores (robust z "
        "over the round's uploads) exceeds this (the outside-range view: twice this), unless "
        "`layercam-ae-rejudge` clears it",
        bounds=Range(0, 1e6, open_low=True))
    layercam_ae_view_pair: float = setting(
        0.6, "also exclude an upload in the round it arrives when two of its view scores each "
        "exceed this share of their cuts (two sides agreeing; `head-direction` and `direction` "
        "count as one side; 1: one view past its cut only)",
        bounds=Range(0, 1, open_low=True))
    layercam_ae_rejudge: bool = setting(
        True, "judge the uploads the views exclude in a round a second time, against the "
        "uploads they keep (the centre, the coordinates' ranges and each view's spread taken "
        "over those), and readmit those it clears: excluded uploads, such as identical crafted "
        "ones, no longer shrink the scale they are judged on (false: one judgement over all)")
    layercam_ae_rejudge_margin: float = setting(
        3.0, "judge again only the uploads the views exclude by at most this much: their "
        "excess, the largest view score over its cut (or the pair's over `layercam-ae-view-pair` "
        "of theirs), is at most this; an upload further past its cuts stays excluded without a "
        "second pass (1: none judged again; see [the second judgement](defense-in-depth.md#the-"
        "second-judgement))", bounds=Range(1, 1e6))
    layercam_ae_clip: bool = setting(
        True, "clip every kept update to the norm exp(median + z·1.4826·MAD) of the round's log "
        "update norms before averaging: no kept upload moves the model more than a benign "
        "client z robust deviations above the median")
    layercam_ae_clip_z: float = setting(
        3.0, "the z of `layercam-ae-clip` (z = 0: the median norm, FLAME's bound)",
        bounds=Range(0, 100))
    adaptive_cam_knows_views: bool = setting(  # attacks/adaptive_cam.py
        True, "`adaptive-cam` keeps every view of `layercam-ae-views` within the benign range "
        "(false: its views-blind start, the control)")
    adaptive_cam_offsets: str = setting(
        "span", "`adaptive-cam`'s offset against the collusion view: a random mix of the benign "
        "uploads' deviations (`span`: it varies as benign clients vary) or a random direction "
        "of all parameters (`isotropic`, the control)", choices=ADAPTIVE_CAM_OFFSETS)
    # model replacement (attacks/model_replacement.py)
    model_replacement_boost: float = setting(
        0.0, "model replacement: γ (0: the clients a round, `clients-per-round` or else "
        "`num-clients`: Bagdasaryan et al.'s n of the round's average)",
        bounds=Range(0, 1e6))
    model_replacement_round: int = setting(
        0, "model replacement: the one round it attacks in, honest in the others (0: every "
        "round)", bounds=Range(0, 100_000))  # 0: every round
    # FLAME (strategies/flame.py)
    flame_noise: float = setting(
        0.001, "FLAME's λ: noise σ = λ × the median update norm",
        bounds=Range(0, 1))  # lambda: sigma = lambda * median norm

    @property
    def layercam_ae_view_names(self) -> tuple[str, ...]:
        """``layercam-ae-views`` as a tuple of view names (empty: the heat maps alone)."""
        return _items(self.layercam_ae_views, ",")

    @property
    def clients_a_round(self) -> int:
        """The clients a round's aggregate is over: ``clients-per-round``, else every client."""
        return self.clients_per_round or self.num_clients

    @property
    def attackers_a_round(self) -> int:
        """The attackers expected among them: ``num-attackers`` in the share of the clients a
        round samples, rounded half up (at least one when there are attackers)."""
        expected = math.floor(self.num_attackers * self.clients_a_round / self.num_clients + 0.5)
        return max(expected, 1) if self.num_attackers else 0

    @staticmethod
    def key_of(field_name: str) -> str:
        return field_name.replace("_", "-")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build and validate from Flower's ``context.run_config``. Keys not listed here are
        rejected (a typo would otherwise silently fall back to a default)."""
        hints = get_type_hints(cls)
        known = {cls.key_of(f.name): f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            if key not in known:
                raise ConfigError(f"unknown run-config key {key!r}")
            name = known[key]
            values[name] = _coerce(key, raw, hints[name])
        config = cls(**values)
        config.validate()
        return config

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping (what ``config.json`` stores)."""
        return {self.key_of(k): v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        """Check ranges and names; raise ``ConfigError`` naming the first bad key."""
        for key in KEYS:  # the declared choices and ranges
            key.check(getattr(self, key.field))
        check_gae_nodes(self.gae_candidate_nodes, self.gae_graph_nodes)
        for key, value in (("defense", self.defense), ("attack", self.attack)):
            if not NAME.fullmatch(value):  # names the run's folder: nothing but a plain name
                raise ConfigError(f"{key}={value!r} is not a name (lower-case letters, digits "
                                  f"and '-')")
        if self.num_attackers >= self.num_clients:
            raise ConfigError(
                f"num-attackers ({self.num_attackers}) must be < num-clients ({self.num_clients})"
            )
        if self.min_replies > self.num_clients:
            raise ConfigError(f"min-replies ({self.min_replies}) must be <= num-clients "
                              f"({self.num_clients})")
        if self.clients_per_round and not (
                self.min_replies <= self.clients_per_round <= self.num_clients):
            raise ConfigError(f"clients-per-round ({self.clients_per_round}) must be 0 (every "
                              f"client) or between min-replies ({self.min_replies}) and "
                              f"num-clients ({self.num_clients})")
        if self.num_attackers > 0 and self.attack == "none":
            raise ConfigError("num-attackers > 0 needs an attack other than 'none'")
        clients, attackers = self.clients_a_round, self.attackers_a_round
        majority = math.floor(clients / 2 + 1)
        if self.attack == "alie" and self.alie_z <= 0 and attackers >= majority:
            raise ConfigError(f"alie-z={self.alie_z:g} takes Baruch et al.'s z_max, which needs "
                              f"fewer attackers a round than floor(n / 2 + 1) = {majority} (n = "
                              f"{clients} clients a round), got {attackers}; set alie-z > 0")
        supporters = majority - attackers
        if self.attack == "alie" and self.alie_z <= 0 and attackers and 2 * supporters >= clients:
            # Phi^-1((n - s) / n) <= 0: the attackers would upload the benign mean
            raise ConfigError(f"alie-z={self.alie_z:g} takes Baruch et al.'s z_max, which is 0 "
                              f"with {attackers} attacker(s) among n = {clients} clients a round "
                              f"(s = {supporters} supporters needed, Phi^-1((n - s) / n) = "
                              f"Phi^-1(0.5)): every upload would be the benign mean; set "
                              f"alie-z > 0")
        if (self.attack == "model-replacement"
                and self.model_replacement_round > self.num_server_rounds):
            raise ConfigError(f"model-replacement-round={self.model_replacement_round} is past "
                              f"the run's last round (num-server-rounds={self.num_server_rounds})"
                              f": the attacker would never attack")
        check_layercam_ae_decision(self.layercam_ae_decision, self.layercam_ae_threshold,
                                   self.layercam_ae_votes, self.layercam_ae_window,
                                   self.layercam_ae_group_z, self.layercam_ae_low_z)
        if not self.results_dir:
            raise ConfigError("results-dir must not be empty")

    def validate_for(self, num_classes: int, model: Any, example: Any) -> None:
        """The checks that need the dataset and model: the target class exists, and the heat
        maps' layer (``layercam-ae-target-layer``, else the model's default) gives a
        convolutional feature map for ``example``, a (1, C, H, W) input."""
        if self.layercam_ae_target_class >= num_classes:
            raise ConfigError(f"layercam-ae-target-class must be < {num_classes} (the classes of "
                              f"{self.dataset}), got {self.layercam_ae_target_class}")
        layer = self.layercam_ae_target_layer or default_cam_layer(self.model)
        try:
            model.get_submodule(layer)
        except AttributeError:
            raise ConfigError(f"layercam-ae-target-layer={layer!r} is not a module of "
                              f"{self.model}") from None
        problem = feature_map_problem(model, layer, example)
        if problem:
            raise ConfigError(f"layercam-ae-target-layer={layer!r} {problem}")


@dataclass(frozen=True)
class Key:
    """One run-config key as ``RunConfig`` declares it (see ``setting``)."""

    name: str
    field: str
    type: type
    default: Any
    help: str
    bounds: Range | None
    choices: Collection[str] | None
    separator: str | None

    def check(self, value: Any, name: str | None = None) -> None:
        """Raise ``ConfigError`` unless ``value`` is inside the declared range or among the
        declared choices (a list key's value: each item, joined or as a tuple); the message names
        ``name``, by default the key."""
        name = name or self.name
        if self.bounds is not None:
            self.bounds.check(name, value)
        if self.choices is None:
            return
        if self.separator is None:
            items = (value,)
        else:
            items = _items(value, self.separator) if isinstance(value, str) else tuple(value)
        for item in items:
            _choice(name, item, tuple(self.choices))


def _keys() -> tuple[Key, ...]:
    hints = get_type_hints(RunConfig)
    return tuple(Key(RunConfig.key_of(f.name), f.name, hints[f.name], f.default,
                     f.metadata.get("help", ""), f.metadata.get("bounds"),
                     f.metadata.get("choices"), f.metadata.get("separator"))
                 for f in fields(RunConfig))


KEYS: tuple[Key, ...] = _keys()
"""Every key, in the order of ``RunConfig``'s fields."""

NUMERIC_RANGES: dict[str, Range] = {key.name: key.bounds for key in KEYS if key.bounds}
"""Every numeric key's range: what makes sense, and nothing that can exhaust the machine."""

KEYS_BY_NAME: dict[str, Key] = {key.name: key for key in KEYS}
"""Every key by its kebab-case name."""


def head_view_names(model: nn.Module, views: Collection[str]) -> tuple[str, ...]:
    """The parameters the ``head-direction`` view reads (``task.models.output_layer_names``) when
    ``views`` include it, none otherwise; a model without an ``nn.Linear`` output layer stops with
    a ``ConfigError`` naming ``layercam-ae-views``."""
    if "head-direction" not in views:
        return ()
    try:
        return output_layer_names(model)
    except ValueError as error:
        raise ConfigError(f"layercam-ae-views: {error}; leave `head-direction` out of the views "
                          "for this model") from error


def check_layercam_ae_decision(decision: str, threshold: str, votes: int, window: int,
                               group_z: float, low_z: float,
                               prefix: str = "layercam-ae-") -> None:
    """The rules that relate LayerCAM-AE's decision keys, checked once each key's value is
    valid: the vote's threshold fits in its window, the evidence's low group has a band
    [-low_z, -group_z) to sit in, and the evidence decision accumulates the two-sided score.
    Raises ``ConfigError`` naming the keys, or with ``prefix=""`` the fields of settings built
    without a run config (``strategies.layercam_ae.LayerCamAeSettings``)."""
    if votes > window:
        raise ConfigError(f"{prefix}votes ({votes}) must be <= {prefix}window ({window})")
    sep = "-" if prefix else "_"
    if group_z >= low_z:
        raise ConfigError(f"{prefix}group{sep}z ({group_z}) must be < {prefix}low{sep}z "
                          f"({low_z}): the low group sits between them")
    if decision == "evidence" and threshold != "two-sided":
        raise ConfigError(f"{prefix}threshold='upper' (the paper's rule) needs "
                          f"{prefix}decision='voting'; the evidence decision accumulates the "
                          "two-sided score")


def check_gae_nodes(candidate_nodes: int, graph_nodes: int, prefix: str = "gae-") -> None:
    """GAE draws its graph's nodes from its candidates: there must be at least as many. Raises
    ``ConfigError`` naming the keys, or with ``prefix=""`` the arguments of ``attacks.gae.Gae``."""
    if candidate_nodes < graph_nodes:
        sep = "-" if prefix else "_"
        raise ConfigError(f"{prefix}candidate{sep}nodes ({candidate_nodes}) must be >= "
                          f"{prefix}graph{sep}nodes ({graph_nodes})")


def key_table() -> str:
    """The markdown table of every key (``docs/configuration.md`` holds it between the markers
    ``<!-- keys: ... -->`` and ``<!-- /keys -->``; a test keeps the two equal)."""
    rows = ["| key | type | default | range or values | meaning |", "|---|---|---|---|---|"]
    for key in KEYS:
        cells = (f"`{key.name}`", key.type.__name__, _literal(key.default), _values(key),
                 key.help.replace("|", r"\|"))
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def _literal(value: Any) -> str:
    """A default as the table shows it: TOML's booleans, strings in code spans."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return repr(value)


def _values(key: Key) -> str:
    if key.bounds is not None:
        return f"`{key.bounds.interval(_exact)}`"
    if key.choices is None:
        return ""
    listed = ", ".join(f"`{choice}`" for choice in key.choices)
    return f"`{key.separator}`-separated, of {listed}" if key.separator else listed


def _exact(number: float) -> str:
    """A bound written in full (``{:g}`` rounds 2**32 - 1)."""
    return f"{int(number):_}" if float(number).is_integer() else repr(number)


def _items(text: str, separator: str) -> tuple[str, ...]:
    """The non-blank items of a ``separator``-joined list, stripped."""
    return tuple(item.strip() for item in text.split(separator) if item.strip())


def _coerce(key: str, raw: Any, kind: type) -> Any:
    """Convert a TOML run-config value to the field's type, or raise naming the key."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
    elif kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
    elif kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            if not math.isfinite(raw):
                raise ConfigError(f"{key} must be a finite number, got {raw!r}")
            return float(raw)
    elif kind is str:
        if isinstance(raw, str):
            return raw
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise ConfigError(f"{key} must be {article} {kind.__name__}, got {raw!r}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--table"]:
        sys.exit("usage: python -m task.config --table  (prints docs/configuration.md's key table)")
    print(key_table(), end="")
