"""FAA-DL: IPFE and AONT against independent computations, and the verification protocol run
through the real ClientApp handlers (an honest suspect is cleared, a poisoned one verified, a
lying one caught, a broken reply recorded)."""

import dataclasses
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_app.app import faa_dl_verify, train
from crypto import ipfe
from crypto.aont import aont_inverse, aont_matrix, aont_transform
from crypto.encrypted_images import decrypt_images, encrypt_images
from server_app.defenses import build_defense, server_assets
from strategies.faa_dl import VERIFY_MESSAGE, FaaDl
from strategies.detection.faa_dl_verification import ocsvm_suspects
from strategies.validation import screen_replies
from task.config import RunConfig
from task.data import load_federated_data
from task.models import build_model
from tests.helpers import act_as_serverapp, reply

# --- inner-product functional encryption ---------------------------------------------------


def test_ipfe_decrypts_inner_products_of_random_vectors():
    rng = np.random.default_rng(0)
    n = 6
    mpk, msk = ipfe.setup(n)
    dlog = ipfe.SmallDiscreteLog(bound=n * 50 * 20, table_size=97)  # forces giant steps
    for _ in range(8):
        x = rng.integers(-50, 51, n).tolist()
        y = rng.integers(-20, 21, n).tolist()
        ct = ipfe.Ciphertext.from_bytes(ipfe.encrypt(mpk, x).to_bytes())  # through the wire format
        assert ipfe.decrypt(ct, y, ipfe.derive_key(msk, y), dlog) == int(np.dot(x, y))
    x, y = [3, 1, 0, 0, 0, 0], [1, -3, 5, 0, 0, 0]  # <x, y> = 0: the identity element
    assert ipfe.decrypt(ipfe.encrypt(mpk, x), y, ipfe.derive_key(msk, y), dlog) == 0


def test_ipfe_keys_reveal_only_their_own_function():
    mpk, msk = ipfe.setup(3)
    dlog = ipfe.SmallDiscreteLog(bound=1000)
    x, y, other = [7, 11, 13], [1, 2, 3], [3, 2, 1]
    ct = ipfe.encrypt(mpk, x)
    assert ipfe.encrypt(mpk, x).to_bytes() != ct.to_bytes()  # randomised
    for k in range(3):
        key = ipfe.derive_key(msk, [int(i == k) for i in range(3)])
        assert ipfe.decrypt_coordinate(ct, k, key, dlog) == x[k]
    with pytest.raises(ValueError, match="outside"):  # key for another y: a random element
        ipfe.decrypt(ct, y, ipfe.derive_key(msk, other), dlog)
    _, other_msk = ipfe.setup(3)  # a key of another setup does not decrypt either
    with pytest.raises(ValueError, match="outside"):
        ipfe.decrypt(ct, y, ipfe.derive_key(other_msk, y), dlog)


def test_no_secret_scalar_is_cached(monkeypatch):
    cached = []
    small = ipfe._small_generator_multiple
    monkeypatch.setattr(ipfe, "_small_generator_multiple", lambda k: cached.append(k) or small(k))
    mpk, msk = ipfe.setup(4)
    ct = ipfe.encrypt(mpk, [5, -3, 0, 200])
    keys = [ipfe.derive_key(msk, [int(i == k) for i in range(4)]) for k in range(4)]
    assert keys == list(msk)  # the coordinate keys are the master secret key itself
    dlog = ipfe.SmallDiscreteLog(bound=1000)
    assert [ipfe.decrypt_coordinate(ct, k, keys[k], dlog) for k in range(4)] == [5, -3, 0, 200]
    assert cached and all(abs(k) < ipfe.SMALL_MULTIPLES for k in cached)
    assert not set(cached) & set(msk)


def test_group_elements_and_ciphertexts_parse_strictly():
    g = ipfe.generator_multiple(1)
    assert ipfe.add([ipfe.multiply(g, ipfe.ORDER - 1), g]) is None  # (q - 1) G + G = O
    assert ipfe.from_bytes(ipfe.to_bytes(None)) is None
    with pytest.raises(ValueError):
        ipfe.from_bytes(b"\x02" + b"\xff" * 32)  # x beyond the field: not on the curve
    with pytest.raises(ValueError, match="multiple"):
        ipfe.Ciphertext.from_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="identity"):
        ipfe.MasterPublicKey.from_bytes([ipfe.to_bytes(None)])


