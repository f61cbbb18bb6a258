"""FedAvg that screens uploads, asks a detection rule whom to keep, and records the round.

Every defense of this package subclasses ``DetectingFedAvg`` and overrides ``detect`` (whom to
keep; a rule that computes the new global model while deciding returns it in
``Detection.aggregate``) or ``aggregate`` (how to combine the kept uploads), plus
``from_config`` for its run-config keys: the Flower glue (sampling, messages), reply screening
and the ``RoundRecord`` are shared. Plain FedAvg is ``detect`` keeping everyone and
``aggregate`` the sample-weighted mean. Each round's record is kept in ``records`` and handed
to ``on_record``, the harness's way to log it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.aggregation import counted_buffers, weighted_average
from strategies.records import ClientUpload, Detection, RoundRecord
from strategies.registry import DEFENSES, ServerAssets
from strategies.validation import MAX_UPDATE_RATIO, MAX_WEIGHT_SHARE, bound_claims, screen_replies
from task.config import RunConfig


@DEFENSES.register
class DetectingFedAvg(FedAvg):
    """Federated averaging over the uploads a detection rule keeps (FedAvg: all of them).

    Parameters
    ----------
    max_update_ratio : float (default: 1e3)
        Uploads with ``||w - w_global|| > max_update_ratio * (||w_global|| + 1)`` are rejected
        as malformed before detection.
    min_replies : int (default: 1)
        A round aggregates only when at least this many uploads pass the screening (and at
        least the rule's own ``min_uploads``); otherwise it keeps the previous global model.
        Sampling waits for this many connected nodes, then samples among those connected.
    sampling_timeout : float (default: 600)
        Seconds sampling waits for ``min_replies`` connected nodes; after that the round sends
        nothing and keeps the previous model, so sampling never waits forever.
    clients_per_round : int (default: 0)
        Nodes sampled for training each round (``sample_nodes``; fewer when fewer are
        connected); 0: ``fraction_train`` of the connected nodes (Flower's key; 1.0 by default).
    sampling_seed : int (default: 0)
        With the round number, seeds which nodes are sampled: the same node ids are sampled
        again (a resumed run). A new simulation gives its nodes new random ids, so it draws
        other clients.
    on_record : callable, optional
        Called with each round's ``RoundRecord`` at the end of ``aggregate_train``.
    **fedavg_kwargs
        Passed to ``flwr.serverapp.strategy.FedAvg`` (sampling fractions, minimum nodes, keys).
        ``train_metrics_aggr_fn`` receives the kept uploads' metrics (``num-examples`` as
        bounded by the screening); by default their sample-weighted mean
        (``mean_of_kept_metrics``).
    """

    name = "fedavg"

    min_uploads = 1
    """The fewest uploads the rule can decide on (Krum family: n >= 2f + 3)."""
    checkpointed: tuple[str, ...] = ()
    """The attributes that carry the rule's state from round to round (vote history, evidence):
    what a checkpoint saves and a resumed run restores (``checkpoint_state``)."""

    def __init__(self, *, max_update_ratio: float = MAX_UPDATE_RATIO, min_replies: int = 1,
                 sampling_timeout: float = 600.0, clients_per_round: int = 0,
                 sampling_seed: int = 0,
                 on_record: Callable[[RoundRecord], None] | None = None, **fedavg_kwargs) -> None:
        fedavg_kwargs.setdefault("train_metrics_aggr_fn", mean_of_kept_metrics)
        super().__init__(**fedavg_kwargs)
        self.max_update_ratio = max_update_ratio
        self.min_replies, self.sampling_timeout = min_replies, sampling_timeout
        if clients_per_round < 0:
            raise ValueError(f"clients_per_round must be >= 0, got {clients_per_round}")
        self.clients_per_round, self.sampling_seed = clients_per_round, sampling_seed
        self.on_record = on_record
        self.global_state: dict[str, np.ndarray] | None = None
        self.records: list[RoundRecord] = []
        self.sampled: list[int] = []
        """The nodes the current round was sent to."""
        self.left_out: set[int] = set()
        """Connected nodes the current round's sample left out (not dropouts)."""
        self.participants: set[int] = set()
        """Every node that has replied in some round: one missing from a later round is named."""

    def checkpoint_state(self) -> dict[str, Any]:
        """The cross-round state a checkpoint saves (``checkpointed`` attributes, the nodes seen)."""
        return {"participants": self.participants,
                **{name: getattr(self, name) for name in self.checkpointed}}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Take back what ``checkpoint_state`` returned (a resumed run)."""
        for name, value in state.items():
            setattr(self, name, value)

    @classmethod
    def from_config(cls, config: RunConfig, assets: ServerAssets, **flower_kwargs: Any
                    ) -> DetectingFedAvg:
        """The defense with its run-config parameters (FedAvg has none); ``flower_kwargs`` go to
        the constructor (sampling, ``on_record``). Raises ``ConfigError`` naming a bad key."""
        return cls(**flower_kwargs)

    @property
    def last_record(self) -> RoundRecord | None:
        return self.records[-1] if self.records else None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the round starts from, then sample ``clients_per_round``
        (or ``fraction_train``) of the connected nodes once ``min_replies`` are connected
        (``sample_nodes``: seeded by the run and the round). Unlike
        Flower's ``sample_nodes`` this waits ``sampling_timeout`` at most: with too few nodes
        the round sends nothing and keeps the previous model."""
        self.global_state = {k: v.numpy() for k, v in arrays.items()}
        deadline = time.monotonic() + self.sampling_timeout
        while len(connected := sorted(grid.get_node_ids())) < self.min_replies:
            if time.monotonic() > deadline:
                log(WARNING, "Round %d: %d node(s) connected, fewer than min-replies=%d: "
                    "nothing sent", server_round, len(connected), self.min_replies)
                # the connected nodes were left out (nothing was sent), not dropped out
                self.sampled, self.left_out = [], set(connected)
                return []
            time.sleep(0.5)
        size = self.clients_per_round or int(len(connected) * self.fraction_train)
        nodes = sample_nodes(connected, size, self.sampling_seed, server_round)
        self.sampled, self.left_out = nodes, set(connected) - set(nodes)
        log(INFO, "configure_train: sampled %d nodes (out of %d)", len(nodes), len(connected))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def detect(self, server_round: int, uploads: list[ClientUpload]) -> Detection:
        """Decide which uploads to aggregate. FedAvg keeps all."""
        return Detection(kept=[u.node_id for u in uploads])

    def aggregate(self, kept: list[ClientUpload]) -> dict[str, np.ndarray]:
        """The new global state from the kept uploads: their sample-weighted mean (FedAvg)."""
        return weighted_average(kept)

    def new_global_state(self, detection: Detection, kept: list[ClientUpload]
                         ) -> dict[str, np.ndarray]:
        """The state the round ends with: the rule's own aggregate when it computed one while
        deciding (``Detection.aggregate``), else ``aggregate`` of the kept uploads."""
        return detection.aggregate if detection.aggregate is not None else self.aggregate(kept)

    def decide(self, server_round: int, uploads: list[ClientUpload]) -> Detection:
        """``detect`` on the round's screened uploads, timed; no decision (``skipped`` in the
        details, nothing kept) with fewer uploads than the rule and ``min-replies`` need, or
        when the rule raises: uploads it cannot decide on cost this round, not the server."""
        needed = max(self.min_replies, self.min_uploads)
        if len(uploads) < needed:
            return Detection(kept=[], details={
                "skipped": f"{len(uploads)} valid upload(s), fewer than the {needed} needed"})
        start = time.perf_counter()
        try:
            detection = self.detect(server_round, uploads)
        except Exception as err:  # noqa: BLE001 -- nothing unscreened is aggregated
            log(ERROR, "Round %d: %s's decision failed", server_round, self.name, exc_info=True)
            return Detection(kept=[], details={
                "skipped": f"the decision failed: {type(err).__name__}: {err}"})
        if not detection.timings:  # a rule that doesn't time its steps: its whole decision
            detection.timings = {"detection": time.perf_counter() - start}
        return detection

    def round_end_state(self, detection: Detection, kept: list[ClientUpload],
                        uploads: list[ClientUpload]) -> dict[str, np.ndarray]:
        """The model the round ends with: the rule's ``new_global_state`` of the ``kept``
        uploads, its integer buffers the median of all the round's screened ``uploads``
        (``counted_buffers``)."""
        return {**self.new_global_state(detection, kept),
                **counted_buffers(uploads, self.global_state)}

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
        screening = time.perf_counter() - start
        replied = {u.node_id for u in uploads} | set(rejected)
        # dropouts: sampled or seen before, and silent; not those this round's sample left out
        missing = sorted((set(self.sampled) | self.participants) - replied - self.left_out)
        self.participants |= replied
        detection = self.decide(server_round, uploads)
        for node_id, reason in detection.rejected.items():
            log(WARNING, "Rejected upload from node %d: %s", node_id, reason)
            rejected[node_id] = reason
        uploads = [u for u in uploads if u.node_id not in detection.rejected]
        kept_ids = set(detection.kept) - set(detection.rejected)
        kept = [u for u in uploads if u.node_id in kept_ids]
        # the claims' bound again among the kept: with uploads excluded, a claim cut among all
        # K could carry more than 2/K of what is aggregated
        kept, rebounded = bound_claims(kept)
        bounded.update({n: c for n, c in rebounded.items() if n not in bounded})
        counted = {u.node_id: u.num_examples for u in [*uploads, *kept]}  # kept last: final
        for node_id, claim in bounded.items():  # once per node, with what it finally counts as
            log(WARNING, "Node %d claims %g examples: counted as %g (at most %g/K of the weight)",
                node_id, claim, counted.get(node_id, claim), MAX_WEIGHT_SHARE)
        arrays, metrics, note = None, None, ""
        start = time.perf_counter()
        if kept:
            arrays = ArrayRecord({k: Array(np.asarray(v, order="C"))  # 0-d stays 0-d
                                  for k, v in self.round_end_state(detection, kept,
                                                                   uploads).items()})
            metrics = self.train_metrics_aggr_fn(
                [RecordDict({"metrics": MetricRecord(
                    {**u.metrics, self.weighted_by_key: u.num_examples})}) for u in kept],
                self.weighted_by_key)
        else:
            note = detection.details.get("skipped", "no upload kept")
            note += ": the previous global model is kept"
            log(WARNING, "Round %d: %s", server_round, note)
        timings = {"screening": screening, **detection.timings,
                   "aggregation": time.perf_counter() - start}
        record = RoundRecord(
            round=server_round, defense=self.name,
            received=[u.node_id for u in uploads] + sorted(rejected), rejected=rejected,
            kept=sorted(kept_ids), excluded=sorted(u.node_id for u in uploads if u.node_id not in kept_ids),
            scores=detection.scores, details=detection.details, timings=timings,
            aggregated=arrays is not None, note=note, bounded_claims=bounded,
            heatmaps=detection.heatmaps, probes=detection.probes, missing=missing,
            sampled=list(self.sampled),
        )
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)
        log(INFO, "Round %d [%s]: kept %d of %d uploads, excluded %s, rejected %s, missing %s",
            server_round, self.name, len(kept), len(uploads), record.excluded, sorted(rejected),
            missing)
        return arrays, metrics


