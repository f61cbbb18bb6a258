"""The experiment harness's Grid: ground truth for metrics, and the eavesdropping channel.

Wraps the Grid the ServerApp is given, passes every call through, and on training rounds:
1. takes each reply's ground-truth ``attacker`` flag out of the reply and keeps it in ``truth``
   (for detection metrics only): no strategy can read it;
2. simulates the threat model's eavesdropping: attackers whose attack needs the round's benign
   uploads first answer with ``awaits-benign = 1``; the harness forwards them this round's
   benign uploads, their claimed data sizes and training losses, and the global model in a
   second message (``train.attack``) and replaces their first reply with the malicious model
   they return. An attacker that does not answer is dropped from the round. This is the only
   place the server helps an attacker;
3. takes each final reply's ``runtime`` ConfigRecord out and keeps the Ray node it names in
   ``ray_nodes`` (replies made by Flower's simulation on Ray carry one): where the round's
   ClientApps ran, for the results only; an id that is no plain hexadecimal string is ignored.
The harness is part of the experiment, not of any strategy: every strategy receives the final
replies through ``send_and_receive`` as usual, without these fields.
It serves benign uploads only when told to (``serve_benign``; ``serves_benign_uploads`` says
when: attackers are configured, and the run is a simulation or the run config opts in for a
deployment), and only to replies that report ``attacker = 1``. Otherwise a reply that asks for
them gets nothing and is passed on as sent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from task.params import content_key
from task.reply import ATTACKER, AWAITS_BENIGN, HARNESS_METRICS, RAY_NODE, RUNTIME

ATTACK_MESSAGE = f"{MessageType.TRAIN}.attack"
RAY_NODE_ID = re.compile(r"[0-9a-f]{1,128}")
"""What a Ray node id looks like (56 hexadecimal digits in Ray 2); a client names its own."""


def _metric(reply: Message, key: str):
    if not reply.has_content() or "metrics" not in reply.content.metric_records:
        return None
    return reply.content["metrics"].get(key)


def _number(value) -> float | None:
    """``value`` as a finite float, or ``None`` (a client's metric can be anything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _forwardable(reply: Message) -> tuple[bytes, int] | None:
    """A benign reply's place among those forwarded (its content, not its random node id or
    arrival), or ``None`` when it is no well-formed upload: arrays that decode and a positive
    ``num-examples``. The strategy's screening rejects such a reply; the harness must not
    fail on it first."""
    if (not reply.has_content() or _metric(reply, ATTACKER) != 0.0
            or "arrays" not in reply.content.array_records
            or not (_number(_metric(reply, "num-examples")) or 0) > 0):
        return None
    try:
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        return content_key(arrays), reply.metadata.src_node_id
    except Exception:  # noqa: BLE001 -- bytes that do not decode: not forwarded
        return None


def claimed_size(sizes: Iterable[float]) -> int:
    """The ``num-examples`` an eavesdropping attacker claims: the benign uploads' median, a
    whole number as every benign client's is (its type would tell a crafted reply apart)."""
    sizes = list(sizes)
    return int(round(float(np.median(sizes)))) if sizes else 1


def ray_node(reply: Message) -> str | None:
    """The Ray node a reply says it was made on, if it names one that looks like an id."""
    if not reply.has_content() or RUNTIME not in reply.content.config_records:
        return None
    node = reply.content[RUNTIME].get(RAY_NODE)
    return node if isinstance(node, str) and RAY_NODE_ID.fullmatch(node) else None


def strip_ground_truth(reply: Message) -> Message:
    """Remove the harness's keys from the reply's metrics, and its ``runtime`` record, in place."""
    if reply.has_content():
        for record in reply.content.metric_records.values():
            for key in HARNESS_METRICS:
                if key in record:
                    del record[key]
        if RUNTIME in reply.content:
            del reply.content[RUNTIME]
    return reply


def serves_benign_uploads(num_attackers: int, simulated: bool, in_deployment: bool) -> bool:
    """Whether the harness answers ``awaits-benign`` requests at all: only with attackers
    configured, in a simulation or where the run config explicitly enables it for a deployment
    experiment (``eavesdrop-in-deployment``). Which attacks ask is theirs to say (an attack's
    ``needs_benign_uploads``, on the client: the harness imports no attack); only a reply that
    also reports ``attacker = 1`` is served."""
    return num_attackers > 0 and (simulated or in_deployment)


class EavesdroppingGrid:
    """A pass-through ``Grid``; ``truth`` holds the last training round's {node id: attacker},
    ``ray_nodes`` its {node id: Ray node id}. Benign uploads are sent to attackers only with
    ``serve_benign``."""

    def __init__(self, grid: Grid, serve_benign: bool) -> None:
        self._grid = grid
        self.serve_benign = serve_benign
        self.truth: dict[int, bool] = {}
        self.ray_nodes: dict[int, str] = {}

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if not any(m.metadata.message_type == MessageType.TRAIN for m in messages):
            return replies
        self.truth = {r.metadata.src_node_id: bool(_metric(r, ATTACKER)) for r in replies
                      if isinstance(_metric(r, ATTACKER), (int, float))}
        asking = [r for r in replies if _metric(r, AWAITS_BENIGN) == 1.0]
        waiting = [r for r in asking if self.serve_benign and self.truth.get(r.metadata.src_node_id)]
        if len(waiting) < len(asking):
            log(WARNING, "Nodes %s asked for the benign uploads; they are served only to "
                "configured attackers in a run that serves them", sorted(
                    r.metadata.src_node_id for r in asking if r not in waiting))
            # their replies go on as sent
        if not waiting:
            return self._handed_on(replies)
        order = {id(r): _forwardable(r) for r in replies}
        benign = sorted((r for r in replies if order[id(r)] is not None),
                        key=lambda r: order[id(r)])  # crafts are reproducible from run to run
        crafted = self._eavesdrop(messages, waiting, benign, timeout)
        waiting_ids = {r.metadata.src_node_id for r in waiting}
        kept = [r for r in replies if r.metadata.src_node_id not in waiting_ids]
        missing = waiting_ids - set(crafted)
        if missing:
            log(WARNING, "Attackers %s sent no crafted model; dropped from the round", sorted(missing))
        return self._handed_on(kept + list(crafted.values()))

    def _handed_on(self, replies: list[Message]) -> list[Message]:
        """The round's final replies without the harness's fields; their Ray nodes kept."""
        self.ray_nodes = {r.metadata.src_node_id: node for r in replies
                          if (node := ray_node(r)) is not None}
        return [strip_ground_truth(r) for r in replies]

    def _eavesdrop(self, messages: list[Message], waiting: list[Message], benign: list[Message],
                   timeout: float | None) -> dict[int, Message]:
        """Send each waiting attacker the benign uploads; return its crafted reply by node id."""
        global_arrays = {m.metadata.dst_node_id: m.content["arrays"] for m in messages}
        sizes = [_number(_metric(r, "num-examples")) for r in benign]  # positive: _forwardable
        losses = [loss for r in benign if (loss := _number(_metric(r, "train-loss"))) is not None]
        content = RecordDict({f"benign-{i}": r.content["arrays"] for i, r in enumerate(benign)})
        content["config"] = ConfigRecord({
            "server-round": messages[0].content["config"]["server-round"],
            "num-benign": len(benign),
            "benign-num-examples": sizes,
            "claimed-num-examples": claimed_size(sizes),
            "claimed-train-loss": float(np.median(losses)) if losses else 0.0,
        })
        attack_messages = []
        for reply in waiting:
            node = reply.metadata.src_node_id
            node_content = RecordDict(dict(content.items()))
            node_content["arrays"] = global_arrays[node]
            attack_messages.append(Message(node_content, dst_node_id=node,
                                           message_type=ATTACK_MESSAGE,
                                           group_id=messages[0].metadata.group_id))
        answers = self._grid.send_and_receive(attack_messages, timeout=timeout)
        return {a.metadata.src_node_id: a for a in answers if not a.has_error()}
