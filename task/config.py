"""The run configuration: one typed, validated object built once from Flower's run config.

Keys are Flower-style kebab-case (``num-server-rounds``); each field of ``RunConfig`` is the
snake_case spelling of its key. ``RunConfig.from_run_config`` is the only place that reads raw
run-config values; a bad key or value raises ``ConfigError`` naming it. The names ``defense``
and ``attack`` select from the registries of ``strategies`` and ``attacks``, which check them
(and what a defense needs of the other keys) when they build one.

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
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from task.data import DATASETS
from task.models import MODELS, default_cam_layer, feature_map_problem
from task.partition import PARTITIONINGS

FAA_DL_ATTACKER_RESPONSES = ("true-data", "forged-data")
LAYERCAM_AE_DECISIONS = ("evidence", "voting")
LAYERCAM_AE_THRESHOLDS = ("upper", "two-sided")
HEATMAP_ENGINES = ("auto", "loop", "vmap")
HEATMAP_SIZES = ("probe", "native")
UPDATE_VIEWS = ("norm", "direction", "outside-range", "collusion")
"""The views of the updates beside the heat maps (``strategies.update_views``)."""


class ConfigError(ValueError):
    """A run-config key or value is invalid; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key of the project, typed, with its default."""

    num_server_rounds: int = 12
    num_clients: int = 24
    num_attackers: int = 3
    dataset: str = "mnist-embedded"
    model: str = "cnn"
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.5
    local_epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 42
    defense: str = "layercam-ae"
    attack: str = "gae"
    results_dir: str = "results"
    round_timeout: float = 600.0
    node_wait_timeout: float = 120.0
    min_replies: int = 2
    resume_from: str = ""
    eavesdrop_in_deployment: bool = False
    # attacks (run on the attacking clients)
    sign_flip_scale: float = 1.0
    gaussian_sigma: float = 0.1
    uniform_noise_scale: float = 0.1
    alie_z: float = 0.0
    ipm_epsilon: float = 0.5
    # GAE (attacks/gae.py) and its controls (attacks/controls.py, which share gae-radius)
    gae_graph_nodes: int = 500
    gae_candidate_nodes: int = 1000
    gae_edge_threshold: float = 0.5
    gae_edge_ramp: float = 0.2
    gae_epochs: int = 150
    gae_adversarial: bool = True
    gae_adversarial_epochs: int = 20
    gae_perturbation: float = 0.05
    gae_learning_rate: float = 0.005
    gae_budget: float = 0.5
    gae_radius: float = 0.0
    # baseline defenses (strategies/robust.py, auror.py, cosdefense.py, cam_baselines.py)
    krum_f: int = 3
    multi_krum_m: int = 0
    trimmed_mean_beta: float = 0.2
    auror_features: int = 100
    auror_separation: float = 0.8
    auror_tau: float = 0.5
    cosdefense_margin: float = 1.0
    # FAA-DL (strategies/faa_dl.py; paper section IV: OC-SVM nu, AONT lambda)
    faa_dl_nu: float = 0.5
    faa_dl_tolerance: float = 1e-3
    faa_dl_aont_lambda: int = 2
    faa_dl_attacker_response: str = "true-data"
    # LayerCAM-AE (paper section 4; equation numbers of the ACM TOPS version)
    layercam_ae_decision: str = "evidence"
    layercam_ae_memory: float = 0.8
    layercam_ae_score_cap: float = 3.0
    layercam_ae_scale_rounds: int = 5
    layercam_ae_group_z: float = 2.75
    layercam_ae_group_size: int = 3
    layercam_ae_threshold: str = "two-sided"
    layercam_ae_beta: float = 1.0
    layercam_ae_robust_z: float = 3.75
    layercam_ae_window: int = 3
    layercam_ae_votes: int = 2
    layercam_ae_probes: int = 4
    layercam_ae_target_layer: str = ""
    layercam_ae_target_class: int = -1
    layercam_ae_probe_labels: bool = True
    layercam_ae_hidden: int = 128
    layercam_ae_epochs: int = 200
    layercam_ae_lr: float = 1e-3
    layercam_ae_weight_decay: float = 1e-5
    layercam_ae_tolerance: float = 0.0
    layercam_ae_map_size: str = "native"
    layercam_ae_threads: int = 1
    layercam_ae_workers: int = 2
    layercam_ae_engine: str = "auto"
    layercam_ae_save_heatmaps: bool = False
    layercam_ae_views: str = ",".join(UPDATE_VIEWS)
    layercam_ae_view_z: float = 6.0
    layercam_ae_clip: bool = True
    layercam_ae_clip_z: float = 3.0
    adaptive_cam_knows_views: bool = True  # attacks/adaptive_cam.py; false: its views-blind start
    # model replacement (attacks/model_replacement.py)
    model_replacement_boost: float = 0.0
    model_replacement_round: int = 0
    # FLAME (strategies/flame.py)
    flame_noise: float = 0.001

    @property
    def layercam_ae_view_names(self) -> tuple[str, ...]:
        """``layercam-ae-views`` as a tuple of view names (empty: the heat maps alone)."""
        return tuple(v.strip() for v in self.layercam_ae_views.split(",") if v.strip())

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
        _choice("dataset", self.dataset, DATASETS)
        _choice("model", self.model, tuple(MODELS))
        _choice("partitioning", self.partitioning, PARTITIONINGS)
        _choice("faa-dl-attacker-response", self.faa_dl_attacker_response,
                FAA_DL_ATTACKER_RESPONSES)
        _choice("layercam-ae-decision", self.layercam_ae_decision, LAYERCAM_AE_DECISIONS)
        _choice("layercam-ae-threshold", self.layercam_ae_threshold, LAYERCAM_AE_THRESHOLDS)
        _choice("layercam-ae-engine", self.layercam_ae_engine, HEATMAP_ENGINES)
        _choice("layercam-ae-map-size", self.layercam_ae_map_size, HEATMAP_SIZES)
        for view in self.layercam_ae_view_names:
            _choice("layercam-ae-views", view, UPDATE_VIEWS)
        for key, bounds in NUMERIC_RANGES.items():
            bounds.check(key, getattr(self, key.replace("-", "_")))
        if self.gae_candidate_nodes < self.gae_graph_nodes:
            raise ConfigError(f"gae-candidate-nodes ({self.gae_candidate_nodes}) must be >= "
                              f"gae-graph-nodes ({self.gae_graph_nodes})")
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
        if self.num_attackers > 0 and self.attack == "none":
            raise ConfigError("num-attackers > 0 needs an attack other than 'none'")
        if self.layercam_ae_votes > self.layercam_ae_window:
            raise ConfigError(
                f"layercam-ae-votes ({self.layercam_ae_votes}) must be <= layercam-ae-window "
                f"({self.layercam_ae_window})"
            )
        if self.layercam_ae_decision == "evidence" and self.layercam_ae_threshold != "two-sided":
            raise ConfigError(
                "layercam-ae-threshold='upper' (the paper's rule) needs "
                "layercam-ae-decision='voting'; the evidence decision accumulates the two-sided score"
            )
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
            raise ConfigError(f"{key} must be in {'(' if self.open_low else '['}{self.low:g}, "
                              f"{self.high:g}{')' if self.open_high else ']'}, got {value}")


POSITIVE = Range(0, 1e6, open_low=True)
"""A scale or strength with no natural ceiling: any value past 1e6 is a typo."""
WEEK = 7 * 24 * 3600.0
"""The longest a timeout may be, in seconds."""

NUMERIC_RANGES: dict[str, Range] = {
    # the federation: sizes that allocate per client, per round or per batch
    "num-server-rounds": Range(1, 100_000),
    "num-clients": Range(2, 100_000),
    "num-attackers": Range(0, 100_000),
    "min-replies": Range(1, 100_000),
    "local-epochs": Range(1, 10_000),
    "batch-size": Range(1, 100_000),
    "learning-rate": Range(0, 10, open_low=True),
    "weight-decay": Range(0, 10),
    "dirichlet-alpha": Range(0, 1e4, open_low=True),
    "seed": Range(0, 2**32 - 1),
    "round-timeout": Range(0, WEEK, open_low=True),
    "node-wait-timeout": Range(0, WEEK, open_low=True),
    # attacks
    "sign-flip-scale": POSITIVE,
    "gaussian-sigma": POSITIVE,
    "uniform-noise-scale": POSITIVE,
    "alie-z": Range(0, 1e3),
    "ipm-epsilon": POSITIVE,
    "gae-graph-nodes": Range(2, 10_000),  # the graph's dense M x M adjacency
    "gae-candidate-nodes": Range(2, 1_000_000),
    "gae-edge-threshold": Range(-1, 1),  # a cosine
    "gae-edge-ramp": Range(0, 1),
    "gae-epochs": Range(0, 100_000),
    "gae-adversarial-epochs": Range(0, 100_000),
    "gae-perturbation": Range(0, 1, open_low=True),
    "gae-learning-rate": Range(0, 10, open_low=True),
    "gae-budget": Range(0, 1, open_low=True),  # a share of the distances' sum
    "gae-radius": Range(0, 1e6),
    # baseline defenses
    "krum-f": Range(0, 100_000),
    "multi-krum-m": Range(0, 100_000),
    "trimmed-mean-beta": Range(0, 0.5, open_high=True),
    "auror-features": Range(1, 1_000_000),
    "auror-separation": Range(0, 1, open_low=True),
    "auror-tau": Range(0, 1, open_low=True),
    "cosdefense-margin": Range(0, 1e3),
    "faa-dl-nu": Range(0, 1, open_low=True),
    "faa-dl-tolerance": Range(0, 1, open_low=True),
    "faa-dl-aont-lambda": Range(-MAX_AONT_LAMBDA, MAX_AONT_LAMBDA),  # the discrete-log table
    # LayerCAM-AE
    "layercam-ae-memory": Range(0, 1, open_high=True),
    "layercam-ae-score-cap": Range(0, 100, open_low=True),
    "layercam-ae-scale-rounds": Range(1, 10_000),
    "layercam-ae-group-z": Range(0, 100, open_low=True),
    "layercam-ae-group-size": Range(0, 100_000),
    "layercam-ae-beta": Range(0, 100),
    "layercam-ae-robust-z": Range(0, 100, open_low=True),
    "layercam-ae-window": Range(1, 10_000),
    "layercam-ae-votes": Range(1, 10_000),
    "layercam-ae-probes": Range(1, 1024),  # K x probes maps per round
    "layercam-ae-target-class": Range(-1, 1_000_000),  # -1: the probe's label or prediction
    "layercam-ae-hidden": Range(1, 65_536),
    "layercam-ae-epochs": Range(1, 1_000_000),
    "layercam-ae-lr": Range(0, 10, open_low=True),
    "layercam-ae-weight-decay": Range(0, 10),
    "layercam-ae-tolerance": Range(0, 1),
    "layercam-ae-threads": Range(0, 1024),
    "layercam-ae-workers": Range(1, 256),  # each holds a copy of the model
    "layercam-ae-view-z": Range(0, 1e6, open_low=True),
    "layercam-ae-clip-z": Range(0, 100),
    "model-replacement-boost": Range(0, 1e6),  # 0: the number of clients
    "model-replacement-round": Range(0, 100_000),  # 0: every round
    "flame-noise": Range(0, 1),  # lambda: sigma = lambda * median norm
}
"""Every numeric key's range: what makes sense, and nothing that can exhaust the machine."""


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
    raise ConfigError(f"{key} must be a {kind.__name__}, got {raw!r}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
