"""Split a labelled pool among clients: IID or Dirichlet(alpha) non-IID, reproducible by seed.

Both use flwr-datasets' partitioners over a table of (row index, label), so a partition is a
plain index array into the in-memory pool and every process computes the same split.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PARTITIONINGS = ("iid", "dirichlet")

MIN_PARTITION_SIZE = 10
"""Dirichlet draws are repeated (flwr-datasets does this) until every client has this many."""


@lru_cache(maxsize=8)
def partition_indices(
    labels: tuple[int, ...] | bytes, num_partitions: int, partitioning: str, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    """Index arrays of all ``num_partitions`` partitions of a pool with these ``labels``.

    ``labels`` is hashable (a tuple, or the bytes of an int64 array) so the result is cached per
    process. IID shuffles the pool with ``seed`` and cuts it into near-equal shards; Dirichlet
    draws each class's split over clients from Dir(alpha) (smaller alpha, more skew).
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    y = np.frombuffer(labels, dtype=np.int64) if isinstance(labels, bytes) else np.asarray(labels)
    if num_partitions < 1 or num_partitions > len(y):
        raise ValueError(f"num_partitions={num_partitions} must be in [1, {len(y)}]")
    table = Dataset.from_dict({"index": np.arange(len(y)), "label": y})
    if partitioning == "iid":
        partitioner = IidPartitioner(num_partitions)
        table = table.shuffle(seed=seed)
    elif partitioning == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
        partitioner = DirichletPartitioner(
            num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=min(MIN_PARTITION_SIZE, len(y) // num_partitions), seed=seed,
        )
    else:
        raise ValueError(f"unknown partitioning {partitioning!r}; choose one of {PARTITIONINGS}")
    partitioner.dataset = table
    return tuple(
        np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
        for i in range(num_partitions)
    )


def client_indices(
    labels: np.ndarray, partition_id: int, num_partitions: int, partitioning: str, alpha: float,
    seed: int,
) -> np.ndarray:
    """Index array of one client's partition (see ``partition_indices``)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id={partition_id} must be in [0, {num_partitions})")
    y = np.ascontiguousarray(labels, dtype=np.int64).tobytes()
    return partition_indices(y, num_partitions, partitioning, alpha, seed)[partition_id]
