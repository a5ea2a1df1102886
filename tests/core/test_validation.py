"""Invalid settings raise ValueError whose message names the bad value and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlorp_lightning import ProjFactor, VLoRPAdam, VLoRPProjector, VLoRPSGD, parse_granularity


def matrix() -> nn.Parameter:
    return nn.Parameter(torch.zeros(6, 8))


def projfactor(**group) -> ProjFactor:
    return ProjFactor([{"params": [matrix()], "rank": 2, **group}])


# (id, constructor, regex the message must match). Each regex covers the bad value and the
# suggested fix or the list of valid choices.
INVALID = [
    # projector: shapes
    ("shape-3d", lambda: VLoRPProjector((2, 3, 4), 1, 1), r"2-D shape .*\(2, 3, 4\).*dense group"),
    ("shape-1d", lambda: VLoRPProjector((8,), 1, 1), r"2-D shape .*\(8,\)"),
    ("shape-empty", lambda: VLoRPProjector((0, 4), 1, 1), r"non-empty shape.*\(0, 4\)"),
    ("project-3d-tensor", lambda: VLoRPProjector((6, 8), 1, 2).project(torch.zeros(6, 8, 1)), r"2-D tensor.*3-D"),
    ("project-wrong-shape", lambda: VLoRPProjector((6, 8), 1, 2).project(torch.zeros(8, 6)), r"\(8, 6\), expected \(6, 8\)"),
    # projector: granularity
    (
        "granularity-not-dividing",
        lambda: VLoRPProjector((6, 8), 3, 1, orientation="right"),
        r"granularity 3 does not divide shape \(6, 8\).*Valid granularities.*1/6, 1/3, 1/2, 1, 2, 4, 8",
    ),
    (
        "fraction-not-dividing",
        lambda: VLoRPProjector((6, 8), "1/4", 1, orientation="right"),
        r"granularity 1/4 does not divide.*right: 1/6, 1/3, 1/2, 1, 2, 4, 8",
    ),
    (
        "granularity-fits-no-side",
        lambda: VLoRPProjector((6, 10), 4, 1),
        r"granularity 4 does not divide shape \(6, 10\) with orientation right or left.*right: .*left: ",
    ),
    ("granularity-0.3", lambda: VLoRPProjector((6, 8), 0.3, 1), r"unit fraction 1/k.*got 0\.3"),
    ("granularity-2/3", lambda: VLoRPProjector((6, 8), "2/3", 1), r"unit fraction 1/k.*got '2/3'"),
    ("granularity-zero", lambda: VLoRPProjector((6, 8), 0, 1), r"positive integer or a unit fraction.*got 0"),
    ("granularity-negative", lambda: VLoRPProjector((6, 8), -2, 1), r"positive integer.*got -2"),
    ("granularity-text", lambda: VLoRPProjector((6, 8), "fine", 1), r"got 'fine'"),
    ("granularity-bool", lambda: parse_granularity(True), r"got True"),
    # projector: rank, distribution, orientation, scale
    ("rank-zero", lambda: VLoRPProjector((6, 8), 1, 0), r"rank must be an integer >= 1, got 0"),
    ("rank-negative", lambda: VLoRPProjector((6, 8), 1, -3), r"rank must be an integer >= 1, got -3"),
    ("rank-float", lambda: VLoRPProjector((6, 8), 1, 2.5), r"rank must be an integer >= 1, got 2\.5"),
    (
        "rank-too-large",
        lambda: VLoRPProjector((6, 8), 2, 5, orientation="right"),
        r"rank 5 exceeds the projection unit length 4 .*use a rank between 1 and 4",
    ),
    ("distribution", lambda: VLoRPProjector((6, 8), 1, 1, "gaussian"), r"unknown distribution 'gaussian'.*normal, rademacher"),
    ("orientation", lambda: VLoRPProjector((6, 8), 1, 1, orientation="up"), r"unknown orientation 'up'.*auto, right, left"),
    ("scale-nan", lambda: VLoRPProjector((6, 8), 1, 1, scale=float("nan")), r"scale must be a finite number, got nan"),
    # optimizer: projected group structure
    (
        "vector-in-projected-group",
        lambda: ProjFactor([{"params": [nn.Parameter(torch.zeros(8))], "names": ["norm.weight"], "rank": 2}]),
        r"'norm.weight' of shape \(8,\) .*not 2-D; put it in a dense group \(rank=None\)",
    ),
    (
        "optimizer-granularity",
        lambda: projfactor(granularity=3, orientation="right", names=["q.weight"]),
        r"parameter 'q.weight': granularity 3 does not divide.*Valid granularities",
    ),
    ("optimizer-rank-zero", lambda: projfactor(rank=0), r"rank must be an integer >= 1, got 0"),
    ("optimizer-rank-too-large", lambda: projfactor(rank=9, orientation="right"), r"rank 9 exceeds.*between 1 and 8"),
    ("optimizer-distribution", lambda: projfactor(distribution="uniform"), r"unknown distribution 'uniform'"),
    ("optimizer-orientation", lambda: projfactor(orientation="diagonal"), r"unknown orientation 'diagonal'"),
    ("gap-zero", lambda: projfactor(update_proj_gap=0), r"update_proj_gap=0; use an integer >= 1"),
    ("gap-float", lambda: projfactor(update_proj_gap=1.5), r"update_proj_gap=1\.5; use an integer >= 1"),
    ("names-length", lambda: projfactor(names=["a", "b"]), r"1 params but 2 names"),
    # optimizer: hyperparameters
    ("lr-negative", lambda: ProjFactor([matrix()], lr=-1e-3), r"lr=-0\.001; use a finite value >= 0"),
    ("lr-nan", lambda: ProjFactor([matrix()], lr=float("nan")), r"lr=nan"),
    ("beta1-one", lambda: ProjFactor([matrix()], betas=(1.0, 0.999)), r"beta1=1\.0; each beta must lie in \[0, 1\)"),
    ("beta2-negative", lambda: ProjFactor([matrix()], betas=(0.9, -0.1)), r"beta2=-0\.1; each beta must lie in \[0, 1\)"),
    ("betas-length", lambda: ProjFactor([matrix()], betas=(0.9,)), r"pair \(beta1, beta2\), got \(0\.9,\)"),
    ("eps-negative", lambda: ProjFactor([matrix()], eps=-1e-8), r"eps=-1e-08; use a value >= 0"),
    ("weight-decay-negative", lambda: ProjFactor([matrix()], weight_decay=-0.1), r"weight_decay=-0\.1; use a value >= 0"),
    ("group-lr-negative", lambda: projfactor(lr=-1.0), r"lr=-1\.0"),
    ("adam-scheme", lambda: VLoRPAdam([matrix()], scheme="full"), r"unknown scheme 'full'.*'os'.*'ss'"),
    ("adam-beta", lambda: VLoRPAdam([matrix()], betas=(0.9, 1.5)), r"beta2=1\.5"),
    ("sgd-momentum", lambda: VLoRPSGD([matrix()], momentum=1.0), r"momentum=1\.0; use a value in \[0, 1\)"),
    ("sgd-lr", lambda: VLoRPSGD([matrix()], lr=-0.1), r"lr=-0\.1"),
    ("state-dtype", lambda: ProjFactor([matrix()], state_dtype="float16"), r"state_dtype='float16'.*float32, bfloat16, param"),
    ("seed-float", lambda: ProjFactor([matrix()], seed=1.5), r"seed must be an integer, got 1\.5"),
]


@pytest.mark.parametrize("build, pattern", [pytest.param(b, p, id=i) for i, b, p in INVALID])
def test_invalid_setting_raises(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()


def test_svd_refresh_without_gradient():
    projector = VLoRPProjector((6, 8), 1, 2, "svd")
    with pytest.raises(ValueError, match=r"'svd' distribution needs the gradient.*pass grad"):
        projector.refresh()


def test_svd_matrix_before_refresh():
    projector = VLoRPProjector((6, 8), 1, 2, "svd")
    with pytest.raises(RuntimeError, match=r"SVD basis is not computed yet; call refresh\(grad\)"):
        projector.matrix()


@pytest.mark.parametrize(
    "max_norm, norm_type, pattern",
    [(0.0, 2.0, r"max_norm must be > 0, got 0\.0"), (1.0, 1.0, r"norm_type=2\.0.*got norm_type=1\.0")],
)
def test_clip_grad_norm_rejects(max_norm, norm_type, pattern):
    optimizer = projfactor()
    with pytest.raises(ValueError, match=pattern):
        optimizer.clip_grad_norm_(max_norm, norm_type)


def test_clip_in_backward_mode_rejected():
    optimizer = ProjFactor([{"params": [matrix()], "rank": 2}], update_in_backward=True)
    with pytest.raises(RuntimeError, match=r"update_in_backward=True.*disable clipping or use update_in_backward=False"):
        optimizer.clip_grad_norm_(1.0)


def test_projector_for_dense_parameter():
    dense = nn.Parameter(torch.zeros(3))
    optimizer = ProjFactor([{"params": [dense], "names": ["bias"]}])
    with pytest.raises(KeyError, match=r"'bias' is not projected"):
        optimizer.projector_for(dense)
