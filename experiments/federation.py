"""The rounds ``flwr run`` runs, in one process and without Flower's messaging: one loop for the
benchmarks and the tests, so that what they measure is what a run does.

It follows the apps' code paths, piece by piece:
- ``LocalFederation`` is the data side: the ServerApp's seeding (``torch.manual_seed(seed)``,
  then the data, then the initial model), the clients' partitions (``task.partition``), and
  a client's training as the ClientApp trains it (on its device, ``pick_device``; one
  intra-op thread, shuffled by ``client_app.app.training_seed``);
- ``client_uploads`` is the clients and the harness: benign clients train; an attacker trains
  on what its attack's ``poison`` makes of its partition and uploads what ``craft`` makes of
  its own model (``np.random.default_rng(training_seed)``, its ``local_probes``), or, for an
  attack that ``needs_benign_uploads``, crafts from the global model and this round's benign
  uploads in the order ``server_app.eavesdrop`` forwards them (``task.params.content_key``),
  and claims their median size;
- ``screen`` is what ``strategies.validation.screen_replies`` does to decoded uploads: an
  upload with NaN/Inf, an impossible buffer or an absurd norm is rejected
  (``values_problem``); no claim counts for more than ``MAX_WEIGHT_SHARE`` / K of the
  round's (``bound_claims``), and they come in the order of their content, then node id;
- ``play_round`` is the strategy's ``aggregate_train`` on them: ``decide`` (``detect``, or
  no decision with too few uploads or a failing rule), the claims bounded again among the
  kept uploads, then ``round_end_state`` of these;
- ``run_rounds`` chains the rounds from the initial model and yields each ``Round``.

The last ``num-attackers`` clients attack, as in a simulation; a client's node id is its
partition id. Round 1's benign training does not depend on the defense or the attack, so a
``LocalFederation`` does it once per client and training setting.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from attacks import AttackInput, build_attack
from client_app.app import local_probes, training_seed
from server_app.defenses import build_defense, server_assets
from server_app.eavesdrop import claimed_size
from strategies.detection.autoencoder import torch_threads
from strategies.records import ClientUpload, Detection
from strategies.validation import (MAX_UPDATE_RATIO, bound_claims, float_norm, in_order,
                                    values_problem)
from task.config import RunConfig
from task.data import load_federated_data
from task.models import build_model
from task.params import content_key
from task.partition import client_indices
from task.train import evaluate, load_numpy_state, pick_device, state_to_numpy, train

if TYPE_CHECKING:
    from attacks import Attack
    from strategies.base import DetectingFedAvg
    from task.data import ImageData

State = dict[str, np.ndarray]
OnCraft = Callable[["Attack", int, State, float], None]
"""Called after each craft with the attack, the attacker, its crafted state and the seconds
``craft`` took (what an attack reports about its last craft can be read then)."""

FEDERATION_KEYS = ("dataset", "model", "partitioning", "dirichlet_alpha", "num_clients", "seed")
"""The run-config keys a ``LocalFederation`` is built for: its data, partitions and model."""
TRAINING_KEYS = ("local_epochs", "batch_size", "learning_rate", "weight_decay", "seed")
"""The keys a client's training depends on besides the model it starts from and its data."""


