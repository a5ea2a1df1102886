"""Float64 reference of VLoRP projection and of the projected update rules.

Everything here is written from the method's equations, independently of the library.
The reference takes only one thing from the library: the random matrix ``P`` of a given
refresh, from :class:`~vlorp_lightning.VLoRPProjector` (:class:`MatrixSource`). The
``"svd"`` basis is computed here in float64. The harness at the end drives the library
optimizers and this reference on the same gradients.

Notation: a gradient ``G`` has shape ``(n, m)`` and the granularity ``c`` is a
:class:`fractions.Fraction`. With the right orientation ``G`` is reshaped row-major to
``(n*c, m/c)`` and ``S = G' @ P`` with ``P`` of shape ``(m/c, r)``. With the left
orientation ``G`` is reshaped to ``(n/c, m*c)`` and ``S = P.T @ G'`` with ``P`` of shape
``(n/c, r)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from vlorp_lightning import ProjFactor, VLoRPAdam, VLoRPProjector, VLoRPSGD, derive_seed

Granularity = Union[int, str, Fraction]


def as_fraction(granularity: Granularity) -> Fraction:
    """Return ``c`` as an exact fraction (``4``, ``"1/4"`` or ``Fraction(1, 4)``)."""
    return Fraction(granularity)


def fits(shape: Tuple[int, int], c: Fraction, orientation: str) -> bool:
    """Whether ``c`` divides ``shape`` for the orientation, so the reshape exists."""
    n, m = shape
    projected, other = (m, n) if orientation == "right" else (n, m)
    if c.denominator == 1:
        return projected % c.numerator == 0
    return c.numerator == 1 and other % c.denominator == 0


def resolve_orientation(shape: Tuple[int, int], c: Fraction, orientation: str) -> str:
    """Apply the ``"auto"`` rule: right when ``n <= m`` and both fit, else the one that fits."""
    if orientation != "auto":
        return orientation
    right, left = fits(shape, c, "right"), fits(shape, c, "left")
    if right and left:
        return "right" if shape[0] <= shape[1] else "left"
    if not (right or left):
        raise ValueError(f"granularity {c} fits no orientation of {shape}")
    return "right" if right else "left"


def unfolded_shape(shape: Tuple[int, int], c: Fraction, orientation: str) -> Tuple[int, int]:
    """Shape of the reshaped gradient: ``(n*c, m/c)`` right, ``(n/c, m*c)`` left."""
    n, m = shape
    if orientation == "right":
        return int(n * c), int(m / c)
    return int(n / c), int(m * c)


def unit_length(shape: Tuple[int, int], c: Fraction, orientation: str) -> int:
    """Length ``d`` of a projection unit, the number of rows of ``P``."""
    rows, columns = unfolded_shape(shape, c, orientation)
    return columns if orientation == "right" else rows


def project(grad: Tensor, matrix: Tensor, c: Fraction, orientation: str) -> Tensor:
    """Project ``grad`` (n, m) with ``P`` (d, r) and return the float64 subspace tensor."""
    unfolded = grad.double().reshape(unfolded_shape(tuple(grad.shape), c, orientation))
    if orientation == "right":
        return unfolded @ matrix.double()
    return matrix.double().T @ unfolded


def project_back(
    projected: Tensor, matrix: Tensor, shape: Tuple[int, int], c: Fraction, orientation: str, scale: float = 1.0
) -> Tensor:
    """Map a subspace tensor back to ``shape`` with ``P`` and multiply by ``scale`` (float64)."""
    if orientation == "right":
        full = projected.double() @ matrix.double().T
    else:
        full = matrix.double() @ projected.double()
    return full.reshape(shape) * scale


def svd_basis(grad: Tensor, c: Fraction, orientation: str, rank: int) -> Tensor:
    """Top-``rank`` singular vectors of the reshaped gradient, shape ``(d, rank)``, float64.

    Right orientation: right singular vectors; left orientation: left singular vectors.
    When ``rank`` exceeds the smaller side of the reshaped gradient, the basis is completed
    with orthonormal vectors of the null space (any completion spans the same space).
    """
    unfolded = grad.double().reshape(unfolded_shape(tuple(grad.shape), c, orientation))
    u, _, vh = torch.linalg.svd(unfolded, full_matrices=True)
    if orientation == "right":
        return vh[:rank].T.contiguous()
    return u[:, :rank].contiguous()


class MatrixSource:
    """``P`` of one parameter for refresh ``k``: the library's random matrix, or a float64 SVD basis.

    Args:
        shape: ``(n, m)``.
        c: granularity.
        rank: ``r``.
        distribution: ``"normal"``, ``"rademacher"``, ``"orthonormal"`` or ``"svd"``.
        orientation: ``"right"`` or ``"left"`` (already resolved).
        parameter_seed: ``derive_seed(base_seed, index)`` of the parameter.
    """

    def __init__(
        self, shape: Tuple[int, int], c: Fraction, rank: int, distribution: str, orientation: str, parameter_seed: int
    ) -> None:
        self.shape, self.c, self.rank = shape, c, rank
        self.distribution, self.orientation = distribution, orientation
        self.parameter_seed = parameter_seed

    def matrix(self, refresh: int, grad: Tensor) -> Tensor:
        """Return ``P`` (d, r) in float64 for refresh ``refresh``, computed from ``grad`` for ``"svd"``."""
        if self.distribution == "svd":
            return svd_basis(grad, self.c, self.orientation, self.rank)
        projector = VLoRPProjector(
            self.shape, self.c, self.rank, self.distribution, self.orientation, seed=self.parameter_seed
        )
        for _ in range(refresh):
            projector.refresh()
        return projector.matrix().double()


class ReferenceProjected:
    """Shared loop of the reference optimizers for one projected parameter (float64).

    Each call of :meth:`step` receives the window's full gradient ``G_t`` and performs
    optimizer step ``t`` (0-based count of completed steps). The matrix of refresh
    ``k = t // update_proj_gap`` is fetched when ``k`` changes, and the subspace momentum
    ``m`` is moved to the new subspace when ``momentum_transfer`` is set.

    Args:
        weight: initial ``W`` (n, m); copied to float64.
        source: the parameter's :class:`MatrixSource`.
        update_proj_gap: steps between refreshes.
        scale: back-projection factor.
        momentum_transfer: ``m <- project_new(back_old_unscaled(m))`` on refresh.
        hyperparameters: the rule's settings (``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``momentum``).
    """

    transfers_momentum_key: Optional[str] = "m"

    def __init__(
        self,
        weight: Tensor,
        source: MatrixSource,
        update_proj_gap: int,
        scale: float = 1.0,
        momentum_transfer: bool = False,
        **hyperparameters: float,
    ) -> None:
        self.weight = weight.detach().double().clone()
        self.source = source
        self.gap = update_proj_gap
        self.scale = scale
        self.momentum_transfer = momentum_transfer
        self.hyper = hyperparameters
        self.t = 0
        self.refresh: Optional[int] = None
        self.matrix: Optional[Tensor] = None
        self.state: Dict[str, Tensor] = {}

    def project(self, grad: Tensor) -> Tensor:
        assert self.matrix is not None
        return project(grad, self.matrix, self.source.c, self.source.orientation)

    def back(self, projected: Tensor, scale: Optional[float] = None) -> Tensor:
        assert self.matrix is not None
        factor = self.scale if scale is None else scale
        return project_back(projected, self.matrix, self.source.shape, self.source.c, self.source.orientation, factor)

    def step(self, grad: Tensor) -> Tensor:
        """Apply step ``t`` from the window gradient ``grad`` (n, m); return the new weight."""
        grad = grad.double()
        refresh = self.t // self.gap
        if refresh != self.refresh:
            new_matrix = self.source.matrix(refresh, grad)
            key = self.transfers_momentum_key
            if self.momentum_transfer and self.matrix is not None and key is not None and key in self.state:
                full = self.back(self.state[key], scale=1.0)
                self.matrix = new_matrix
                self.state[key] = self.project(full)
            self.matrix = new_matrix
            self.refresh = refresh
        self.t += 1
        self.update(self.project(grad), self.t)
        return self.weight

    def decay(self) -> None:
        self.weight *= 1.0 - self.hyper["lr"] * self.hyper.get("weight_decay", 0.0)

    def update(self, projected: Tensor, t: int) -> None:
        raise NotImplementedError

    def adam_step_size(self, t: int) -> float:
        beta1, beta2 = self.hyper["betas"]
        return self.hyper["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)


class ReferenceProjFactor(ReferenceProjected):
    """ProjFactor: subspace first moment, factored second moment of ``back(S)``."""

    def update(self, projected: Tensor, t: int) -> None:
        beta1, beta2 = self.hyper["betas"]
        n, m = self.source.shape
        state = self.state
        if "m" not in state:
            state["m"] = torch.zeros_like(projected)
            state["row"] = torch.zeros(n, dtype=torch.float64)
            state["col"] = torch.zeros(m, dtype=torch.float64)
        state["m"] = beta1 * state["m"] + (1 - beta1) * projected
        squared = self.back(projected) ** 2
        state["row"] = beta2 * state["row"] + (1 - beta2) * squared.sum(dim=1)
        state["col"] = beta2 * state["col"] + (1 - beta2) * squared.sum(dim=0)
        second = torch.outer(state["row"], state["col"]) / state["row"].sum()
        direction = self.back(state["m"]) / (second.sqrt() + self.hyper["eps"])
        self.decay()
        self.weight -= self.adam_step_size(t) * direction


class ReferenceAdamOS(ReferenceProjected):
    """Adam on the back-projected gradient with full-size moments (no subspace momentum)."""

    transfers_momentum_key = None

    def update(self, projected: Tensor, t: int) -> None:
        beta1, beta2 = self.hyper["betas"]
        full = self.back(projected)
        state = self.state
        if "m" not in state:
            state["m"] = torch.zeros_like(full)
            state["v"] = torch.zeros_like(full)
        state["m"] = beta1 * state["m"] + (1 - beta1) * full
        state["v"] = beta2 * state["v"] + (1 - beta2) * full**2
        direction = state["m"] / (state["v"].sqrt() + self.hyper["eps"])
        self.decay()
        self.weight -= self.adam_step_size(t) * direction


class ReferenceAdamSS(ReferenceProjected):
    """Adam inside the subspace, back-projected after normalization."""

    def update(self, projected: Tensor, t: int) -> None:
        beta1, beta2 = self.hyper["betas"]
        state = self.state
        if "m" not in state:
            state["m"] = torch.zeros_like(projected)
            state["v"] = torch.zeros_like(projected)
        state["m"] = beta1 * state["m"] + (1 - beta1) * projected
        state["v"] = beta2 * state["v"] + (1 - beta2) * projected**2
        normalized = state["m"] / (state["v"].sqrt() + self.hyper["eps"])
        self.decay()
        self.weight -= self.adam_step_size(t) * self.back(normalized)


class ReferenceSGD(ReferenceProjected):
    """SGD with optional subspace momentum: ``b = mu*b + S``, ``W -= lr*back(b)``."""

    def update(self, projected: Tensor, t: int) -> None:
        momentum = self.hyper.get("momentum", 0.0)
        if momentum > 0:
            previous = self.state.get("m", torch.zeros_like(projected))
            self.state["m"] = momentum * previous + projected
            buffer = self.state["m"]
        else:
            buffer = projected
        self.decay()
        self.weight -= self.hyper["lr"] * self.back(buffer)


REFERENCES = {
    "projfactor": ReferenceProjFactor,
    "os": ReferenceAdamOS,
    "ss": ReferenceAdamSS,
    "sgd": ReferenceSGD,
}


def parameter_seed(base_seed: int, index: int) -> int:
    """Seed of the parameter at position ``index`` over all groups."""
    return derive_seed(base_seed, index)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (Frobenius norms)."""
    expected = expected.double()
    difference = torch.linalg.vector_norm(actual.double() - expected)
    return float(difference / torch.linalg.vector_norm(expected).clamp_min(1e-300))


