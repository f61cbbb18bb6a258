"""A Flower Grid whose SuperNodes are the real ClientApp, called in-process.

The ServerApp's harness (``server_app.app.run_experiment``) and a strategy's Flower loop
(``Strategy.start``) run unchanged on it: every message goes to ``client_app.app.app`` with the
node's own ``Context`` (partition, role), as a SuperNode would hand it over, and a handler that
raises becomes an error reply, as in Flower. ``offline`` nodes are not connected, ``silent``
ones are connected but never reply (as a node that died mid-round until the timeout); a test
sets them between rounds. What it leaves out is Flower's transport (the SuperLink, Ray, gRPC),
which the end-to-end tests run for real.

Runs that differ only in what the server does (``defense``, ``results-dir``) send their clients
the same messages: given a shared ``replies`` cache, a node answers a message it has answered
before in the same state with the reply the ClientApp gave then (its content and the node's
state after it, copied), as the ClientApp is deterministic; the first run trains for real.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict

from client_app.app import app as client_app
from tests.helpers import act_as_serverapp

SERVER_SIDE_KEYS = ("defense", "results-dir")
"""Run-config keys the ClientApp's answers do not depend on (a ``replies`` cache ignores them)."""


class LocalGrid:
    """``num_nodes`` SuperNodes (node ids 1..n, partition i-1 of ``num_partitions``, default
    n); the last ``num_attackers`` get ``role = "attacker"``, the rest ``"benign"``."""

    def __init__(self, run_config: Mapping[str, Any], num_nodes: int, num_attackers: int,
                 num_partitions: int | None = None, replies: dict | None = None) -> None:
        act_as_serverapp()
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=dict(run_config),
                          node_config={"partition-id": node - 1,
                                       "num-partitions": num_partitions or num_nodes,
                                       "role": "attacker" if node > num_nodes - num_attackers
                                       else "benign"})
            for node in range(1, num_nodes + 1)}
        self.sent: list[str] = []
        self.offline: set[int] = set()
        self.silent: set[int] = set()
        self.replies = replies
        self.client_config = repr(sorted((k, v) for k, v in run_config.items()
                                         if k not in SERVER_SIDE_KEYS))

    def get_node_ids(self) -> list[int]:
        return [node for node in self.contexts if node not in self.offline]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message.metadata.message_type)
            if message.metadata.dst_node_id in self.silent | self.offline:
                continue
            context = self.contexts[message.metadata.dst_node_id]
            try:
                replies.append(self._answer(message, context))
            except Exception as err:  # noqa: BLE001 -- as a SuperNode reports a failed ClientApp
                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"),
                                       reply_to=message))
        return replies

    def _answer(self, message: Message, context: Context) -> Message:
        """The ClientApp's reply, or the cached one (module docstring)."""
        if self.replies is None:
            return client_app(message, context)
        key = (self.client_config, repr(sorted(context.node_config.items())),
               message.metadata.message_type, message.content.object_id, context.state.object_id)
        if key not in self.replies:
            reply = client_app(message, context)
            self.replies[key] = (reply.error if reply.has_error() else copy.deepcopy(reply.content),
                                 copy.deepcopy(context.state))
        answer, state = self.replies[key]
        context.state = copy.deepcopy(state)
        if isinstance(answer, Error):
            return Message(answer, reply_to=message)
        return Message(copy.deepcopy(answer), reply_to=message)
