"""The ClientApp: local training and evaluation on this node's partition; attackers attack.

A node learns its partition from ``context.node_config`` (``partition-id``, ``num-partitions``):
Flower's simulation engine sets them, a real SuperNode gets them from ``--node-config``. Its role
is ``role = "attacker"`` or ``"benign"`` in the node config; without one (simulation), the last
``num-attackers`` partitions attack. An attacker trains honestly (on flipped labels for
label-flip), then uploads what its attack crafts; attacks that need the round's benign uploads
get them from the harness in a second ``train.attack`` message. Every reply reports ``attacker`` (1.0/0.0) as
ground truth for the server's detection metrics; the harness takes it out of the reply before
any defense sees it, and an attacker's final reply has the same fields as a benign one. Imports
of torch and the data stack happen inside the handlers: in a deployment every message starts a
fresh ClientApp process, and a light module import keeps the other message types cheap.
Run by Flower's simulation on Ray, a training reply also names the Ray node that made it (a
``runtime`` ConfigRecord, ``ray-node``), which the harness records and no defense sees.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from task.config import RunConfig
from task.reply import ATTACKER, AWAITS_BENIGN, RAY_NODE, RUNTIME

if TYPE_CHECKING:
    import torch

    from attacks import Attack
    from task.data import ImageData

app = ClientApp()


def node_integer(node_config: Mapping[str, Any], key: str) -> int:
    """A node-config value that must be an integer (a string of digits is one written in
    quotes); ``ValueError`` naming the key otherwise (``KeyError`` when it is missing)."""
    value = node_config[key]
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"node config {key}={value!r} is not an integer")
    return value


def node_partition(context: Context) -> tuple[int, int]:
    """This node's (partition id, number of partitions), validated."""
    node = context.node_config
    try:
        partition_id = node_integer(node, "partition-id")
        num_partitions = node_integer(node, "num-partitions")
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err.args[0]!r}: start the SuperNode with "
            f"--node-config \"partition-id=<i> num-partitions=<n>\""
        ) from None
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node config partition-id={partition_id} is outside [0, {num_partitions})")
    return partition_id, num_partitions


ROLES = ("benign", "attacker")


def is_attacker(context: Context, num_attackers: int) -> bool:
    """The node's role: ``role`` from the node config, else the last ``num_attackers``
    partitions of a simulation."""
    role = context.node_config.get("role")
    if role is not None:
        if role not in ROLES:
            raise ValueError(f"node config role={role!r} is not one of {list(ROLES)}")
        return role == "attacker"
    partition_id, num_partitions = node_partition(context)
    return partition_id >= num_partitions - num_attackers


def _local_data(context: Context):
    """Config, this node's partition id and its local data partition."""
    import torch

    from task.data import load_federated_data
    from task.partition import client_indices

    torch.set_num_threads(1)  # simulated clients share the machine's cores
    config = RunConfig.from_run_config(context.run_config)
    partition_id, num_partitions = node_partition(context)
    data = load_federated_data(config.dataset, config.seed)
    indices = client_indices(
        data.train.labels.numpy(), partition_id, num_partitions, config.partitioning,
        config.dirichlet_alpha, config.seed,
    )
    return config, partition_id, data.train.subset(indices)


def _local_setup(msg: Message, context: Context):
    """Config, the local data partition and the received global model, ready to use."""
    from task.models import build_model
    from task.train import pick_device

    config, partition_id, local = _local_data(context)
    model = build_model(config.model, local.in_channels, local.num_classes, local.image_size)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    return config, partition_id, local, model, pick_device()


def training_seed(config: RunConfig, server_round: int, partition_id: int) -> int:
    """The seed that shuffles this node's batches in ``server_round``."""
    return config.seed * 100_003 + server_round * 1_009 + partition_id


def _training_data(local, config: RunConfig, attacker: bool):
    """The partition as this node trained on it (for FAA-DL's verification, which has no model
    to build every attack with): what a data-poisoning attack makes of it."""
    from attacks import ATTACKS, build_attack

    if not (attacker and ATTACKS.get(config.attack).poisons_data):
        return local
    return build_attack(config).poison(local)


