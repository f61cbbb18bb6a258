"""GAE: data-agnostic model poisoning with an adversarial graph autoencoder.

Li, Zheng, Yuan, Ni, Akan, Poor, "Data-agnostic model poisoning against federated learning: a
graph autoencoder approach", IEEE TIFS 19:3465-3480, 2024 (arXiv 2311.18498); the threat model of
the LayerCAM-AE paper's eq. 8. The graph lives on *updates* at the coordinates that carry their
energy, as in the authors' later GRMP code. Per round and attacker, from the eavesdropped benign
models w_1..w_I (claimed data sizes n_i) and the global model w_g only -- no training data:

1. **Observe** (``attacks.observed``): u_i = w_i - w_g, the weighted mean update u_bar,
   d_i = ||u_i - u_bar||, ||u_i|| and the per-coordinate energy mean_i |u_i|, one model at a time.
2. **Select** (GAE eq. 9, ``select_benign``): maximise sum_i b_i d_i subject to
   sum_i b_i d_i <= Gamma, b_i in {0, 1}, Gamma = ``budget`` * sum_i d_i, over subsets of at
   least three (a graph of two models is two sign cliques); the minimisation as printed selects
   nothing under the same bound.
3. **Graph** on M = ``graph_nodes`` coordinates drawn from the ``candidate_nodes`` most energetic:
   F_m is the selected updates at m (M x I_sel, in a canonical order, so the arrival order does
   not matter). A_mn = 1 where the correlation of rows m and n (cosine of centred rows: raw rows
   would link every pair of the same sign) is >= tau + ramp/2, 0 below tau - ramp/2, linear in
   between: a ramp, because a binary cut lets an input change of rounding size flip an edge.
4. **Adversarial GAE** (``adversarial_structure``): a two-layer GCN encoder, decoder
   A_hat = sigmoid(Z Z^T), trained to reconstruct A; then the paper's adversarial regeneration
   ascends that loss on the latent Z within mean |A_hat - A_fit| <= ``perturbation``. In Z, not in
   the GAE's weights: there the loss starts at a minimum, where ascent is unstable.
   ``adversarial=False`` keeps A_fit, the control for what the adversarial step adds.
5. **Spectral generation** (``spectral_transfer``): L = diag(A 1) - A = B Lambda B^T, L_hat from
   A_hat = B_hat Lambda_hat B_hat^T, F_hat = T F with T the paper's B_hat B^T built from spectral
   projectors (the benign features on the adversarial graph): independent of the eigensolver and
   continuous in its inputs.
6. **Optimise under eq. 8** (``optimal_graph_update``): v = w' - w_g is u_bar off the graph and
   F_hat c on it, maximising the first-order damage D(v) = -<v, u_bar> / ||u_bar|| subject to
   ||v|| <= d_T, i.e. ||F_hat c|| <= r_G, r_G^2 = d_T^2 - ||u_bar off the graph||^2. The saddle
   point of L = D - lambda (||v|| - d_T) is closed-form: v_G = r_G P(-u_bar_G) / ||P(-u_bar_G)||,
   P the projector onto span(F_hat), lambda = ||P u_bar_G|| / (r_G ||u_bar||); the GAE does not
   depend on v, so the papers' alternation converges in one pass. d_T (``radius``) defaults to
   max_i ||w_i - w_g||.
7. **Upload** w' = w_g + v; the harness claims the median benign data size for it and the
   attacker reports the median benign training loss, so its reply has a benign reply's fields.

Cost: two M x M eigendecompositions and a dense GCN on M nodes; memory beyond the received
models, a few vectors of the model's size. Rejected alternatives and measurements:
docs/attacks.md (Design notes: the GAE attack).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
import torch
import torch.nn.functional as F
from flwr.common import log
from sklearn.metrics import roc_auc_score
from torch import nn

from attacks.base import ATTACKS, Attack, AttackInput
from attacks.observed import ObservedRound, observe_round
from task.config import RunConfig, check_gae_nodes
from task.params import State, unflatten

HIDDEN, LATENT = 32, 16
KNAPSACK_UNITS = 10_000
_DEFAULTS = RunConfig()
"""The declared defaults of the ``gae-*`` keys (``task.config``), the constructor's too."""
EIGENVALUE_TOLERANCE = 1e-8
"""Eigenvalues closer than this (relative to the largest) count as one (for the record)."""
SPECTRAL_BANDWIDTH = 1.0
"""Width of the pairing of eigenvectors by rank (``spectral_transfer``), in ranks; also the width,
in mean gaps, over which nearby eigenvalues' ranks are smoothed."""
RANK_TOLERANCE = 1e-10
"""Singular values of F_hat below this fraction of the largest span no direction."""


