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
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from attacks.base import ATTACKS, Attack, AttackInput
from attacks.eavesdropping import largest_gamma
from strategies.heatmaps import as_tensors, layercam_heatmaps
from task.models import default_cam_layer
from task.params import State, flatten_updates, unflatten


@ATTACKS.register
class AdaptiveCam(Attack):
    """Reverse the benign update as far as heat maps and distances stay benign-looking."""

    name = "adaptive-cam"
    needs_benign_uploads = True
    needs_local_probes = True

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.model, self.layer = model.eval(), layer

    @classmethod
    def from_config(cls, config, model=None):
        if model is None:
            raise ValueError("adaptive-cam needs the model architecture")
        return cls(model, config.layercam_ae_target_layer or default_cam_layer(config.model))

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

        def candidate(gamma: float) -> State:
            return unflatten((1.0 - gamma) * mean_update, names, global_state)

        def fits(gamma: float) -> bool:
            if gamma * update_norm > distance_bound:
                return False
            return float((maps([candidate(gamma)])[0] - center).norm()) <= map_bound

        return candidate(largest_gamma(fits, gamma_init=1.0, tolerance=1e-3))
