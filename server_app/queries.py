"""The ServerApp's channel for what a defense asks clients beyond training, over its Grid."""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


class GridQueries:
    """``strategies.registry.ClientQueries`` over a Flower Grid: one round trip for all
    requests; a node's later replies are ignored, a node that does not answer is left out."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def ask(self, message_type: str, server_round: int, requests: Mapping[int, RecordDict],
            timeout: float) -> dict[int, Message]:
        messages = [Message(content, dst_node_id=node_id, message_type=message_type,
                            group_id=str(server_round))
                    for node_id, content in requests.items()]
        replies: dict[int, Message] = {}
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            replies.setdefault(reply.metadata.src_node_id, reply)
        return replies