# ---------------------------------------------------------------------------- harness
# Runs a library optimizer and the reference above on the same gradients. The
# gradients enter through autograd (loss = sum(W * G) has gradient exactly G), so the
# library's gradient hooks and compressed accumulation are exercised as in training.

LEARNING_RATE = 0.05
BETAS = (0.9, 0.99)
EPS = 1e-6


@dataclass
class Case:
    """One comparison of a library optimizer against the reference.

    Args:
        kind: ``"projfactor"``, ``"os"``, ``"ss"`` or ``"sgd"``.
        shape: ``(n, m)`` of the two projected weights.
        granularity: ``c``.
        rank: ``r``.
        orientation: ``"auto"``, ``"right"`` or ``"left"``.
        distribution: projection distribution.
        steps: optimizer steps to run.
        gap: ``update_proj_gap``.
        weight_decay: decoupled weight decay of every group.
        momentum_transfer: the optimizer option of the same name.
        scale: back-projection factor.
        momentum: SGD momentum (only for ``"sgd"``).
        seed: base seed.
    """

    kind: str
    shape: Tuple[int, int]
    granularity: Granularity = 1
    rank: int = 2
    orientation: str = "auto"
    distribution: str = "normal"
    steps: int = 3
    gap: int = 2
    weight_decay: float = 0.0
    momentum_transfer: bool = False
    scale: float = 1.0
    momentum: float = 0.9
    seed: int = 0


