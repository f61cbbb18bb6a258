"""An adaptive attack that knows LayerCAM-AE: Min-Max in heat-map space.

The attacker knows the defense (LayerCAM heat maps of the target layer, scored by an autoencoder
for outliers) and has what any client has: the model architecture, its own images, the global
model and -- through the eavesdropping channel -- this round's benign uploads. It reverses the
benign progress, w(gamma) = w_g + (1 - gamma) u_bar with u_bar the benign mean update (gamma > 1
pushes the aggregate back past w_g, as IPM does), and takes the largest gamma for which both
1. its heat maps stay within the benign spread: ||H(w) - H_bar|| <= max_i ||H(w_i) - H_bar||,
   where H are LayerCAM maps (eq. 9-10) on its own images for the classes the benign mean model
   predicts and H_bar the benign models' mean map -- what LayerCAM-AE's autoencoder learns to
   reconstruct; and
2. its parameters stay within the benign spread: ||w - w_bar|| <= max_i ||w_i - w_bar||,
so that neither the heat-map detector nor a distance rule sees an outlier. gamma is found by
Shejwalkar & Houmansadr's doubling-and-bisection search (Min-Max, NDSS 2021), which assumes
feasibility is monotone in gamma.

Against the update views (``layercam-ae-views``, ``strategies.detection.update_views``) it knows each view
(``adaptive-cam-knows-views``; false: the views-blind attack above, its control)
and keeps every view's value within the benign uploads' range (so its robust score stays below
the largest benign one, whatever the cut), and the pair of its two highest views within the
pair rule (``layercam-ae-view-pair``: its ``views_excess`` no higher than a benign upload's, nor
past the cut; without the collusion view, which the offset below answers, though the server's
rule includes it). Reversing the mean update cannot pass the direction
view, so its candidates turn away from the mean instead: w(gamma) = w_g + (1 - gamma) u_bar +
gamma ||u_bar|| e, with e the unit ALIE direction -sign(u_bar) * sigma (sigma the benign
updates' per-coordinate deviation) made orthogonal to u_bar, and against the collusion view
each attacker adds its own random offset, sized so that two attackers sit as far apart as a
benign upload from its nearest neighbour (halved while the offset alone leaves a view's range).
The offset is a random mix of the benign uploads' deviations from their mean
(``adaptive-cam-offsets='span'``): it varies the parameters as benign clients vary them, so it
seldom needs halving. The control, ``'isotropic'``, is a random direction of all parameters: it
writes into coordinates the benign clients leave small, so it is halved more often, and the
attackers end up close together.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from attacks.base import ATTACKS, Attack, AttackInput
from attacks.eavesdropping import largest_gamma
from strategies.detection.heatmaps import as_tensors, layercam_heatmaps
from strategies.detection.update_views import (VIEWS, coordinate_median, nearest_distances,
                                               robust_z, views_excess)
from task.config import ADAPTIVE_CAM_OFFSETS, head_view_names
from task.models import default_cam_layer
from task.params import State, columns_of, flatten_updates, unflatten


@ATTACKS.register
class AdaptiveCam(Attack):
    """Reverse the benign update as far as heat maps and distances stay benign-looking."""

    name = "adaptive-cam"
    needs_benign_uploads = True
    needs_local_probes = True

    def __init__(self, model: nn.Module, layer: str, views: tuple[str, ...] = (),
                 view_z: float = 6.0, view_pair: float = 1.0, offsets: str = "span") -> None:
        if offsets not in ADAPTIVE_CAM_OFFSETS:
            raise ValueError(f"offsets must be one of {ADAPTIVE_CAM_OFFSETS}, got {offsets!r}")
        self.model, self.layer, self.views = model.eval(), layer, tuple(views)
        self.view_z, self.view_pair, self.offsets = view_z, view_pair, offsets
        self.head_names = head_view_names(model, self.views)

    @classmethod
    def from_config(cls, config, model=None):
        if model is None:
            raise ValueError("adaptive-cam needs the model architecture")
        return cls(model, config.layercam_ae_target_layer or default_cam_layer(config.model),
                   config.layercam_ae_view_names if config.adaptive_cam_knows_views else (),
                   config.layercam_ae_view_z, config.layercam_ae_view_pair,
                   config.adaptive_cam_offsets)

    def craft(self, attack_input: AttackInput) -> State:
        benign, global_state = attack_input.benign_states, attack_input.global_state
        if len(benign) < 2 or attack_input.probes is None:
            raise ValueError("adaptive-cam needs two eavesdropped benign uploads and local probes")
        probes = attack_input.probes
        updates, names = flatten_updates(benign, global_state)
        mean_update = updates.mean(axis=0)
        mean_state = unflatten(mean_update, names, global_state)
        with torch.no_grad():
            logits = functional_call(self.model, as_tensors(mean_state, probes.device), (probes,))
        classes = logits.argmax(dim=1)

        def maps(states) -> torch.Tensor:
            return layercam_heatmaps(self.model, states, probes, self.layer, classes,
                                     engine="loop").flatten(1).double()

        benign_maps = maps(benign)
        center = benign_maps.mean(dim=0)
        map_bound = float((benign_maps - center).norm(dim=1).max())
        distance_bound = float(np.linalg.norm(updates - mean_update, axis=1).max())
        update_norm = float(np.linalg.norm(mean_update))

        step, offset = self.turn(updates, attack_input.rng)

        def update(gamma: float) -> np.ndarray:
            return (1.0 - gamma) * mean_update + gamma * update_norm * step + offset

        def candidate(gamma: float) -> State:
            return unflatten(update(gamma), names, global_state)

        within_views = self.view_bounds(updates, columns_of(global_state, self.head_names))

        def fits(gamma: float) -> bool:
            if np.linalg.norm(update(gamma) - mean_update) > distance_bound:
                return False
            if not within_views(update(gamma)):
                return False
            return float((maps([candidate(gamma)])[0] - center).norm()) <= map_bound

        for _ in range(30):  # an offset that alone leaves a view's range is halved
            if fits(0.0):
                break
            offset *= 0.5
        return candidate(largest_gamma(fits, gamma_init=1.0, tolerance=1e-3))

    def turn(self, updates: np.ndarray, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
        """The direction the candidates turn to and this attacker's own offset (module
        docstring); without views neither: the candidates reverse the mean update."""
        mean = updates.mean(axis=0)
        if not self.views:
            return np.zeros_like(mean), np.zeros_like(mean)
        alie = -np.sign(mean) * updates.std(axis=0)
        alie -= (alie @ mean) / max(float(mean @ mean), 1e-30) * mean
        step = alie / max(float(np.linalg.norm(alie)), 1e-12)
        offset = np.zeros_like(mean)
        if "collusion" in self.views:
            if self.offsets == "span":
                noise = rng.normal(0.0, 1.0, len(updates)) @ (updates - mean)
            else:
                noise = rng.normal(0.0, 1.0, mean.shape)
            # two attackers' independent offsets of length r lie about r * sqrt(2) apart: as far
            # apart as a benign upload from its nearest neighbour
            radius = float(np.median(nearest_distances(updates))) / np.sqrt(2.0)
            offset = radius * noise / max(float(np.linalg.norm(noise)), 1e-30)
        return step, offset

    def view_bounds(self, updates: np.ndarray, head: tuple[slice, ...] = ()):
        """A test that an update's value in every view lies within the benign uploads' range
        (each view computed against the benign coordinate-wise median), and that its two
        highest views pass the pair rule no further than a benign upload's do, nor past the
        cut (robust scores over the benign uploads and the update); ``head``: the output
        layer's columns of ``updates`` (head-direction)."""
        centre = coordinate_median(updates)
        views = [v for v in self.views if v != "collusion"]  # the offset answers collusion
        highest = {v: float(VIEWS[v](updates, centre, head=head).max()) for v in views}

        def within(update: np.ndarray) -> bool:
            stacked = np.vstack([updates, update])
            values = {v: VIEWS[v](stacked, centre, head=head) for v in views}
            if any(float(values[v][-1]) > highest[v] for v in views):
                return False
            if len(views) < 2 or self.view_pair >= 1.0:  # the pair rule adds nothing
                return True
            excess = views_excess({v: robust_z(values[v]) for v in views}, self.view_z,
                                  self.view_pair)
            return float(excess[-1]) <= min(1.0, float(excess[:-1].max()))
        return within
