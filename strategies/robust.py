"""Flower's robust aggregation rules with per-client records: Krum, Multi-Krum, Bulyan,
coordinate-wise Median, Trimmed mean, and the geometric median (GeoMed).

Flower's own ``Krum``/``MultiKrum``/``Bulyan``/``FedMedian``/``FedTrimmedAvg`` aggregate
without saying whom they dropped. These subclasses of ``DetectingFedAvg`` make the same
decisions (Krum's selection is tested against ``flwr``'s ``select_multikrum``), reuse Flower's
coordinate-wise kernels (``trim_mean``, ``aggregate_n_closest_weights``), and fill the shared
``RoundRecord``: whom they excluded and each client's continuous score where the rule has one.
All work on the updates w_i - w_g of the floating-point arrays; integer buffers (e.g. BatchNorm
step counters) are the round's median (``aggregation.counted_buffers``, for every rule).
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from strategies.base import DetectingFedAvg
from strategies.records import ClientUpload, Detection
from strategies.registry import DEFENSES
from strategies.detection.robust_math import (bulyan_selection_size, geometric_median, krum_scores,
                                    krum_select)
from task.config import ConfigError, RunConfig
from task.params import flatten_updates, float_names, unflatten


def uploads_a_round(config: RunConfig) -> tuple[str, int]:
    """The key that sets how many uploads a round has, and that number: ``clients-per-round``
    when set, else ``num-clients``."""
    return ("clients-per-round" if config.clients_per_round else "num-clients",
            config.clients_a_round)


def check_krum_f(config: RunConfig, factor: int = 2) -> int:
    """``krum-f``, checked against the uploads a round has (``uploads_a_round``), for a rule
    that needs n >= factor * f + 3 (Krum: 2, Bulyan: 4); below it, every round would keep the
    previous model."""
    needed = factor * config.krum_f + 3
    key, clients = uploads_a_round(config)
    if clients < needed:
        raise ConfigError(f"krum-f={config.krum_f} needs {key} >= {factor}f + 3 = {needed} "
                          f"for {config.defense}, got {clients}")
    return config.krum_f


class _UpdateRule(DetectingFedAvg):
    """Shared glue: flatten the uploads' updates once per round."""

    def updates(self, uploads: list[ClientUpload]) -> np.ndarray:
        return flatten_updates([u.arrays for u in uploads], self.global_state)[0]

    def from_update(self, vector: np.ndarray, kept: list[ClientUpload]) -> dict[str, np.ndarray]:
        """w_g + vector for the float arrays (integer buffers: ``counted_buffers``)."""
        return unflatten(vector, float_names(self.global_state), self.global_state)