class LocalFederation:
    """The test data, the clients' partitions and the initial model of ``config``'s run, built
    in the ServerApp's order; trains clients as the ClientApp does."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)  # as the ServerApp: seed, data, model
        self.data = load_federated_data(config.dataset, config.seed)
        self.test = self.data.test
        self.initial = state_to_numpy(self.model_fn())
        labels = self.data.train.labels.numpy()
        self.partitions = [
            self.data.train.subset(client_indices(labels, c, config.num_clients,
                                                  config.partitioning, config.dirichlet_alpha,
                                                  config.seed))
            for c in range(config.num_clients)]
        self.device = pick_device()  # the ClientApp's and the ServerApp's
        self._model = self.model_fn()
        self._first_round: dict[tuple, State] = {}

    def model_fn(self) -> torch.nn.Module:
        """A fresh model of the run's architecture."""
        test = self.test
        return build_model(self.config.model, test.in_channels, test.num_classes, test.image_size)

    def check(self, config: RunConfig) -> None:
        """``ValueError`` unless ``config`` runs on this federation's data and partitions."""
        differ = [k for k in FEDERATION_KEYS if getattr(config, k) != getattr(self.config, k)]
        if differ:
            raise ValueError(f"the run config differs from the federation's in {differ}")
        if config.clients_per_round:  # ALIE's and model replacement's n would be the sample's
            raise ValueError("the in-process rounds send every round to every client: "
                             "clients-per-round is for flwr run")

    def attackers(self, config: RunConfig) -> frozenset[int]:
        """The clients that attack: the last ``num_attackers``, as in a simulation."""
        n = self.config.num_clients
        return frozenset(range(n - config.num_attackers, n))

    def train_client(self, config: RunConfig, global_state: State, server_round: int,
                     client: int, local: ImageData | None = None) -> State:
        """``client``'s model after local training from ``global_state`` on ``local`` (its
        partition by default), seeded as the ClientApp seeds it."""
        local = self.partitions[client] if local is None else local
        key = (client, *(getattr(config, k) for k in TRAINING_KEYS))
        cacheable = (server_round == 1 and global_state is self.initial
                     and local is self.partitions[client])
        if cacheable and key in self._first_round:
            return self._first_round[key]
        load_numpy_state(self._model, global_state)
        with torch_threads(1):  # as the ClientApp: the states do not depend on the machine
            train(self._model, local, epochs=config.local_epochs, batch_size=config.batch_size,
                  learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                  device=self.device, seed=training_seed(config, server_round, client))
        state = state_to_numpy(self._model)
        if cacheable:
            self._first_round[key] = state
        return state

    def accuracy(self, state: State) -> float:
        """Test accuracy of ``state`` on the server's held-out data."""
        load_numpy_state(self._model, state)
        return evaluate(self._model, self.test, self.device)[1]


def _craft(attack: Attack, attack_input: AttackInput, client: int,
           on_craft: OnCraft | None) -> State:
    started = time.perf_counter()
    state = attack.craft(attack_input)
    if on_craft is not None:
        on_craft(attack, client, state, time.perf_counter() - started)
    return state


def client_uploads(federation: LocalFederation, config: RunConfig, attack: Attack,
                   global_state: State, server_round: int, attackers: Collection[int],
                   on_craft: OnCraft | None = None) -> tuple[list[ClientUpload], list[ClientUpload]]:
    """This round's uploads, and the benign ones in the order the harness forwards them to
    eavesdropping attackers (their sizes as the clients reported them)."""
    uploads, benign = [], []
    eavesdropping = attack.needs_benign_uploads
    for client in range(federation.config.num_clients):
        if client in attackers and eavesdropping:
            continue  # crafts once the benign uploads are in
        local = federation.partitions[client]
        if client in attackers:
            local = attack.poison(local)
        state = federation.train_client(config, global_state, server_round, client, local)
        upload = ClientUpload(client, state, float(len(local)))
        if client in attackers:
            rng = np.random.default_rng(training_seed(config, server_round, client))
            state = _craft(attack, AttackInput(global_state, state, rng,
                                               probes=local_probes(local, attack),
                                               server_round=server_round), client, on_craft)
            upload = ClientUpload(client, state, float(len(local)))
        else:
            benign.append(upload)
        uploads.append(upload)
    benign.sort(key=lambda u: (content_key(u.arrays), u.node_id))  # server_app.eavesdrop's order
    if eavesdropping and attackers:
        states = tuple(u.arrays for u in benign)
        sizes = tuple(u.num_examples for u in benign)
        claimed = float(claimed_size(sizes))
        for client in sorted(attackers):
            rng = np.random.default_rng(training_seed(config, server_round, client))
            probes = local_probes(federation.partitions[client], attack)
            state = _craft(attack, AttackInput(global_state, global_state, rng, states, sizes,
                                               probes, server_round), client, on_craft)
            uploads.append(ClientUpload(client, state, claimed))
    return uploads, benign


