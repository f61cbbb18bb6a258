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
