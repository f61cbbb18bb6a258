"""The embedded MNIST and the offline behaviour of downloadable presets."""

import numpy as np
import pytest

from task import data as data_module
from task.data import DatasetUnavailableError, EMBEDDED_TEST_SIZE, load_federated_data


def test_embedded_mnist_is_the_real_test_set_split_by_seed():
    d = load_federated_data("mnist-embedded", 7)
    assert len(d.train) + len(d.test) == 10_000 and len(d.test) == EMBEDDED_TEST_SIZE
    assert d.train.images.shape[1:] == (1, 28, 28)
    labels = np.concatenate([d.train.labels.numpy(), d.test.labels.numpy()])
    # the official MNIST test-set class counts
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    other = load_federated_data("mnist-embedded", 8)
    assert not np.array_equal(d.test.labels.numpy(), other.test.labels.numpy())
    x = d.test.as_float()
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2  # standardised


def test_offline_download_fails_with_a_clear_message(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data_module, "_torchvision_split", no_network)
    with pytest.raises(DatasetUnavailableError, match="mnist-embedded"):
        load_federated_data("cifar10", 0, str(tmp_path))


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="'imagenet'"):
        load_federated_data("imagenet", 0)