# --- linear AONT ---------------------------------------------------------------------------


def test_aont_matrix_is_equation_29_and_invertible():
    assert aont_matrix(4).tolist() == [[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1], [1, 1, 1, 2]]
    m = aont_matrix(28)
    assert np.allclose(m @ np.linalg.inv(m.astype(float)), np.eye(28))
    with pytest.raises(ValueError, match="singular"):
        aont_matrix(3, lam=2)


def test_aont_round_trips_images_exactly_and_rejects_foreign_rows():
    x = np.random.default_rng(1).integers(0, 256, (5, 3, 28, 32)).astype(np.uint8)
    u = aont_transform(x)
    m = aont_matrix(28)
    assert np.array_equal(u[2, 1], m @ x[2, 1].astype(np.int64))
    assert np.array_equal(aont_inverse(u), x)
    u[0, 0, -1, 0] += 1
    with pytest.raises(ValueError, match="not the AONT"):
        aont_inverse(u)


def test_encrypted_images_round_trip_and_malformed_payloads_are_named():
    images = np.random.default_rng(2).integers(0, 256, (3, 1, 28, 28)).astype(np.uint8)
    mpk, msk = ipfe.setup(28)
    keys = [ipfe.derive_key(msk, [int(i == k) for i in range(28)]) for k in range(28)]
    encrypted = encrypt_images(images, mpk)
    assert encrypted.masked_rows.shape == (3, 1, 27, 28)
    assert np.array_equal(decrypt_images(encrypted, keys), images)
    truncated = dataclasses.replace(encrypted, ciphertexts=encrypted.ciphertexts[:-33])
    with pytest.raises(ValueError, match="ciphertexts"):
        decrypt_images(truncated, keys)
    with pytest.raises(ValueError, match="coordinate keys"):
        decrypt_images(encrypted, keys[:-1])


# --- OC-SVM screening ----------------------------------------------------------------------


def test_ocsvm_flags_far_updates_and_at_most_about_nu_of_all():
    rng = np.random.default_rng(3)
    updates = np.vstack([rng.normal(0, 1, (18, 50)), rng.normal(0, 1, (2, 50)) + 30])
    suspects, scores = ocsvm_suspects(updates, nu=0.5)
    assert suspects[18:].all() and scores[18:].min() > scores[:18].max()
    assert suspects.sum() <= 0.5 * 20 + 1


def test_ocsvm_suspects_do_not_depend_on_the_order_replies_arrived_in():
    # Six clients, two of them near-identical: scikit-learn alone flags different clients
    # for most orders of these rows (libsvm's degenerate solutions).
    rng = np.random.default_rng(0)
    for _ in range(20):
        updates = rng.normal(size=(6, 50))
        updates[5] = updates[4]
        updates[4:] *= -1
        suspects, scores = ocsvm_suspects(updates, nu=0.5)
        order = rng.permutation(6)
        again, again_scores = ocsvm_suspects(updates[order], nu=0.5)
        np.testing.assert_array_equal(again, suspects[order])
        np.testing.assert_allclose(again_scores, scores[order], atol=1e-12)


# --- the verification protocol through the ClientApp handlers ------------------------------

PARTITIONS = 60  # ~133 images per node keeps each recomputation short


def _context(partition_id, role, **overrides):
    run_config = {**RunConfig().to_run_config(), "local-epochs": 1, "attack": "sign-flip",
                  "defense": "faa-dl",
                  "num-attackers": 1, **overrides}
    node_config = {"partition-id": partition_id, "num-partitions": PARTITIONS, "role": role}
    return Context(run_id=1, node_id=partition_id + 1, node_config=node_config,
                   state=RecordDict(), run_config=run_config)


class UnusedGrid:
    """These tests call the verification's steps directly: no message is sent."""


