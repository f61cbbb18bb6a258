"""DDH-based inner-product functional encryption (IPFE) over the secp256k1 group.

The scheme of Abdalla, Bourse, De Caro and Pointcheval, "Simple functional encryption schemes
for inner products" (PKC 2015, section 3), FAA-DL's reference [27], with G the generator of
secp256k1 and q its (prime) group order:

- ``setup(n)``:            msk = s <- Z_q^n,  mpk = (h_i = s_i G)_i
- ``derive_key(msk, y)``:  sk_y = <y, s> mod q
- ``encrypt(mpk, x)``:     r <- Z_q,  ct_0 = r G,  ct_i = r h_i + x_i G
- ``decrypt(ct, y, sk_y)``: sum_i y_i ct_i - sk_y ct_0 = <x, y> G, then a discrete logarithm in
  a known, small range (``SmallDiscreteLog``): FAA-DL equation (18).

Security: selectively IND-CPA secure under the decisional Diffie-Hellman assumption, which is
believed to hold on secp256k1 (prime order q ~ 2^256, no efficient pairing); the best known
attack (Pollard's rho) costs ~2^128 group operations, so the security parameter is 128 bits
(stronger than the 112 bits of a 2048-bit finite-field group). Group arithmetic is
libsecp256k1's (through ``coincurve``); secrets come from ``secrets``. Elements are
``coincurve.PublicKey`` or ``None`` for the identity, which libsecp256k1 cannot represent.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from coincurve import PublicKey

ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
"""q, the prime order of the secp256k1 group."""

SECURITY_BITS = 128
POINT_BYTES = 33
"""A group element on the wire: SEC1 compressed; the identity is 33 zero bytes."""

Point = PublicKey | None
_IDENTITY_BYTES = bytes(POINT_BYTES)


SMALL_MULTIPLES = 1 << 16
"""|k| below this is a plaintext or a discrete-log step, never a secret: its k G is cached."""


def generator_multiple(k: int) -> Point:
    """k G. Small multiples (plaintexts, discrete-log tables) come from a cache; any other k,
    secret scalars and encryption randomness among them, is never kept."""
    if -SMALL_MULTIPLES < k < SMALL_MULTIPLES:
        return _small_generator_multiple(k)
    return _generator_multiple(k)


@lru_cache(maxsize=SMALL_MULTIPLES)
def _small_generator_multiple(k: int) -> Point:
    return _generator_multiple(k)


def _generator_multiple(k: int) -> Point:
    k %= ORDER
    return None if k == 0 else PublicKey.from_secret(k.to_bytes(32, "big"))


def multiply(point: Point, k: int) -> Point:
    """k * point."""
    k %= ORDER
    if point is None or k == 0:
        return None
    return point if k == 1 else point.multiply(k.to_bytes(32, "big"))


def add(points: Sequence[Point]) -> Point:
    """The sum of ``points``."""
    present = [p for p in points if p is not None]
    if len(present) <= 1:
        return present[0] if present else None
    try:
        return PublicKey.combine_keys(present)
    except ValueError:  # libsecp256k1 refuses a sum that is the identity
        return None


def to_bytes(point: Point) -> bytes:
    return _IDENTITY_BYTES if point is None else point.format(compressed=True)


def from_bytes(data: bytes) -> Point:
    """Parse one element; raise ``ValueError`` if it is not on secp256k1."""
    if len(data) != POINT_BYTES:
        raise ValueError(f"a group element has {POINT_BYTES} bytes, got {len(data)}")
    return None if data == _IDENTITY_BYTES else PublicKey(data)


def random_scalar() -> int:
    """Uniform in [1, q), from the operating system's CSPRNG."""
    return secrets.randbelow(ORDER - 1) + 1


@dataclass(frozen=True)
class MasterPublicKey:
    """mpk = (h_1, ..., h_n)."""

    h: tuple[PublicKey, ...]

    @property
    def slots(self) -> int:
        return len(self.h)

    def to_bytes(self) -> list[bytes]:
        return [to_bytes(p) for p in self.h]

    @classmethod
    def from_bytes(cls, parts: Sequence[bytes]) -> "MasterPublicKey":
        points = tuple(from_bytes(bytes(p)) for p in parts)
        if not points or any(p is None for p in points):
            raise ValueError("a master public key needs at least one element, none the identity")
        return cls(points)


