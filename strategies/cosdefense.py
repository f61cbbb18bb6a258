"""CosDefense (Yaldiz, Zhang, Avestimehr, "Secure federated learning against model poisoning
attacks via client filtering", ICLR 2023 workshop, arXiv 2304.00160).

The score of client i is the cosine similarity between the global model's last-layer weights and
client i's last-layer update; poisoned updates score higher than benign ones. Scores are min-max
normalised within the round and clients "much higher than the average" are filtered out, read
here as: normalised score > mean + ``margin`` * std of the round's normalised scores. The last
layer is the state's last two-dimensional floating-point array (the classifier's weight).
Assumes attackers are a minority and that the last layer exposes them.
"""

from __future__ import annotations

import numpy as np

from strategies.base import DetectingFedAvg
from strategies.records import ClientUpload, Detection
from strategies.registry import DEFENSES


def last_layer_name(state: dict[str, np.ndarray]) -> str:
    """Name of the last two-dimensional floating-point array of a state."""
    names = [k for k, v in state.items() if v.dtype.kind == "f" and v.ndim == 2]
    if not names:
        raise ValueError("CosDefense needs a model whose state has a 2-D (linear) weight")
    return names[-1]


def cosine_scores(global_weight: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """cos(W_g, W_i - W_g) for each client's last-layer weight W_i."""
    reference = global_weight.ravel().astype(np.float64)
    updates = np.stack([w.ravel().astype(np.float64) - reference for w in weights])
    norms = np.linalg.norm(updates, axis=1) * np.linalg.norm(reference)
    return updates @ reference / np.maximum(norms, 1e-300)


@DEFENSES.register
class CosDefense(DetectingFedAvg):
    """CosDefense (module docstring)."""

    name = "cosdefense"

    def __init__(self, *, margin: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.margin = margin

    @classmethod
    def from_config(cls, config, assets, **flower_kwargs):
        return cls(margin=config.cosdefense_margin, **flower_kwargs)

    def detect(self, server_round: int, uploads: list[ClientUpload]) -> Detection:
        layer = last_layer_name(self.global_state)
        scores = cosine_scores(self.global_state[layer], [u.arrays[layer] for u in uploads])
        spread = scores.max() - scores.min()
        normalised = (scores - scores.min()) / spread if spread > 0 else np.zeros_like(scores)
        cut = normalised.mean() + self.margin * normalised.std()
        # recorded in the scores' units (what the records and the report's cut line compare the
        # recorded scores with): the same decision, up to the last bit at the cut
        threshold = float(scores.min() + cut * spread)
        return Detection(
            kept=[u.node_id for u, s in zip(uploads, scores) if s <= threshold],
            scores={u.node_id: float(s) for u, s in zip(uploads, scores)},
            details={"layer": layer, "threshold": threshold, "normalised_threshold": float(cut)},
        )
