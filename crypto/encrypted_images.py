"""Images as FAA-DL's verification sends them (Algorithm 1, lines 7-8): every image channel's
rows go through the linear AONT; rows u_1..u_{n-1} travel in the clear, the last row u_n is
IPFE-encrypted, one ciphertext per image channel ("only one encryption ... after AONT")."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crypto import ipfe
from crypto.aont import LAMBDA, aont_inverse, aont_transform

MAX_PIXEL = 255


@dataclass(frozen=True)
class EncryptedImages:
    """``masked_rows``: int32 ``N x C x (H-1) x W``; ``ciphertexts``: the N*C ciphertexts of
    the last AONT rows (W + 1 group elements each), concatenated in image-channel order."""

    masked_rows: np.ndarray
    ciphertexts: bytes


def last_row_bound(height: int, lam: int = LAMBDA) -> int:
    """The largest value of u_n = sum_{j<n} x_j + lambda x_n for 8-bit pixels."""
    return (height - 1 + abs(lam)) * MAX_PIXEL


def encrypt_images(images: np.ndarray, mpk: ipfe.MasterPublicKey, lam: int = LAMBDA) -> EncryptedImages:
    """AONT-transform uint8 ``N x C x H x W`` images and encrypt their last rows under ``mpk``
    (which must have W slots)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 N x C x H x W, got {images.dtype} {images.shape}")
    width = images.shape[-1]
    if mpk.slots != width:
        raise ValueError(f"the key has {mpk.slots} slots but the images are {width} wide")
    u = aont_transform(images, lam)
    last_rows = u[..., -1, :].reshape(-1, width)
    return EncryptedImages(
        masked_rows=u[..., :-1, :].astype(np.int32),
        ciphertexts=b"".join(ipfe.encrypt(mpk, row.tolist()).to_bytes() for row in last_rows),
    )


def decrypt_images(
    encrypted: EncryptedImages,
    coordinate_keys: Sequence[int],
    lam: int = LAMBDA,
    dlog: ipfe.SmallDiscreteLog | None = None,
    deadline: float | None = None,
) -> np.ndarray:
    """The uint8 images back, given the function keys for y = e_1, ..., e_W; ``ValueError``
    naming what is wrong if the payload is malformed, ``TimeoutError`` once ``time.monotonic()``
    passes ``deadline`` (the work grows with the images the sender chose to send)."""
    rows = np.asarray(encrypted.masked_rows)
    if rows.ndim != 4 or rows.dtype.kind not in "iu":
        raise ValueError(f"masked rows must be integer N x C x (H-1) x W, got {rows.dtype} {rows.shape}")
    n, c, height, width = rows.shape[0], rows.shape[1], rows.shape[2] + 1, rows.shape[3]
    if len(coordinate_keys) != width:
        raise ValueError(f"{len(coordinate_keys)} coordinate keys for images {width} wide")
    size = (width + 1) * ipfe.POINT_BYTES
    if len(encrypted.ciphertexts) != n * c * size:
        raise ValueError(f"expected {n * c} ciphertexts of {size} bytes, got "
                         f"{len(encrypted.ciphertexts)} bytes")
    dlog = dlog or ipfe.SmallDiscreteLog(last_row_bound(height, lam))
    blob = encrypted.ciphertexts
    last = np.empty((n * c, width), dtype=np.int64)
    for i in range(n * c):
        if deadline is not None and i % 64 == 0 and time.monotonic() > deadline:
            raise TimeoutError(f"decrypting {n} images took past the deadline ({i // c} done)")
        ct = ipfe.Ciphertext.from_bytes(blob[i * size : (i + 1) * size])
        last[i] = [ipfe.decrypt_coordinate(ct, k, key, dlog) for k, key in enumerate(coordinate_keys)]
    u = np.concatenate([rows.astype(np.int64), last.reshape(n, c, 1, width)], axis=2)
    x = aont_inverse(u, lam)
    if x.min(initial=0) < 0 or x.max(initial=0) > MAX_PIXEL:
        raise ValueError("decrypted pixels fall outside [0, 255]")
    return x.astype(np.uint8)