def screen(uploads: list[ClientUpload], global_state: State,
           max_update_ratio: float = MAX_UPDATE_RATIO
           ) -> tuple[list[ClientUpload], dict[int, str]]:
    """The uploads as ``screen_replies`` hands decoded ones to the strategy, and the rejected
    ones' reasons: those ``values_problem`` rejects left out, the others' claims bounded, in
    the order of their content (``in_order``)."""
    norm = float_norm(global_state)
    rejected = {u.node_id: problem for u in uploads
                if (problem := values_problem(u.arrays, global_state, max_update_ratio, norm))}
    return in_order([u for u in uploads if u.node_id not in rejected])[0], rejected


@dataclasses.dataclass
class Round:
    """One round as the strategy decided it."""

    server_round: int
    global_state: State
    """The model the clients received."""
    uploads: list[ClientUpload]
    """What the strategy received, in its order, with the claims it counts."""
    benign: list[ClientUpload]
    """The benign uploads as the harness forwards them to eavesdropping attackers."""
    attackers: frozenset[int]
    detection: Detection
    kept: list[ClientUpload]
    """The uploads aggregated, claims bounded among them (none: the round keeps
    ``global_state``)."""
    new_global_state: State
    """The model the round ends with."""
    rejected: dict[int, str] = dataclasses.field(default_factory=dict)
    """{node id: reason} of the uploads the screening or the strategy rejected."""

    @property
    def truth(self) -> dict[int, bool]:
        """{node id: attacker} of every upload, rejected ones included."""
        return {n: n in self.attackers for n in [u.node_id for u in self.uploads] + [*self.rejected]}

    @property
    def excluded(self) -> set[int]:
        """The node ids of the screened uploads the strategy did not keep (as the round's
        record: its rejections are in ``rejected``)."""
        return {u.node_id for u in self.uploads} - set(self.detection.kept) - set(self.rejected)

    @property
    def crafted(self) -> list[ClientUpload]:
        """The attackers' uploads, in the strategy's order."""
        return [u for u in self.uploads if u.node_id in self.attackers]


def play_round(federation: LocalFederation, config: RunConfig, strategy: DetectingFedAvg,
               attack: Attack, global_state: State, server_round: int,
               drop_attackers: bool = False, on_craft: OnCraft | None = None) -> Round:
    """One round: the clients' uploads, the strategy's decision and the aggregate of the kept
    uploads. ``drop_attackers`` drops the attackers' uploads whatever the strategy decides (a
    control: a perfect round)."""
    attackers = federation.attackers(config)
    uploads, benign = client_uploads(federation, config, attack, global_state, server_round,
                                     attackers, on_craft)
    uploads, rejected = screen(uploads, global_state, strategy.max_update_ratio)
    strategy.global_state = global_state
    detection = strategy.decide(server_round, uploads)
    rejected.update(detection.rejected)
    decided = [u for u in uploads if u.node_id not in detection.rejected]
    kept_ids = set(detection.kept) - set(rejected) - (attackers if drop_attackers else set())
    kept, _ = bound_claims([u for u in decided if u.node_id in kept_ids])  # as aggregate_train
    new_state = global_state
    if kept:
        new_state = {k: np.asarray(v, order="C")
                     for k, v in strategy.round_end_state(detection, kept, decided).items()}
    return Round(server_round, global_state, uploads, benign, attackers, detection, kept,
                 new_state, rejected)


def run_rounds(federation: LocalFederation, config: RunConfig, rounds: int | None = None, *,
               oracle_rounds: Collection[int] = (), on_craft: OnCraft | None = None,
               strategy: DetectingFedAvg | None = None, attack: Attack | None = None
               ) -> Iterator[Round]:
    """``rounds`` rounds (``config.num_server_rounds`` by default) of ``config``'s defense
    and attack from the initial model, as ``flwr run`` runs them; ``strategy`` and ``attack``
    are built from ``config`` unless given. In the ``oracle_rounds`` the attackers' uploads are
    dropped whatever the defense decides."""
    federation.check(config)
    if strategy is None:
        strategy = build_defense(config, server_assets(config, federation.test))
    if attack is None:
        attack = build_attack(config, federation.model_fn())
    global_state = federation.initial
    for server_round in range(1, (rounds or config.num_server_rounds) + 1):
        played = play_round(federation, config, strategy, attack, global_state, server_round,
                            server_round in oracle_rounds, on_craft)
        yield played
        global_state = played.new_global_state
