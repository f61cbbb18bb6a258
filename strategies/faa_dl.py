"""FAA-DL (Federated Anomaly Analytics-enhanced Distributed Learning; ``faa-dl.txt``) as a
Flower strategy, Algorithm 2 step III:

1. anomaly detection: a One-Class SVM (RBF, nu = 0.5) over the updates splits out suspects;
2. anomaly verification (Algorithm 1), over Flower messages of type ``query.faa_dl_verify``:
   per suspect the key authority runs a fresh IPFE ``setup``; the suspect gets the master
   public key and answers with its training data, rows through the linear AONT and the last
   row encrypted, plus its shuffling seed; the authority gives the server the function keys
   for the coordinate vectors e_1..e_W, the server decrypts, trains the global model on the
   data as the client claims to have trained, and compares with the upload;
3. anomaly removal: verified anomalies are excluded, the rest are averaged (FedAvg).

A suspect that does not answer, answers malformed data, or whose update cannot be reproduced
within ``tolerance`` is a verified anomaly; a reproduced one is cleared. Nonlinear training
needs the data itself, so the coordinate keys let the server read a suspect's data for that
one verification: nothing of the clients that the OC-SVM does not flag, and nothing an
eavesdropper on the channel can decrypt. In this package the key authority (the paper's
trusted third party) lives in the ServerApp process; it keeps each master secret key only
until the session's keys are derived.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from torch import nn

from crypto import ipfe
from crypto.aont import LAMBDA, aont_matrix
from crypto.encrypted_images import EncryptedImages, decrypt_images, last_row_bound
from strategies.base import DetectingFedAvg
from strategies.detection.faa_dl_verification import (
    TrainingRecipe, ocsvm_suspects, recompute_update, relative_mismatch,
)
from strategies.records import ClientUpload, Detection
from strategies.registry import DEFENSES, ClientQueries
from strategies.validation import reason_line
from task.config import ConfigError
from task.data import ImageData
from task.params import flatten_updates

VERIFY_MESSAGE = f"{MessageType.QUERY}.faa_dl_verify"


class KeyAuthority:
    """The trusted third party of Algorithm 1 (lines 1-3): one IPFE key pair per verification."""

    def __init__(self) -> None:
        self._sessions: dict[int, tuple[int, ...]] = {}
        self._ids = count()

    def open_session(self, slots: int) -> tuple[int, ipfe.MasterPublicKey]:
        """A fresh (mpk, msk); returns the session id and the mpk for the suspect."""
        mpk, msk = ipfe.setup(slots)
        session = next(self._ids)
        self._sessions[session] = msk
        return session, mpk

    def coordinate_keys(self, session: int) -> list[int]:
        """Function keys for y = e_1..e_n of a session, whose msk the authority then forgets.

        In DDH-IPFE sk_y = <s, y>, so the key for e_k is s_k: the n coordinate keys together
        are the session's master secret key. The server that receives them can decrypt every
        inner product of that one ciphertext set, which is what verification needs (the whole
        last row); the session is never reused.
        """
        msk = self._sessions.pop(session)
        return [ipfe.derive_key(msk, [int(i == k) for i in range(len(msk))]) for k in range(len(msk))]

    def close(self, session: int) -> None:
        """Forget a session's msk without deriving its keys (a verification that stopped)."""
        self._sessions.pop(session, None)


@dataclass
class Verdict:
    """The outcome of one suspect's verification."""

    verified: bool
    reason: str
    mismatch: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)


