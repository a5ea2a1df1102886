"""Checkpoint round trips: a resumed run must equal the uninterrupted run bit for bit."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn

from vlorp_lightning import ProjFactor, VLoRPAdam, VLoRPSGD

MICRO_BATCHES = 4
BATCH = 8
GAP = 2

CONFIGS = [
    pytest.param("projfactor", "normal", id="projfactor-normal"),
    pytest.param("projfactor", "orthonormal", id="projfactor-orthonormal"),
    pytest.param("projfactor", "svd", id="projfactor-svd"),
    pytest.param("ss", "normal", id="ss-normal"),
    pytest.param("os", "svd", id="os-svd"),
    pytest.param("sgd", "rademacher", id="sgd-rademacher"),
]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4, bias=False))


def make_optimizer(kind: str, distribution: str, model: nn.Module) -> torch.optim.Optimizer:
    groups = [
        {"params": [model[0].weight], "names": ["w0"], "rank": 2, "granularity": "1/2"},
        {"params": [model[2].weight], "names": ["w2"], "rank": 3, "granularity": 2},
        {"params": [model[0].bias], "names": ["b0"], "rank": None},
    ]
    common = dict(update_proj_gap=GAP, distribution=distribution, seed=11, momentum_transfer=True)
    if kind == "sgd":
        return VLoRPSGD(groups, lr=0.05, momentum=0.9, weight_decay=0.01, **common)
    if kind in ("os", "ss"):
        return VLoRPAdam(groups, lr=0.01, weight_decay=0.01, scheme=kind, **common)
    return ProjFactor(groups, lr=0.01, weight_decay=0.01, **common)


def make_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 6, generator=generator), torch.randn(BATCH, 4, generator=generator)) for _ in range(steps)]


def micro_batches(batch):
    inputs, targets = batch
    return list(zip(inputs.chunk(MICRO_BATCHES), targets.chunk(MICRO_BATCHES)))


def backward(model: nn.Module, micro_batch) -> None:
    inputs, targets = micro_batch
    (nn.functional.mse_loss(model(inputs), targets) / MICRO_BATCHES).backward()


def train(model, optimizer, batches) -> None:
    for batch in batches:
        for micro_batch in micro_batches(batch):
            backward(model, micro_batch)
        optimizer.step()
        optimizer.zero_grad()


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # Dense gradients of an unfinished window live in p.grad, outside the optimizer state.
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "grads": grads}, path)


def restore(path: Path, kind: str, distribution: str):
    checkpoint = torch.load(path, weights_only=True)
    model = make_model()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # make sure the weights really come from the checkpoint
    model.load_state_dict(checkpoint["model"])
    for name, param in model.named_parameters():
        param.grad = checkpoint["grads"].get(name)
    optimizer = make_optimizer(kind, distribution, model)
    optimizer.load_state_dict(checkpoint["optimizer"])
    return model, optimizer


def assert_identical(model, optimizer, expected_model, expected_optimizer) -> None:
    for (name, param), expected in zip(model.named_parameters(), expected_model.parameters()):
        assert torch.equal(param, expected), f"parameter {name} differs"
    for param, expected in zip(model.parameters(), expected_model.parameters()):
        state, expected_state = optimizer.state[param], expected_optimizer.state[expected]
        name = optimizer.param_name(param)
        assert state.keys() == expected_state.keys(), name
        for key, value in expected_state.items():
            assert torch.equal(state[key], value), f"state {name}/{key} differs"
    assert optimizer.global_step == expected_optimizer.global_step
    assert optimizer.last_grad_norm == expected_optimizer.last_grad_norm


@pytest.mark.parametrize("kind, distribution", CONFIGS)
def test_resume_equals_uninterrupted(tmp_path, kind, distribution):
    batches = make_batches(6)
    expected_model = make_model()
    expected_optimizer = make_optimizer(kind, distribution, expected_model)
    train(expected_model, expected_optimizer, batches)

    model = make_model()
    optimizer = make_optimizer(kind, distribution, model)
    train(model, optimizer, batches[:3])
    save(tmp_path / "step3.pt", model, optimizer)
    del model, optimizer

    model, optimizer = restore(tmp_path / "step3.pt", kind, distribution)
    assert optimizer.global_step == 3
    train(model, optimizer, batches[3:])
    assert_identical(model, optimizer, expected_model, expected_optimizer)


@pytest.mark.parametrize("kind, distribution", CONFIGS)
def test_resume_inside_accumulation_window(tmp_path, kind, distribution):
    batches = make_batches(5)
    expected_model = make_model()
    expected_optimizer = make_optimizer(kind, distribution, expected_model)
    train(expected_model, expected_optimizer, batches)

    model = make_model()
    optimizer = make_optimizer(kind, distribution, model)
    train(model, optimizer, batches[:3])
    window = micro_batches(batches[3])
    for micro_batch in window[:2]:
        backward(model, micro_batch)
    save(tmp_path / "mid-window.pt", model, optimizer)
    del model, optimizer

    model, optimizer = restore(tmp_path / "mid-window.pt", kind, distribution)
    for micro_batch in window[2:]:
        backward(model, micro_batch)
    optimizer.step()
    optimizer.zero_grad()
    train(model, optimizer, batches[4:])
    assert_identical(model, optimizer, expected_model, expected_optimizer)


def _leaves(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def test_state_holds_only_tensors():
    model = make_model()
    optimizer = make_optimizer("projfactor", "svd", model)
    train(model, optimizer, make_batches(1))
    state = optimizer.state_dict()["state"]
    assert state, "the optimizer kept no state"
    assert all(torch.is_tensor(leaf) for leaf in _leaves(state))


@pytest.mark.parametrize("granularity", [Fraction(1, 2), 0.5, "1/2", 2, Fraction(2)])
def test_state_dict_loads_weights_only(tmp_path, granularity):
    weight = nn.Parameter(torch.randn(8, 6))
    optimizer = ProjFactor([{"params": [weight], "rank": 2, "granularity": granularity}], update_proj_gap=1)
    for _ in range(2):
        (weight * torch.randn(8, 6)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    loaded = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    restored = ProjFactor([{"params": [nn.Parameter(weight.detach().clone())], "rank": 2, "granularity": granularity}])
    restored.load_state_dict(loaded)
    assert restored.global_step == 2
    assert restored.projector_for(restored.param_groups[0]["params"][0]).refresh_count == 1


def test_load_rejects_other_seed():
    weight = nn.Parameter(torch.randn(8, 6))
    optimizer = ProjFactor([{"params": [weight], "rank": 2}], seed=1)
    other = ProjFactor([{"params": [nn.Parameter(weight.detach().clone())], "rank": 2}], seed=2)
    with pytest.raises(ValueError, match=r"seed=1 .* seed=2"):
        other.load_state_dict(optimizer.state_dict())
