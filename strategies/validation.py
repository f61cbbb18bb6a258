"""Screen training replies before any defense sees them.

Every field of a reply is the client's to choose, so a reply is rejected, with a reason naming
what is wrong, when it carries an error, lacks its ArrayRecord or ``num-examples``, has arrays
whose names differ from the global model's, whose header or decoded bytes differ from the
global model's in shape or dtype, that hold NaN/Inf or move absurdly far from the global model,
or claims an implausible ``num-examples``; and any exception while screening one reply rejects
that reply, never the round. Rejected uploads never reach aggregation; the reasons go into the
round's record.

Buffers are checked for what they are: a BatchNorm ``running_var`` is a variance (a negative
one makes evaluation take the root of a negative number: NaN everywhere), ``num_batches_tracked``
a count, and every integer array stays within +-2^53, where float64 holds it exactly and
casting back cannot overflow. The next global model's integer arrays are the round's median
(``strategies.aggregation.counted_buffers``), and an upload may move them by ``MAX_COUNT_STEP``
at most, so that no minority, nor a majority in a few rounds, can push them to that cap.

``num-examples`` weighs a client in FedAvg, so a claim is also bounded by the others: no client
carries more than ``MAX_WEIGHT_SHARE`` / K of the round's K valid claims (twice the share of K
equal claims; ``bound_claims``), whatever it says; the original claim is recorded. The
strategy cuts again among the uploads its rule keeps, so the bound holds for what is aggregated.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from logging import WARNING

import numpy as np
from flwr.app import Message
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from strategies.records import ClientUpload
from task.params import content_key

MAX_UPDATE_RATIO = 1e3
"""Default bound on ||w - w_global|| / (||w_global|| + 1); beyond it an upload is absurd."""

MAX_EXAMPLES = 1e12
"""A ``num-examples`` claim above this is implausible (rejected); it also keeps every sum of
claims finite."""

MAX_WEIGHT_SHARE = 2.0
"""No client's claim carries more than this many times 1/K of the round's total weight."""

MAX_INTEGER = 2**53
"""Integer arrays must stay within +-MAX_INTEGER (exact in float64, where they are averaged)."""

MAX_COUNT_STEP = 2**32
"""How far an integer array (a batch count) may move from the global model's in one round: a
count grows by one round's batches. With the round's median taken (``counted_buffers``), liars
would need the majority of more than 2^21 rounds to bring the global count to the cap above,
past which honest uploads are rejected."""

NON_NEGATIVE_BUFFERS = ("running_var", "num_batches_tracked")
"""Buffer names (the last part of an array's name; torch's BatchNorm) that cannot be negative."""

NO_REPLY_ERRORS = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
"""Errors by which the SuperLink says a node or its reply is gone, sent in its own name
(``SUPERLINK_NODE_ID``): a dropout, which the round records as missing, not a rejection. A
node's own reply carrying one of these codes is a client error like any other."""


def is_dropout(msg: Message) -> bool:
    """Whether ``msg`` is the SuperLink's word that a node or its reply is gone."""
    return (msg.has_error() and msg.error.code in NO_REPLY_ERRORS
            and msg.metadata.src_node_id == SUPERLINK_NODE_ID)


MAX_REASON_CHARS = 300
"""Characters of a rejection's reason kept in the round's record: the reason quotes what the
client sent (its error's text, its arrays' names), whose length the client chooses."""

_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b\n]*(\x07|\x1b\\)?|[ -/]*[0-~])"
                      r"|\x9b[0-?]*[ -/]*[@-~]")
"""Terminal escape sequences: colour codes and the like (CSI, 7- and 8-bit), window titles
(OSC, to their end or the line's) and the short ones (a character set, a saved cursor)."""


def reason_line(text: object, prefix: str = "", last_line: bool = True) -> str:
    """``prefix`` and ``text`` as one line of at most ``MAX_REASON_CHARS``: ``text``'s last
    non-empty line (a traceback's is its exception; ``last_line=False``: its lines joined by
    spaces), without terminal escapes, control characters or Unicode format characters
    (bidirectional overrides), tabs as spaces, cut with an ellipsis."""
    cleaned = "".join(c for c in _ESCAPES.sub("", str(text)).replace("\t", " ")
                      if c in "\n\r" or unicodedata.category(c) not in ("Cc", "Cf"))
    lines = [line.strip() for line in cleaned.splitlines() if line.strip()]
    line = prefix + ((lines[-1] if lines else "") if last_line else " ".join(lines))
    return line if len(line) <= MAX_REASON_CHARS else line[:MAX_REASON_CHARS - 1] + "…"


def npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype that ``.npy`` bytes decode to, read from their own header without
    allocating the array (which the header could make arbitrarily large)."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f".npy format version {version} is not accepted")
    shape, _, dtype = readers[version](stream)
    return tuple(shape), dtype


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
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)):
        return None, f"metric {weighted_by_key!r} missing or not a number"
    if not (math.isfinite(num_examples) and 0 < num_examples <= MAX_EXAMPLES):
        return None, (f"metric {weighted_by_key!r} must be a positive number up to "
                      f"{MAX_EXAMPLES:g}, got {num_examples}")
    arrays: dict[str, np.ndarray] = {}
    for name, expected in reference.items():
        array = record[name]
        if tuple(array.shape) != expected.shape or str(array.dtype) != str(expected.dtype):
            return None, (
                f"array {name!r} is {array.dtype}{list(array.shape)}, expected "
                f"{expected.dtype}{list(expected.shape)}"
            )
        try:
            shape, dtype = npy_header(array.data)
        except Exception as err:  # noqa: BLE001 -- corrupt bytes: any decoding failure rejects
            return None, f"array {name!r} cannot be decoded ({err})"
        if shape != expected.shape or dtype != expected.dtype:
            return None, (f"array {name!r} decodes to {dtype}{list(shape)}, "
                          f"not the {expected.dtype}{list(expected.shape)} its header says")
        try:
            arrays[name] = array.numpy()
        except Exception as err:  # noqa: BLE001 -- corrupt bytes: any decoding failure rejects
            return None, f"array {name!r} cannot be decoded ({err})"
    problem = values_problem(arrays, reference, max_update_ratio, reference_norm)
    if problem:
        return None, problem
    return ClientUpload(node_id, arrays, float(num_examples), dict(metrics)), ""


def values_problem(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                   max_update_ratio: float, reference_norm: float) -> str:
    """Why the decoded arrays of an upload (the global model's names, shapes and dtypes) cannot
    be used, or "": NaN/Inf, a buffer that cannot be (``buffer_problem``), an integer array
    moved more than ``MAX_COUNT_STEP``, or an update longer than ``max_update_ratio`` x
    (||global|| + 1) (``reference_norm``: ||global||)."""
    squared_distance = 0.0
    for name, expected in reference.items():
        value = arrays[name]
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"array {name!r} contains NaN or Inf"
        problem = buffer_problem(name, value)
        if problem:
            return problem
        if value.dtype.kind == "f":
            squared_distance += squared_step(value, expected)
        elif value.size:  # integers within +-2^53 (buffer_problem): the difference fits
            step = int(np.abs(value.astype(np.int64) - expected.astype(np.int64)).max())
            if step > MAX_COUNT_STEP:
                return (f"array {name!r} moves {step:.3g} from the global model's (at most "
                        f"2^32 in a round)")
    distance = math.sqrt(squared_distance)
    if distance > max_update_ratio * (reference_norm + 1.0):
        return (f"update norm {distance:.3g} exceeds {max_update_ratio:g} x (||global|| + 1) = "
                f"{max_update_ratio * (reference_norm + 1.0):.3g}")
    return ""


def float_norm(state: Mapping[str, np.ndarray]) -> float:
    """||state|| over its floating-point arrays, in float64."""
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2))
                         for v in state.values() if v.dtype.kind == "f"))


def in_order(uploads: list[ClientUpload]) -> tuple[list[ClientUpload], dict[int, float]]:
    """The accepted uploads as the strategy gets them: claims bounded (``bound_claims``; the
    bounded ones' original claims returned too), in the order of their content
    (``task.params.content_key``), then node id."""
    uploads, bounded = bound_claims(uploads)
    return sorted(uploads, key=lambda u: (content_key(u.arrays), u.node_id)), bounded


def squared_step(value: np.ndarray, expected: np.ndarray) -> float:
    """||value - expected||^2, in the arrays' dtype (float32 at least) through one dot product:
    the bound it is checked against is 1,000 x (||global|| + 1), far above float32's rounding.
    Past float32's range (a step beyond about 1.8e19) it is taken again in float64."""
    with np.errstate(over="ignore"):
        step = np.subtract(value, expected, dtype=np.promote_types(value.dtype, np.float32))
        squared = float(np.dot(step.ravel(), step.ravel()))
    if math.isfinite(squared):
        return squared
    return float(np.sum((value.astype(np.float64) - expected) ** 2))


