"""VLoRPAdam (os, ss) and VLoRPSGD against the float64 reference."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import Case, relative_error, run_case, unit_length
from vlorp_lightning import VLoRPAdam, VLoRPSGD

TOLERANCE = 1e-5
KINDS = ["os", "ss", "sgd"]

LAYOUTS = [
    pytest.param(2, "right", id="right-c2"),
    pytest.param("1/2", "right", id="right-c1/2"),
    pytest.param(2, "left", id="left-c2"),
    pytest.param("1/3", "left", id="left-c1/3"),
]


def assert_matches(case: Case, seed: int = 0) -> None:
    results = run_case(case, torch.Generator().manual_seed(seed))
    for name, (actual, expected) in results.items():
        assert float(expected.norm()) > 0, f"{name}: the reference did not move"
        error = relative_error(actual, expected)
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e} of the update for {case}"


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("granularity, orientation", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_scheme_first_steps(kind, granularity, orientation, steps):
    assert_matches(Case(kind, (8, 6), granularity, 2, orientation, steps=steps, gap=10))


@pytest.mark.parametrize("momentum_transfer", [False, True], ids=["keep", "transfer"])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("granularity, orientation", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_scheme_across_refreshes(kind, granularity, orientation, rank, momentum_transfer):
    case = Case(
        kind, (8, 6), granularity, rank, orientation, steps=5, gap=2,
        weight_decay=0.1, momentum_transfer=momentum_transfer,
    )  # fmt: skip
    assert_matches(case)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("orientation", ["right", "left"])
def test_sgd_momentum(orientation, momentum):
    case = Case("sgd", (8, 6), 2, 2, orientation, steps=5, gap=2, weight_decay=0.1, momentum=momentum)
    assert_matches(case)


@pytest.mark.parametrize("distribution", ["rademacher", "orthonormal", "svd"])
@pytest.mark.parametrize("kind", KINDS)
def test_scheme_distributions(kind, distribution):
    case = Case(kind, (8, 6), 1, 2, "left", distribution, steps=5, gap=2, weight_decay=0.1, momentum_transfer=True)
    assert_matches(case)


@pytest.mark.parametrize("orientation", ["right", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_scheme_full_rank_with_transfer(kind, orientation):
    # c = 1 and r = d make the subspace shape equal to the weight shape; the os moments
    # live in the original space and must not be moved by momentum transfer.
    shape = (6, 6)
    case = Case(kind, shape, 1, 6, orientation, "orthonormal", steps=5, gap=2, momentum_transfer=True)
    assert_matches(case)


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(KINDS))
    n, m = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    orientation = draw(st.sampled_from(["right", "left"]))
    projected, other = (m, n) if orientation == "right" else (n, m)
    if draw(st.booleans()):
        k = draw(st.sampled_from([d for d in range(1, other + 1) if other % d == 0]))
        granularity = 1 if k == 1 else f"1/{k}"
    else:
        granularity = draw(st.sampled_from([d for d in range(1, projected + 1) if projected % d == 0]))
    rank = draw(st.integers(1, unit_length((n, m), Fraction(granularity), orientation)))
    return Case(
        kind,
        (n, m),
        granularity,
        rank,
        orientation,
        distribution=draw(st.sampled_from(["normal", "rademacher", "orthonormal"])),
        steps=3,
        gap=2,
        weight_decay=draw(st.sampled_from([0.0, 0.1])),
        momentum_transfer=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.0, 0.9])),
    )


@settings(max_examples=25, deadline=None)
@given(case=cases(), seed=st.integers(0, 2**31))
def test_scheme_random_shapes(case, seed):
    assert_matches(case, seed)


def test_adam_state_shapes():
    for scheme, expected in (("os", (8, 6)), ("ss", (16, 2))):
        weight = torch.nn.Parameter(torch.randn(8, 6))
        optimizer = VLoRPAdam([{"params": [weight], "rank": 2, "granularity": 2, "orientation": "right"}], scheme=scheme)
        (weight * torch.randn(8, 6)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert optimizer.state[weight]["exp_avg"].shape == expected
        assert optimizer.state[weight]["exp_avg_sq"].shape == expected


def test_sgd_without_momentum_keeps_no_buffer():
    weight = torch.nn.Parameter(torch.randn(8, 6))
    optimizer = VLoRPSGD([{"params": [weight], "rank": 2}], lr=0.1)
    (weight * torch.randn(8, 6)).sum().backward()
    optimizer.step()
    assert "exp_avg" not in optimizer.state[weight]
