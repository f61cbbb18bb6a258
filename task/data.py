"""Datasets as in-memory uint8 image tensors: the embedded MNIST and torchvision's paper presets.

Every dataset loads into an ``ImageData`` (images ``N x C x H x W`` uint8, int64 labels) for the
clients' training pool and one for the server's held-out test/probe set. Keeping uint8 tensors
in memory makes partitions plain index arrays and keeps a CIFAR-sized pool at ~150 MB.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch

DATASETS = (
    "mnist-embedded", "mnist", "fashion-mnist", "svhn", "cifar10", "cifar100", "tiny-imagenet",
    "celeba",
)

# Per-channel mean/std used to standardise inputs (the usual published values).
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "celeba": ((0.5063, 0.4258, 0.3832), (0.3107, 0.2904, 0.2897)),
}

EMBEDDED_TEST_SIZE = 2000
"""Images of the embedded MNIST (10,000 in all) held out for the server's test and probe set."""


class DatasetUnavailableError(RuntimeError):
    """A dataset that must be downloaded could not be obtained (e.g. no network)."""


@dataclass(frozen=True)
class ImageData:
    """Images (uint8, N x C x H x W) with labels and the standardisation to apply."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: np.ndarray | torch.Tensor) -> "ImageData":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageData(self.images[idx], self.labels[idx], self.num_classes, self.mean, self.std)

    def as_float(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised float32 images (all, or those at ``indices``)."""
        images = self.images if indices is None else self.images[indices]
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std


@dataclass(frozen=True)
class FederatedData:
    """The clients' training pool and the server's held-out test/probe set."""

    train: ImageData
    test: ImageData


