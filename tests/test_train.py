"""Local training lowers the loss and takes torch.optim.Adam's steps; evaluation reports loss
and accuracy."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import task.train
from task.data import load_federated_data
from task.models import build_model
from task.train import Adam, evaluate, load_numpy_state, state_to_numpy, train


def test_training_lowers_loss_and_raises_accuracy():
    torch.manual_seed(0)
    data = load_federated_data("mnist-embedded", 0)
    local = data.train.subset(np.arange(512))
    model = build_model("cnn", 1, 10, 28)
    device = torch.device("cpu")
    loss_before, acc_before = evaluate(model, data.test, device)
    train(model, local, epochs=2, batch_size=64, learning_rate=1e-3, weight_decay=0.0,
          device=device, seed=0)
    loss_after, acc_after = evaluate(model, data.test, device)
    assert loss_after < loss_before - 0.5
    assert acc_after > 0.7 > acc_before


def test_state_round_trip():
    model = build_model("resnet18", 3, 10, 32)
    state = state_to_numpy(model)
    other = build_model("resnet18", 3, 10, 32)
    load_numpy_state(other, state)
    for k, v in other.state_dict().items():
        assert np.array_equal(v.numpy(), state[k])


def torch_adam(params, lr: float, weight_decay: float) -> torch.optim.Adam:
    """The oracle: the optimizer ``task.train.Adam`` stands in for."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_training_takes_torch_adams_steps_to_the_last_bit(monkeypatch, weight_decay):
    """Two epochs of ``train`` end in the same state, bit for bit, with ``task.train.Adam`` as
    with ``torch.optim.Adam`` (what the results recorded before it was written were made with)."""
    data = load_federated_data("mnist-embedded", 0)
    local = data.train.subset(np.arange(300))
    states, losses = [], []
    for optimizer in (Adam, torch_adam):
        monkeypatch.setattr(task.train, "Adam", optimizer)
        torch.manual_seed(3)
        model = build_model("cnn", 1, 10, 28)
        losses.append(train(model, local, epochs=2, batch_size=64, learning_rate=1e-3,
                            weight_decay=weight_decay, device=torch.device("cpu"), seed=5))
        states.append(model.state_dict())
    assert losses[0] == losses[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[1])


def test_adam_leaves_a_parameter_without_a_gradient_as_torch_adam_does():
    """A parameter that gets no gradient in a step is left alone and its state not started
    (its first step later is its step 1), as ``torch.optim.Adam`` does."""
    results = []
    for make in (Adam, torch_adam):
        torch.manual_seed(0)
        used, unused = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
        optimizer = make([used, unused], lr=0.1, weight_decay=0.01)
        for step in range(4):
            optimizer.zero_grad()
            loss = (used ** 2).sum() + ((unused ** 3).sum() if step >= 2 else 0.0)
            loss.backward()
            optimizer.step()
        results.append((used.detach().clone(), unused.detach().clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_fresh_process_trains_without_importing_torch_dynamo():
    """What ``task.train.Adam`` is for: in a deployment every message starts a ClientApp
    process, and ``torch.optim``'s optimizers import ``torch._dynamo`` (seconds) when used."""
    code = ("import sys, numpy as np, torch\n"
            "from task.data import load_federated_data\n"
            "from task.models import build_model\n"
            "from task.train import train\n"
            "local = load_federated_data('mnist-embedded', 0).train.subset(np.arange(64))\n"
            "train(build_model('cnn', 1, 10, 28), local, epochs=1, batch_size=32,\n"
            "      learning_rate=1e-3, weight_decay=0.0, device=torch.device('cpu'), seed=0)\n"
            "print('torch._dynamo' in sys.modules)\n")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert ran.stdout.strip() == "False", ran.stdout + ran.stderr