@dataclass(frozen=True)
class Ciphertext:
    """(ct_0, ct_1, ..., ct_n)."""

    ct0: Point
    ct: tuple[Point, ...]

    def to_bytes(self) -> bytes:
        return b"".join(to_bytes(p) for p in (self.ct0, *self.ct))

    @classmethod
    def from_bytes(cls, data: bytes) -> "Ciphertext":
        if len(data) % POINT_BYTES or len(data) < 2 * POINT_BYTES:
            raise ValueError(f"a ciphertext is a multiple (>= 2) of {POINT_BYTES} bytes, got {len(data)}")
        points = [from_bytes(data[i : i + POINT_BYTES]) for i in range(0, len(data), POINT_BYTES)]
        return cls(points[0], tuple(points[1:]))


def setup(slots: int) -> tuple[MasterPublicKey, tuple[int, ...]]:
    """(mpk, msk) for vectors of ``slots`` coordinates."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    msk = tuple(random_scalar() for _ in range(slots))
    return MasterPublicKey(tuple(generator_multiple(s) for s in msk)), msk


def derive_key(msk: Sequence[int], y: Sequence[int]) -> int:
    """sk_y = <y, s> mod q: lets its holder learn <x, y> and nothing else about x."""
    if len(y) != len(msk):
        raise ValueError(f"function vector has {len(y)} coordinates, the key {len(msk)}")
    return sum(int(a) * s for a, s in zip(y, msk)) % ORDER


def encrypt(mpk: MasterPublicKey, x: Sequence[int]) -> Ciphertext:
    """Enc(mpk, x) with fresh randomness r."""
    if len(x) != mpk.slots:
        raise ValueError(f"plaintext has {len(x)} coordinates, the key {mpk.slots}")
    r = random_scalar()
    return Ciphertext(
        generator_multiple(r),
        tuple(add([multiply(h, r), generator_multiple(int(v))]) for h, v in zip(mpk.h, x)),
    )


def decrypt_to_group(ct: Ciphertext, y: Sequence[int], sk_y: int) -> Point:
    """<x, y> G from a ciphertext of x and the key for y."""
    if len(y) != len(ct.ct):
        raise ValueError(f"function vector has {len(y)} coordinates, the ciphertext {len(ct.ct)}")
    return add([multiply(c, int(a)) for c, a in zip(ct.ct, y)] + [multiply(ct.ct0, -sk_y)])


class SmallDiscreteLog:
    """Solve v G = P for integers |v| <= bound by baby-step giant-step; with the default
    table (2 bound + 1 entries) every solve is one lookup."""

    def __init__(self, bound: int, table_size: int | None = None) -> None:
        if bound < 0:
            raise ValueError(f"bound must be >= 0, got {bound}")
        self.bound = bound
        self.size = max(1, min(table_size or 2 * bound + 1, 2 * bound + 1))
        self._table: dict[bytes, int] = {}
        point: Point = None
        for j in range(self.size):
            self._table[to_bytes(point)] = j
            point = add([point, generator_multiple(1)])
        self._giant_step = generator_multiple(-self.size)
        self._offset = generator_multiple(bound)

    def solve(self, point: Point) -> int:
        """v with v G = ``point``; ``ValueError`` if |v| > bound."""
        shifted = add([point, self._offset])  # (v + bound) G, with v + bound in [0, 2 bound]
        for i in range(-(-(2 * self.bound + 1) // self.size)):
            j = self._table.get(to_bytes(shifted))
            if j is not None:
                return i * self.size + j - self.bound
            shifted = add([shifted, self._giant_step])
        raise ValueError(f"discrete logarithm is outside [-{self.bound}, {self.bound}]")


def decrypt(ct: Ciphertext, y: Sequence[int], sk_y: int, dlog: SmallDiscreteLog) -> int:
    """<x, y>, FAA-DL equation (18)."""
    return dlog.solve(decrypt_to_group(ct, y, sk_y))


def decrypt_coordinate(ct: Ciphertext, k: int, sk_k: int, dlog: SmallDiscreteLog) -> int:
    """x_k, with the key for the unit vector y = e_k (``decrypt`` specialised: one scalar
    multiplication instead of n)."""
    return dlog.solve(add([ct.ct[k], multiply(ct.ct0, -sk_k)]))
