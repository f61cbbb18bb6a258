"""A Flower Grid whose SuperNodes are the real ClientApp, called in-process.

The ServerApp's harness (``server_app.app.run_experiment``) and a strategy's Flower loop
(``Strategy.start``) run unchanged on it: every message goes to ``client_app.app.app`` with the
node's own ``Context`` (partition, role), as a SuperNode would hand it over, and a handler that
raises becomes an error reply, as in Flower. ``offline`` nodes are not connected, ``silent``
ones are connected but never reply (as a node that died mid-round until the timeout); a test
sets them between rounds. What it leaves out is Flower's transport (the SuperLink, Ray, gRPC),
which the end-to-end tests run for real.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict

from client_app.app import app as client_app
from tests.helpers import act_as_serverapp


class LocalGrid:
    """``num_nodes`` SuperNodes (node ids 1..n, partition i-1 of ``num_partitions``, default
    n); the last ``num_attackers`` get ``role = "attacker"``, the rest ``"benign"``."""

    def __init__(self, run_config: Mapping[str, Any], num_nodes: int, num_attackers: int,
                 num_partitions: int | None = None) -> None:
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
                replies.append(client_app(message, context))
            except Exception as err:  # noqa: BLE001 -- as a SuperNode reports a failed ClientApp
                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"),
                                       reply_to=message))
        return replies