MIN_SELECTED = 3
"""Models the graph needs at least: with two, every standardised node feature is
+-(1, -1)/sqrt(2), every cosine +-1, and the graph two cliques by sign, a structure of no data."""


def select_benign(distances: np.ndarray, budget: float) -> np.ndarray:
    """GAE eq. 9: the subset maximising sum d_i under sum d_i <= budget * sum_i d_i, as a boolean
    mask (0-1 knapsack with value = weight = d_i, exact DP on quantised weights), among the
    subsets of at least ``MIN_SELECTED`` models (all of them when there are fewer); when no such
    subset fits, the ``MIN_SELECTED`` with the smallest d_i, past the capacity. Several subsets
    can be optimal; the items are taken in ascending order of d_i, so which one is chosen does
    not depend on the order the models were overheard in."""
    distances = np.asarray(distances, dtype=np.float64)
    least = min(MIN_SELECTED, len(distances))
    capacity = budget * distances.sum()
    order = np.argsort(distances, kind="stable")
    chosen = np.zeros(len(distances), dtype=bool)
    if capacity > 0:
        # Rounding weights up keeps every chosen subset within the capacity.
        weights = np.ceil(distances[order] / capacity * KNAPSACK_UNITS - 1e-9).astype(int)
        # reachable[i, k, c]: some subset of the first i items, of min(size, least) = k items,
        # weighs exactly c units.
        reachable = np.zeros((len(weights) + 1, least + 1, KNAPSACK_UNITS + 1), dtype=bool)
        reachable[0, 0, 0] = True
        for i, w in enumerate(weights):
            reachable[i + 1] = reachable[i]
            if w <= KNAPSACK_UNITS:
                for k in range(least + 1):
                    reachable[i + 1, min(k + 1, least), w:] |= reachable[i, k, : KNAPSACK_UNITS + 1 - w]
        if reachable[-1, least].any():
            units, k = int(np.flatnonzero(reachable[-1, least]).max()), least
            for i in range(len(weights), 0, -1):  # backtrack: prefer leaving item i-1 out
                if reachable[i - 1, k, units]:
                    continue
                chosen[order[i - 1]], units = True, units - weights[i - 1]
                k = k if k == least and reachable[i - 1, k, units] else k - 1
    if chosen.sum() < least:
        chosen[order[:least]] = True
    return chosen


def graph_nodes(energy: np.ndarray, candidates: int, nodes: int,
                rng: np.random.Generator) -> np.ndarray:
    """Step 3's nodes: ``nodes`` coordinates drawn at random from the ``candidates`` with the
    largest ``energy`` (ties broken by index), sorted."""
    candidates = min(candidates, len(energy))
    # the top ``candidates`` by a linear-time partition instead of sorting all D coordinates
    kth = np.partition(energy, len(energy) - candidates)[len(energy) - candidates]
    above = np.flatnonzero(energy > kth)
    top = np.concatenate([above, np.flatnonzero(energy == kth)[: candidates - len(above)]])
    return np.sort(rng.choice(np.sort(top), size=min(nodes, candidates), replace=False))


