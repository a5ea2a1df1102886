"""Tests of the pure diagnostics functions against dense float64 torch.linalg references."""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from reference import project, project_back

from vlorp_lightning import ProjFactor, VLoRPProjector, estimate_state_bytes, vlorp_param_groups
from vlorp_lightning.diagnostics import (
    adamw_state_bytes,
    compare_state_bytes,
    cosine_similarity,
    cuda_peak_bytes,
    current_rss_bytes,
    format_state_table,
    peak_rss_bytes,
    projection_error,
    reconstruct,
    relative_error,
)


def dense_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    reference = reference.double()
    return float(torch.linalg.matrix_norm(reference - approximation.double()) / torch.linalg.matrix_norm(reference))


def dense_cosine(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    a, b = reference.double().flatten(), approximation.double().flatten()
    return float(torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)))


def dense_reconstruction(grad: torch.Tensor, projector: VLoRPProjector) -> torch.Tensor:
    matrix = projector.matrix(dtype=torch.float64)
    c = Fraction(projector.granularity)
    projected = project(grad, matrix, c, projector.orientation)
    return project_back(projected, matrix, projector.shape, c, projector.orientation, projector.scale)


# ---------------------------------------------------------------------- error and cosine
@pytest.mark.parametrize(
    "shape", [pytest.param((7, 5), id="7x5"), pytest.param((64, 128), id="64x128"), pytest.param((1, 1), id="1x1")]
)
def test_error_and_cosine_match_dense(shape):
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(shape, generator=generator)
    approximation = reference + 0.3 * torch.randn(shape, generator=generator)
    assert float(relative_error(reference, approximation)) == pytest.approx(dense_error(reference, approximation), rel=1e-5)
    assert float(cosine_similarity(reference, approximation)) == pytest.approx(
        dense_cosine(reference, approximation), rel=1e-5
    )


def test_error_and_cosine_return_float32_scalars():
    reference = torch.randn(4, 4, dtype=torch.float64)
    error = relative_error(reference, reference.to(torch.bfloat16))
    cosine = cosine_similarity(reference, reference.to(torch.bfloat16))
    assert error.shape == ()
    assert error.dtype == torch.float32
    assert cosine.shape == ()
    assert cosine.dtype == torch.float32


def test_error_and_cosine_of_zero_tensors():
    zero = torch.zeros(3, 4)
    other = torch.ones(3, 4)
    assert float(relative_error(zero, zero)) == 0.0
    assert float(cosine_similarity(zero, zero)) == 1.0
    assert math.isinf(float(relative_error(zero, other)))
    assert float(cosine_similarity(zero, other)) == 0.0
    assert float(relative_error(other, zero)) == 1.0
    assert float(cosine_similarity(other, zero)) == 0.0


def test_opposite_tensors_have_cosine_minus_one():
    tensor = torch.randn(5, 6)
    assert float(cosine_similarity(tensor, -tensor)) == pytest.approx(-1.0, abs=1e-6)
    assert float(relative_error(tensor, -tensor)) == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("function", [relative_error, cosine_similarity], ids=["error", "cosine"])
def test_shape_mismatch_raises(function):
    with pytest.raises(ValueError, match=r"approximation has shape \(4, 3\) but the reference has shape \(3, 4\)"):
        function(torch.zeros(3, 4), torch.zeros(4, 3))


# ---------------------------------------------------------------------- reconstruction
@pytest.mark.parametrize(
    "shape, granularity, orientation",
    [
        pytest.param((16, 32), 1, "right", id="c1-right"),
        pytest.param((16, 32), 4, "right", id="c4-right"),
        pytest.param((32, 16), "1/2", "left", id="c1/2-left"),
        pytest.param((24, 8), 2, "left", id="c2-left"),
    ],
)
def test_reconstruct_matches_dense(shape, granularity, orientation):
    projector = VLoRPProjector(shape, granularity, rank=3, orientation=orientation, seed=5, scale=0.25)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    expected = dense_reconstruction(grad, projector)
    actual = reconstruct(grad, projector)
    assert actual.dtype == torch.float32
    assert torch.allclose(actual.double(), expected, rtol=1e-5, atol=1e-6)
    error, cosine = projection_error(grad, projector)
    assert float(error) == pytest.approx(dense_error(grad, expected), rel=1e-5)
    assert float(cosine) == pytest.approx(dense_cosine(grad, expected), rel=1e-5)


def test_reconstruct_upcasts_bfloat16_gradient():
    projector = VLoRPProjector((16, 16), 1, rank=16, distribution="orthonormal")
    grad = torch.randn(16, 16).to(torch.bfloat16)
    error, cosine = projection_error(grad, projector)
    assert float(error) < 1e-5
    assert float(cosine) > 1 - 1e-6


def test_reconstruct_rejects_wrong_shape():
    projector = VLoRPProjector((16, 16), 1, rank=4)
    with pytest.raises(ValueError, match=r"gradient has shape \(16, 8\), expected \(16, 16\)"):
        reconstruct(torch.zeros(16, 8), projector)