@pytest.fixture(scope="module")
def setting():
    act_as_serverapp()
    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, 28)
    config = RunConfig.from_run_config(_context(0, "benign").run_config)
    test = load_federated_data(config.dataset, config.seed).test
    strategy = build_defense(config, server_assets(config, test, grid=UnusedGrid()))
    assert isinstance(strategy, FaaDl)
    arrays = ArrayRecord(model.state_dict())
    strategy.global_state = {k: v.numpy() for k, v in arrays.items()}
    return strategy, arrays


def _upload(strategy, arrays, context):
    instruction = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=context.node_id, message_type="train")
    reply = train(instruction, context)
    uploads, rejected, _ = screen_replies([reply], strategy.global_state, "num-examples")
    assert not rejected
    return uploads[0]


def _request(strategy, node_id):
    """A verification request under a fresh session; returns it and the session."""
    session, mpk = strategy.authority.open_session(28)
    request = Message(RecordDict({"config": ConfigRecord({
        "server-round": 1, "mpk": mpk.to_bytes(), "aont-lambda": 2})}),
        dst_node_id=node_id, message_type=VERIFY_MESSAGE)
    return request, session


def _verify(strategy, upload, context):
    request, session = _request(strategy, context.node_id)
    reply = faa_dl_verify(request, context)
    keys = strategy.authority.coordinate_keys(session)
    return strategy.check(upload, reply, keys), reply, keys


def test_honest_suspect_is_cleared_with_its_update_reproduced_exactly(setting):
    strategy, arrays = setting
    context = _context(4, "benign")
    verdict, _, _ = _verify(strategy, _upload(strategy, arrays, context), context)
    assert not verdict.verified, verdict.reason
    assert verdict.mismatch == 0.0
    assert verdict.seconds["decryption"] > 0 and verdict.seconds["recomputation"] > 0


def test_an_honest_suspect_whose_claim_the_round_bounded_is_cleared(setting):
    # A client with more data than the round's weight share allows: its upload counts as the
    # bound (``bound_claims``), and its verification reply holds every example it trained on.
    strategy, arrays = setting
    context = _context(4, "benign")
    instruction = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=context.node_id, message_type="train")
    small = [reply(900 + i, strategy.global_state, {"num-examples": 30}) for i in range(5)]
    uploads, rejected, bounded = screen_replies([train(instruction, context), *small],
                                                strategy.global_state, "num-examples")
    (upload,) = [u for u in uploads if u.node_id == context.node_id]
    assert not rejected and upload.num_examples < bounded[context.node_id]
    verdict, _, _ = _verify(strategy, upload, context)
    assert not verdict.verified, verdict.reason
    assert verdict.mismatch == 0.0


def test_a_recomputation_that_is_not_finite_verifies_the_suspect(setting, monkeypatch):
    """The update is reproduced only when the difference is within the tolerance: a NaN
    difference (the recomputed model not finite) is no reproduction."""
    import strategies.faa_dl as faa_dl

    strategy, arrays = setting
    context = _context(4, "benign")
    upload = _upload(strategy, arrays, context)
    monkeypatch.setattr(faa_dl, "relative_mismatch", lambda *_: float("nan"))
    verdict, _, _ = _verify(strategy, upload, context)
    assert verdict.verified and "differs by nan" in verdict.reason, verdict.reason


def test_a_verification_that_fails_to_ask_leaves_no_master_secret_key(setting):
    strategy, arrays = setting
    context = _context(4, "benign")
    upload = _upload(strategy, arrays, context)

    class Unreachable:
        def ask(self, *_):
            raise ConnectionError("the grid is gone")

    queries, strategy.queries = strategy.queries, Unreachable()
    try:
        with pytest.raises(ConnectionError):
            strategy.verify(1, [upload])
    finally:
        strategy.queries = queries
    assert strategy.authority._sessions == {}


def test_a_suspects_error_text_is_recorded_as_one_bounded_line(setting):
    """A verdict's reason quotes what a suspect sent (its error's text, what decoding its
    reply raised): one line, bounded, as the screening's."""
    from strategies.validation import MAX_REASON_CHARS

    strategy, arrays = setting
    context = _context(5, "benign")
    upload = _upload(strategy, arrays, context)
    request, _ = _request(strategy, context.node_id)
    text = "Traceback\n  \x1b[31mdeep\x1b[0m\nValueError: " + "x" * 10**5
    verdict = strategy.check(upload, Message(Error(code=0, reason=text), reply_to=request), [])
    assert verdict.verified
    assert verdict.reason.startswith("verification failed on the client: ValueError: xxx")
    assert len(verdict.reason) == MAX_REASON_CHARS


