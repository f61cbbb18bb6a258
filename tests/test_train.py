"""Local training lowers the loss; evaluation reports loss and accuracy."""

import numpy as np
import torch

from task.data import load_federated_data
from task.models import build_model
from task.train import evaluate, load_numpy_state, state_to_numpy, train


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