def build_optimizer(case: Case, groups: List[Dict[str, Any]], **options: Any) -> Optimizer:
    """Construct the library optimizer of ``case.kind`` on ``groups``."""
    common = dict(
        update_proj_gap=case.gap,
        scale=case.scale,
        distribution=case.distribution,
        orientation=case.orientation,
        seed=case.seed,
        momentum_transfer=case.momentum_transfer,
        **options,
    )
    if case.kind == "sgd":
        return VLoRPSGD(groups, lr=LEARNING_RATE, momentum=case.momentum, weight_decay=case.weight_decay, **common)
    adam = dict(lr=LEARNING_RATE, betas=BETAS, eps=EPS, weight_decay=case.weight_decay, **common)
    if case.kind == "projfactor":
        return ProjFactor(groups, **adam)
    return VLoRPAdam(groups, scheme=case.kind, **adam)


def drive(optimizer: Optimizer, params: List[Tensor], gradients: List[List[Tensor]]) -> None:
    """Run one optimizer step per entry of ``gradients`` (one tensor per parameter)."""
    for step_gradients in gradients:
        loss = sum((param * grad).sum() for param, grad in zip(params, step_gradients))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def run_case(case: Case, generator: torch.Generator) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Run ``case`` on two projected weights and a dense bias; return updates per name.

    The parameter layout is a dense group ``[bias]`` first and then the projected group
    ``[first, second]``, so the projected weights have positions 1 and 2 over all groups.

    Returns:
        ``{name: (library_update, reference_update)}``, each ``W_T - W_0`` in float64.
    """
    n, m = case.shape
    c = as_fraction(case.granularity)
    orientation = resolve_orientation(case.shape, c, case.orientation)
    initial = {
        "bias": torch.randn(m, generator=generator) * 0.1,
        "first": torch.randn(n, m, generator=generator) * 0.1,
        "second": torch.randn(n, m, generator=generator) * 0.1,
    }
    params = {name: torch.nn.Parameter(value.clone()) for name, value in initial.items()}
    groups = [
        {"params": [params["bias"]], "names": ["bias"], "rank": None},
        {
            "params": [params["first"], params["second"]],
            "names": ["first", "second"],
            "rank": case.rank,
            "granularity": case.granularity,
        },
    ]
    optimizer = build_optimizer(case, groups)
    order = ["bias", "first", "second"]
    gradients = [[torch.randn(initial[name].shape, generator=generator) for name in order] for _ in range(case.steps)]
    drive(optimizer, [params[name] for name in order], gradients)

    hyper = dict(lr=LEARNING_RATE, betas=BETAS, eps=EPS, weight_decay=case.weight_decay, momentum=case.momentum)
    results: Dict[str, Tuple[Tensor, Tensor]] = {}
    for index, name in enumerate(order):
        if name == "bias":
            expected = _dense_reference(case, initial[name], [step[index] for step in gradients])
        else:
            source = MatrixSource(
                case.shape, c, case.rank, case.distribution, orientation, parameter_seed(case.seed, index)
            )
            rule = REFERENCES[case.kind](
                initial[name], source, case.gap, case.scale, case.momentum_transfer, **hyper
            )
            for step in gradients:
                rule.step(step[index])
            expected = rule.weight
        results[name] = (params[name].detach().double() - initial[name].double(), expected - initial[name].double())
    return results


def _dense_reference(case: Case, initial: Tensor, gradients: List[Tensor]) -> Tensor:
    """Dense rule of ``case.kind``: torch.optim.AdamW itself, or float64 SGD with momentum."""
    if case.kind != "sgd":
        param = torch.nn.Parameter(initial.clone())
        adamw = torch.optim.AdamW(
            [param], lr=LEARNING_RATE, betas=BETAS, eps=EPS, weight_decay=case.weight_decay, foreach=False
        )
        for grad in gradients:
            param.grad = grad.clone()
            adamw.step()
        return param.detach().double()
    weight = initial.double().clone()
    buffer: Optional[Tensor] = None
    for grad in gradients:
        if case.momentum > 0:
            buffer = grad.double() if buffer is None else case.momentum * buffer + grad.double()
            direction = buffer
        else:
            direction = grad.double()
        weight = weight * (1 - LEARNING_RATE * case.weight_decay) - LEARNING_RATE * direction
    return weight
