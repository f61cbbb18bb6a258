"""The dataset loaders that download, read offline from small files written here in each
dataset's own on-disk format (what the download leaves in the data folder): MNIST and
Fashion-MNIST's IDX files, SVHN's .mat, CIFAR-10/100's pickled batches, Tiny-ImageNet's JPEG tree
and CelebA's aligned JPEGs with their text tables. Each loaded split must hold exactly the
images and labels written, in the shape and label space the models expect.

torchvision checks the MD5 of the original files before it uses them; these files are not the
originals, so the checks are replaced by "the file exists" (a missing file still sends the
loader to the network, and offline to ``DatasetUnavailableError``).
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from task.data import CELEBA_ATTRIBUTE, DatasetUnavailableError, load_federated_data

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def files_exist_is_enough(monkeypatch):
    import torchvision.datasets.celeba as celeba
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn
    import torchvision.datasets.utils as utils

    for module in (celeba, cifar, svhn, utils):
        monkeypatch.setattr(module, "check_integrity",
                            lambda fpath, md5=None: os.path.isfile(fpath))
    load_federated_data.cache_clear()
    yield
    load_federated_data.cache_clear()


def images(n: int, *shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def labels(n: int, classes: int) -> np.ndarray:
    return RNG.integers(0, classes, size=n).astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: magic (0x08 = uint8, number of dimensions), big-endian sizes, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_and_fashion_mnist_read_their_idx_files(tmp_path, name, folder):
    written = {}
    for split, n in (("train", 12), ("t10k", 5)):
        x, y = images(n, 28, 28), labels(n, 10)
        write_idx(tmp_path / folder / "raw" / f"{split}-images-idx3-ubyte", x)
        write_idx(tmp_path / folder / "raw" / f"{split}-labels-idx1-ubyte", y)
        written[split] = (x, y)
    data = load_federated_data(name, 0, str(tmp_path))
    for split, loaded in (("train", data.train), ("t10k", data.test)):
        x, y = written[split]
        assert torch.equal(loaded.images, torch.from_numpy(x).unsqueeze(1))
        assert torch.equal(loaded.labels, torch.from_numpy(y).long())
    assert data.train.num_classes == 10 and data.train.in_channels == 1


def test_svhn_reads_its_mat_files_with_label_10_as_digit_0(tmp_path):
    written = {}
    for split, n in (("train", 9), ("test", 4)):
        x, y = images(n, 32, 32, 3), labels(n, 10)
        y[0] = 0  # SVHN's files write the digit 0 as class 10
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat",
                         {"X": x.transpose(1, 2, 3, 0), "y": np.where(y == 0, 10, y)[:, None]})
        written[split] = (x, y)
    data = load_federated_data("svhn", 0, str(tmp_path))
    for split, loaded in (("train", data.train), ("test", data.test)):
        x, y = written[split]
        assert torch.equal(loaded.images, torch.from_numpy(x).permute(0, 3, 1, 2))
        assert torch.equal(loaded.labels, torch.from_numpy(y).long())
    assert data.train.image_size == 32 and data.train.in_channels == 3


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_reads_its_pickled_batches(tmp_path, name, classes):
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir()
    key = "labels" if name == "cifar10" else "fine_labels"
    files = (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
             if name == "cifar10" else ["train"])
    train_x, train_y = images(3 * len(files), 32, 32, 3), labels(3 * len(files), classes)
    for i, file in enumerate(files):  # rows: the 1024 red values, then green, then blue
        rows = train_x[3 * i:3 * i + 3].transpose(0, 3, 1, 2).reshape(3, -1)
        pickle.dump({"data": rows, key: train_y[3 * i:3 * i + 3].tolist()}, open(folder / file, "wb"))
    test_x, test_y = images(4, 32, 32, 3), labels(4, classes)
    pickle.dump({"data": test_x.transpose(0, 3, 1, 2).reshape(4, -1), key: test_y.tolist()},
                open(folder / ("test_batch" if name == "cifar10" else "test"), "wb"))
    meta = ({"label_names": [str(c) for c in range(10)]} if name == "cifar10"
            else {"fine_label_names": [str(c) for c in range(100)]})
    pickle.dump(meta, open(folder / ("batches.meta" if name == "cifar10" else "meta"), "wb"))
    data = load_federated_data(name, 0, str(tmp_path))
    assert torch.equal(data.train.images, torch.from_numpy(train_x).permute(0, 3, 1, 2))
    assert torch.equal(data.train.labels, torch.from_numpy(train_y).long())
    assert torch.equal(data.test.images, torch.from_numpy(test_x).permute(0, 3, 1, 2))
    assert data.train.num_classes == classes


def save_jpeg(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Write ``pixels`` as a JPEG; return what a reader decodes (JPEG is lossy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG")
    return np.asarray(Image.open(path).convert("RGB"))


def test_tiny_imagenet_reads_its_jpeg_tree_and_validation_annotations(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    train = {w: [save_jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG", images(1, 64, 64, 3)[0])
                 for i in range(2)] for w in wnids}
    val_labels = [2, 0, 1, 2]
    val = [save_jpeg(base / "val" / "images" / f"val_{i}.JPEG", images(1, 64, 64, 3)[0])
           for i in range(len(val_labels))]
    (base / "val" / "val_annotations.txt").write_text("".join(
        f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t63\t63\n" for i, c in enumerate(val_labels)))
    data = load_federated_data("tiny-imagenet", 0, str(tmp_path))
    expected_train = np.stack([img for w in wnids for img in train[w]])
    assert torch.equal(data.train.images, torch.from_numpy(expected_train).permute(0, 3, 1, 2))
    assert data.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(data.test.images, torch.from_numpy(np.stack(val)).permute(0, 3, 1, 2))
    assert data.test.labels.tolist() == val_labels
    assert data.train.num_classes == 200 and data.train.image_size == 64


def test_celeba_reads_aligned_jpegs_labelled_by_the_smiling_attribute(tmp_path):
    base = tmp_path / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    partition = [0, 0, 0, 1, 2, 2]  # train, train, train, valid, test, test
    attributes = ["5_o_Clock_Shadow", "Arched_Eyebrows", CELEBA_ATTRIBUTE, "Young"]
    smiling = [1, -1, 1, -1, -1, 1]
    for name in names:
        save_jpeg(base / "img_align_celeba" / name, images(1, 218, 178, 3)[0])
    (base / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in zip(names, partition)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    (base / "list_attr_celeba.txt").write_text(
        f"{len(names)}\n{' '.join(attributes)}\n" + "".join(
            f"{n}  1 -1 {s:2d} 1\n" for n, s in zip(names, smiling)))
    (base / "list_bbox_celeba.txt").write_text(
        f"{len(names)}\nimage_id x_1 y_1 width height\n" + "".join(f"{n} 1 2 3 4\n" for n in names))
    (base / "list_landmarks_align_celeba.txt").write_text(
        f"{len(names)}\nlefteye_x lefteye_y\n" + "".join(f"{n} 69 109\n" for n in names))
    data = load_federated_data("celeba", 0, str(tmp_path))
    assert data.train.labels.tolist() == [1, 0, 1] and data.test.labels.tolist() == [0, 1]
    assert tuple(data.train.images.shape) == (3, 3, 64, 64)  # centre-cropped, resized to 64
    assert data.train.num_classes == 2


def test_a_missing_file_still_means_the_network_and_offline_the_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.svhn as svhn

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(svhn, "download_url", offline)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": images(2, 32, 32, 3).transpose(1, 2, 3, 0),
                                                    "y": np.ones((2, 1))})  # no test split
    with pytest.raises(DatasetUnavailableError, match="svhn"):
        load_federated_data("svhn", 0, str(tmp_path))


def test_celeba_offline_is_the_clear_error_about_the_network(tmp_path, monkeypatch):
    """torchvision fetches CelebA from Google Drive through ``gdown`` (a dependency): offline,
    the error is the network's, not a missing package's."""
    import gdown

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(gdown, "download", offline)
    with pytest.raises(DatasetUnavailableError, match=r"no network.*mnist-embedded"):
        load_federated_data("celeba", 0, str(tmp_path))


def test_the_serverapp_stops_in_one_line_when_its_dataset_cannot_be_had(tmp_path, monkeypatch):
    from flwr.app import Context, RecordDict
    import torchvision.datasets.mnist as mnist

    from server_app.app import main

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(mnist, "download_and_extract_archive", offline)
    monkeypatch.setenv("LAYERCAM_AE_DATA", str(tmp_path / "data"))
    load_federated_data.cache_clear()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"dataset": "mnist", "results-dir": str(tmp_path / "results")})
    with pytest.raises(SystemExit, match=r"^dataset 'mnist' is not in .* use dataset='mnist-embedded'"):
        main(None, context)  # no Grid: the data is loaded first
    assert not (tmp_path / "results").exists()
