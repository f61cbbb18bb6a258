"""One record type for every defense: who uploaded, who was rejected, kept or excluded, and why.

Flower's robust strategies don't say whom they dropped; ours all fill a ``RoundRecord`` so that
detection metrics compare defenses like for like. Plain data only (JSON-serialisable via
``to_json``); the harness writes it, strategies never do I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class ClientUpload:
    """One accepted local model: its sender, parameters and claimed sample count."""

    node_id: int
    arrays: dict[str, np.ndarray]
    num_examples: float
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Detection:
    """What a defense decided this round.

    ``kept`` are the node ids aggregated, in the rule's order (the uploads' for most; Krum's
    lowest score first). ``scores`` are continuous suspicion scores (higher =
    more suspicious) for ROC/AUC, where the method has them. ``details`` holds method-specific
    values (thresholds, per-client flags, votes); ``timings`` seconds per step.
    """

    kept: list[int]
    scores: dict[int, float] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    aggregate: dict[str, np.ndarray] | None = None
    """The new global state, when the rule computes it while deciding (the coordinate-wise
    rules); ``None``: the strategy's ``aggregate`` of the kept uploads."""
    heatmaps: np.ndarray | None = None
    """The round's heat maps (K, P, h, w) of the uploads decided on, in upload order, for the
    harness to save: client k's map for probe p, at the resolution the defense computed it."""
    probes: np.ndarray | None = None
    """(P, C, H, W) the probe images of ``heatmaps``, for the harness to draw them under."""
    rejected: dict[int, str] = field(default_factory=dict)
    """Uploads the rule found unusable while deciding (a heat map that is not finite), with the
    reason: they are neither kept nor scored, and the round records them as rejected."""


@dataclass
class RoundRecord:
    """The defense's full record of one round."""

    round: int
    defense: str
    received: list[int]
    rejected: dict[int, str]
    kept: list[int]
    excluded: list[int]
    scores: dict[int, float] | None
    details: dict[str, Any]
    timings: dict[str, float]
    aggregated: bool
    note: str = ""
    bounded_claims: dict[int, float] = field(default_factory=dict)
    """Original ``num-examples`` of the kept or excluded uploads whose claim was bounded."""
    heatmaps: np.ndarray | None = field(default=None, repr=False, compare=False)
    """The detection's heat maps (``Detection.heatmaps``): an artifact, not serialised."""
    probes: np.ndarray | None = field(default=None, repr=False, compare=False)
    """Their probe images (``Detection.probes``): an artifact, not serialised."""
    missing: list[int] = field(default_factory=list)
    """Nodes sampled this round, or seen in an earlier one and not left out of this round's
    sample, that sent no reply (dropouts)."""
    sampled: list[int] = field(default_factory=list)
    """The nodes this round was sent to (every connected node unless ``clients-per-round``)."""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (node ids become strings as JSON object keys require); the heat-map
        artifacts are left out."""
        out = asdict(dataclasses.replace(self, heatmaps=None, probes=None))
        del out["heatmaps"], out["probes"]
        out["rejected"] = {str(k): v for k, v in self.rejected.items()}
        out["bounded_claims"] = {str(k): v for k, v in self.bounded_claims.items()}
        if self.scores is not None:
            out["scores"] = {str(k): float(v) for k, v in self.scores.items()}
        out["details"] = _jsonable(self.details)
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value
