"""Partitioning: sizes, disjointness, coverage, reproducibility, and Dirichlet skew vs alpha."""

import numpy as np
import pytest

from task.data import load_federated_data
from task.partition import client_indices, partition_indices


@pytest.fixture(scope="module")
def labels():
    return load_federated_data("mnist-embedded", 0).train.labels.numpy()


def _parts(labels, n, how, alpha=0.5, seed=1):
    return [client_indices(labels, i, n, how, alpha, seed) for i in range(n)]


@pytest.mark.parametrize("how", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_the_pool(labels, how):
    parts = _parts(labels, 24, how)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)
    assert len(np.unique(joined)) == len(labels)
    assert min(len(p) for p in parts) >= 10


def test_iid_sizes_are_equal_within_one(labels):
    sizes = [len(p) for p in _parts(labels, 24, "iid")]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("how", ["iid", "dirichlet"])
def test_same_seed_same_split_other_seed_other_split(labels, how):
    a, b, c = _parts(labels, 8, how, seed=3), _parts(labels, 8, how, seed=3), _parts(labels, 8, how, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _mean_label_entropy(labels, parts):
    entropies = []
    for p in parts:
        counts = np.bincount(labels[p], minlength=10) / len(p)
        nz = counts[counts > 0]
        entropies.append(-(nz * np.log(nz)).sum())
    return float(np.mean(entropies))


def test_dirichlet_skew_grows_as_alpha_shrinks(labels):
    entropy = {a: _mean_label_entropy(labels, _parts(labels, 24, "dirichlet", a)) for a in (0.1, 0.5, 5.0)}
    iid = _mean_label_entropy(labels, _parts(labels, 24, "iid"))
    assert entropy[0.1] < entropy[0.5] < entropy[5.0] < iid + 1e-9
    assert iid > 2.2  # close to log(10) = 2.30: every IID client sees all classes


def test_bad_partition_arguments_raise(labels):
    with pytest.raises(ValueError, match="partition_id"):
        client_indices(labels, 5, 5, "iid", 0.5, 0)
    with pytest.raises(ValueError, match="alpha"):
        partition_indices(labels.tobytes(), 4, "dirichlet", 0.0, 0)
    with pytest.raises(ValueError, match="partitioning"):
        partition_indices(labels.tobytes(), 4, "shards", 0.5, 0)


def flwr_datasets_partitions(labels: np.ndarray, num_partitions: int, partitioning: str,
                             alpha: float, seed: int) -> list[np.ndarray]:
    """The oracle: flwr-datasets' partitioners over a table of (row index, label)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    table = Dataset.from_dict({"index": np.arange(len(labels)), "label": labels})
    if partitioning == "iid":
        partitioner, table = IidPartitioner(num_partitions), table.shuffle(seed=seed)
    else:
        partitioner = DirichletPartitioner(
            num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=min(10, len(labels) // num_partitions), seed=seed)
    partitioner.dataset = table
    return [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
            for i in range(num_partitions)]


@pytest.mark.parametrize(("how", "n", "alpha", "seed"), [
    ("iid", 24, 0.5, 42), ("iid", 7, 0.5, 1), ("iid", 1000, 0.5, 3),
    ("dirichlet", 24, 0.5, 42), ("dirichlet", 24, 0.5, 1), ("dirichlet", 100, 0.3, 7),
    ("dirichlet", 5, 5.0, 0), ("dirichlet", 24, 0.1, 2)])
def test_partitions_are_flwr_datasets_partitions(labels, how, n, alpha, seed):
    """The same index arrays, in the same order, as flwr-datasets' partitioners give (the seed-2
    alpha-0.1 split redraws: some client gets fewer than 10 images at the first draw)."""
    mine = partition_indices(labels.astype(np.int64).tobytes(), n, how, alpha, seed)
    theirs = flwr_datasets_partitions(labels, n, how, alpha, seed)
    assert len(mine) == len(theirs) == n
    assert all(np.array_equal(a, b) for a, b in zip(mine, theirs))


def test_a_dirichlet_split_that_keeps_failing_stops_with_the_advice_after_as_many_draws():
    """Nine rows of one class for three clients at alpha 0.01: a draw nearly always gives one
    client all of them, so no draw gives each client its 3 rows. Both stop, after the same
    number of draws (one warning each)."""
    labels = np.zeros(9, dtype=np.int64)
    with pytest.warns(UserWarning) as mine, pytest.raises(ValueError, match="dirichlet-alpha"):
        partition_indices(labels.tobytes(), 3, "dirichlet", 0.01, 0)
    with pytest.warns(UserWarning) as theirs, pytest.raises(ValueError,
                                                            match="max number of attempts"):
        flwr_datasets_partitions(labels, 3, "dirichlet", 0.01, 0)
    assert len(mine) == len([w for w in theirs if "min_partition_size" in str(w.message)]) == 11