def standardised(features: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm across clients (a constant row stays zero): the
    cosine of two rows is then their correlation."""
    centred = features - features.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return np.divide(centred, norms, out=np.zeros_like(centred), where=norms > 0)


def encoder_input(features: np.ndarray) -> np.ndarray:
    """The GCN's node features: rows centred across clients, all scaled by one number (the
    entries' standard deviation), so that a coordinate on which the clients nearly agree gets a
    small feature rather than an amplified one."""
    centred = features - features.mean(axis=1, keepdims=True)
    scale = centred.std()
    return centred / scale if scale > 0 else centred


def cosine_graph(features: np.ndarray, threshold: float, ramp: float = 0.0) -> np.ndarray:
    """Adjacency (M, M) from the rows' cosine similarity: 1 at or above ``threshold`` + ramp/2,
    0 below ``threshold`` - ramp/2, linear in between (``ramp = 0``: the binary graph
    cos >= threshold); zero diagonal, and zero rows link to nothing."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)
    cosine = unit @ unit.T
    if ramp > 0:
        adjacency = np.clip((cosine - threshold) / ramp + 0.5, 0.0, 1.0)
    else:
        adjacency = (cosine >= threshold).astype(np.float64)
    adjacency[norms[:, 0] == 0, :] = 0
    adjacency[:, norms[:, 0] == 0] = 0
    np.fill_diagonal(adjacency, 0)
    return adjacency


def laplacian(adjacency: np.ndarray) -> np.ndarray:
    """L = diag(A 1) - A."""
    return np.diag(adjacency.sum(axis=1)) - adjacency


def distinct_eigenvalues(eigenvalues: np.ndarray) -> int:
    """How many eigenspaces: eigenvalues (ascending) further apart than the tolerance."""
    scale = max(1.0, float(np.abs(eigenvalues).max()))
    return 1 + int(np.count_nonzero(np.diff(eigenvalues) > EIGENVALUE_TOLERANCE * scale))


def _geometric_nn():
    """``torch_geometric.nn``, imported without the deprecation notice of ``torch.jit.script``
    that its modules' import-time scripting prints (noise in every attacker's log)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated",
                                category=FutureWarning)
        import torch_geometric.nn
    return torch_geometric.nn


class _GcnEncoder(nn.Module):
    """Two GCN layers (Kipf & Welling) on a dense adjacency: the graph is dense enough that
    ``DenseGCNConv``'s matrix products beat message passing over an edge list."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        convolution = _geometric_nn().DenseGCNConv
        self.conv1, self.conv2 = convolution(in_channels, HIDDEN), convolution(HIDDEN, LATENT)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv1(x, adjacency, add_loop=True))
        return self.conv2(hidden, adjacency, add_loop=True).squeeze(0)


@dataclass(frozen=True)
class GaeSettings:
    """Step 4's autoencoder (run-config keys ``gae-*``)."""

    epochs: int = _DEFAULTS.gae_epochs
    """Adam steps of descent: the GAE learns to reconstruct A."""
    adversarial: bool = _DEFAULTS.gae_adversarial
    """Ascend the reconstruction loss from there (the paper's adversarial regeneration)."""
    adversarial_epochs: int = _DEFAULTS.gae_adversarial_epochs
    """Projected ascent steps on the latent embedding."""
    perturbation: float = _DEFAULTS.gae_perturbation
    """Budget eps of the ascent: mean |A_hat - A_fit| over all pairs, A_fit the reconstruction."""
    learning_rate: float = _DEFAULTS.gae_learning_rate


ADVERSARIAL_STEP = 0.05
"""Length of one ascent step on Z, as a fraction of ||Z_fit||_F."""


