"""Model replacement (Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How to backdoor federated
learning", AISTATS 2020, section 4.2): the attacker scales its update so that the average
becomes the model it wants.

With n clients and server learning rate eta = 1 (FedAvg), uploading
X~ = gamma (X - G) + G with gamma = n / eta makes the round's average about X, whatever the
others upload (their updates nearly cancel as the model converges). The untargeted target
model X here is the honest local step reversed, X = G - (w - G): the one-shot replacement of
the global model by one that unlearns what the round taught. ``round`` picks the one round of
the attack (0: every round); in other rounds the attacker uploads its honest model. BatchNorm's
running statistics stay the attacker's own: boosted, a variance turns negative, which no
screening lets through.
"""

from __future__ import annotations

from attacks.base import ATTACKS, Attack, AttackInput, with_own_statistics
from task.params import State, flatten_updates, unflatten


@ATTACKS.register
class ModelReplacement(Attack):
    """Upload G - gamma (w - G) in the attack round(s): the reversed honest update boosted by
    gamma (default: the number of clients a round averages)."""

    name = "model-replacement"

    def __init__(self, boost: float, attack_round: int = 0) -> None:
        if not boost > 0:
            raise ValueError(f"model-replacement boost must be > 0, got {boost}")
        self.boost, self.attack_round = boost, attack_round

    @classmethod
    def from_config(cls, config, model=None):
        return cls(config.model_replacement_boost or float(config.clients_a_round),
                   config.model_replacement_round)

    def attacks_in(self, server_round: int) -> bool:
        return self.attack_round == 0 or server_round == self.attack_round

    def craft(self, attack_input: AttackInput) -> State:
        own, global_state = attack_input.own_state, attack_input.global_state
        if not self.attacks_in(attack_input.server_round):
            return own
        updates, names = flatten_updates([own], global_state)
        return with_own_statistics(
            unflatten(-self.boost * updates[0], names, global_state, buffers=own), own)
