"""Screen training replies before any defense sees them.

A reply is rejected, with a reason naming what is wrong, when it carries an error, lacks its
ArrayRecord or ``num-examples``, has arrays whose names, shapes or dtypes differ from the global
model's, holds NaN/Inf, or moves absurdly far from the global model. Rejected uploads never reach
aggregation; the reasons go into the round's record.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import WARNING

import numpy as np
from flwr.app import Message
from flwr.common import log

from strategies.records import ClientUpload
from task.params import content_key

MAX_UPDATE_RATIO = 1e3
"""Default bound on ||w - w_global|| / (||w_global|| + 1); beyond it an upload is absurd."""


def check_upload(
    node_id: int, content, reference: Mapping[str, np.ndarray], weighted_by_key: str, max_update_ratio: float,
    reference_norm: float,
) -> tuple[ClientUpload | None, str]:
    """Return (the upload, "") or (None, reason)."""
    arrays_records = list(content.array_records.values())
    metric_records = list(content.metric_records.values())
    if len(arrays_records) != 1:
        return None, f"expected one ArrayRecord, got {len(arrays_records)}"
    if len(metric_records) != 1:
        return None, f"expected one MetricRecord, got {len(metric_records)}"
    record, metrics = arrays_records[0], metric_records[0]
    missing = sorted(set(reference) - set(record))
    extra = sorted(set(record) - set(reference))
    if missing or extra:
        return None, f"array names differ from the global model: missing {missing[:3]}, extra {extra[:3]}"
    num_examples = metrics.get(weighted_by_key)
    if isinstance(num_examples, list) or num_examples is None:
        return None, f"metric {weighted_by_key!r} missing or not a number"
    if not (math.isfinite(num_examples) and num_examples > 0):
        return None, f"metric {weighted_by_key!r} must be a positive finite number, got {num_examples}"
    arrays: dict[str, np.ndarray] = {}
    squared_distance = 0.0
    for name, expected in reference.items():
        array = record[name]
        if tuple(array.shape) != expected.shape or np.dtype(array.dtype) != expected.dtype:
            return None, (
                f"array {name!r} is {array.dtype}{list(array.shape)}, expected "
                f"{expected.dtype}{list(expected.shape)}"
            )
        try:
            value = array.numpy()
        except Exception as err:  # corrupt bytes: any decoding failure is a rejection
            return None, f"array {name!r} cannot be decoded ({err})"
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return None, f"array {name!r} contains NaN or Inf"
        if value.dtype.kind == "f":
            squared_distance += float(np.sum((value.astype(np.float64) - expected) ** 2))
        arrays[name] = value
    distance = math.sqrt(squared_distance)
    if distance > max_update_ratio * (reference_norm + 1.0):
        return None, (
            f"update norm {distance:.3g} exceeds {max_update_ratio:g} x (||global|| + 1) = "
            f"{max_update_ratio * (reference_norm + 1.0):.3g}"
        )
    return ClientUpload(node_id, arrays, float(num_examples), dict(metrics)), ""


def screen_replies(
    replies: Iterable[Message], reference: Mapping[str, np.ndarray], weighted_by_key: str,
    max_update_ratio: float = MAX_UPDATE_RATIO,
) -> tuple[list[ClientUpload], dict[int, str]]:
    """Split training replies into accepted uploads and ``{node_id: reason}`` rejections.

    A node that replies twice keeps its first reply (accepted or rejected); later ones are
    ignored with a warning. Uploads come back in the order of their content
    (``task.params.content_key``), not of arrival or node id (random in Flower), so that sums
    over them (the aggregate, the autoencoder's loss) and the decisions that depend on them
    are the same from run to run.
    """
    reference_norm = math.sqrt(
        sum(float(np.sum(v.astype(np.float64) ** 2)) for v in reference.values() if v.dtype.kind == "f")
    )
    accepted: list[ClientUpload] = []
    rejected: dict[int, str] = {}
    seen: set[int] = set()
    for msg in replies:
        node_id = int(msg.metadata.src_node_id)
        if msg.has_error():
            rejected[node_id] = f"client error: {msg.error.reason}"
            continue
        if node_id in seen or node_id in rejected:
            # One decision per node and round: a later reply must not mark an aggregated node
            # as rejected (detection metrics would count it as removed).
            log(WARNING, "Ignored a second reply from node %d in one round", node_id)
            continue
        upload, reason = check_upload(
            node_id, msg.content, reference, weighted_by_key, max_update_ratio, reference_norm
        )
        if upload is None:
            rejected[node_id] = reason
            continue
        seen.add(node_id)
        accepted.append(upload)
    return sorted(accepted, key=lambda u: (content_key(u.arrays), u.node_id)), rejected