def balanced_bce(target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss of logits against ``target``: binary cross-entropy over all off-diagonal pairs,
    edges and non-edges weighing half each (torch-geometric's ``recon_loss`` balance, dense:
    exact and deterministic). The weights are computed once, not per training step."""
    off_diagonal = 1.0 - torch.eye(len(target), dtype=target.dtype)
    edges = target.sum().clamp_min(1)
    weight = torch.where(target > 0, 0.5 / edges, 0.5 / (off_diagonal.sum() - edges).clamp_min(1))
    weight = weight * off_diagonal
    return lambda logits: F.binary_cross_entropy_with_logits(logits, target, weight=weight,
                                                             reduction="sum")


def _mean_change(latent: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """mean |sigmoid(Z Z^T) - reference| over the off-diagonal pairs."""
    change = (torch.sigmoid(latent @ latent.T) - reference).abs()
    return (change.sum() - change.diagonal().sum()) / (len(latent) * (len(latent) - 1))


def adversarial_latent(fitted: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor],
                       budget: float, steps: int) -> torch.Tensor:
    """Ascend the reconstruction loss over the latent embedding Z from ``fitted`` (Z_fit):
    normalised gradient steps, each followed by the projection that shrinks Z - Z_fit until
    mean |A_hat - A_fit| <= ``budget`` (bisection along the segment). Ascent starts where the
    loss's gradient in Z is large (the GAE minimised it over its weights, not over Z), so the
    path is a smooth function of the inputs."""
    reference = torch.sigmoid(fitted @ fitted.T)
    step = ADVERSARIAL_STEP * fitted.norm()
    latent = fitted.clone()
    for _ in range(steps):
        latent.requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(latent @ latent.T), latent)
        with torch.no_grad():
            latent = latent + step * gradient / gradient.norm().clamp_min(1e-300)
            if _mean_change(latent, reference) > budget:
                low, high = 0.0, 1.0
                for _ in range(30):  # to 1e-9 of the step
                    mid = (low + high) / 2
                    inside = _mean_change(fitted + mid * (latent - fitted), reference) <= budget
                    low, high = (mid, high) if inside else (low, mid)
                latent = fitted + low * (latent - fitted)
    return latent.detach()


def adversarial_structure(features: np.ndarray, adjacency: np.ndarray, settings: GaeSettings,
                          seed: int = 0) -> tuple[np.ndarray, dict[str, float]]:
    """Step 4: train a GCN graph autoencoder (float64) to reconstruct ``adjacency`` from
    ``features``, then (if adversarial) ascend its loss on the latent embedding within the
    budget. Returns A_hat (M, M, zero diagonal) and what it recorded about A_hat."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = _geometric_nn().GAE(_GcnEncoder(features.shape[1])).double()
    x, target = torch.from_numpy(features), torch.from_numpy(adjacency)
    loss = balanced_bce(target)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=settings.learning_rate)
    for _ in range(settings.epochs):
        optimizer.zero_grad()
        latent = autoencoder.encode(x, target)
        loss(autoencoder.decoder.forward_all(latent, sigmoid=False)).backward()
        optimizer.step()
    with torch.no_grad():
        fitted_latent = autoencoder.encode(x, target)
    latent = fitted_latent
    if settings.adversarial:
        latent = adversarial_latent(fitted_latent, loss, settings.perturbation,
                                    settings.adversarial_epochs)
    with torch.no_grad():
        structure = torch.sigmoid(latent @ latent.T).numpy()
        fitted = torch.sigmoid(fitted_latent @ fitted_latent.T).numpy()
        record = {"reconstruction-loss": float(loss(latent @ latent.T)),
                  "fitted-loss": float(loss(fitted_latent @ fitted_latent.T)),
                  "mean-change": float(_mean_change(latent, torch.from_numpy(fitted)))}
    np.fill_diagonal(structure, 0.0)
    upper = np.triu_indices(len(adjacency), k=1)
    decoded, fitted_edges = structure[upper] >= 0.5, fitted[upper] >= 0.5
    edges = adjacency[upper] >= 0.5
    record.update({
        "edges-flipped": int(np.count_nonzero(decoded != edges)),
        "edges-flipped-vs-reconstruction": int(np.count_nonzero(decoded != fitted_edges)),
        "auc": roc_auc_score(edges, structure[upper]),
        "reconstruction-auc": roc_auc_score(edges, fitted[upper]),
        "structure-std": float(structure[upper].std()),
    })
    return structure, record


def smoothed_ranks(eigenvalues: np.ndarray, bandwidth: float) -> np.ndarray:
    """Each eigenvalue's rank in its (ascending) spectrum, smoothed over ``bandwidth`` times the
    spectrum's mean gap: sum_i Phi((lambda_k - lambda_i) / h). Well-separated eigenvalues get
    k + 1/2, equal ones the same rank; continuous in the eigenvalues."""
    mean_gap = max((eigenvalues[-1] - eigenvalues[0]) / max(len(eigenvalues) - 1, 1), 1e-300)
    gaps = torch.from_numpy((eigenvalues[:, None] - eigenvalues[None, :]) / (bandwidth * mean_gap))
    return torch.special.ndtr(gaps).sum(dim=1).numpy()