@DEFENSES.register
class MultiKrum(_UpdateRule):
    """Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017): score each update by
    the summed squared distances to its n - f - 2 nearest others and average the m
    lowest-scoring uploads. Assumes at most f attackers and n > 2f + 2; m defaults to n - f.
    The Krum score is the suspicion score."""

    name = "multi-krum"

    def __init__(self, *, num_malicious: int, num_selected: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_malicious, self.num_selected = num_malicious, num_selected

    clients_per_attacker = 2
    """n >= clients_per_attacker * f + 3 uploads are needed."""

    @classmethod
    def from_config(cls, config, assets, **flower_kwargs):
        num_malicious = check_krum_f(config, cls.clients_per_attacker)
        _, clients = uploads_a_round(config)
        if config.multi_krum_m > clients - num_malicious:
            raise ConfigError(f"multi-krum-m={config.multi_krum_m} exceeds n - f = "
                              f"{clients - num_malicious} (n = {clients} uploads a round, krum-f="
                              f"{num_malicious}): Multi-Krum would average uploads of assumed "
                              "attackers (0: n - f)")
        return cls(num_malicious=num_malicious, num_selected=config.multi_krum_m,
                   **flower_kwargs)

    @property
    def min_uploads(self) -> int:  # type: ignore[override]
        return self.clients_per_attacker * self.num_malicious + 3

    def selection_size(self, num_uploads: int) -> int:
        """m, at most n - f of this round's n uploads (fewer than planned after dropouts)."""
        most = max(1, num_uploads - self.num_malicious)
        return min(self.num_selected, most) if self.num_selected else most

    def detect(self, server_round: int, uploads: list[ClientUpload]) -> Detection:
        vectors = self.updates(uploads)
        scores = krum_scores(vectors, self.num_malicious)
        chosen = krum_select(vectors, self.num_malicious, self.selection_size(len(uploads)), scores)
        return Detection(kept=[uploads[i].node_id for i in chosen],
                         scores={u.node_id: float(s) for u, s in zip(uploads, scores)},
                         details={"f": self.num_malicious})


@DEFENSES.register
class Krum(MultiKrum):
    """Krum (Blanchard et al., NeurIPS 2017): Multi-Krum with m = 1 -- the single most central
    upload becomes the global model. Assumes at most f attackers and n > 2f + 2."""

    name = "krum"

    def __init__(self, *, num_malicious: int, **kwargs) -> None:
        super().__init__(num_malicious=num_malicious, num_selected=1, **kwargs)

    @classmethod
    def from_config(cls, config, assets, **flower_kwargs):
        return cls(num_malicious=check_krum_f(config), **flower_kwargs)


@DEFENSES.register
class Bulyan(MultiKrum):
    """Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018): Multi-Krum selects theta = n - 2f
    uploads, then each coordinate averages the beta = n - 4f selected values closest to the
    selection's coordinate-wise median (Flower's ``aggregate_n_closest_weights``). Assumes at
    most f attackers and n >= 4f + 3; with fewer uploads the round keeps the previous model.
    The selection is Flower's ``Bulyan``'s: one Multi-Krum pass over all n uploads (the paper
    applies Krum again to the uploads left after each pick, which can pick other uploads)."""

    name = "bulyan"
    clients_per_attacker = 4

    @classmethod
    def from_config(cls, config, assets, **flower_kwargs):
        # theta is Bulyan's own: ``multi-krum-m`` does not apply
        return cls(num_malicious=check_krum_f(config, cls.clients_per_attacker), **flower_kwargs)

    def selection_size(self, num_uploads: int) -> int:
        return bulyan_selection_size(num_uploads, self.num_malicious)[0]

    def aggregate(self, kept: list[ClientUpload]) -> dict[str, np.ndarray]:
        beta = len(kept) - 2 * self.num_malicious  # kept = theta = n - 2f, so beta = n - 4f
        selected = self.updates(kept)
        (closest,) = aggregate_n_closest_weights([np.median(selected, axis=0)],
                                                 [[v] for v in selected], beta)
        return self.from_update(closest, kept)


class _CoordinateRule(_UpdateRule):
    """A rule that keeps every upload but combines them robustly; its score is each update's
    distance to the robust aggregate (how far the rule pulled away from it)."""

    @abstractmethod
    def combine(self, vectors: np.ndarray, uploads: list[ClientUpload]) -> tuple[np.ndarray, dict]:
        """The robust aggregate update of the (n, d) ``vectors`` and details to record."""

    def detect(self, server_round: int, uploads: list[ClientUpload]) -> Detection:
        vectors = self.updates(uploads)
        aggregate, details = self.combine(vectors, uploads)
        distances = np.linalg.norm(vectors - aggregate, axis=1)
        return Detection(kept=[u.node_id for u in uploads],
                         scores={u.node_id: float(d) for u, d in zip(uploads, distances)},
                         details=details, aggregate=self.from_update(aggregate, uploads))


@DEFENSES.register
class Median(_CoordinateRule):
    """Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, ICML 2018), as Flower's
    ``FedMedian``. Tolerates fewer than half attackers per coordinate."""

    name = "median"

    def combine(self, vectors, uploads):
        return np.median(vectors, axis=0), {}


@DEFENSES.register
class TrimmedMean(_CoordinateRule):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018) with Flower's ``trim_mean``: drop the
    floor(beta n) largest and smallest values of each coordinate, average the rest. Assumes at
    most beta n attackers."""

    name = "trimmed-mean"

    def __init__(self, *, beta: float = 0.2, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 <= beta < 0.5:
            raise ValueError(f"trimmed-mean beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    @classmethod
    def from_config(cls, config, assets, **flower_kwargs):
        return cls(beta=config.trimmed_mean_beta, **flower_kwargs)

    def combine(self, vectors, uploads):
        return trim_mean(vectors, self.beta), {"beta": self.beta,
                                                "trimmed_per_side": int(self.beta * len(vectors))}


@DEFENSES.register
class GeoMed(_CoordinateRule):
    """Geometric median of the updates weighted by sample counts (Chen, Su, Xu, 2017; RFA's
    smoothed Weiszfeld, Pillutla et al., IEEE TSP 2022). Breakdown point 1/2. Details record
    each client's effective Weiszfeld weight."""

    name = "geomed"

    def combine(self, vectors, uploads):
        weights = np.array([u.num_examples for u in uploads], dtype=np.float64)
        median, iterations = geometric_median(vectors, weights)
        effective = weights / np.maximum(1e-12, np.linalg.norm(vectors - median, axis=1))
        return median, {"iterations": iterations,
                        "weights": {u.node_id: float(w) for u, w in
                                    zip(uploads, effective / effective.sum())}}

