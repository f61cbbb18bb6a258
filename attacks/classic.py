"""Attacks that need only the attacker's own model: sign-flip, Gaussian noise, uniform noise,
label-flip."""

from __future__ import annotations

import numpy as np

from attacks.base import ATTACKS, Attack, AttackInput, relabelled, with_own_statistics
from task.data import ImageData
from task.params import State, flatten_updates, is_batchnorm_statistic, unflatten


def is_weight(name: str, value: np.ndarray) -> bool:
    """Whether an array of the state is a weight the noise attacks perturb: floating point
    and not one of BatchNorm's running statistics (noise would make a variance negative)."""
    return value.dtype.kind == "f" and not is_batchnorm_statistic(name)


@ATTACKS.register
class SignFlip(Attack):
    """Sign-flipping (Damaskinos et al., "Asynchronous Byzantine machine learning (the case of
    SGD)", ICML 2018): upload w_g - scale * (w - w_g), the honest update reversed and scaled
    (BatchNorm's running statistics stay its own: flipped, a variance can turn negative).
    FAA-DL (section VI-A) flips the weights themselves (epsilon * w, epsilon < 0): for epsilon
    = -1 an upload about twice the model's norm away from every benign one, where reversing the
    update stays at the honest update's distance."""

    name = "sign-flip"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    @classmethod
    def from_config(cls, config, model=None):
        return cls(config.sign_flip_scale)

    def craft(self, attack_input: AttackInput) -> State:
        own, global_state = attack_input.own_state, attack_input.global_state
        updates, names = flatten_updates([own], global_state)
        return with_own_statistics(
            unflatten(-self.scale * updates[0], names, global_state, buffers=own), own)


@ATTACKS.register
class GaussianNoise(Attack):
    """Gaussian noise (Fang, Cao, Jia, Gong, "Local model poisoning attacks to Byzantine-robust
    federated learning", USENIX Security 2020; FAA-DL section VI-A): upload the honest model
    plus i.i.d. N(0, sigma^2) noise on every weight (BatchNorm's running statistics, which are
    no weights, stay its own)."""

    name = "gaussian"

    def __init__(self, sigma: float = 0.1) -> None:
        self.sigma = sigma

    @classmethod
    def from_config(cls, config, model=None):
        return cls(config.gaussian_sigma)

    def craft(self, attack_input: AttackInput) -> State:
        own = attack_input.own_state
        return {k: (v + attack_input.rng.normal(0.0, self.sigma, v.shape)).astype(v.dtype)
                if is_weight(k, v) else v for k, v in own.items()}


@ATTACKS.register
class UniformNoise(Attack):
    """Scaled uniform noise added to a benign model, as the LayerCAM-AE authors' public code
    generates its "malicious" models: w + scale * U(-1, 1) on every weight (BatchNorm's running
    statistics stay its own)."""

    name = "uniform-noise"

    def __init__(self, scale: float = 0.1) -> None:
        self.scale = scale

    @classmethod
    def from_config(cls, config, model=None):
        return cls(config.uniform_noise_scale)

    def craft(self, attack_input: AttackInput) -> State:
        own = attack_input.own_state
        return {k: (v + self.scale * attack_input.rng.uniform(-1.0, 1.0, v.shape)).astype(v.dtype)
                if is_weight(k, v) else v for k, v in own.items()}


@ATTACKS.register
class LabelFlip(Attack):
    """Label flipping, a data-poisoning attack (Tolpegin, Truex, Gursoy, Liu, "Data poisoning
    attacks against federated learning systems", ESORICS 2020): train honestly on labels
    y -> C - 1 - y and upload the result."""

    name = "label-flip"
    poisons_data = True

    def flip_labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        return num_classes - 1 - labels

    def poison(self, data: ImageData) -> ImageData:
        return relabelled(data, self.flip_labels(data.labels.numpy(), data.num_classes))
