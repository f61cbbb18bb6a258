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
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from task.data import DATASETS
from task.models import MODELS
from task.partition import PARTITIONINGS

FAA_DL_ATTACKER_RESPONSES = ("true-data", "forged-data")
LAYERCAM_AE_DECISIONS = ("evidence", "voting")
LAYERCAM_AE_THRESHOLDS = ("upper", "two-sided")
HEATMAP_ENGINES = ("auto", "loop", "vmap")
HEATMAP_SIZES = ("probe", "native")


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
    layercam_ae_robust_z: float = 3.5
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
        for key, value, low in (
            ("num-server-rounds", self.num_server_rounds, 1),
            ("num-clients", self.num_clients, 2),
            ("num-attackers", self.num_attackers, 0),
            ("min-replies", self.min_replies, 1),
            ("local-epochs", self.local_epochs, 1),
            ("batch-size", self.batch_size, 1),
            ("layercam-ae-window", self.layercam_ae_window, 1),
            ("layercam-ae-scale-rounds", self.layercam_ae_scale_rounds, 1),
            ("layercam-ae-group-size", self.layercam_ae_group_size, 0),
            ("layercam-ae-votes", self.layercam_ae_votes, 1),
            ("layercam-ae-probes", self.layercam_ae_probes, 1),
            ("layercam-ae-hidden", self.layercam_ae_hidden, 1),
            ("layercam-ae-epochs", self.layercam_ae_epochs, 1),
            ("layercam-ae-threads", self.layercam_ae_threads, 0),
            ("layercam-ae-workers", self.layercam_ae_workers, 1),
            ("gae-graph-nodes", self.gae_graph_nodes, 2),
            ("gae-candidate-nodes", self.gae_candidate_nodes, self.gae_graph_nodes),
            ("gae-epochs", self.gae_epochs, 0),
            ("gae-adversarial-epochs", self.gae_adversarial_epochs, 0),
            ("krum-f", self.krum_f, 0),
            ("multi-krum-m", self.multi_krum_m, 0),
            ("auror-features", self.auror_features, 1),
        ):
            if value < low:
                raise ConfigError(f"{key} must be >= {low}, got {value}")
        for key, value in (
            ("dirichlet-alpha", self.dirichlet_alpha),
            ("learning-rate", self.learning_rate),
            ("round-timeout", self.round_timeout),
            ("node-wait-timeout", self.node_wait_timeout),
            ("layercam-ae-robust-z", self.layercam_ae_robust_z),
            ("layercam-ae-score-cap", self.layercam_ae_score_cap),
            ("layercam-ae-group-z", self.layercam_ae_group_z),
            ("layercam-ae-lr", self.layercam_ae_lr),
            ("sign-flip-scale", self.sign_flip_scale),
            ("gaussian-sigma", self.gaussian_sigma),
            ("uniform-noise-scale", self.uniform_noise_scale),
            ("ipm-epsilon", self.ipm_epsilon),
            ("gae-budget", self.gae_budget),
            ("gae-learning-rate", self.gae_learning_rate),
            ("faa-dl-tolerance", self.faa_dl_tolerance),
        ):
            if not value > 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        for key, value in (
            ("weight-decay", self.weight_decay),
            ("layercam-ae-beta", self.layercam_ae_beta),
            ("layercam-ae-weight-decay", self.layercam_ae_weight_decay),
            ("layercam-ae-tolerance", self.layercam_ae_tolerance),
            ("alie-z", self.alie_z),
            ("gae-radius", self.gae_radius),
            ("cosdefense-margin", self.cosdefense_margin),
        ):
            if not value >= 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
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
        if not 0 <= self.layercam_ae_memory < 1:
            raise ConfigError(f"layercam-ae-memory must be in [0, 1), got {self.layercam_ae_memory}")
        if self.layercam_ae_decision == "evidence" and self.layercam_ae_threshold != "two-sided":
            raise ConfigError(
                "layercam-ae-threshold='upper' (the paper's rule) needs "
                "layercam-ae-decision='voting'; the evidence decision accumulates the two-sided score"
            )
        if not 0 <= self.trimmed_mean_beta < 0.5:
            raise ConfigError(f"trimmed-mean-beta must be in [0, 0.5), got {self.trimmed_mean_beta}")
        for key, value in (("auror-separation", self.auror_separation),
                           ("auror-tau", self.auror_tau)):
            if not 0 < value <= 1:
                raise ConfigError(f"{key} must be in (0, 1], got {value}")
        if not -1 <= self.gae_edge_threshold <= 1:
            raise ConfigError(f"gae-edge-threshold must be a cosine in [-1, 1], got "
                              f"{self.gae_edge_threshold}")
        if not 0 <= self.gae_edge_ramp <= 1:
            raise ConfigError(f"gae-edge-ramp must be in [0, 1], got {self.gae_edge_ramp}")
        if not 0 < self.gae_perturbation <= 1:
            raise ConfigError(f"gae-perturbation must be in (0, 1], got {self.gae_perturbation}")
        if not 0 < self.faa_dl_nu <= 1:
            raise ConfigError(f"faa-dl-nu must be in (0, 1], got {self.faa_dl_nu}")
        if self.layercam_ae_target_class < -1:
            raise ConfigError("layercam-ae-target-class must be -1 (the probe's label or the "
                              "predicted class) or a class")
        if not self.results_dir:
            raise ConfigError("results-dir must not be empty")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2^32), got {self.seed}")
        if abs(self.faa_dl_aont_lambda) > MAX_AONT_LAMBDA:
            raise ConfigError(f"faa-dl-aont-lambda must be within +-{MAX_AONT_LAMBDA} (it sizes "
                              f"the server's discrete-log table), got {self.faa_dl_aont_lambda}")

    def validate_for(self, num_classes: int, model: Any) -> None:
        """The checks that need the dataset and model: the target class exists, the target
        layer is a module of the model."""
        if self.layercam_ae_target_class >= num_classes:
            raise ConfigError(f"layercam-ae-target-class must be < {num_classes} (the classes of "
                              f"{self.dataset}), got {self.layercam_ae_target_class}")
        if self.layercam_ae_target_layer:
            try:
                model.get_submodule(self.layercam_ae_target_layer)
            except AttributeError:
                raise ConfigError(
                    f"layercam-ae-target-layer={self.layercam_ae_target_layer!r} is not a module "
                    f"of {self.model}") from None


MAX_AONT_LAMBDA = 1000
"""Bound on |faa-dl-aont-lambda|: the server's discrete-log table grows with it."""


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
