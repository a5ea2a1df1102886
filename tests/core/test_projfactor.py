"""ProjFactor against the float64 reference, and its dense groups against torch.optim.AdamW."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import Case, relative_error, run_case, unit_length
from vlorp_lightning import ProjFactor

TOLERANCE = 1e-5

# Shape (8, 6) admits integer and 1/k granularities in both orientations with rank up to 3.
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
def test_projfactor_first_steps(granularity, orientation, steps):
    assert_matches(Case("projfactor", (8, 6), granularity, 2, orientation, steps=steps, gap=10))


@pytest.mark.parametrize("momentum_transfer", [False, True], ids=["keep", "transfer"])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("granularity, orientation", LAYOUTS)
def test_projfactor_across_refreshes(granularity, orientation, rank, momentum_transfer):
    case = Case(
        "projfactor", (8, 6), granularity, rank, orientation, steps=5, gap=2,
        weight_decay=0.1, momentum_transfer=momentum_transfer,
    )  # fmt: skip
    assert_matches(case)


@pytest.mark.parametrize("shape", [(4, 8), (8, 4), (6, 6)])
def test_projfactor_auto_orientation(shape):
    assert_matches(Case("projfactor", shape, 2, 2, "auto", steps=5, gap=2, weight_decay=0.1))


@pytest.mark.parametrize("distribution", ["rademacher", "orthonormal", "svd"])
@pytest.mark.parametrize("orientation", ["right", "left"])
def test_projfactor_distributions(distribution, orientation):
    case = Case(
        "projfactor", (8, 6), 1, 2, orientation, distribution, steps=5, gap=2,
        weight_decay=0.1, momentum_transfer=True,
    )  # fmt: skip
    assert_matches(case)


@pytest.mark.parametrize("scale", [0.25, 4.0])
def test_projfactor_scale(scale):
    assert_matches(Case("projfactor", (8, 6), 2, 2, "right", steps=5, gap=2, scale=scale, momentum_transfer=True))


@pytest.mark.parametrize("distribution", ["orthonormal", "svd"])
def test_projfactor_full_rank(distribution):
    # r equals the unit length: nothing is compressed, the reference still applies exactly.
    assert_matches(Case("projfactor", (4, 6), 1, 6, "right", distribution, steps=5, gap=2, momentum_transfer=True))


@st.composite
def cases(draw, kind: str):
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
    )


@settings(max_examples=25, deadline=None)
@given(case=cases("projfactor"), seed=st.integers(0, 2**31))
def test_projfactor_random_shapes(case, seed):
    assert_matches(case, seed)


def test_projfactor_dense_group_is_adamw():
    generator = torch.Generator().manual_seed(4)
    initial = torch.randn(5, 3, generator=generator)
    ours = torch.nn.Parameter(initial.clone())
    theirs = torch.nn.Parameter(initial.clone())
    settings_ = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05)
    optimizer = ProjFactor([ours], **settings_)
    adamw = torch.optim.AdamW([theirs], foreach=False, **settings_)
    assert not optimizer.is_projected(ours)
    for _ in range(4):
        grad = torch.randn(5, 3, generator=generator)
        (ours * grad).sum().backward()
        theirs.grad = grad.clone()
        optimizer.step()
        adamw.step()
        optimizer.zero_grad()
        assert relative_error(ours.detach() - initial, theirs.detach() - initial) <= 1e-6
        torch.testing.assert_close(optimizer.state[ours]["exp_avg"], adamw.state[theirs]["exp_avg"])
        torch.testing.assert_close(optimizer.state[ours]["exp_avg_sq"], adamw.state[theirs]["exp_avg_sq"])


def test_projfactor_zero_gradient_divides_by_eps():
    weight = torch.nn.Parameter(torch.ones(4, 6))
    optimizer = ProjFactor([{"params": [weight], "rank": 2}], lr=0.1)
    (weight * torch.zeros(4, 6)).sum().backward()
    optimizer.step()
    assert torch.equal(weight.detach(), torch.ones(4, 6))
    assert torch.isfinite(optimizer.state[weight]["exp_avg_row"]).all()
