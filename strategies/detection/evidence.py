"""Evidence over rounds: how the heat-map defenses turn each round's scores into exclusions.

Each round's reconstruction errors R become signed robust scores z = (R - median) / scale
(``SpreadHistory``). The scale is pooled over rounds -- the median of the last few rounds'
relative spreads 1.4826 MAD / median, times this round's median -- because one round's MAD
over a few dozen clients is itself noisy. A client's evidence is its scores of past rounds
combined with forgetting, normalised to unit variance (Stouffer's combination, exponentially
weighted), each round's score clipped to +-cap:

    S_t = memory * S_(t-1) + clip(z_t, cap),    V_t = memory^2 * V_(t-1) + 1,    E_t = S_t / sqrt(V_t).

If a benign client's scores are independent standard normals, so is its E_t: the cut
|E_t| > z_cut costs the false-positive rate of one round's cut, while a client whose scores sit
at z round after round reaches |E| = |z| * sqrt((1 + memory) / (1 - memory)) (3|z| at memory
0.8). Attackers sit moderately low round after round (the autoencoder reconstructs colluders'
maps *better*), so they are excluded within a few rounds and stay excluded while they keep
behaving so; a benign client with one unlucky round is readmitted once its later scores pull E
back. ``memory = 0`` is the one-round robust cut. The clip bounds what one round can say, as
benign rounds have heavy tails; with the cap below the cut, one round alone excludes a client
only as part of a low group. Benign scores are not independent either (a client's data stays
its own), so the cut sits above what a persistently off-centre benign client accumulates.

A client not sampled in a round (partial participation) is not scored in it. Its evidence
decays by the rounds it took part in (``decay="participation"``, the default: it returns with
the evidence it left with) or by the rounds that passed (``decay="rounds"``: S and V are first
multiplied by memory and memory^2 once per round missed, so old evidence fades with time).

``excluded_by_evidence`` turns evidence into exclusions: beyond the cut alone, or together
with a group. Colluders form a mode of near-alike maps that the autoencoder reconstructs better
than the diverse benign ones, so they sit together on the low side; when at least
``group_size`` clients are between -low_cut and -group_z at once, they are excluded together,
which benign clients rarely are. Clients beyond the cut, or excluded by the update views, do
not count towards a group, so that excluded attackers do not sweep benign clients near the
band's edge out with them. Alone, a client on the low side is the one the autoencoder finds
most typical, as an honest client whose data is nearest the round's average is round after
round under non-IID data: the low side's cut for a lone client (``low_cut``) may sit above the
high side's. Once excluded (by the evidence or the views), a client stays excluded while its
evidence stays below -group_z (``still_held``): colluders cross the lone cut, or leave the views'
ranges, one at a time, and without the hold the ones left behind fall short of a group and are
readmitted while their evidence still says low. Measurements:
docs/defenses.md and docs/defense-in-depth.md.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Mapping

import numpy as np

from strategies.detection.thresholds import MAD_TO_STD, robust_z
from task.config import EVIDENCE_DECAYS


class SpreadHistory:
    """Signed robust scores with the scale pooled over the last ``rounds`` rounds."""

    def __init__(self, rounds: int) -> None:
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.spreads: deque[float] = deque(maxlen=rounds)

    def scores(self, errors: np.ndarray) -> np.ndarray:
        """z = (R - median(R)) / (median of the recent relative spreads * median(R))."""
        errors = np.asarray(errors, dtype=np.float64)
        median = float(np.median(errors))
        spread = MAD_TO_STD * float(np.median(np.abs(errors - median))) / median if median > 0 else 0.0
        if not spread > 0:  # ties or zero errors: this round's own fallback scale
            return robust_z(errors)
        self.spreads.append(spread)
        return (errors - median) / (float(np.median(self.spreads)) * median)


class EvidenceLedger:
    """Per-client evidence E (module docstring), updated once per round."""

    def __init__(self, memory: float, cap: float = math.inf, decay: str = "participation") -> None:
        if not 0 <= memory < 1:
            raise ValueError(f"memory must be in [0, 1), got {memory}")
        if not cap > 0:
            raise ValueError(f"cap must be > 0, got {cap}")
        if decay not in EVIDENCE_DECAYS:
            raise ValueError(f"decay must be one of {EVIDENCE_DECAYS}, got {decay!r}")
        self.memory = memory
        self.cap = cap
        self.decay = decay
        self.sums: dict[int, float] = {}
        self.variances: dict[int, float] = {}
        self.last_round: dict[int, int] = {}
        """The round each client was last scored in (``decay="rounds"``)."""

    def update(self, scores: Mapping[int, float], server_round: int | None = None
               ) -> dict[int, float]:
        """Add this round's signed scores; return the evidence of the clients scored. With
        ``decay="rounds"`` the round number tells how many rounds each client missed."""
        if self.decay == "rounds" and server_round is None:
            raise ValueError("decay='rounds' needs the round number")
        evidence = {}
        for node, z in scores.items():
            missed = 0
            if self.decay == "rounds":
                missed = max(server_round - self.last_round.get(node, server_round - 1) - 1, 0)
                self.last_round[node] = server_round
            keep = self.memory ** (missed + 1)
            total = keep * self.sums.get(node, 0.0) + min(max(float(z), -self.cap), self.cap)
            variance = keep ** 2 * self.variances.get(node, 0.0) + 1.0
            self.sums[node], self.variances[node] = total, variance
            evidence[node] = total / math.sqrt(variance)
        return evidence


def excluded_by_evidence(evidence: Mapping[int, float], cut: float, group_z: float,
                         group_size: int, low_cut: float | None = None,
                         out: Collection[int] = ()) -> set[int]:
    """Clients with E > cut or E < -low_cut (default: the cut), and the clients with
    -low_cut <= E < -group_z when there are at least ``group_size`` of them (0: no group
    rule). Clients already beyond the cut do not make up a group, nor do the clients in
    ``out`` (excluded this round on other grounds: the update views): once clear attackers
    are out, a benign client near -group_z stays in. The hold is ``still_held``."""
    low_cut = cut if low_cut is None else low_cut
    excluded = {n for n, e in evidence.items() if e > cut or e < -low_cut}
    band = {n for n, e in evidence.items() if -low_cut <= e < -group_z and n not in out}
    if group_size > 0 and len(band) >= group_size:
        excluded |= band
    return excluded


def still_held(evidence: Mapping[int, float], held: Collection[int], group_z: float) -> set[int]:
    """The clients of ``held`` (excluded the last round they were scored, by the evidence or
    on other grounds) scored this round whose evidence is still below -group_z: they stay
    excluded, so that a low group whose members cross the lone cut one by one does not leave
    the rest alone in the band."""
    return {n for n in held if evidence.get(n, 0.0) < -group_z}
