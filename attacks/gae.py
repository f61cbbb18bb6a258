"""GAE: data-agnostic model poisoning with an adversarial graph autoencoder.

Li, Zheng, Yuan, Ni, Akan, Poor, "Data-agnostic model poisoning against federated learning: a
graph autoencoder approach", IEEE TIFS 19:3465-3480, 2024 (arXiv 2311.18498); the threat model of
the LayerCAM-AE paper's eq. 8. Implemented per round and attacker from the eavesdropped benign
models w_1..w_I (claimed data sizes n_i) and the global model w_g only -- no training data:

1. **Benign mean and distances**: w_bar = sum_i n_i w_i / sum_i n_i, d_i = ||w_i - w_bar||_2.
2. **Selection** (GAE eq. 9), a 0-1 knapsack: maximise sum_i b_i d_i subject to
   sum_i b_i d_i <= Gamma, b_i in {0, 1}, with Gamma = ``budget`` * sum_i d_i. (Minimising the
   same sum under the same bound selects nothing, so the knapsack is solved as a maximisation.)
   Dynamic programming over the distances rounded up to 1/10,000 of Gamma: never
   over Gamma, and at least as good as the best subset within Gamma (1 - I / 10,000). At least
   the two models closest to w_bar are kept.
3. **Graph**: M coordinates drawn at random (seeded) are the nodes; node m's feature is the row
   F_m of F (M x I_sel), the selected models' values at m; A_mn = 1 if cos(F_m, F_n) >= tau and
   m != n, else 0.
4. **Graph autoencoder**: torch-geometric's ``GAE`` with a two-layer GCN encoder (``DenseGCNConv``, hidden
   32, latent 16, rows of Z scaled to norm 2 so that the logits stay bounded) and the
   inner-product decoder A_hat = sigmoid(Z Z^T), trained for ``epochs``
   steps of Adam (lr 0.01) on the binary cross-entropy between A_hat and A over all off-diagonal
   pairs, edges and non-edges weighing half each (torch-geometric's ``recon_loss`` balance, but
   dense: exact and deterministic, no negative sampling). Adversarial training (the
   paper's, default) *maximises* this reconstruction loss, so A_hat is an adversarial structure;
   ``adversarial=False`` minimises it instead.
5. **Graph-spectral generation**: L = diag(A 1) - A = B Lambda B^T and, with A_hat's diagonal
   zeroed, L_hat = diag(A_hat 1) - A_hat = B_hat Lambda_hat B_hat^T (eigenvectors by ascending
   eigenvalue); F_hat = B_hat B^T F re-expresses the benign features on the adversarial graph.
   The malicious values at the M graph coordinates are F_hat a, with a the selected models'
   data-size weights (their weighted mean feature, re-expressed).
6. **Damage under the distance constraint** (eq. 8): the deviation delta = w' - w_bar starts
   at F_hat a - w_bar on the graph coordinates and at w_g - w_bar (the benign update undone) on
   all others. The data-agnostic damage surrogate is D(delta) = ||delta||, the deviation of the
   poisoned aggregate from the benign aggregate (up to the attacker's weight), maximised subject
   to ||delta|| <= d_T. The constraint's centre is w_bar, the attacker's estimate of the next
   global model; d_T (``radius``) defaults to max_i d_i, the largest benign distance this round.
   Objective and constraint are both radial, so the primal-dual iteration on
   L = D - lambda (||delta|| - d_T) has its saddle point in closed form: delta on the sphere of
   radius d_T in the generated direction, lambda = 1. It is computed directly (iterating
   subgradient steps on this linear problem only oscillates around it).
7. **Upload** w' = w_bar + delta; the harness claims the median benign data size for it.

One departure, for cost: M defaults to 2,000 graph nodes rather than 10,000, because step 5 needs two full M x M eigendecompositions (O(M^3): 97 s each at
M = 10,000 on a 2-core CPU, 0.7 s at 2,000); ``gae-graph-nodes = 10000`` restores it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, AttackInput, State
from task.params import flatten_updates, unflatten

HIDDEN, LATENT, GAE_LEARNING_RATE = 32, 16, 0.01
LATENT_NORM = 2.0
"""Norm of every latent vector, so decoder logits lie in [-4, 4] and the ascended loss is
bounded (unbounded, ascent drives every logit to +inf: A_hat is the complete graph within five
epochs)."""
KNAPSACK_UNITS = 10_000


def select_benign(distances: np.ndarray, budget: float) -> np.ndarray:
    """GAE eq. 9: the subset maximising sum d_i under sum d_i <= budget * sum_i d_i, as a boolean
    mask (0-1 knapsack with value = weight = d_i, exact DP on quantised weights). At least the
    two models with the smallest d_i are kept."""
    distances = np.asarray(distances, dtype=np.float64)
    capacity = budget * distances.sum()
    chosen = np.zeros(len(distances), dtype=bool)
    if capacity > 0:
        # Rounding weights up keeps every chosen subset within the capacity.
        weights = np.ceil(distances / capacity * KNAPSACK_UNITS - 1e-9).astype(int)
        # reachable[i][c]: some subset of the first i items weighs exactly c units.
        reachable = np.zeros((len(weights) + 1, KNAPSACK_UNITS + 1), dtype=bool)
        reachable[0, 0] = True
        for i, w in enumerate(weights):
            reachable[i + 1] = reachable[i]
            if w <= KNAPSACK_UNITS:
                reachable[i + 1, w:] |= reachable[i, : KNAPSACK_UNITS + 1 - w]
        units = int(np.flatnonzero(reachable[-1]).max())
        for i in range(len(weights), 0, -1):  # backtrack: prefer leaving item i-1 out
            if not reachable[i - 1, units]:
                chosen[i - 1], units = True, units - weights[i - 1]
    if chosen.sum() < 2:
        chosen[np.argsort(distances, kind="stable")[:2]] = True
    return chosen


def cosine_graph(features: torch.Tensor, threshold: float) -> torch.Tensor:
    """Binary adjacency (M, M): 1 where the rows' cosine similarity is >= ``threshold``, zero
    diagonal."""
    unit = F.normalize(features, dim=1)
    adjacency = (unit @ unit.T >= threshold).to(features.dtype)
    adjacency.fill_diagonal_(0)
    return adjacency


def laplacian(adjacency: torch.Tensor) -> torch.Tensor:
    """L = diag(A 1) - A."""
    return torch.diag(adjacency.sum(dim=1)) - adjacency


class _GcnEncoder(nn.Module):
    """Two GCN layers (Kipf & Welling) on a dense adjacency: the graphs here are dense (about a
    third of all pairs at tau = 0.5), where ``DenseGCNConv``'s matrix products are far faster
    than message passing over an edge list."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        from torch_geometric.nn import DenseGCNConv

        self.conv1, self.conv2 = DenseGCNConv(in_channels, HIDDEN), DenseGCNConv(HIDDEN, LATENT)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv1(x, adjacency, add_loop=True))
        latent = self.conv2(hidden, adjacency, add_loop=True).squeeze(0)
        return LATENT_NORM * F.normalize(latent, dim=1)