def ray_node() -> str | None:
    """The id of the Ray node this ClientApp runs on, when Flower's simulation runs it in a
    Ray worker; ``None`` elsewhere (a deployment's ClientApp process never imports Ray, and
    this doesn't either)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def _training_reply(msg: Message, arrays: ArrayRecord, metrics: dict) -> Message:
    """A training reply: the arrays, their metrics and, on Ray, the node that made them."""
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    node = ray_node()
    if node is not None:
        content[RUNTIME] = ConfigRecord({RAY_NODE: node})
    return Message(content, reply_to=msg)


def _model_reply(msg: Message, state: dict, metrics: dict) -> Message:
    """The reply carrying a model state (numpy arrays) and its metrics."""
    import numpy as np
    import torch

    # np.asarray keeps 0-d buffers (BatchNorm's num_batches_tracked) 0-d; ascontiguousarray
    # would make them 1-d, which the server's screening rightly refuses
    arrays = ArrayRecord({k: torch.from_numpy(np.asarray(v, order="C")) for k, v in state.items()})
    return _training_reply(msg, arrays, metrics)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local partition and send it back (attackers:
    send what their attack crafts from it)."""
    import numpy as np

    from attacks import AttackInput, build_attack
    from task.params import integer_arrays
    from task.train import state_to_numpy
    from task.train import train as train_locally

    config, partition_id, local, model, device = _local_setup(msg, context)
    attacker = is_attacker(context, config.num_attackers)
    attack = build_attack(config, model) if attacker else None
    if attack is not None and attack.needs_benign_uploads:
        # The harness will send this round's benign uploads in a "train.attack" message.
        metrics = {"num-examples": len(local), ATTACKER: 1.0, AWAITS_BENIGN: 1.0}
        return _training_reply(msg, msg.content["arrays"], metrics)
    if attack is not None:
        local = attack.poison(local)  # honest data unless the attack poisons it
    global_state = state_to_numpy(model)
    server_round = int(msg.content["config"]["server-round"])
    seed = training_seed(config, server_round, partition_id)
    loss = train_locally(
        model, local, epochs=config.local_epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, device=device,
        seed=seed,
    )
    state = state_to_numpy(model.cpu())
    if attack is not None:  # its batch counters its own: an honest client's
        state = {**attack.craft(AttackInput(global_state, state, np.random.default_rng(seed),
                                            probes=local_probes(local, attack),
                                            server_round=server_round)),
                 **integer_arrays(state)}
    metrics = {"train-loss": loss, "num-examples": len(local), ATTACKER: float(attacker)}
    return _model_reply(msg, state, metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local partition."""
    from task.train import evaluate as evaluate_locally

    _, _, local, model, device = _local_setup(msg, context)
    loss, accuracy = evaluate_locally(model, local, device)
    metrics = MetricRecord({"eval-loss": loss, "eval-acc": accuracy, "num-examples": len(local)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


LOCAL_PROBES = 16
"""Own images an attacker with ``needs_local_probes`` computes heat maps on."""


def local_probes(local: ImageData, attack: Attack) -> torch.Tensor | None:
    """The first ``LOCAL_PROBES`` images of the partition for an attack that needs them."""
    import torch

    if not attack.needs_local_probes:
        return None
    return local.as_float(torch.arange(min(LOCAL_PROBES, len(local))))


def eavesdropped_round(msg: Message) -> tuple[ConfigRecord, dict, tuple[dict, ...],
                                               tuple[float, ...]]:
    """A ``train.attack`` message's config, global model, forwarded benign uploads and their
    sizes, checked: ``ValueError`` naming the record or field that is missing or does not fit
    (each upload must hold the global model's arrays, in their shapes)."""
    content = msg.content
    missing = [name for name in ("config", "arrays") if name not in content]
    if missing:
        raise ValueError(f"train.attack message has no {' or '.join(map(repr, missing))} record")
    settings = content["config"]
    for field in ("server-round", "num-benign", "claimed-train-loss", "claimed-num-examples"):
        if field not in settings:
            raise ValueError(f"train.attack message's config has no {field!r}")
    global_state = {k: v.numpy() for k, v in content["arrays"].items()}
    benign = []
    for i in range(int(settings["num-benign"])):
        if f"benign-{i}" not in content:
            raise ValueError(f"train.attack message has no 'benign-{i}' record "
                             f"(num-benign={settings['num-benign']})")
        upload = {k: v.numpy() for k, v in content[f"benign-{i}"].items()}
        if {k: v.shape for k, v in upload.items()} != {k: v.shape for k, v in global_state.items()}:
            raise ValueError(f"train.attack message's 'benign-{i}' does not hold the global "
                             f"model's arrays in their shapes")
        benign.append(upload)
    sizes = tuple(float(n) for n in settings.get("benign-num-examples", []))
    if sizes and len(sizes) != len(benign):
        raise ValueError(f"train.attack message has {len(sizes)} benign-num-examples for "
                         f"{len(benign)} benign uploads")
    return settings, global_state, tuple(benign), sizes


@app.train("attack")
def attack_with_eavesdropped_uploads(msg: Message, context: Context) -> Message:
    """Second message of an attacker's round: craft the upload from the benign uploads the
    harness forwarded (``benign-<i>``) and the global model (``arrays``)."""
    import numpy as np
    import torch

    from attacks import ATTACKS, AttackInput, build_attack
    from task.params import median_integer_arrays

    torch.set_num_threads(1)
    config = RunConfig.from_run_config(context.run_config)
    partition_id, _ = node_partition(context)
    attacker = is_attacker(context, config.num_attackers)
    if not (attacker and ATTACKS.get(config.attack).needs_benign_uploads):
        raise ValueError(f"train.attack message to a node that crafts nothing from benign "
                         f"uploads (attack={config.attack!r}, role "
                         f"{'attacker' if attacker else 'benign'})")
    settings, global_state, benign, sizes = eavesdropped_round(msg)
    probes = None
    if ATTACKS.get(config.attack).needs_local_probes:
        config, partition_id, local, model, _ = _local_setup(msg, context)
        attack = build_attack(config, model)
        probes = local_probes(local, attack)
    else:
        attack = build_attack(config)
    server_round = int(settings["server-round"])
    seed = training_seed(config, server_round, partition_id)
    state = attack.craft(
        AttackInput(global_state, global_state, np.random.default_rng(seed), benign, sizes, probes,
                    server_round)
    )
    # batch counters as the benign uploads carry them (the global model's would give it away)
    state = {**state, **median_integer_arrays(benign, global_state)}
    # The fields of a benign reply: the median benign data size and training loss of the round.
    metrics = {"train-loss": float(settings["claimed-train-loss"]),
               "num-examples": int(settings["claimed-num-examples"]), ATTACKER: 1.0}
    return _model_reply(msg, state, metrics)


@app.query("faa_dl_verify")
def faa_dl_verify(msg: Message, context: Context) -> Message:
    """FAA-DL's anomaly verification, client side (Algorithm 1, lines 6-9): answer with the
    data this round's training used, its rows through the linear AONT and the last row
    IPFE-encrypted under the received master public key, and the shuffling seed.

    An attacker answers with its real data (the paper's attackers), or with
    ``faa-dl-attacker-response = "forged-data"`` lies: it claims its labels shifted by one
    class, which it did not train on.
    """
    import numpy as np
    from flwr.app import Array

    from crypto.encrypted_images import encrypt_images
    from crypto.ipfe import MasterPublicKey

    config, partition_id, local = _local_data(context)
    settings = msg.content["config"]
    attacker = is_attacker(context, config.num_attackers)
    local = _training_data(local, config, attacker)  # what this round's training used
    labels = local.labels.numpy()
    if attacker and config.faa_dl_attacker_response == "forged-data":
        labels = (labels + 1) % local.num_classes
    encrypted = encrypt_images(local.images.numpy(), MasterPublicKey.from_bytes(settings["mpk"]),
                               int(settings["aont-lambda"]))
    content = RecordDict({
        "data": ArrayRecord({"masked-rows": Array(encrypted.masked_rows),
                             "labels": Array(np.ascontiguousarray(labels, dtype=np.int64))}),
        "encrypted": ConfigRecord({
            "ciphertexts": encrypted.ciphertexts,
            "train-seed": training_seed(config, int(settings["server-round"]), partition_id),
        }),
    })
    return Message(content, reply_to=msg)
