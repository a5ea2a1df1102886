"""ProjFactor: Adam-like updates from VLoRP-projected gradients with a factored second moment.

Source ("the paper" below): Wang et al., "Memory-Efficient LLM Training by Various-Grained
Low-Rank Projection of Gradients", ICML 2025, arXiv:2505.01744, and its reference code.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Tuple

import torch
from torch import Tensor

from vlorp_lightning.optim.base import ProjectedOptimizer
from vlorp_lightning.projection import Distribution, GranularityLike, Orientation, VLoRPProjector

__all__ = ["ProjFactor"]


class ProjFactor(ProjectedOptimizer):
    r"""Memory-efficient Adam-like optimizer for VLoRP-projected gradients.

    For a projected parameter :math:`W \in \mathbb{R}^{n \times m}` with projector
    :math:`\mathcal{P}` (:class:`~vlorp_lightning.VLoRPProjector`, back-projection
    :math:`\mathcal{P}^{-1}` including the factor ``scale``):

    .. math::
        \begin{aligned}
        &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2, \epsilon, \lambda \text{ (weight decay)} \\
        &\textbf{initialize}: m_0 = 0 \in \mathbb{R}^{nc \times r},\ v^{row}_0 = 0 \in \mathbb{R}^{n},
            \ v^{col}_0 = 0 \in \mathbb{R}^{m} \\
        &\textbf{for } t = 1, 2, \dots: \\
        &\quad S_t = \mathcal{P}(G_t) \quad \text{(sum of the window's projected micro-batch gradients)} \\
        &\quad m_t = \beta_1 m_{t-1} + (1 - \beta_1) S_t \\
        &\quad B_t = \mathcal{P}^{-1}(S_t) \\
        &\quad v^{row}_t = \beta_2 v^{row}_{t-1} + (1 - \beta_2) \textstyle\sum_j (B_t^2)_{:, j} \\
        &\quad v^{col}_t = \beta_2 v^{col}_{t-1} + (1 - \beta_2) \textstyle\sum_i (B_t^2)_{i, :} \\
        &\quad V_t = v^{row}_t (v^{col}_t)^\top / \textstyle\sum_i v^{row}_{t,i} \\
        &\quad D_t = \mathcal{P}^{-1}(m_t) / (\sqrt{V_t} + \epsilon) \\
        &\quad W_t = (1 - \gamma\lambda) W_{t-1}
            - \gamma \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} D_t \\
        &\textbf{return } W_t
        \end{aligned}

    For the left orientation the first moment has shape ``(r, m*c)`` instead. Dense
    groups (``rank=None``: biases, norms, embeddings, heads) use AdamW with the same
    ``lr``, ``betas``, ``eps`` and ``weight_decay`` of their group.

    The projection is refreshed every ``update_proj_gap`` optimizer steps and stays fixed
    within an accumulation window.

    .. Note::
        Deviations from the paper's reference code: (1) ``step()`` performs the update, and
        all state lives in the optimizer, so Lightning's loops, schedulers and checkpoints work;
        (2) the projection is fixed for a whole accumulation window, where the reference code
        redraws it for every micro-batch of a refresh step; (3) ``momentum_transfer`` optionally
        maps the first moment into the new subspace on refresh.

    .. Note::
        ``scale`` multiplies both :math:`B_t` and :math:`\mathcal{P}^{-1}(m_t)`, so it cancels in
        :math:`D_t` except against :math:`\epsilon`. The paper's settings are ``scale=0.25`` and
        ``update_proj_gap=30``.

    .. Note::
        When every :math:`v^{row}` entry is 0 (a zero gradient from the start) the sum in
        :math:`V_t` is clamped to the smallest positive float, so :math:`V_t = 0` and
        :math:`D_t = \mathcal{P}^{-1}(m_t) / \epsilon`.

    Memory per projected parameter: ``n*c*r`` (first moment) ``+ n + m`` (second-moment
    factors) ``+ n*c*r`` (accumulator, with ``compress_gradients``) elements of
    ``state_dtype`` for the right orientation, ``m*c*r`` in place of ``n*c*r`` for the left;
    AdamW would keep ``2*n*m``. Each step also uses three transient ``n x m`` tensors.

    Args:
        params: parameters or groups, usually from :func:`~vlorp_lightning.vlorp_param_groups`.
            A group is projected when its ``rank`` is not ``None``.
        lr: learning rate :math:`\gamma`; default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``; default ``(0.9, 0.999)``.
        eps: :math:`\epsilon`, added to :math:`\sqrt{V_t}`; default 1e-6.
        weight_decay: decoupled weight decay :math:`\lambda`; default 0.
        granularity: default ``c`` of projected groups (integer or ``1/k``); default 1. Memory
            grows linearly in ``c``.
        rank: default ``r`` of groups; ``None`` (default) leaves groups without their own
            ``rank`` dense. Memory grows linearly in ``r``.
        update_proj_gap: optimizer steps between projection refreshes; default 30.
        scale: factor applied on back-projection; default 1.0 (see the Note).
        distribution: ``"normal"``, ``"rademacher"``, ``"orthonormal"`` or ``"svd"``; default ``"normal"``.
            ``"svd"`` stores a ``(d, r)`` basis per parameter and runs an SVD per refresh.
        orientation: ``"auto"``, ``"right"`` or ``"left"``; default ``"auto"``.
        seed: base seed of all projections; default 0.
        compress_gradients: see :class:`~vlorp_lightning.optim.base.ProjectedOptimizer`; default ``True``.
        update_in_backward: see the base class; default ``False``.
        momentum_transfer: see the base class; default ``False``.
        state_dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"param"``; halving it halves the state.

    Example:
        >>> import torch
        >>> from vlorp_lightning import ProjFactor
        >>> weight = torch.nn.Parameter(torch.randn(8, 16))
        >>> optimizer = ProjFactor([{"params": [weight], "rank": 2, "granularity": 4}], lr=1e-2)
        >>> weight.sum().backward()
        >>> optimizer.step()
        >>> optimizer.state[weight]["exp_avg"].shape
        torch.Size([32, 2])
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        granularity: GranularityLike = 1,
        rank: "int | None" = None,
        update_proj_gap: int = 30,
        scale: float = 1.0,
        distribution: Distribution = "normal",
        orientation: Orientation = "auto",
        seed: int = 0,
        compress_gradients: bool = True,
        update_in_backward: bool = False,
        momentum_transfer: bool = False,
        state_dtype: str = "float32",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            granularity=granularity,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            distribution=distribution,
            orientation=orientation,
        )
        super().__init__(
            params,
            defaults,
            seed=seed,
            compress_gradients=compress_gradients,
            update_in_backward=update_in_backward,
            momentum_transfer=momentum_transfer,
            state_dtype=state_dtype,
        )

    def _init_projected_state(self, param: Tensor, state: Dict[str, Any]) -> None:
        projector = self._projectors[param]
        dtype = self._state_dtype_for(param)
        n, m = projector.shape
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros(projector.state_shape, dtype=dtype, device=param.device)
        state["exp_avg_row"] = torch.zeros(n, dtype=dtype, device=param.device)
        state["exp_avg_col"] = torch.zeros(m, dtype=dtype, device=param.device)

    def _projected_update(
        self, param: Tensor, grad: Tensor, state: Dict[str, Any], group: Dict[str, Any], projector: VLoRPProjector
    ) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        step = float(state["step"])
        exp_avg, row, col = state["exp_avg"], state["exp_avg_row"], state["exp_avg_col"]

        # First moment in the subspace.
        exp_avg.lerp_(grad.to(exp_avg.dtype), 1 - beta1)

        # Factored second moment of the back-projected gradient (float32 for accuracy).
        back = projector.project_back(grad.float())
        squared = back.square_()
        row.mul_(beta2).add_(squared.sum(dim=1).to(row.dtype), alpha=1 - beta2)
        col.mul_(beta2).add_(squared.sum(dim=0).to(col.dtype), alpha=1 - beta2)
        del back, squared

        row32, col32 = row.float(), col.float()
        total = row32.sum().clamp_min(torch.finfo(torch.float32).tiny)
        denom = torch.outer(row32, col32).div_(total).sqrt_().add_(eps)

        direction = projector.project_back(exp_avg.float()).div_(denom)
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        if weight_decay:
            param.mul_(1 - lr * weight_decay)
        param.add_(direction.to(param.dtype), alpha=-step_size)
