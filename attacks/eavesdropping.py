"""Attacks built from the benign uploads of the round (delivered by the harness's eavesdropping
channel): ALIE, IPM, Min-Max and Min-Sum. All work on the benign *updates* Delta_i = w_i - w_g
of the floating-point arrays, flattened into one vector per client."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from statistics import NormalDist

import numpy as np

from attacks.base import ATTACKS, Attack, AttackInput
from task.params import State, flatten_updates, squared_distances, unflatten


class EavesdroppingAttack(Attack, ABC):
    """Base of the attacks that need the round's benign uploads."""

    needs_benign_uploads = True

    @abstractmethod
    def malicious_update(self, updates: np.ndarray) -> np.ndarray:
        """The malicious update from the (n, d) benign updates."""

    def craft(self, attack_input: AttackInput) -> State:
        if len(attack_input.benign_states) < 2:
            raise ValueError(f"{self.name} needs at least two eavesdropped benign uploads")
        updates, names = flatten_updates(attack_input.benign_states, attack_input.global_state)
        return unflatten(self.malicious_update(updates), names, attack_input.global_state)


def alie_z(num_clients: int, num_attackers: int) -> float:
    """Baruch et al.'s z_max: s = floor(n/2 + 1) - m supporters needed, z = Phi^-1((n - s) / n)."""
    supporters = math.floor(num_clients / 2 + 1) - num_attackers
    return NormalDist().inv_cdf((num_clients - supporters) / num_clients)


@ATTACKS.register
class Alie(EavesdroppingAttack):
    """"A little is enough" (Baruch, Baruch, Goldberg, NeurIPS 2019): every coordinate at
    mean - z * std of the benign updates, inside the benign spread so that coordinate-wise and
    distance-based rules keep it. ``z`` <= 0 takes z_max from the numbers of clients."""

    name = "alie"

    def __init__(self, z: float, num_clients: int, num_attackers: int) -> None:
        self.z = z if z > 0 else alie_z(num_clients, num_attackers)

    @classmethod
    def from_config(cls, config, model=None):
        return cls(config.alie_z, config.clients_a_round, config.attackers_a_round)

    def malicious_update(self, updates: np.ndarray) -> np.ndarray:
        return updates.mean(axis=0) - self.z * updates.std(axis=0)


@ATTACKS.register
class Ipm(EavesdroppingAttack):
    """Inner-product manipulation (Xie, Koyejo, Gupta, "Fall of empires", UAI 2020): upload
    -epsilon times the benign mean update, making its inner product with the true update negative."""

    name = "ipm"

    def __init__(self, epsilon: float = 0.5) -> None:
        self.epsilon = epsilon

    @classmethod
    def from_config(cls, config, model=None):
        return cls(config.ipm_epsilon)

    def malicious_update(self, updates: np.ndarray) -> np.ndarray:
        return -self.epsilon * updates.mean(axis=0)


def largest_gamma(fits, gamma_init: float = 10.0, tolerance: float = 1e-5) -> float:
    """The largest gamma >= 0 with ``fits(gamma)`` (monotone: True up to a bound), by doubling
    then bisection (Shejwalkar & Houmansadr's search, Algorithm 1)."""
    low, high = 0.0, gamma_init
    while fits(high) and high < 1e6:
        low, high = high, 2 * high
    while high - low > tolerance * max(1.0, low):
        mid = (low + high) / 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


@ATTACKS.register
class MinMax(EavesdroppingAttack):
    """Min-Max (Shejwalkar & Houmansadr, "Manipulating the Byzantine", NDSS 2021, AGR-agnostic):
    mean + gamma * p with p = -std of the benign updates and the largest gamma such that the
    malicious update is no farther from any benign update than two benign updates are from each
    other: max_i ||m - Delta_i|| <= max_ij ||Delta_i - Delta_j||."""

    name = "min-max"

    def malicious_update(self, updates: np.ndarray) -> np.ndarray:
        mean, direction = updates.mean(axis=0), -updates.std(axis=0)
        bound = math.sqrt(squared_distances(updates).max())
        gamma = largest_gamma(
            lambda g: np.linalg.norm(updates - (mean + g * direction), axis=1).max() <= bound
        )
        return mean + gamma * direction


@ATTACKS.register
class MinSum(EavesdroppingAttack):
    """Min-Sum (same paper): the largest gamma such that the malicious update's sum of squared
    distances to the benign updates is at most the largest such sum of a benign update:
    sum_i ||m - Delta_i||^2 <= max_i sum_j ||Delta_i - Delta_j||^2."""

    name = "min-sum"

    def malicious_update(self, updates: np.ndarray) -> np.ndarray:
        mean, direction = updates.mean(axis=0), -updates.std(axis=0)
        bound = squared_distances(updates).sum(axis=1).max()
        gamma = largest_gamma(
            lambda g: (np.linalg.norm(updates - (mean + g * direction), axis=1) ** 2).sum() <= bound
        )
        return mean + gamma * direction