def spectral_transfer(adjacency: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int]:
    """Step 5's operator T (M, M), F_hat = T F, and the number of distinct eigenvalues of L.

    The paper's T = B_hat B^T pairs the k-th eigenvectors of L and L_hat. Single eigenvectors
    are defined only up to sign, and (nearly) repeated eigenvalues only by their span, so that
    T jumps with the eigensolver's choices and with tiny input changes. Built from the
    eigenvectors' projectors instead: T = sum_(k,j) W_kj b_hat_k b_hat_k^T b_j b_j^T, with
    W_kj = exp(-(r_hat_k - r_j)^2 / 2 s^2) over the smoothed ranks r, r_hat (``smoothed_ranks``,
    s = ``SPECTRAL_BANDWIDTH``), so each b_j is carried to the b_hat of nearby rank in
    proportion to their overlap. T is the identity when A_hat = A, depends on no basis or sign,
    and moves continuously with A and A_hat."""
    eigenvalues, basis = np.linalg.eigh(laplacian(adjacency))
    adversarial_eigenvalues, adversarial_basis = np.linalg.eigh(laplacian(structure))
    ranks = smoothed_ranks(eigenvalues, SPECTRAL_BANDWIDTH)
    adversarial_ranks = smoothed_ranks(adversarial_eigenvalues, SPECTRAL_BANDWIDTH)
    weights = np.exp(-0.5 * ((adversarial_ranks[:, None] - ranks[None, :]) / SPECTRAL_BANDWIDTH) ** 2)
    transfer = adversarial_basis @ (weights * (adversarial_basis.T @ basis)) @ basis.T
    return transfer, distinct_eigenvalues(eigenvalues)


def span_basis(generated: np.ndarray) -> np.ndarray:
    """Orthonormal basis (M, r) of the column span of F_hat, rank-thresholded."""
    u, singular, _ = np.linalg.svd(generated, full_matrices=False)
    if singular.size == 0 or singular[0] == 0:
        raise ValueError("the generated features are zero: no direction to attack in")
    return u[:, singular > RANK_TOLERANCE * singular[0]]


def optimal_graph_update(basis: np.ndarray, mean_update_graph: np.ndarray,
                         radius: float) -> np.ndarray:
    """Step 6's saddle point: the v_G in span(``basis``) with ||v_G|| <= ``radius`` maximising
    -<v_G, u_bar_G>, i.e. ``radius`` * P(-u_bar_G) / ||P(-u_bar_G)||."""
    projected = -basis @ (basis.T @ mean_update_graph)
    norm = np.linalg.norm(projected)
    if radius == 0:
        return np.zeros_like(projected)
    if norm == 0:
        raise ValueError("the mean update is orthogonal to the generated span: no damage to gain")
    return projected * (radius / norm)


@dataclass
class GaeReport:
    """What one craft did: sizes, graph and structure statistics, damage, seconds per step."""

    selected: int = 0
    graph: dict[str, float] = field(default_factory=dict)
    structure: dict[str, float] = field(default_factory=dict)
    radius: float = 0.0
    graph_radius: float = 0.0
    damage: float = 0.0
    """D(v) = -<v, u_bar> / ||u_bar||, the surrogate the optimisation maximised."""
    cosine_with_undo: float = 0.0
    """cos(v, -u_bar): how much of the update is undone (1 for the undo-update control)."""
    seconds: dict[str, float] = field(default_factory=dict)