def test_a_decryption_past_the_verification_deadline_verifies_the_suspect(setting):
    """The suspect chooses how many images the server decrypts: the decryption stops at the
    verification's deadline, and the suspect is verified (an honest one in time is cleared)."""
    strategy, arrays = setting
    context = _context(4, "benign")
    upload = _upload(strategy, arrays, context)
    request, session = _request(strategy, context.node_id)
    reply = faa_dl_verify(request, context)
    keys = strategy.authority.coordinate_keys(session)
    verdict = strategy.check(upload, reply, keys, deadline=time.monotonic() - 1.0)
    assert verdict.verified and "ran past the deadline" in verdict.reason, verdict.reason
    assert not strategy.check(upload, reply, keys, deadline=time.monotonic() + 600).verified


def test_a_silent_suspect_does_not_spend_an_honest_ones_decryption_time(setting, monkeypatch):
    """The replies are awaited up to the timeout (a silent suspect makes the wait whole); the
    decryptions' budget starts when they are in, so the honest suspect that answered is
    cleared."""
    strategy, arrays = setting
    context = _context(4, "benign")
    honest = _upload(strategy, arrays, context)
    claim = honest.metrics["num-examples"]  # the silent one claims more: decrypted last,
    # though its node id is the smaller
    silent = dataclasses.replace(honest, node_id=honest.node_id - 1,
                                 metrics={**honest.metrics, "num-examples": 100 * claim})
    checked, check = [], strategy.check
    monkeypatch.setattr(strategy, "check",
                        lambda upload, *rest: checked.append(upload.node_id) or check(upload, *rest))

    class WaitingForTheSilentOne:
        def ask(self, message_type, server_round, requests, timeout):
            replies = {honest.node_id: faa_dl_verify(Message(
                requests[honest.node_id], dst_node_id=honest.node_id,
                message_type=message_type), context)}
            time.sleep(timeout)
            return replies

    monkeypatch.setattr(strategy, "queries", WaitingForTheSilentOne())
    monkeypatch.setattr(strategy, "verification_timeout", 1.0)
    verdicts = strategy.verify(1, [silent, honest])
    assert not verdicts[honest.node_id].verified, verdicts[honest.node_id].reason
    assert verdicts[silent.node_id].verified
    assert verdicts[silent.node_id].reason == "no verification reply"
    assert checked == [honest.node_id, silent.node_id]  # the smaller claim first


def test_poisoned_suspect_is_verified(setting):
    strategy, arrays = setting
    context = _context(5, "attacker")  # trains honestly, uploads the flipped update
    verdict, _, _ = _verify(strategy, _upload(strategy, arrays, context), context)
    assert verdict.verified and verdict.mismatch > 1.0, verdict.reason


def test_lying_suspect_is_caught(setting):
    strategy, arrays = setting
    # An attacker that uploads its honest model (so nothing to hide) but answers
    # verification with data it did not train on is caught just the same.
    honest = _upload(strategy, arrays, _context(6, "benign"))
    liar = _context(6, "attacker", **{"faa-dl-attacker-response": "forged-data"})
    verdict, _, _ = _verify(strategy, honest, liar)
    assert verdict.verified and verdict.mismatch > strategy.tolerance, verdict.reason


def test_missing_or_malformed_replies_verify_the_suspect_and_name_the_fault(setting):
    strategy, arrays = setting
    context = _context(7, "benign")
    upload = _upload(strategy, arrays, context)
    assert strategy.check(upload, None, []).reason == "no verification reply"
    _, reply, keys = _verify(strategy, upload, context)
    reply.content["encrypted"]["ciphertexts"] = reply.content["encrypted"]["ciphertexts"][:-1]
    verdict = strategy.check(upload, reply, keys)
    assert verdict.verified and "malformed" in verdict.reason and "ciphertexts" in verdict.reason
    del reply.content["data"]
    assert "malformed" in strategy.check(upload, reply, keys).reason
    claimed_more = dataclasses.replace(  # the claim as the client made it (in its metrics)
        upload, metrics={**upload.metrics, "num-examples": upload.num_examples + 1})
    _, reply, keys = _verify(strategy, upload, context)
    assert "examples" in strategy.check(claimed_more, reply, keys).reason