@DEFENSES.register
class FaaDl(DetectingFedAvg):
    """FAA-DL: OC-SVM screening, IPFE-protected verification of suspects, FedAvg of the rest.

    Parameters
    ----------
    model_fn : callable
        Builds an untrained model of the run's architecture.
    reference : ImageData
        Server data with the run's image shape, classes and standardisation (only its
        metadata is used).
    recipe : TrainingRecipe
        The clients' local training hyper-parameters, as the run config sets them.
    nu : float (default: 0.5)
        The OC-SVM's bound on the fraction of outliers (the paper's 0.5).
    tolerance : float (default: 1e-3)
        Largest ``||g' - g|| / ||g'||`` of a cleared suspect.
    aont_lambda : int (default: 2)
        lambda of the AONT matrix (equation 29).
    queries : ClientQueries
        Reaches the suspects (the harness's messaging; the strategy does no I/O).
    verification_timeout : float (default: 600)
        Seconds to wait for the suspects' verification replies, and then for their decryption:
        a suspect not yet decrypted by then is verified (malicious).
    """

    name = "faa-dl"

    def __init__(
        self, *, model_fn: Callable[[], nn.Module], reference: ImageData, recipe: TrainingRecipe,
        queries: ClientQueries, nu: float = 0.5, tolerance: float = 1e-3,
        aont_lambda: int = LAMBDA, verification_timeout: float = 600.0, **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.queries = queries
        self.model_fn = model_fn
        self.reference = reference
        self.recipe = recipe
        self.nu = nu
        self.tolerance = tolerance
        self.aont_lambda = aont_lambda
        self.verification_timeout = verification_timeout
        self.authority = KeyAuthority()
        channels, height, width = reference.images.shape[1:]
        aont_matrix(height, aont_lambda)  # raises if lambda makes it singular for this height
        self._masked_shape = (channels, height - 1, width)
        self._dlog = ipfe.SmallDiscreteLog(last_row_bound(height, aont_lambda))

    @classmethod
    def from_config(cls, config, assets, **flower_kwargs):
        if assets.queries is None:
            raise ValueError("faa-dl verifies suspects over messages: ServerAssets.queries is needed")
        try:  # the AONT is built for the images' height, and refuses a singular lambda
            aont_matrix(assets.reference.images.shape[2], config.faa_dl_aont_lambda)
        except ValueError as err:
            raise ConfigError(f"faa-dl-aont-lambda={config.faa_dl_aont_lambda}: {err}") from None
        recipe = TrainingRecipe(config.local_epochs, config.batch_size, config.learning_rate,
                                config.weight_decay)
        return cls(model_fn=assets.model_fn, reference=assets.reference, recipe=recipe,
                   queries=assets.queries, nu=config.faa_dl_nu,
                   tolerance=config.faa_dl_tolerance, aont_lambda=config.faa_dl_aont_lambda,
                   verification_timeout=config.round_timeout, **flower_kwargs)

    def detect(self, server_round: int, uploads: list[ClientUpload]) -> Detection:
        start = time.perf_counter()
        updates, _ = flatten_updates([u.arrays for u in uploads], self.global_state)
        is_suspect, scores = ocsvm_suspects(updates, self.nu)
        suspects = [u for u, flagged in zip(uploads, is_suspect) if flagged]
        timings = {"ocsvm": time.perf_counter() - start}
        start = time.perf_counter()
        verdicts = self.verify(server_round, suspects) if suspects else {}
        timings["verification"] = time.perf_counter() - start
        # the suspects' requests travel together: one round trip; the server's steps add up
        timings["verification-round-trip"] = max(
            (v.seconds.get("round-trip", 0.0) for v in verdicts.values()), default=0.0)
        for step in ("decryption", "recomputation"):
            timings[f"verification-{step}"] = sum(v.seconds.get(step, 0.0) for v in verdicts.values())
        verified = sorted(n for n, v in verdicts.items() if v.verified)
        return Detection(
            kept=[u.node_id for u in uploads if u.node_id not in verified],
            scores={u.node_id: float(s) for u, s in zip(uploads, scores)},
            details={
                "suspects": sorted(verdicts), "verified": verified,
                "cleared": sorted(n for n, v in verdicts.items() if not v.verified),
                "mismatch": {n: v.mismatch for n, v in verdicts.items() if v.mismatch is not None},
                "reasons": {n: v.reason for n, v in verdicts.items()},
                "seconds": {n: v.seconds for n, v in verdicts.items()},
                "security-bits": ipfe.SECURITY_BITS,
            },
            timings=timings,
        )

    def verify(self, server_round: int, suspects: list[ClientUpload]) -> dict[int, Verdict]:
        """Run Algorithm 1 with every suspect (their messages travel together)."""
        width = self._masked_shape[-1]
        sessions, requests = {}, {}
        for upload in suspects:
            sessions[upload.node_id], mpk = self.authority.open_session(width)
            requests[upload.node_id] = RecordDict({"config": ConfigRecord({
                "server-round": server_round, "mpk": mpk.to_bytes(), "aont-lambda": self.aont_lambda,
            })})
        start = time.perf_counter()
        try:
            replies = self.queries.ask(VERIFY_MESSAGE, server_round, requests,
                                       self.verification_timeout)
        except BaseException:  # the round fails (``aggregate_train``); no msk outlives it
            for session in sessions.values():
                self.authority.close(session)
            raise
        round_trip = time.perf_counter() - start
        # the decryptions' budget, from the replies on: the suspects choose how many images
        # they send, so the smallest claims go first and no large one spends a smaller one's time
        deadline = time.monotonic() + self.verification_timeout
        verdicts = {}
        for upload in sorted(suspects, key=lambda u: (u.metrics.get(self.weighted_by_key,
                                                                    float("inf")), u.node_id)):
            keys = self.authority.coordinate_keys(sessions[upload.node_id])
            verdict = self.check(upload, replies.get(upload.node_id), keys, deadline)
            verdict.seconds["round-trip"] = round_trip
            verdicts[upload.node_id] = verdict
        return verdicts

    def check(self, upload: ClientUpload, reply: Message | None, keys: list[int],
              deadline: float | None = None) -> Verdict:
        """Verify one suspect's upload against its verification reply (lines 11-16). Its
        decryption stops at ``deadline`` (``time.monotonic()``; ``verify``: the verification's
        timeout after the replies are in): a suspect decides how many images the server
        decrypts, at about a millisecond and a half an MNIST image."""
        if reply is None:
            return Verdict(True, "no verification reply")
        if reply.has_error():
            return Verdict(True, reason_line(reply.error.reason,
                                             "verification failed on the client: "))
        start = time.perf_counter()
        try:  # against the number the client claimed: ``num_examples`` may be the round's
            # bound of it (``bound_claims``), which an honest client's data exceeds
            data, seed = self._decrypt(reply, keys, upload.metrics[self.weighted_by_key],
                                       deadline)
        except TimeoutError as err:
            return Verdict(True, reason_line(err, "its verification ran past the deadline: "))
        except Exception as err:  # noqa: BLE001 -- whatever the reply holds verifies the suspect
            return Verdict(True, reason_line(err, f"malformed verification reply: "
                                                  f"{type(err).__name__}: ", last_line=False))
        seconds = {"decryption": time.perf_counter() - start}
        start = time.perf_counter()
        try:
            recomputed = recompute_update(self.model_fn, self.global_state, data, self.recipe, seed)
            mismatch = relative_mismatch(recomputed, upload.arrays, self.global_state)
        except Exception as err:  # noqa: BLE001 -- data the client chose cannot crash the round
            return Verdict(True, reason_line(err, f"its data cannot be trained on: "
                                                  f"{type(err).__name__}: ", last_line=False))
        seconds["recomputation"] = time.perf_counter() - start
        if not mismatch <= self.tolerance:  # a NaN difference reproduces nothing
            return Verdict(True, f"recomputed update differs by {mismatch:.3g} "
                                 f"(tolerance {self.tolerance:g})", mismatch, seconds)
        return Verdict(False, f"update reproduced (difference {mismatch:.3g})", mismatch, seconds)

    def _decrypt(self, reply: Message, keys: list[int], claimed: float,
                 deadline: float | None = None) -> tuple[ImageData, int]:
        """The suspect's training set and seed from its reply; ``ValueError`` if malformed or
        if it holds another number of examples than the upload claimed (checked before any
        decryption, so an oversized reply costs nothing)."""
        arrays, encrypted = reply.content["data"], reply.content["encrypted"]
        rows, labels = arrays["masked-rows"].numpy(), arrays["labels"].numpy()
        if rows.ndim != 4 or tuple(rows.shape[1:]) != self._masked_shape:
            raise ValueError(f"masked rows of shape {tuple(rows.shape)}, expected "
                             f"N x {' x '.join(map(str, self._masked_shape))}")
        if rows.shape[0] != claimed:
            raise ValueError(f"the upload claimed {claimed:g} examples but the reply holds "
                             f"{rows.shape[0]}")
        if labels.shape != (rows.shape[0],) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels of {labels.dtype} {tuple(labels.shape)} for {rows.shape[0]} images")
        if labels.size and not (0 <= labels.min() and labels.max() < self.reference.num_classes):
            raise ValueError(f"labels outside [0, {self.reference.num_classes})")
        ciphertexts = encrypted["ciphertexts"]
        if not isinstance(ciphertexts, bytes):  # bytes(n) of a number n would allocate n bytes
            raise ValueError(f"ciphertexts must be bytes, got {type(ciphertexts).__name__}")
        images = decrypt_images(
            EncryptedImages(rows, ciphertexts), keys, self.aont_lambda, self._dlog, deadline)
        data = ImageData(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                         self.reference.num_classes, self.reference.mean, self.reference.std)
        seed = encrypted["train-seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"train-seed must be an integer in [0, 2^63), got {seed!r}")
        return data, seed