def adversarial_structure(features: torch.Tensor, adjacency: torch.Tensor, epochs: int,
                          adversarial: bool = True, seed: int = 0) -> torch.Tensor:
    """Step 4: train a GCN graph autoencoder on (features, adjacency) and return its decoded
    structure A_hat = sigmoid(Z Z^T) (M, M) with a zero diagonal. Adversarial training ascends
    the reconstruction loss; otherwise it descends it."""
    from torch_geometric.nn import GAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = GAE(_GcnEncoder(features.shape[1]))
    x = features / features.std().clamp_min(1e-12)
    # Edges and non-edges weigh half each, as in torch-geometric's ``recon_loss`` (one negative
    # sample per edge), but over all pairs instead of a sample.
    off_diagonal = 1.0 - torch.eye(len(adjacency), dtype=features.dtype)
    edges = adjacency.sum().clamp_min(1)
    weight = torch.where(adjacency > 0, 0.5 / edges, 0.5 / (off_diagonal.sum() - edges).clamp_min(1))
    weight = weight * off_diagonal
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=GAE_LEARNING_RATE)
    sign = -1.0 if adversarial else 1.0
    for _ in range(epochs):
        optimizer.zero_grad()
        logits = autoencoder.decoder.forward_all(autoencoder.encode(x, adjacency), sigmoid=False)
        loss = F.binary_cross_entropy_with_logits(logits, adjacency, weight=weight, reduction="sum")
        (sign * loss).backward()
        optimizer.step()
    with torch.no_grad():
        structure = autoencoder.decoder.forward_all(autoencoder.encode(x, adjacency))
    return structure.fill_diagonal_(0)