def sample_nodes(connected: list[int], size: int, seed: int, server_round: int) -> list[int]:
    """``size`` of the ``connected`` node ids (all when fewer, at least one), drawn without
    replacement by a generator seeded with (``seed``, ``server_round``), sorted: the draw
    depends on the run's seed, the round and the set of nodes, not on their order."""
    pool = sorted(connected)
    size = max(1, min(len(pool), size))
    if size == len(pool):
        return pool
    picked = np.random.default_rng([seed, server_round]).choice(len(pool), size, replace=False)
    return sorted(pool[i] for i in picked)


def mean_of_kept_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Sample-weighted mean of the finite numeric metrics every kept upload reports (Flower's
    ``train_metrics_aggr_fn`` signature). Clients choose their metrics: one that is missing,
    a list or not finite in any upload is left out rather than failing the round."""
    metrics = [next(iter(c.metric_records.values())) for c in contents]
    weights = [float(m[weighted_by_key]) for m in metrics]
    total = sum(weights)
    out: dict[str, float] = {weighted_by_key: total}
    for key in sorted(set.intersection(*(set(m) for m in metrics)) - {weighted_by_key}):
        values = [m[key] for m in metrics]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            out[key] = float(sum(w * v for w, v in zip(weights, values)) / total)
    return MetricRecord(out)
