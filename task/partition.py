"""Split a labelled pool among clients: IID or Dirichlet(alpha) non-IID, reproducible by seed.

The splits are flwr-datasets' ``IidPartitioner`` (after a ``datasets`` shuffle by ``seed``) and
``DirichletPartitioner`` (``self_balancing=False``, ``shuffle=True``), drawn here in numpy with the
same random draws in the same order, so that a partition is the same index array into the
in-memory pool (``tests/test_partition.py`` checks it against flwr-datasets). Importing
flwr-datasets imports Hugging Face ``datasets``, pandas, seaborn and matplotlib, about 2 s of CPU
in every process that partitions: every Ray worker of a simulation, and in a deployment every
message, since each starts a fresh ClientApp process.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np

PARTITIONINGS = ("iid", "dirichlet")

MIN_PARTITION_SIZE = 10
"""Dirichlet draws are repeated (flwr-datasets does this) until every client has this many."""

DIRICHLET_TRIES = 11
"""Draws of the whole Dirichlet split before giving up (flwr-datasets': attempts 0 to 10)."""


def iid_partitions(count: int, num_partitions: int, seed: int) -> tuple[np.ndarray, ...]:
    """The pool's rows shuffled by ``seed`` (``datasets.Dataset.shuffle``: a permutation from
    ``np.random.default_rng(seed)``) and cut into contiguous, near-equal shards, the first
    ``count % num_partitions`` one row longer (``Dataset.shard(contiguous=True)``)."""
    order = np.random.default_rng(seed).permutation(count)
    size, longer = divmod(count, num_partitions)
    starts = [size * i + min(i, longer) for i in range(num_partitions + 1)]
    return tuple(order[starts[i]:starts[i + 1]] for i in range(num_partitions))


def dirichlet_partitions(labels: np.ndarray, num_partitions: int, alpha: float,
                         min_partition_size: int, seed: int) -> tuple[np.ndarray, ...]:
    """Each class's rows split among the partitions in proportions drawn from Dir(alpha), class
    by class in sorted order; the whole draw repeated until every partition holds
    ``min_partition_size`` rows; then each partition's rows shuffled. One generator,
    ``np.random.default_rng(seed)``, makes every draw, as flwr-datasets'
    ``DirichletPartitioner`` does."""
    rng = np.random.default_rng(seed)
    concentration = np.full(num_partitions, float(alpha))
    classes = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    for attempt in range(DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for rows in classes:
            cuts = (np.cumsum(rng.dirichlet(concentration)) * len(rows)).astype(int)[:-1]
            for part, share in zip(parts, np.split(rows, cuts)):
                part.extend(share.tolist())
        smallest = min(len(part) for part in parts)
        if smallest >= min_partition_size:
            break
        warnings.warn(f"a Dirichlet({alpha}) split left a partition with {smallest} rows, fewer "
                      f"than {min_partition_size}: drawing again (attempt {attempt + 1})",
                      stacklevel=2)
    else:
        raise ValueError(f"no Dirichlet({alpha}) split of {len(labels)} rows into "
                         f"{num_partitions} partitions gave each {min_partition_size} rows in "
                         f"{DIRICHLET_TRIES} draws: raise dirichlet-alpha or use fewer clients")
    for part in parts:
        rng.shuffle(part)  # a list, as flwr-datasets shuffles it: the same draws
    return tuple(np.asarray(part, dtype=np.int64) for part in parts)


@lru_cache(maxsize=8)
def partition_indices(
    labels: tuple[int, ...] | bytes, num_partitions: int, partitioning: str, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    """Index arrays of all ``num_partitions`` partitions of a pool with these ``labels``.

    ``labels`` is hashable (a tuple, or the bytes of an int64 array) so the result is cached per
    process. IID shuffles the pool with ``seed`` and cuts it into near-equal shards; Dirichlet
    draws each class's split over clients from Dir(alpha) (smaller alpha, more skew).
    """
    y = np.frombuffer(labels, dtype=np.int64) if isinstance(labels, bytes) else np.asarray(labels)
    if num_partitions < 1 or num_partitions > len(y):
        raise ValueError(f"num_partitions={num_partitions} must be in [1, {len(y)}]")
    if partitioning == "iid":
        return iid_partitions(len(y), num_partitions, seed)
    if partitioning == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
        return dirichlet_partitions(y, num_partitions, alpha,
                                    min(MIN_PARTITION_SIZE, len(y) // num_partitions), seed)
    raise ValueError(f"unknown partitioning {partitioning!r}; choose one of {PARTITIONINGS}")


def client_indices(
    labels: np.ndarray, partition_id: int, num_partitions: int, partitioning: str, alpha: float,
    seed: int,
) -> np.ndarray:
    """Index array of one client's partition (see ``partition_indices``)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id={partition_id} must be in [0, {num_partitions})")
    y = np.ascontiguousarray(labels, dtype=np.int64).tobytes()
    return partition_indices(y, num_partitions, partitioning, alpha, seed)[partition_id]
