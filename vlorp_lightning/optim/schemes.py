"""Reference update schemes of the VLoRP paper on the same projection machinery.

``VLoRPAdam(scheme="os")`` keeps full-size Adam moments of the back-projected gradient
("original space"), ``VLoRPAdam(scheme="ss")`` keeps Adam moments inside the subspace
("subspace"), and :class:`VLoRPSGD` applies the back-projected (momentum) gradient. They
exist to reproduce the comparisons against :class:`~vlorp_lightning.ProjFactor` in Wang et
al., "Memory-Efficient LLM Training by Various-Grained Low-Rank Projection of Gradients",
ICML 2025, arXiv:2505.01744.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Literal, Optional, Tuple

import torch
from torch import Tensor

from vlorp_lightning.optim.base import ProjectedOptimizer
from vlorp_lightning.projection import Distribution, GranularityLike, Orientation, VLoRPProjector

__all__ = ["VLoRPAdam", "VLoRPSGD"]

Scheme = Literal["os", "ss"]


class VLoRPAdam(ProjectedOptimizer):
    r"""Adam on VLoRP-projected gradients, in the original space or in the subspace.

    With :math:`S_t` the projected gradient and :math:`\mathcal{P}^{-1}` the back-projection
    (including ``scale``), and :math:`k_t = \gamma \sqrt{1 - \beta_2^t} / (1 - \beta_1^t)`:

    .. math::
        \begin{aligned}
        &\textbf{os}: B_t = \mathcal{P}^{-1}(S_t),\ m_t = \beta_1 m_{t-1} + (1-\beta_1) B_t,
            \ v_t = \beta_2 v_{t-1} + (1-\beta_2) B_t^2, \\
        &\qquad W_t = (1 - \gamma\lambda) W_{t-1} - k_t\, m_t / (\sqrt{v_t} + \epsilon) \\
        &\textbf{ss}: m_t = \beta_1 m_{t-1} + (1-\beta_1) S_t,
            \ v_t = \beta_2 v_{t-1} + (1-\beta_2) S_t^2, \\
        &\qquad W_t = (1 - \gamma\lambda) W_{t-1} - k_t\, \mathcal{P}^{-1}\big(m_t / (\sqrt{v_t} + \epsilon)\big)
        \end{aligned}

    Memory per projected ``(n, m)`` parameter: ``os`` keeps ``2*n*m`` elements (as much as
    AdamW, it only removes the full gradient); ``ss`` keeps ``2*n*c*r``. Both add the
    ``n*c*r`` accumulator with ``compress_gradients``. Dense groups use AdamW.
    ``momentum_transfer`` moves only the ``ss`` first moment.

    Args:
        params: parameters or groups; a group is projected when its ``rank`` is not ``None``.
        lr, betas, eps, weight_decay: as in :class:`~vlorp_lightning.ProjFactor`
            (defaults 1e-3, (0.9, 0.999), 1e-6, 0).
        scheme: ``"os"`` (default) or ``"ss"``.
        granularity, rank, update_proj_gap, scale, distribution, orientation, seed,
            compress_gradients, update_in_backward, momentum_transfer, state_dtype: as in
            :class:`~vlorp_lightning.ProjFactor`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        scheme: Scheme = "os",
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
        if scheme not in ("os", "ss"):
            raise ValueError(f"unknown scheme {scheme!r}; choose 'os' (original space) or 'ss' (subspace)")
        self.scheme = scheme
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, granularity=granularity, rank=rank,
            update_proj_gap=update_proj_gap, scale=scale, distribution=distribution, orientation=orientation,
        )  # fmt: skip
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
        shape = self._projectors[param].shape if self.scheme == "os" else self._projectors[param].state_shape
        dtype = self._state_dtype_for(param)
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=param.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=param.device)

    def _momentum_to_transfer(self, param: Tensor) -> Optional[Tensor]:
        # The os first moment lives in the original space, so a refresh leaves it as is, even
        # at full rank with c = 1, where its shape equals the subspace shape.
        if self.scheme == "os":
            return None
        return super()._momentum_to_transfer(param)

    def _projected_update(
        self, param: Tensor, grad: Tensor, state: Dict[str, Any], group: Dict[str, Any], projector: VLoRPProjector
    ) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        step = float(state["step"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        source = projector.project_back(grad.float()) if self.scheme == "os" else grad.float()
        source = source.to(exp_avg.dtype)
        exp_avg.lerp_(source, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(source, source, value=1 - beta2)
        # Out-of-place sqrt: for float32 state, .float() returns exp_avg_sq itself.
        normalized = exp_avg.float() / (exp_avg_sq.float().sqrt().add_(eps))
        direction = normalized if self.scheme == "os" else projector.project_back(normalized)
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        if weight_decay:
            param.mul_(1 - lr * weight_decay)
        param.add_(direction.to(param.dtype), alpha=-step_size)


class VLoRPSGD(ProjectedOptimizer):
    r"""SGD on VLoRP-projected gradients, with optional momentum in the subspace.

    .. math::
        \begin{aligned}
        &b_t = \mu\, b_{t-1} + S_t \quad (b_t = S_t \text{ when } \mu = 0) \\
        &W_t = (1 - \gamma\lambda) W_{t-1} - \gamma\, \mathcal{P}^{-1}(b_t)
        \end{aligned}

    Dense groups apply the same rule to the full gradient. Memory per projected
    parameter: ``n*c*r`` for the momentum buffer when ``momentum > 0``, plus the
    accumulator with ``compress_gradients``.

    Args:
        params: parameters or groups; a group is projected when its ``rank`` is not ``None``.
        lr: learning rate :math:`\gamma`; default 1e-3.
        momentum: :math:`\mu` in ``[0, 1)``; default 0.
        weight_decay: decoupled weight decay :math:`\lambda`; default 0.
        granularity, rank, update_proj_gap, scale, distribution, orientation, seed,
            compress_gradients, update_in_backward, momentum_transfer, state_dtype: as in
            :class:`~vlorp_lightning.ProjFactor`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
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
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum={momentum!r}; use a value in [0, 1), such as 0.9")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay,
            granularity=granularity, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
            distribution=distribution, orientation=orientation,
        )  # fmt: skip
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
        state["step"] = torch.zeros((), dtype=torch.float32)
        if self._group_of_cached(param)["momentum"] > 0:
            shape = self._projectors[param].state_shape
            state["exp_avg"] = torch.zeros(shape, dtype=self._state_dtype_for(param), device=param.device)

    def _init_dense_state(self, param: Tensor, state: Dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32)
        if self._group_of_cached(param)["momentum"] > 0:
            state["exp_avg"] = torch.zeros_like(param, dtype=self._state_dtype_for(param))

    def _apply(self, param: Tensor, grad: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> Tensor:
        """Update the momentum buffer (if any) and return the direction in the gradient's space."""
        if group["momentum"] > 0:
            buffer = state["exp_avg"]
            buffer.mul_(group["momentum"]).add_(grad.to(buffer.dtype))
            return buffer.float()
        return grad.float()

    def _decay(self, param: Tensor, group: Dict[str, Any]) -> None:
        if group["weight_decay"]:
            param.mul_(1 - group["lr"] * group["weight_decay"])

    def _projected_update(
        self, param: Tensor, grad: Tensor, state: Dict[str, Any], group: Dict[str, Any], projector: VLoRPProjector
    ) -> None:
        direction = projector.project_back(self._apply(param, grad, state, group))
        self._decay(param, group)
        param.add_(direction.to(param.dtype), alpha=-group["lr"])

    def _dense_update(self, param: Tensor, grad: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        direction = self._apply(param, grad, state, group)
        self._decay(param, group)
        param.add_(direction.to(param.dtype), alpha=-group["lr"])