def buffer_problem(name: str, value: np.ndarray) -> str:
    """Why a (finite) array cannot be what its name says, or ""."""
    if value.dtype.kind in "iu" and value.size and (
            value.min() < -MAX_INTEGER or value.max() > MAX_INTEGER):
        return f"array {name!r} holds integers beyond +-2^53"
    if name.rsplit(".", 1)[-1] in NON_NEGATIVE_BUFFERS and value.size and value.min() < 0:
        return f"array {name!r} is negative (min {value.min():.3g}): it cannot be"
    return ""


def claim_bound(claims: Sequence[float], share: float = MAX_WEIGHT_SHARE) -> float:
    """The largest t such that, each claim counted as min(claim, t), no claim carries more
    than ``share`` / K of their sum (``inf`` when none does; ``share`` >= 1).

    With the j largest claims cut to t and R the sum of the rest, t / (j t + R) = share / K
    gives t = c R / (1 - j c), c = share / K: the first j for which t is at least the next
    claim down is the one where the cut stops."""
    k = len(claims)
    c = share / k if k else 1.0
    ordered = sorted(claims, reverse=True)
    if c >= 1 or ordered[0] <= c * sum(ordered):
        return math.inf
    rest = sum(ordered)
    for j in range(1, k):
        rest -= ordered[j - 1]
        if j * c >= 1:
            break
        bound = c * rest / (1 - j * c)
        if bound >= ordered[j]:
            return bound
    return ordered[-1]  # every claim cut to the smallest: equal weights, 1/K each


def bound_claims(uploads: list[ClientUpload], share: float = MAX_WEIGHT_SHARE
                 ) -> tuple[list[ClientUpload], dict[int, float]]:
    """Count each ``num-examples`` claim as at most ``claim_bound`` of the round's claims;
    return the uploads with their bounded claims and ``{node_id: original claim}`` of those
    bounded."""
    if not uploads:
        return uploads, {}
    bound = claim_bound([u.num_examples for u in uploads], share)
    bounded = {u.node_id: u.num_examples for u in uploads if u.num_examples > bound}
    return [dataclasses.replace(u, num_examples=bound) if u.node_id in bounded else u
            for u in uploads], bounded


def screen_replies(
    replies: Iterable[Message], reference: Mapping[str, np.ndarray], weighted_by_key: str,
    max_update_ratio: float = MAX_UPDATE_RATIO,
) -> tuple[list[ClientUpload], dict[int, str], dict[int, float]]:
    """Split training replies into accepted uploads, ``{node_id: reason}`` rejections and
    ``{node_id: claim}`` of the accepted uploads whose claim was bounded (``bound_claims``).

    The SuperLink's dropout errors (``is_dropout``) are skipped (the node is missing, not
    rejected).
    A node that replies twice keeps its first reply (accepted or rejected, an error reply
    included); later ones are ignored with a warning. Uploads come back in the order of their
    content (``task.params.content_key``), not of arrival or node id (random in Flower), so
    that sums over them (the aggregate, the autoencoder's loss) and the decisions that depend
    on them are the same from run to run.
    """
    reference_norm = float_norm(reference)
    accepted: list[ClientUpload] = []
    rejected: dict[int, str] = {}
    seen: set[int] = set()
    for msg in replies:
        if is_dropout(msg):
            continue
        node_id = int(msg.metadata.src_node_id)
        if node_id in seen or node_id in rejected:
            # One decision per node and round: a later reply, an error reply included, must not
            # mark an aggregated node as rejected (detection metrics would count it as removed).
            log(WARNING, "Ignored a second reply from node %d in one round", node_id)
            continue
        if msg.has_error():
            rejected[node_id] = reason_line(msg.error.reason, "client error: ")
            continue
        try:
            upload, reason = check_upload(
                node_id, msg.content, reference, weighted_by_key, max_update_ratio, reference_norm
            )
        except Exception as err:  # noqa: BLE001 -- whatever a reply holds costs that reply only
            upload, reason = None, f"screening failed: {type(err).__name__}: {err}"
        if upload is None:
            rejected[node_id] = reason_line(reason, last_line=False)  # the project's own
            # words (or an exception's), quoting what the client sent: every line, joined
            continue
        seen.add(node_id)
        accepted.append(upload)
    accepted, bounded = in_order(accepted)
    return accepted, rejected, bounded