def spectral_generation(features: torch.Tensor, adjacency: torch.Tensor,
                        adversarial: torch.Tensor) -> torch.Tensor:
    """Step 5: F_hat = B_hat B^T F with L = B Lambda B^T, L_hat = B_hat Lambda_hat B_hat^T."""
    _, basis = torch.linalg.eigh(laplacian(adjacency))
    _, adversarial_basis = torch.linalg.eigh(laplacian(adversarial))
    return adversarial_basis @ (basis.T @ features)


def deviation_at_radius(start: np.ndarray, radius: float) -> np.ndarray:
    """Step 6: argmax ||delta|| s.t. ||delta|| <= radius, in the direction of ``start``."""
    norm = np.linalg.norm(start)
    if norm == 0:
        raise ValueError("the generated deviation is zero: no direction to attack in")
    return start * (radius / norm)


class Gae(Attack):
    """The GAE attack (module docstring): graph from the eavesdropped benign models, adversarial
    GCN autoencoder, graph-spectral generation, the largest deviation with ||w' - w_bar|| <= d_T."""

    name = "gae"
    needs_benign_uploads = True

    def __init__(self, graph_nodes: int = 2000, edge_threshold: float = 0.5, epochs: int = 50,
                 adversarial: bool = True, budget: float = 0.5, radius: float = 0.0) -> None:
        self.graph_nodes, self.edge_threshold, self.epochs = graph_nodes, edge_threshold, epochs
        self.adversarial, self.budget, self.radius = adversarial, budget, radius

    def craft(self, attack_input: AttackInput) -> State:
        benign = attack_input.benign_states
        if len(benign) < 2:
            raise ValueError("gae needs at least two eavesdropped benign uploads")
        global_state = attack_input.global_state
        updates, names = flatten_updates(benign, global_state)
        weights = np.asarray(attack_input.benign_weights or [1.0] * len(benign), dtype=np.float64)
        mean_update = weights @ updates / weights.sum()
        distances = np.linalg.norm(updates - mean_update, axis=1)
        selected = select_benign(distances, self.budget)
        global_vector = np.concatenate([global_state[k].astype(np.float64).ravel() for k in names])
        nodes = np.sort(attack_input.rng.choice(
            len(global_vector), size=min(self.graph_nodes, len(global_vector)), replace=False))
        features = torch.from_numpy(global_vector[nodes, None] + updates[selected][:, nodes].T)
        features = features.float()
        adjacency = cosine_graph(features, self.edge_threshold)
        structure = adversarial_structure(features, adjacency, self.epochs, self.adversarial,
                                          seed=int(attack_input.rng.integers(2**31)))
        generated = spectral_generation(features, adjacency, structure).double().numpy()
        mix = weights[selected] / weights[selected].sum()
        start = -mean_update  # w_g - w_bar off the graph
        start[nodes] = generated @ mix - (global_vector[nodes] + mean_update[nodes])
        radius = self.radius if self.radius > 0 else float(distances.max())
        deviation = deviation_at_radius(start, radius)
        return unflatten(mean_update + deviation, names, global_state)