def _read_idx(path: Path) -> np.ndarray:
    """Parse a gzip-compressed IDX file (the MNIST format: magic, dims, big-endian payload)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: payload has {data.size} bytes, header says {tuple(dims)}")
    return data.reshape(tuple(dims))


DISTRIBUTION = "layercam-ae-fl"


def embedded_mnist_dir() -> Path:
    """The folder holding the embedded MNIST files.

    Beside this module in a source checkout or a regular install. Flower imports the app from
    its FAB bundle, which cannot carry binary files over 1 MB, so from there the files are found
    through the installed distribution (its editable source folder, or site-packages).
    """
    candidates = [Path(__file__).resolve().parent / "mnist"]
    try:
        from importlib import metadata

        dist = metadata.distribution(DISTRIBUTION)
        direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
        if direct_url.get("dir_info", {}).get("editable") and direct_url.get("url", "").startswith("file://"):
            candidates.append(Path(unquote(urlparse(direct_url["url"]).path)) / "task" / "mnist")
        candidates.append(Path(str(dist.locate_file("task/mnist"))))
    except metadata.PackageNotFoundError:
        pass
    for folder in candidates:
        if (folder / "t10k-images-idx3-ubyte.gz").is_file():
            return folder
    raise DatasetUnavailableError(
        f"the embedded MNIST files were not found (looked in {[str(c) for c in candidates]}); "
        f"install the project on this machine with `pip install -e .` (or `pip install .`)"
    )


def load_embedded_mnist(seed: int) -> FederatedData:
    """The MNIST test set shipped with the package, split (by ``seed``) into 8,000 client
    training images and ``EMBEDDED_TEST_SIZE`` server test/probe images."""
    folder = embedded_mnist_dir()
    images = _read_idx(folder / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    order = np.random.default_rng(seed).permutation(len(labels))
    data = ImageData(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        10, *_STATS["mnist"],
    )
    return FederatedData(
        train=data.subset(order[EMBEDDED_TEST_SIZE:]), test=data.subset(order[:EMBEDDED_TEST_SIZE])
    )


def default_data_dir() -> Path:
    """Where downloaded datasets are cached (``LAYERCAM_AE_DATA`` overrides)."""
    env = os.environ.get("LAYERCAM_AE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "layercam-ae" / "data"


def _to_image_data(images: np.ndarray | torch.Tensor, labels, num_classes: int, name: str,
                   channels_last: bool) -> ImageData:
    x = torch.as_tensor(np.asarray(images), dtype=torch.uint8)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif channels_last:
        x = x.permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return ImageData(x.contiguous(), y, num_classes, *_STATS[name])


def _torchvision_split(name: str, root: Path, train: bool) -> ImageData:
    from torchvision import datasets

    if name in ("mnist", "fashion-mnist"):
        cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
        ds = cls(root, train=train, download=True)
        return _to_image_data(ds.data, ds.targets, 10, name, channels_last=False)
    if name == "svhn":
        ds = datasets.SVHN(root, split="train" if train else "test", download=True)
        return _to_image_data(ds.data, ds.labels, 10, name, channels_last=False)
    if name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        ds = cls(root, train=train, download=True)
        return _to_image_data(ds.data, ds.targets, 10 if name == "cifar10" else 100, name,
                              channels_last=True)
    if name == "tiny-imagenet":
        return _tiny_imagenet_split(root, train)
    if name == "celeba":
        return _celeba_split(root, train)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


_TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _tiny_imagenet_split(root: Path, train: bool) -> ImageData:
    """Tiny-ImageNet-200 (64x64, 200 classes): the 100,000 training images, or the 10,000
    labelled validation images as the test split."""
    from PIL import Image
    from torchvision.datasets.utils import download_and_extract_archive

    base = root / "tiny-imagenet-200"
    if not base.exists():
        download_and_extract_archive(_TINY_IMAGENET_URL, str(root))
    wnids = (base / "wnids.txt").read_text().split()
    cls = {w: i for i, w in enumerate(wnids)}
    if train:
        items = [(p, cls[w]) for w in wnids for p in sorted((base / "train" / w / "images").glob("*.JPEG"))]
    else:
        lines = (base / "val" / "val_annotations.txt").read_text().splitlines()
        items = [(base / "val" / "images" / l.split("\t")[0], cls[l.split("\t")[1]]) for l in lines]
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in items])
    return _to_image_data(images, [c for _, c in items], 200, "tiny-imagenet", channels_last=True)


CELEBA_ATTRIBUTE = "Smiling"
"""The binary CelebA attribute used as the class label."""


def _celeba_split(root: Path, train: bool) -> ImageData:
    """CelebA, centre-cropped and resized to 64x64 (memory: ~2.4 GB for the training split),
    labelled by the binary attribute ``CELEBA_ATTRIBUTE``."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.CenterCrop(178), transforms.Resize(64)])
    ds = datasets.CelebA(root, split="train" if train else "test", target_type="attr",
                         transform=tf, download=True)
    col = ds.attr_names.index(CELEBA_ATTRIBUTE)
    images = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
    return _to_image_data(images, ds.attr[:, col], 2, "celeba", channels_last=True)


@lru_cache(maxsize=4)
def load_federated_data(name: str, seed: int, data_dir: str | None = None) -> FederatedData:
    """Load the named dataset (cached per process: every simulated client in one worker shares it).

    Downloadable presets go to ``data_dir`` (default ``default_data_dir()``); when they cannot be
    fetched, ``DatasetUnavailableError`` says so and points to the offline default.
    """
    if name == "mnist-embedded":
        return load_embedded_mnist(seed)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    root = Path(data_dir) if data_dir else default_data_dir()
    root.mkdir(parents=True, exist_ok=True)
    try:
        return FederatedData(_torchvision_split(name, root, True), _torchvision_split(name, root, False))
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError
        raise DatasetUnavailableError(
            f"dataset {name!r} is not in {root} and could not be downloaded ({err}). Connect to the "
            f"internet once, place the files there (or set LAYERCAM_AE_DATA), or use "
            f"dataset='mnist-embedded', which ships with the package."
        ) from err