def test_label_flip_client_is_reproduced_from_the_labels_it_trained_on(setting):
    strategy, arrays = setting
    # Data poisoning is outside FAA-DL's threat model: the client answers with the flipped
    # labels it trained on, and its update is reproduced.
    context = _context(8, "attacker", attack="label-flip")
    verdict, reply, _ = _verify(strategy, _upload(strategy, arrays, context), context)
    assert not verdict.verified and verdict.mismatch == 0.0, verdict.reason
    benign = _context(8, "benign")
    honest = faa_dl_verify(_request(strategy, benign.node_id)[0], benign)
    honest_labels = honest.content["data"]["labels"].numpy()
    assert np.array_equal(reply.content["data"]["labels"].numpy(), 9 - honest_labels)


def _mutated(reply: Message, field: str, value) -> Message:
    """A copy of a verification reply with one field replaced by ``value``."""
    content = RecordDict({"data": ArrayRecord(dict(reply.content["data"].items())),
                          "encrypted": ConfigRecord(dict(reply.content["encrypted"].items()))})
    if field in ("data", "encrypted"):
        content[field] = value
    elif field in ("masked-rows", "labels"):
        content["data"][field] = value
    else:
        content["encrypted"][field] = value
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=reply.metadata.src_node_id,
                                             message_type=VERIFY_MESSAGE))


FIELD_VALUES = {
    "train-seed": st.one_of(st.sampled_from([float("inf"), float("nan"), 1e30, -1, 2**63 - 1 + 0.5,
                                             "7", b"7", True]),
                            st.integers(-(2**63), -1)),
    "ciphertexts": st.one_of(st.binary(max_size=80), st.integers(0, 2**16), st.text(max_size=8)),
    "data": st.just(ConfigRecord({"masked-rows": b"\x00" * 8, "labels": 1})),
    "encrypted": st.just(ArrayRecord({"train-seed": Array(np.zeros(1))})),
    "masked-rows": st.sampled_from([Array(np.zeros((2, 1, 27, 28), dtype=np.float64)),
                                    Array(np.zeros((0, 1, 27, 28), dtype=np.int32)),
                                    Array(np.zeros(5, dtype=np.int32)),
                                    Array(np.full((3, 1, 27, 28), 2**30, dtype=np.int32))]),
    "labels": st.sampled_from([Array(np.full(133, 10)), Array(np.full(133, -1)),
                               Array(np.zeros(133, dtype=np.float32)), Array(np.zeros((2, 2)))]),
}


@pytest.fixture(scope="module")
def honest_verification(setting):
    """An honest suspect's upload, its verification reply and the session's keys."""
    strategy, arrays = setting
    context = _context(8, "benign")
    upload = _upload(strategy, arrays, context)
    _, reply, keys = _verify(strategy, upload, context)
    assert not strategy.check(upload, reply, keys).verified
    return upload, reply, keys


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_malformed_verification_replies_verify_the_suspect_and_never_raise(
        setting, honest_verification, data):
    """Every field of a verification reply is the suspect's to choose: whatever it sends, the
    check returns a verdict (the suspect verified, with a reason), never an exception."""
    strategy, _ = setting
    upload, reply, keys = honest_verification
    field = data.draw(st.sampled_from(sorted(FIELD_VALUES)), label="field")
    value = data.draw(FIELD_VALUES[field], label="value")
    verdict = strategy.check(upload, _mutated(reply, field, value), keys)
    assert verdict.verified and verdict.reason, (field, value, verdict)


def test_a_number_for_the_ciphertexts_is_rejected_before_anything_is_allocated(
        setting, honest_verification):
    strategy, _ = setting
    upload, reply, keys = honest_verification
    verdict = strategy.check(upload, _mutated(reply, "ciphertexts", 2**34), keys)
    assert verdict.verified and "ciphertexts must be bytes" in verdict.reason