@ATTACKS.register
class Gae(Attack):
    """The GAE attack (module docstring): graph of the benign updates' energetic coordinates,
    adversarial GCN autoencoder, graph-spectral generation, the most damaging combination of the
    generated updates within ||w' - w_g|| <= d_T."""

    name = "gae"
    needs_benign_uploads = True

    def __init__(self, graph_nodes: int = _DEFAULTS.gae_graph_nodes,
                 candidate_nodes: int = _DEFAULTS.gae_candidate_nodes,
                 edge_threshold: float = _DEFAULTS.gae_edge_threshold,
                 edge_ramp: float = _DEFAULTS.gae_edge_ramp, budget: float = _DEFAULTS.gae_budget,
                 radius: float = _DEFAULTS.gae_radius, settings: GaeSettings = GaeSettings()
                 ) -> None:
        check_gae_nodes(candidate_nodes, graph_nodes, prefix="")
        self.graph_nodes, self.candidate_nodes = graph_nodes, candidate_nodes
        self.edge_threshold, self.edge_ramp = edge_threshold, edge_ramp
        self.budget, self.radius = budget, radius
        self.settings = settings
        self.last_report: GaeReport | None = None

    @classmethod
    def from_config(cls, config, model=None):
        return cls(graph_nodes=config.gae_graph_nodes,
                   candidate_nodes=config.gae_candidate_nodes,
                   edge_threshold=config.gae_edge_threshold, edge_ramp=config.gae_edge_ramp,
                   budget=config.gae_budget, radius=config.gae_radius,
                   settings=GaeSettings(epochs=config.gae_epochs,
                                        adversarial=config.gae_adversarial,
                                        adversarial_epochs=config.gae_adversarial_epochs,
                                        perturbation=config.gae_perturbation,
                                        learning_rate=config.gae_learning_rate))

    def craft(self, attack_input: AttackInput) -> State:
        state, self.last_report = self.craft_with_report(attack_input)
        if self.last_report.graph_radius == 0.0:  # said on the client: the report stays here
            log(WARNING, "GAE, round %d: d_T = %.4g leaves the graph no room (the benign mean "
                "update's norm off the graph is at least that): the upload is the benign mean "
                "update shrunk onto the sphere, no attack; raise gae-radius (0: the largest "
                "benign distance)", attack_input.server_round, self.last_report.radius)
        return state

    def craft_with_report(self, attack_input: AttackInput) -> tuple[State, GaeReport]:
        """The malicious state and what the craft recorded."""
        report, clock = GaeReport(), time.perf_counter()

        def lap(step: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            report.seconds[step] = now - clock
            clock = now

        observed = observe_round(attack_input.global_state, attack_input.benign_states,
                                 attack_input.benign_weights)
        distances = observed.distances_to_mean
        selected = np.flatnonzero(select_benign(distances, self.budget))
        selected = selected[np.argsort(distances[selected], kind="stable")]  # canonical order
        report.selected = len(selected)
        lap("observe")
        rng = attack_input.rng
        nodes = graph_nodes(observed.energy, self.candidate_nodes, self.graph_nodes, rng)
        features = observed.updates_at([attack_input.benign_states[i] for i in selected],
                                       nodes)  # F: (M, I_sel)
        adjacency = cosine_graph(standardised(features), self.edge_threshold, self.edge_ramp)
        lap("graph")
        structure, report.structure = adversarial_structure(
            encoder_input(features), adjacency, self.settings, seed=int(rng.integers(2**31)))
        lap("autoencoder")
        transfer, distinct = spectral_transfer(adjacency, structure)
        generated = transfer @ features  # F_hat
        edges = adjacency.sum() / 2
        report.graph = {"nodes": len(nodes), "edges": int(edges),
                        "density": float(edges / max(1, len(nodes) * (len(nodes) - 1) / 2)),
                        "distinct-eigenvalues": distinct}
        lap("eigendecompositions")
        update = self._update_from(observed, nodes, generated, report)
        lap("optimisation")
        return unflatten(update, observed.names, attack_input.global_state), report

    def _update_from(self, observed: ObservedRound, nodes: np.ndarray, generated: np.ndarray,
                     report: GaeReport) -> np.ndarray:
        """Step 6: the benign mean update off the graph, the optimal generated update on it."""
        mean = observed.mean_update
        radius = self.radius if self.radius > 0 else observed.largest_benign_distance
        off_graph = float(np.sqrt(max(mean @ mean - mean[nodes] @ mean[nodes], 0.0)))
        # A radius below the benign mean's own off-graph norm leaves the attack no room: the
        # off-graph part shrinks onto the sphere and the graph part is zero.
        update = mean * min(1.0, radius / off_graph) if off_graph > 0 else mean.copy()
        graph_radius = float(np.sqrt(max(radius**2 - min(off_graph, radius) ** 2, 0.0)))
        update[nodes] = optimal_graph_update(span_basis(generated), mean[nodes], graph_radius)
        mean_norm = float(np.linalg.norm(mean))
        report.radius, report.graph_radius = radius, graph_radius
        report.damage = float(-(update @ mean) / mean_norm)
        report.cosine_with_undo = report.damage / float(np.linalg.norm(update))
        return update