@pytest.mark.parametrize("granularity, orientation", [(1, "right"), (4, "left"), ("1/2", "right")])
def test_full_rank_orthonormal_is_exact(granularity, orientation):
    probe = VLoRPProjector((32, 32), granularity, rank=1, orientation=orientation)
    projector = VLoRPProjector((32, 32), granularity, rank=probe.unit_length, distribution="orthonormal", orientation=orientation)
    grad = torch.randn(32, 32)
    error, cosine = projection_error(grad, projector)
    assert float(error) < 1e-5
    assert float(cosine) == pytest.approx(1.0, abs=1e-6)


def test_scale_shrinks_reconstruction():
    projector = VLoRPProjector((8, 8), 1, rank=8, distribution="orthonormal", scale=0.5)
    error, cosine = projection_error(torch.randn(8, 8), projector)
    assert float(error) == pytest.approx(0.5, abs=1e-5)
    assert float(cosine) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("unit, rank", [(16, 4), (32, 8)])
def test_normal_squared_error_matches_theory(unit, rank):
    # E ||G - G_hat||^2 / ||G||^2 = (d + 1) / r for P with i.i.d. N(0, 1/r) entries.
    grad = torch.randn(8, unit, generator=torch.Generator().manual_seed(3))
    squared = []
    for seed in range(200):
        projector = VLoRPProjector((8, unit), 1, rank, orientation="right", seed=seed)
        squared.append(float(projection_error(grad, projector)[0]) ** 2)
    assert sum(squared) / len(squared) == pytest.approx((unit + 1) / rank, rel=0.1)


# ---------------------------------------------------------------------- state accounting
def test_adamw_state_bytes():
    assert adamw_state_bytes(10) == 80
    assert adamw_state_bytes(10, bytes_per_element=2) == 40
    with pytest.raises(ValueError, match="numel=-1 must be >= 0"):
        adamw_state_bytes(-1)


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def stepped_projfactor(model: torch.nn.Module, rank: int) -> ProjFactor:
    optimizer = ProjFactor(vlorp_param_groups(model, rank=rank, targets="all-linear"), lr=1e-3)
    model(torch.randn(4, 16)).square().sum().backward()
    optimizer.step()
    return optimizer


def test_compare_state_bytes_agrees_with_estimate():
    model = small_model()
    optimizer = stepped_projfactor(model, rank=4)
    measured = optimizer.state_bytes()
    estimate = estimate_state_bytes(model, rank=4, targets="all-linear")
    numel = sum(p.numel() for p in model.parameters())
    projected = [name for name, _ in optimizer.named_projected_parameters()]
    summary = compare_state_bytes(measured, adamw_state_bytes(numel), projected, estimate)

    assert summary["mismatches"] == []
    assert summary["rows"]["total"] == {"predicted": estimate.total_bytes, "measured": measured["total"]["total"]}
    assert summary["rows"]["projected"]["measured"] == sum(measured[name]["total"] for name in projected)
    assert summary["rows"]["dense"]["measured"] == measured["total"]["total"] - summary["rows"]["projected"]["measured"]
    assert summary["components"]["second_moment"] == measured["total"]["second_moment"]
    assert summary["ratio"] == pytest.approx(measured["total"]["total"] / (8 * numel))
    assert summary["predicted_ratio"] == pytest.approx(estimate.total_bytes / (8 * numel))


def test_compare_state_bytes_lists_mismatches():
    model = small_model()
    optimizer = stepped_projfactor(model, rank=4)
    wrong = estimate_state_bytes(model, rank=2, targets="all-linear")
    projected = [name for name, _ in optimizer.named_projected_parameters()]
    summary = compare_state_bytes(optimizer.state_bytes(), 1000, projected, wrong)
    assert summary["mismatches"] == ["0.weight", "2.weight"]
    assert "prediction differs from measurement for: 0.weight, 2.weight" in format_state_table(summary)


def test_compare_state_bytes_without_estimate():
    optimizer = stepped_projfactor(small_model(), rank=4)
    summary = compare_state_bytes(optimizer.state_bytes(), 0, ["0.weight", "2.weight"])
    assert summary["rows"]["total"]["predicted"] is None
    assert summary["predicted_ratio"] is None
    assert summary["ratio"] == 0.0
    table = format_state_table(summary)
    assert "AdamW equivalent" in table
    assert "total" in table


# ---------------------------------------------------------------------- process memory
def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status, which only Linux has")
def test_peak_rss_matches_proc_high_water_mark():
    block = torch.ones(32 * 2**20 // 4)  # touch 32 MiB so the peak is recent
    before = proc_status_bytes("VmHWM")
    peak = peak_rss_bytes()
    after = proc_status_bytes("VmHWM")
    del block
    assert peak is not None
    assert before * 0.99 <= peak <= after * 1.01


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status, which only Linux has")
def test_current_rss_matches_proc():
    rss = current_rss_bytes()
    reference = proc_status_bytes("VmRSS")
    assert rss == pytest.approx(reference, rel=0.05)
    assert rss <= peak_rss_bytes() * 1.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_counts_allocation():
    torch.cuda.reset_peak_memory_stats()
    block = torch.empty(2**24, dtype=torch.uint8, device="cuda")
    allocated, reserved = cuda_peak_bytes()
    del block
    assert allocated >= 2**24
    assert reserved >= allocated
