"""Gradient accumulation, in-backward updates, clipping, non-finite skipping and loss scaling."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from reference import (
    MatrixSource,
    as_fraction,
    parameter_seed,
    project,
    project_back,
    relative_error,
    resolve_orientation,
)
from vlorp_lightning import ProjFactor, VLoRPAdam, VLoRPSGD

MICRO_BATCHES = 4
BATCH = 16
STEPS = 5
GAP = 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4, bias=False))


def make_batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 6, generator=generator), torch.randn(BATCH, 4, generator=generator)) for _ in range(steps)]


def groups_of(model: nn.Module, granularity=2, rank=2) -> list[dict]:
    """Projected: both weights (positions 0, 1); dense: the first bias (position 2)."""
    return [
        {"params": [model[0].weight, model[2].weight], "names": ["w0", "w2"], "rank": rank, "granularity": granularity},
        {"params": [model[0].bias], "names": ["b0"], "rank": None},
    ]


def make_optimizer(kind: str, model: nn.Module, **options) -> torch.optim.Optimizer:
    common = dict(update_proj_gap=GAP, seed=3, momentum_transfer=True, **options)
    if kind == "sgd":
        return VLoRPSGD(groups_of(model), lr=0.05, momentum=0.9, weight_decay=0.01, **common)
    if kind in ("os", "ss"):
        return VLoRPAdam(groups_of(model), lr=0.01, weight_decay=0.01, scheme=kind, **common)
    return ProjFactor(groups_of(model), lr=0.01, weight_decay=0.01, **common)


def loss_of(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(inputs), targets)


def train_full_batch(kind: str) -> nn.Module:
    model = make_model()
    optimizer = make_optimizer(kind, model)
    for inputs, targets in make_batches():
        loss_of(model, inputs, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def assert_same_updates(model: nn.Module, expected: nn.Module) -> None:
    initial = dict(make_model().named_parameters())
    for (name, param), (_, reference) in zip(model.named_parameters(), expected.named_parameters()):
        error = relative_error(param.detach() - initial[name].detach(), reference.detach() - initial[name].detach())
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


# ---------------------------------------------------------------------------- accumulation
# NOTE: "svd" is left out of the accumulation tests because its basis comes from the
# window's first micro-batch gradient, not from the full-batch gradient.
@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "uncompressed"])
@pytest.mark.parametrize("kind", ["projfactor", "os", "ss", "sgd"])
def test_micro_batches_equal_full_batch(kind, compress):
    model = make_model()
    optimizer = make_optimizer(kind, model, compress_gradients=compress)
    projected = [model[0].weight, model[2].weight]
    for inputs, targets in make_batches():
        for chunk_inputs, chunk_targets in zip(inputs.chunk(MICRO_BATCHES), targets.chunk(MICRO_BATCHES)):
            (loss_of(model, chunk_inputs, chunk_targets) / MICRO_BATCHES).backward()
            if compress:
                assert all(p.grad is None for p in projected), "a full projected gradient survived backward"
            else:
                assert all(p.grad is not None for p in projected)
            assert model[0].bias.grad is not None
        optimizer.step()
        optimizer.zero_grad()
    assert_same_updates(model, train_full_batch(kind))


@pytest.mark.parametrize("kind", ["projfactor", "ss", "sgd"])
def test_in_backward_equals_full_batch(kind):
    model = make_model()
    optimizer = make_optimizer(kind, model, update_in_backward=True)
    params = list(model.parameters())
    for window, (inputs, targets) in enumerate(make_batches(), start=1):
        chunks = list(zip(inputs.chunk(MICRO_BATCHES), targets.chunk(MICRO_BATCHES)))
        for index, (chunk_inputs, chunk_targets) in enumerate(chunks):
            optimizer.mark_accumulation_boundary(index == len(chunks) - 1)
            before = [p.detach().clone() for p in params]
            (loss_of(model, chunk_inputs, chunk_targets) / MICRO_BATCHES).backward()
            changed = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
            if index < len(chunks) - 1:
                assert not any(changed), "a parameter moved before the last micro-batch"
            else:
                assert all(changed), "the last backward did not update every parameter"
                assert all(p.grad is None for p in params)
        optimizer.step()
        optimizer.zero_grad()
        for param in params:
            assert int(optimizer.state[param]["step"]) == window, optimizer.param_name(param)
        assert optimizer.global_step == window
    assert_same_updates(model, train_full_batch(kind))


def test_in_backward_step_moves_nothing():
    model = make_model()
    optimizer = make_optimizer("projfactor", model, update_in_backward=True)
    inputs, targets = make_batches(1)[0]
    optimizer.mark_accumulation_boundary(True)
    loss_of(model, inputs, targets).backward()
    after_backward = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(after_backward, model.parameters()))


# ---------------------------------------------------------------------------- clipping
def _linear_problem(compress: bool):
    """SGD on loss = sum(W * G) + sum(b * g): the gradients are exactly G and g."""
    generator = torch.Generator().manual_seed(2)
    weight = nn.Parameter(torch.randn(8, 6, generator=generator))
    bias = nn.Parameter(torch.randn(6, generator=generator))
    grad_weight, grad_bias = torch.randn(8, 6, generator=generator), torch.randn(6, generator=generator)
    optimizer = VLoRPSGD(
        [{"params": [weight], "rank": 2, "granularity": 2}, {"params": [bias], "rank": None}],
        lr=0.5,
        seed=8,
        compress_gradients=compress,
    )
    ((weight * grad_weight).sum() + (bias * grad_bias).sum()).backward()
    c = as_fraction(2)
    source = MatrixSource((8, 6), c, 2, "normal", resolve_orientation((8, 6), c, "auto"), parameter_seed(8, 0))
    matrix = source.matrix(0, grad_weight)
    projected = project(grad_weight, matrix, source.c, source.orientation)
    return weight, bias, grad_weight, grad_bias, optimizer, source, matrix, projected


@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "uncompressed"])
def test_clip_grad_norm_scales(compress):
    weight, bias, _, grad_bias, optimizer, source, matrix, projected = _linear_problem(compress)
    initial_weight, initial_bias = weight.detach().double().clone(), bias.detach().double().clone()
    expected_norm = math.sqrt(float(projected.square().sum()) + float(grad_bias.double().square().sum()))
    max_norm = expected_norm / 4

    norm = optimizer.clip_grad_norm_(max_norm)
    assert float(norm) == pytest.approx(expected_norm, rel=1e-6)
    assert optimizer.last_grad_norm == pytest.approx(expected_norm, rel=1e-6)
    coefficient = max_norm / (expected_norm + 1e-6)
    if compress:
        accumulator = optimizer.state[weight]["accumulator"]
        assert relative_error(accumulator, projected * coefficient) <= 1e-6
    assert relative_error(bias.grad, grad_bias * coefficient) <= 1e-6

    optimizer.step()
    back = project_back(projected * coefficient, matrix, (8, 6), source.c, source.orientation)
    expected_weight = initial_weight - 0.5 * back
    assert relative_error(weight.detach() - initial_weight, expected_weight - initial_weight) <= 1e-5
    assert relative_error(bias.detach() - initial_bias, -0.5 * grad_bias.double() * coefficient) <= 1e-5


def test_clip_grad_norm_below_limit_is_noop():
    weight, bias, _, grad_bias, optimizer, _, _, projected = _linear_problem(True)
    expected_norm = math.sqrt(float(projected.square().sum()) + float(grad_bias.double().square().sum()))
    accumulator = optimizer.state[weight]["accumulator"].clone()
    norm = optimizer.clip_grad_norm_(expected_norm * 2)
    assert float(norm) == pytest.approx(expected_norm, rel=1e-6)
    assert torch.equal(optimizer.state[weight]["accumulator"], accumulator)
    assert torch.equal(bias.grad, grad_bias)


# ---------------------------------------------------------------------------- non-finite gradients
def _snapshot(optimizer, params):
    return (
        [p.detach().clone() for p in params],
        {optimizer.param_name(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params},
    )


def _nonfinite_problem(bad: str, **options):
    generator = torch.Generator().manual_seed(5)
    weight = nn.Parameter(torch.randn(8, 6, generator=generator))
    bias = nn.Parameter(torch.randn(6, generator=generator))
    optimizer = ProjFactor(
        [{"params": [weight], "names": ["layer.weight"], "rank": 2}, {"params": [bias], "names": ["layer.bias"]}],
        lr=0.01,
        **options,
    )
    clean = [(torch.randn(8, 6, generator=generator), torch.randn(6, generator=generator)) for _ in range(3)]
    poisoned_weight, poisoned_bias = clean[1][0].clone(), clean[1][1].clone()
    if bad == "weight":
        poisoned_weight[3, 2] = float("nan")
    else:
        poisoned_bias[1] = float("inf")
    return weight, bias, optimizer, clean, (poisoned_weight, poisoned_bias)


def _apply(weight, bias, optimizer, grads) -> None:
    ((weight * grads[0]).sum() + (bias * grads[1]).sum()).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("bad", ["weight", "bias"])
def test_nonfinite_step_skipped(bad):
    weight, bias, optimizer, clean, poisoned = _nonfinite_problem(bad, update_proj_gap=10)
    _apply(weight, bias, optimizer, clean[0])
    params_before, state_before = _snapshot(optimizer, [weight, bias])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for skipped in (1, 2):
            _apply(weight, bias, optimizer, poisoned)
            assert optimizer.skipped_steps == skipped
            assert optimizer.global_step == 1
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in runtime]
    assert f"layer.{bad}" in str(runtime[0].message)

    params_after, state_after = _snapshot(optimizer, [weight, bias])
    assert all(torch.equal(a, b) for a, b in zip(params_before, params_after))
    for name, entries in state_before.items():
        assert entries.keys() == state_after[name].keys()
        for key, value in entries.items():
            assert torch.equal(value, state_after[name][key]), f"{name}/{key} changed in a skipped step"

    _apply(weight, bias, optimizer, clean[1])
    assert not torch.equal(weight.detach(), params_before[0])
    assert int(optimizer.state[weight]["step"]) == 2


@pytest.mark.parametrize(
    "bad, distribution",
    [
        ("weight", "normal"),
        ("bias", "normal"),
        ("bias", "svd"),
        pytest.param("weight", "svd"),
    ],
)
def test_nonfinite_skip_at_refresh(bad, distribution):
    # update_proj_gap=1 puts a refresh (with momentum transfer) at the poisoned window: the
    # run must continue exactly as if the poisoned step had never happened.
    options = dict(update_proj_gap=1, momentum_transfer=True, distribution=distribution)
    weight, bias, optimizer, clean, poisoned = _nonfinite_problem(bad, **options)
    expected_weight, expected_bias, expected_optimizer, _, _ = _nonfinite_problem(bad, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _apply(weight, bias, optimizer, clean[0])
        _apply(weight, bias, optimizer, poisoned)
        for grads in clean[1:]:
            _apply(weight, bias, optimizer, grads)
    for grads in clean:
        _apply(expected_weight, expected_bias, expected_optimizer, grads)
    assert optimizer.skipped_steps == 1
    assert torch.equal(weight, expected_weight)
    assert torch.equal(bias, expected_bias)


# ---------------------------------------------------------------------------- loss scaling
def _scaled_problem(with_dense: bool):
    generator = torch.Generator().manual_seed(6)
    weight = nn.Parameter(torch.randn(8, 6, generator=generator))
    bias = nn.Parameter(torch.randn(6, generator=generator))
    groups = [{"params": [weight], "rank": 2, "granularity": 2}]
    if with_dense:
        groups.append({"params": [bias], "rank": None})
    optimizer = ProjFactor(groups, lr=0.01, update_proj_gap=2)
    gradients = [(torch.randn(8, 6, generator=generator), torch.randn(6, generator=generator)) for _ in range(3)]
    return weight, bias, optimizer, gradients


def _loss(weight, bias, grad_weight, grad_bias, with_dense):
    loss = (weight * grad_weight).sum()
    return loss + (bias * grad_bias).sum() if with_dense else loss


@pytest.mark.parametrize("unscale_first", [False, True], ids=["accumulators-only", "unscale-then-accumulators"])
@pytest.mark.parametrize("with_dense", [True, False], ids=["with-dense", "projected-only"])
def test_grad_scaler_matches_unscaled(with_dense, unscale_first):
    weight, bias, optimizer, gradients = _scaled_problem(with_dense)
    plain_weight, plain_bias, plain_optimizer, _ = _scaled_problem(with_dense)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for grad_weight, grad_bias in gradients:
        _loss(plain_weight, plain_bias, grad_weight, grad_bias, with_dense).backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad()

        scaler.scale(_loss(weight, bias, grad_weight, grad_bias, with_dense)).backward()
        if unscale_first:
            scaler.unscale_(optimizer)
        optimizer.unscale_accumulators_(scaler)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert scaler.get_scale() == 2.0**10
    torch.testing.assert_close(weight, plain_weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias, plain_bias, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_dense", [True, False], ids=["with-dense", "projected-only"])
def test_grad_scaler_overflow_skips_step(with_dense):
    weight, bias, optimizer, gradients = _scaled_problem(with_dense)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    grad_weight, grad_bias = gradients[0]
    scaler.scale(_loss(weight, bias, grad_weight, grad_bias, with_dense)).backward()
    optimizer.unscale_accumulators_(scaler)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    params_before, state_before = _snapshot(optimizer, [weight])

    loss = _loss(weight, bias, grad_weight, grad_bias, with_dense) * float("inf")
    scaler.scale(loss).backward()
    optimizer.unscale_accumulators_(scaler)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()

    assert scaler.get_scale() == 2.0**9
    params_after, state_after = _snapshot(optimizer, [weight])
    assert torch.equal(params_after[0], params_before[0])
    for key, value in next(iter(state_before.values())).items():
        assert torch.equal(value, next(iter(state_after.values()))[key]), key
    assert optimizer.global_step == 1

    scaler.scale(_loss(weight, bias, grad_weight, grad_bias, with_dense)).backward()
    optimizer.unscale_accumulators_(scaler)
    scaler.step(optimizer)
    scaler.update()
    assert optimizer.global_step == 2
    assert torch.isfinite(weight).all()
    assert not torch.equal(weight.detach(), params_before[0])
