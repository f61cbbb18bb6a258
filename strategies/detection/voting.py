"""Voting over recent rounds, LayerCAM-AE eq. (16)-(17).

Every ``window`` (xi) rounds the server makes a final decision: a client is malicious if it was
an outlier in at least ``votes`` (epsilon) of the rounds of the last xi in which it took part.
Clients are identified by Flower node id; a client that skipped rounds is judged on the rounds
it was in, and a client that just joined on the one or two rounds it has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def is_voting_round(server_round: int, window: int) -> bool:
    """Eq. (16): rounds with t mod xi == 0 aggregate by the vote Y, others by O."""
    return server_round % window == 0


def vote_malicious(
    history: Mapping[int, Mapping[int, bool]], server_round: int, window: int, votes: int,
    clients: Iterable[int],
) -> dict[int, int]:
    """Outlier counts over rounds (server_round - window, server_round] for ``clients`` that
    reach ``votes`` (Y = 0 in eq. 17); ``history[node][round]`` is True when the node was an
    outlier (O = 0) that round."""
    first = server_round - window + 1
    malicious = {}
    for node in clients:
        rounds = history.get(node, {})
        count = sum(1 for t, outlier in rounds.items() if first <= t <= server_round and outlier)
        if count >= votes:
            malicious[node] = count
    return malicious


class OutlierHistory:
    """The per-client outlier flags of recent rounds (the paper's buffer M, xi x K)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.flags: dict[int, dict[int, bool]] = {}

    def record(self, server_round: int, outliers: Mapping[int, bool]) -> None:
        """Store this round's flags and forget rounds that left the window."""
        for node, outlier in outliers.items():
            self.flags.setdefault(node, {})[server_round] = bool(outlier)
        oldest = server_round - self.window + 1
        for node in list(self.flags):
            self.flags[node] = {t: o for t, o in self.flags[node].items() if t >= oldest}
            if not self.flags[node]:
                del self.flags[node]
