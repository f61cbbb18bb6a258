"""FedAvg that screens uploads, asks a detection rule whom to keep, and records the round.

Every defense of this package subclasses ``DetectingFedAvg`` and overrides ``detect`` (whom to
keep) and, for robust aggregation rules, ``aggregate`` (how to combine them): the Flower glue
(sampling, messages), reply screening and the ``RoundRecord`` are shared. Plain FedAvg is
``detect`` keeping everyone and ``aggregate`` the sample-weighted mean.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.aggregation import weighted_average
from strategies.records import ClientUpload, Detection, RoundRecord
from strategies.validation import MAX_CLAIM_RATIO, MAX_UPDATE_RATIO, screen_replies


class DetectingFedAvg(FedAvg):
    """Federated averaging over the uploads a detection rule keeps (FedAvg: all of them).

    Parameters
    ----------
    max_update_ratio : float (default: 1e3)
        Uploads with ``||w - w_global|| > max_update_ratio * (||w_global|| + 1)`` are rejected
        as malformed before detection.
    **fedavg_kwargs
        Passed to ``flwr.serverapp.strategy.FedAvg`` (sampling fractions, minimum nodes, keys).
    """

    name = "fedavg"

    def __init__(self, *, max_update_ratio: float = MAX_UPDATE_RATIO, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.max_update_ratio = max_update_ratio
        self.global_state: dict[str, np.ndarray] | None = None
        self.records: list[RoundRecord] = []

    @property
    def last_record(self) -> RoundRecord | None:
        return self.records[-1] if self.records else None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the round starts from, then sample as FedAvg does."""
        self.global_state = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def detect(self, server_round: int, uploads: list[ClientUpload]) -> Detection:
        """Decide which uploads to aggregate. FedAvg keeps all."""
        return Detection(kept=[u.node_id for u in uploads])

    def aggregate(self, kept: list[ClientUpload]) -> dict[str, np.ndarray]:
        """The new global state from the kept uploads: their sample-weighted mean (FedAvg)."""
        return weighted_average(kept)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies, detect, and average the kept uploads (never an empty set)."""
        if self.global_state is None:
            raise RuntimeError("aggregate_train called before configure_train")
        start = time.perf_counter()
        uploads, rejected, bounded = screen_replies(
            replies, self.global_state, self.weighted_by_key, self.max_update_ratio
        )
        for node_id, reason in rejected.items():
            log(WARNING, "Rejected upload from node %d: %s", node_id, reason)
        for node_id, claim in bounded.items():
            log(WARNING, "Node %d claims %g examples: counted as %gx the median claim",
                node_id, claim, MAX_CLAIM_RATIO)
        screening = time.perf_counter() - start
        detection = (
            self.detect(server_round, uploads) if uploads else Detection(kept=[])
        )
        kept_ids = set(detection.kept)
        kept = [u for u in uploads if u.node_id in kept_ids]
        arrays, metrics, note = None, None, ""
        start = time.perf_counter()
        if kept:
            arrays = ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in self.aggregate(kept).items()}
            )
            metrics = _kept_metrics(kept)
        else:
            note = "no upload kept: the previous global model is kept"
            log(WARNING, "Round %d: %s", server_round, note)
        timings = {"screening": screening, **detection.timings,
                   "aggregation": time.perf_counter() - start}
        record = RoundRecord(
            round=server_round, defense=self.name,
            received=[u.node_id for u in uploads] + sorted(rejected), rejected=rejected,
            kept=sorted(kept_ids), excluded=sorted(u.node_id for u in uploads if u.node_id not in kept_ids),
            scores=detection.scores, details=detection.details, timings=timings,
            aggregated=arrays is not None, note=note, bounded_claims=bounded,
        )
        self.records.append(record)
        log(INFO, "Round %d [%s]: kept %d of %d uploads, excluded %s, rejected %s",
            server_round, self.name, len(kept), len(uploads), record.excluded, sorted(rejected))
        return arrays, metrics


def _kept_metrics(kept: list[ClientUpload]) -> MetricRecord:
    """Sample-weighted mean of the numeric training metrics all kept uploads report."""
    total = sum(u.num_examples for u in kept)
    common = set.intersection(*(set(u.metrics) for u in kept))
    out: dict[str, float] = {"num-examples": total}
    for key in sorted(common - {"num-examples"}):
        values = [u.metrics[key] for u in kept]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            out[key] = float(sum(u.num_examples * v for u, v in zip(kept, values)) / total)
    return MetricRecord(out)
