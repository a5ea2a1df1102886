"""state_bytes against the memory formulas, and the absence of full-size gradients."""

from __future__ import annotations

import gc
import weakref
from fractions import Fraction

import pytest
import torch
from torch import nn

from vlorp_lightning import ProjFactor, VLoRPAdam, VLoRPSGD

# (shape, granularity, orientation, rank)
LAYOUTS = [
    pytest.param((8, 12), 1, "right", 4, id="right-c1"),
    pytest.param((8, 12), 3, "right", 2, id="right-c3"),
    pytest.param((8, 12), "1/4", "right", 5, id="right-c1/4"),
    pytest.param((8, 12), 2, "left", 3, id="left-c2"),
    pytest.param((8, 12), "1/3", "left", 2, id="left-c1/3"),
    pytest.param((16, 6), "1/2", "left", 1, id="tall-left-c1/2"),
    pytest.param((5, 7), 1, "auto", 2, id="auto-odd"),
]
FLOAT32 = 4


def subspace_numel(shape, granularity, orientation, rank) -> int:
    """Elements of one projected tensor: n*c*r (right) or m*c*r (left)."""
    n, m = shape
    c = Fraction(granularity)
    if orientation == "auto":
        orientation = "right" if n <= m else "left"
    return int((n if orientation == "right" else m) * c * rank)


def one_step(optimizer, params) -> None:
    loss = sum((p * torch.randn(p.shape)).sum() for p in params)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("shape, granularity, orientation, rank", LAYOUTS)
def test_projfactor_state_bytes(shape, granularity, orientation, rank):
    weight = nn.Parameter(torch.zeros(shape))
    bias = nn.Parameter(torch.zeros(shape[1]))
    groups = [
        {"params": [weight], "names": ["w"], "rank": rank, "granularity": granularity, "orientation": orientation},
        {"params": [bias], "names": ["b"]},
    ]
    optimizer = ProjFactor(groups)
    one_step(optimizer, [weight, bias])
    # The accumulator of the finished window is kept (zeroed) for the next one.
    numel = subspace_numel(shape, granularity, orientation, rank)
    n, m = shape
    expected = {
        "momentum": numel * FLOAT32,
        "second_moment": (n + m) * FLOAT32,
        "accumulator": numel * FLOAT32,
        "projection": 0,
    }
    expected["total"] = sum(expected.values())
    report = optimizer.state_bytes()
    assert report["w"] == expected
    dense = {"momentum": m * FLOAT32, "second_moment": m * FLOAT32, "accumulator": 0, "projection": 0}
    dense["total"] = 2 * m * FLOAT32
    assert report["b"] == dense
    assert report["total"] == {key: expected[key] + dense[key] for key in expected}


@pytest.mark.parametrize("shape, granularity, orientation, rank", LAYOUTS)
def test_svd_basis_counted(shape, granularity, orientation, rank):
    weight = nn.Parameter(torch.zeros(shape))
    group = {"params": [weight], "names": ["w"], "rank": rank, "granularity": granularity, "orientation": orientation}
    optimizer = ProjFactor([group], distribution="svd")
    one_step(optimizer, [weight])
    # The basis has d rows, d the unit length: m/c (right) or n/c (left).
    n, m = shape
    right = orientation == "right" or (orientation == "auto" and n <= m)
    unit_length = int((m if right else n) / Fraction(granularity))
    assert optimizer.state_bytes()["w"]["projection"] == unit_length * rank * FLOAT32


def test_state_bytes_options():
    shape, rank, granularity = (8, 12), 2, 2
    numel = subspace_numel(shape, granularity, "right", rank)

    def report(optimizer_class, **options):
        weight = nn.Parameter(torch.zeros(shape))
        group = {"params": [weight], "names": ["w"], "rank": rank, "granularity": granularity, "orientation": "right"}
        optimizer = optimizer_class([group], **options)
        one_step(optimizer, [weight])
        return optimizer.state_bytes()["w"]

    uncompressed = report(ProjFactor, compress_gradients=False)
    assert uncompressed["accumulator"] == 0
    assert uncompressed["momentum"] == numel * FLOAT32
    half = report(ProjFactor, state_dtype="bfloat16")
    assert half["momentum"] == numel * 2
    assert half["second_moment"] == (8 + 12) * 2
    assert half["accumulator"] == numel * 2
    original_space = report(VLoRPAdam, scheme="os")
    assert original_space["momentum"] == original_space["second_moment"] == 8 * 12 * FLOAT32
    subspace = report(VLoRPAdam, scheme="ss")
    assert subspace["momentum"] == subspace["second_moment"] == numel * FLOAT32
    assert report(VLoRPSGD, momentum=0.9)["momentum"] == numel * FLOAT32
    plain = report(VLoRPSGD)
    assert plain["momentum"] == 0
    assert plain["total"] == numel * FLOAT32


def test_projfactor_keeps_no_full_size_state():
    shape = (16, 24)
    weight = nn.Parameter(torch.zeros(shape))
    optimizer = ProjFactor([{"params": [weight], "rank": 2, "granularity": 2}], update_proj_gap=1)
    for _ in range(3):
        one_step(optimizer, [weight])
        optimizer.zero_grad()
    for key, value in optimizer.state[weight].items():
        assert value.numel() < weight.numel(), f"state {key} has {value.numel()} elements"


def test_full_gradient_freed_after_backward():
    weight = nn.Parameter(torch.zeros(32, 48))
    seen: list[weakref.ref] = []
    # Registered before the optimizer's hook, so it receives the full gradient first.
    weight.register_post_accumulate_grad_hook(lambda p: seen.append(weakref.ref(p.grad)))
    optimizer = ProjFactor([{"params": [weight], "rank": 2}])
    for _ in range(2):
        (weight * torch.randn(32, 48)).sum().backward()
        gc.collect()
        assert weight.grad is None
        assert seen[-1]() is None, "the full gradient is still referenced after backward"
    optimizer.step()
