"""Tests of VLoRPProjector: projection math, distributions, unbiasedness, seeds and determinism."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import (
    as_fraction,
    parameter_seed,
    project,
    project_back,
    relative_error,
    unfolded_shape,
    unit_length,
)
from vlorp_lightning import ProjFactor, VLoRPProjector, derive_seed, parse_granularity, valid_granularities

REPO_ROOT = Path(__file__).resolve().parents[2]
RANDOM_DISTRIBUTIONS = ["normal", "rademacher", "orthonormal"]

# (shape, granularity, orientation): integer and 1/k granularities in both orientations.
LAYOUTS = [
    pytest.param((8, 6), 1, "right", id="right-c1"),
    pytest.param((8, 6), 2, "right", id="right-c2"),
    pytest.param((8, 6), "1/2", "right", id="right-c1/2"),
    pytest.param((8, 6), "1/4", "right", id="right-c1/4"),
    pytest.param((8, 6), 2, "left", id="left-c2"),
    pytest.param((8, 6), "1/3", "left", id="left-c1/3"),
]


def divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]


def library_granularity(c: Fraction) -> int | str:
    return c.numerator if c.denominator == 1 else f"1/{c.denominator}"


@st.composite
def layouts(draw):
    """Random (shape, c, orientation, rank) whose reshape exists."""
    n = draw(st.integers(1, 12))
    m = draw(st.integers(1, 12))
    orientation = draw(st.sampled_from(["right", "left"]))
    projected, other = (m, n) if orientation == "right" else (n, m)
    if draw(st.booleans()):
        c = Fraction(1, draw(st.sampled_from(divisors(other))))
    else:
        c = Fraction(draw(st.sampled_from(divisors(projected))))
    rank = draw(st.integers(1, unit_length((n, m), c, orientation)))
    return (n, m), c, orientation, rank


# ---------------------------------------------------------------------------- projection math
@pytest.mark.parametrize("distribution", RANDOM_DISTRIBUTIONS)
@pytest.mark.parametrize("shape, granularity, orientation", LAYOUTS)
def test_project_matches_reference(shape, granularity, orientation, distribution):
    c = as_fraction(granularity)
    rank = min(3, unit_length(shape, c, orientation))
    projector = VLoRPProjector(shape, granularity, rank, distribution, orientation, seed=11, scale=0.25)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    matrix = projector.matrix()

    projected = projector.project(grad)
    expected = project(grad, matrix, c, orientation)
    assert projected.shape == expected.shape
    assert relative_error(projected, expected) <= 1e-6

    back = projector.project_back(projected)
    assert back.shape == shape
    assert relative_error(back, project_back(expected, matrix, shape, c, orientation, 0.25)) <= 1e-6
    unscaled = projector.project_back_unscaled(projected)
    assert relative_error(unscaled, project_back(expected, matrix, shape, c, orientation, 1.0)) <= 1e-6


@settings(max_examples=25, deadline=None)
@given(layout=layouts(), distribution=st.sampled_from(RANDOM_DISTRIBUTIONS), seed=st.integers(0, 2**31))
def test_project_random_shapes(layout, distribution, seed):
    shape, c, orientation, rank = layout
    projector = VLoRPProjector(shape, library_granularity(c), rank, distribution, orientation, seed=seed)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    matrix = projector.matrix()
    assert matrix.shape == (unit_length(shape, c, orientation), rank)

    projected = projector.project(grad)
    expected = project(grad, matrix, c, orientation)
    assert relative_error(projected, expected) <= 1e-5
    back = projector.project_back(projected)
    assert relative_error(back, project_back(expected, matrix, shape, c, orientation)) <= 1e-5


@pytest.mark.parametrize(
    "shape, granularity, expected",
    [
        pytest.param((4, 8), 1, "right", id="wide-both-fit"),
        pytest.param((8, 8), 2, "right", id="square-tie"),
        pytest.param((8, 4), 1, "left", id="tall-both-fit"),
        pytest.param((8, 4), 8, "left", id="only-left-fits"),
        pytest.param((4, 6), 3, "right", id="only-right-fits"),
        pytest.param((6, 4), "1/3", "right", id="fraction-only-right"),
        pytest.param((4, 6), "1/3", "left", id="fraction-only-left"),
    ],
)
def test_auto_orientation(shape, granularity, expected):
    projector = VLoRPProjector(shape, granularity, 1, orientation="auto")
    assert projector.orientation == expected
    assert projector.state_shape == _state_shape(shape, as_fraction(granularity), expected, 1)


def _state_shape(shape, c, orientation, rank):
    rows, columns = unfolded_shape(shape, c, orientation)
    return (rows, rank) if orientation == "right" else (rank, columns)


def test_valid_granularities_lists_divisors():
    assert valid_granularities((6, 8), "right") == ["1/6", "1/3", "1/2", "1", "2", "4", "8"]
    assert valid_granularities((6, 8), "left") == ["1/8", "1/4", "1/2", "1", "2", "3", "6"]


@pytest.mark.parametrize(
    "value, expected",
    [(4, Fraction(4)), (0.25, Fraction(1, 4)), ("1/16", Fraction(1, 16)), (Fraction(1, 3), Fraction(1, 3)), ("2", 2)],
)
def test_parse_granularity_accepts(value, expected):
    assert parse_granularity(value) == expected


# ---------------------------------------------------------------------------- distributions
def test_normal_entries_have_variance_one_over_rank():
    rank = 8
    samples = torch.cat([VLoRPProjector((4, 64), 1, rank, "normal", seed=s).matrix().flatten() for s in range(8)])
    assert abs(float(samples.mean())) < 0.02
    assert float(samples.var()) == pytest.approx(1 / rank, rel=0.1)


def test_rademacher_entries_are_signs_over_sqrt_rank():
    rank = 4
    matrix = VLoRPProjector((3, 32), 1, rank, "rademacher", seed=5).matrix()
    assert torch.equal(matrix.abs(), torch.full_like(matrix, 1 / math.sqrt(rank)))
    assert 0 < int((matrix > 0).sum()) < matrix.numel()


@pytest.mark.parametrize("shape, granularity, orientation", LAYOUTS)
def test_orthonormal_columns_scaled(shape, granularity, orientation):
    c = as_fraction(granularity)
    d = unit_length(shape, c, orientation)
    rank = min(3, d)
    matrix = VLoRPProjector(shape, granularity, rank, "orthonormal", orientation, seed=2).matrix().double()
    torch.testing.assert_close(matrix.T @ matrix, torch.eye(rank, dtype=torch.float64) * d / rank, rtol=0, atol=1e-5)


def _unbiasedness_error(samples: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """Squared error of the sample mean and its expected size ``E||X - G||^2 / N``."""
    mean_error = float(((samples.mean(dim=0) - grad) ** 2).sum())
    expected = float(((samples - grad) ** 2).sum(dim=(1, 2)).mean()) / samples.shape[0]
    return mean_error, expected


@pytest.mark.parametrize("orientation, granularity", [("right", 2), ("left", "1/2")])
@pytest.mark.parametrize("distribution", RANDOM_DISTRIBUTIONS)
def test_random_projection_unbiased(distribution, orientation, granularity):
    shape, rank, count = (6, 8), 2, 4000
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = []
    for seed in range(count):
        projector = VLoRPProjector(shape, granularity, rank, distribution, orientation, seed=seed)
        matrix = projector.matrix().double()
        c = as_fraction(granularity)
        samples.append(project_back(project(grad, matrix, c, orientation), matrix, shape, c, orientation))
    samples = torch.stack(samples)

    # The mean's squared error concentrates around E||X - G||^2 / N, so it shrinks like 1/N
    # (the error like 1/sqrt(N)); a factor 4 leaves room for sampling noise.
    for size in (250, count):
        mean_error, expected = _unbiasedness_error(samples[:size], grad)
        assert mean_error <= 4 * expected, f"biased at N={size}: {mean_error:.3g} > 4 * {expected:.3g}"
    assert math.sqrt(mean_error) / float(grad.norm()) < 0.1

    # The same check rejects a projection whose entries are rank times too large in
    # variance (E[P P^T] = r I), which is what N(0, 1) entries would give.
    mean_error, expected = _unbiasedness_error(samples * rank, grad)
    assert mean_error > 4 * expected


@pytest.mark.parametrize("distribution", ["orthonormal", "svd"])
@pytest.mark.parametrize(
    "shape, granularity, orientation",
    LAYOUTS + [pytest.param((2, 16), 1, "right", id="svd-rank-above-rows"), pytest.param((16, 2), 1, "left")],
)
def test_full_rank_reproduces_gradient(shape, granularity, orientation, distribution):
    d = unit_length(shape, as_fraction(granularity), orientation)
    projector = VLoRPProjector(shape, granularity, d, distribution, orientation, seed=4)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    back = projector.project_back(projector.project(grad))
    torch.testing.assert_close(back, grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("orientation", ["right", "left"])
def test_svd_basis_is_top_singular_vectors(orientation):
    shape, c, rank = (8, 12), Fraction(2), 2
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    projector = VLoRPProjector(shape, c, rank, "svd", orientation)
    projector.refresh(grad.float())
    basis = projector.matrix().double()
    u, _, vh = torch.linalg.svd(grad.reshape(unfolded_shape(shape, c, orientation)))
    expected = vh[:rank].T if orientation == "right" else u[:, :rank]
    # Singular vectors are unique up to sign, so compare the spanned projections.
    torch.testing.assert_close(basis @ basis.T, expected @ expected.T, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- seeds
def _model_groups():
    torch.manual_seed(0)
    bias = torch.nn.Parameter(torch.zeros(6))
    first, second, third = (torch.nn.Parameter(torch.randn(4, 6)) for _ in range(3))
    groups = [
        {"params": [bias], "rank": None},
        {"params": [first, second], "rank": 2, "granularity": 2},
        {"params": [third], "rank": 3, "granularity": 1},
    ]
    return groups, [first, second, third]


@pytest.mark.parametrize("distribution", RANDOM_DISTRIBUTIONS)
def test_parameter_seed_by_position(distribution):
    groups, projected = _model_groups()
    optimizer = ProjFactor(groups, seed=123, distribution=distribution)
    for index, param in zip((1, 2, 3), projected):
        projector = optimizer.projector_for(param)
        assert projector.seed == parameter_seed(123, index)
        granularity, rank = (2, 2) if index < 3 else (1, 3)
        standalone = VLoRPProjector((4, 6), granularity, rank, distribution, seed=derive_seed(123, index))
        assert torch.equal(projector.matrix(), standalone.matrix())
    first, second = (optimizer.projector_for(p).matrix() for p in projected[:2])
    assert not torch.equal(first, second), "two parameters of the same shape share a projection"


def test_refresh_uses_derived_seed():
    seed, rank, d = 77, 3, 6
    projector = VLoRPProjector((4, d), 1, rank, "normal", "right", seed=seed)
    matrices = []
    for refresh in range(4):
        generator = torch.Generator().manual_seed(derive_seed(seed, refresh))
        expected = torch.randn(d, rank, generator=generator) / math.sqrt(rank)
        torch.testing.assert_close(projector.matrix(), expected, rtol=0, atol=0)
        matrices.append(projector.matrix().clone())
        projector.refresh()
    assert all(not torch.equal(matrices[i], matrices[j]) for i in range(4) for j in range(i))


def test_refresh_schedule_follows_step_count():
    gap = 2
    weight = torch.nn.Parameter(torch.randn(4, 6))
    optimizer = ProjFactor([{"params": [weight], "rank": 2}], update_proj_gap=gap, seed=5)
    projector = optimizer.projector_for(weight)
    for t in range(7):
        (weight * torch.randn(4, 6)).sum().backward()
        expected_refresh = t // gap
        assert projector.refresh_count == expected_refresh, f"step {t}"
        fresh = VLoRPProjector((4, 6), 1, 2, seed=derive_seed(5, 0))
        for _ in range(expected_refresh):
            fresh.refresh()
        assert torch.equal(projector.matrix(), fresh.matrix()), f"step {t}"
        optimizer.step()
        optimizer.zero_grad()


_DUMP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from vlorp_lightning import ProjFactor
    torch.manual_seed(int(sys.argv[2]))  # the global RNG must not matter
    shapes = [(4, 6), (4, 6), (6, 4), (8, 8)]
    result = {}
    for distribution in ("normal", "rademacher", "orthonormal"):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        optimizer = ProjFactor([{"params": params, "rank": 2, "granularity": 2}], seed=2024, distribution=distribution)
        for index, param in enumerate(params):
            projector = optimizer.projector_for(param)
            for refresh in range(3):
                result[f"{distribution}/{index}/{refresh}"] = projector.matrix().clone()
                projector.refresh()
    torch.save(result, sys.argv[1])
    """
)


def _start_dump(path: Path, hash_seed: str, torch_seed: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-c", _DUMP_SCRIPT, str(path), str(torch_seed)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_matrices_identical_across_processes(tmp_path):
    # Both processes run at once: each spends most of its time importing the package.
    paths = [tmp_path / "first.pt", tmp_path / "second.pt"]
    processes = [_start_dump(paths[0], "1", 0), _start_dump(paths[1], "2", 99)]
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
    first, second = (torch.load(path, weights_only=True) for path in paths)
    assert first.keys() == second.keys()
    assert len(first) == 3 * 4 * 3
    for key in first:
        assert torch.equal(first[key], second[key]), key
    for distribution in ("normal", "rademacher", "orthonormal"):
        for refresh in range(3):
            same_shape = first[f"{distribution}/0/{refresh}"], first[f"{distribution}/1/{refresh}"]
            assert not torch.equal(*same_shape), f"{distribution} refresh {refresh}"
