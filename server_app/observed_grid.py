"""A Grid that passes every call through and notes, from each training reply, the ground-truth
``attacker`` flag the client reported -- for detection metrics only; strategies never see it."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid


class ObservedGrid:
    """Wraps a ``Grid``; ``truth`` holds the latest training round's {node id: is attacker}."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.truth: dict[int, bool] = {}

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if any(m.metadata.message_type == MessageType.TRAIN for m in messages):
            self.truth = {}
            for reply in replies:
                if reply.has_content() and "metrics" in reply.content.metric_records:
                    flag = reply.content["metrics"].get("attacker")
                    if isinstance(flag, (int, float)):
                        self.truth[reply.metadata.src_node_id] = bool(flag)
        return replies
