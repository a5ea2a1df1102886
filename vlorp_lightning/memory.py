"""Static optimizer-state estimates from parameter shapes alone (no tensors are allocated).

Works on a model built on the ``meta`` device, so a 7B model can be planned on a laptop.
No Lightning import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from torch import nn

from vlorp_lightning.projection import GranularityLike, VLoRPProjector
from vlorp_lightning.targets import TargetSpec, select_targets

__all__ = ["StateEstimate", "estimate_state_bytes"]


@dataclass
class StateEstimate:
    """Predicted optimizer-state bytes of one configuration.

    Attributes:
        per_param: bytes per parameter name (projected and dense).
        projected_bytes: total over projected matrices.
        dense_bytes: total over dense parameters (AdamW moments).
        adamw_bytes: what ``torch.optim.AdamW`` would keep for the same parameters
            (``2 * numel * state_bytes_per_element``).
        projected_shapes: shapes of the projected matrices.
    """

    per_param: Dict[str, int] = field(default_factory=dict)
    projected_bytes: int = 0
    dense_bytes: int = 0
    adamw_bytes: int = 0
    projected_shapes: List[tuple] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Projected plus dense bytes."""
        return self.projected_bytes + self.dense_bytes

    @property
    def ratio_to_adamw(self) -> float:
        """``total_bytes / adamw_bytes`` (0 when nothing is trainable)."""
        return self.total_bytes / self.adamw_bytes if self.adamw_bytes else 0.0


def estimate_state_bytes(
    model: nn.Module,
    *,
    optimizer: str = "projfactor",
    granularity: GranularityLike = 1,
    rank: int = 8,
    orientation: str = "auto",
    distribution: str = "normal",
    targets: TargetSpec = "default",
    exclude: Optional[Sequence[str]] = None,
    compress_gradients: bool = True,
    momentum: float = 0.0,
    bytes_per_element: int = 4,
) -> StateEstimate:
    """Predict the steady-state optimizer state of a model, in bytes.

    Per projected ``(n, m)`` matrix with projected state of ``s`` elements (``n*c*r`` right,
    ``m*c*r`` left) and ``a = s`` with ``compress_gradients`` (else 0):

    * ``"projfactor"``: ``s + n + m + a``
    * ``"ss"``: ``2*s + a``; ``"os"``: ``2*n*m + a``
    * ``"sgd"``: ``s + a`` with momentum, else ``a``
    * ``"adamw"``: ``2*n*m``

    plus ``d*r`` for a stored ``"svd"`` basis (``d`` the unit length). Dense parameters
    count ``2*numel`` (AdamW) or ``numel``/0 for SGD with/without momentum.

    Args:
        model: the model, on any device including ``meta``.
        optimizer: ``"projfactor"``, ``"os"``, ``"ss"``, ``"sgd"`` or ``"adamw"``.
        granularity, rank, orientation, distribution: projection settings as in
            :class:`~vlorp_lightning.VLoRPProjector`.
        targets, exclude: as in :func:`~vlorp_lightning.select_targets`.
        compress_gradients: count the projected accumulator; default ``True``.
        momentum: SGD momentum (only its being non-zero matters).
        bytes_per_element: 4 for float32 state (default), 2 for bfloat16.

    Returns:
        A :class:`StateEstimate`.
    """
    estimate = StateEstimate()
    projected = {} if optimizer == "adamw" else {id(t.param): t for t in select_targets(model, targets, exclude)}
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        numel = param.numel()
        estimate.adamw_bytes += 2 * numel * bytes_per_element
        if id(param) in projected:
            target = projected[id(param)]
            side = orientation
            if target.transposed and orientation in ("right", "left"):
                side = "left" if orientation == "right" else "right"
            projector = VLoRPProjector(tuple(param.shape), granularity, rank, distribution=distribution, orientation=side)
            elements = _projected_elements(optimizer, projector, compress_gradients, momentum)
            bytes_ = elements * bytes_per_element + projector.stored_bytes()
            estimate.projected_bytes += bytes_
            estimate.projected_shapes.append(tuple(param.shape))
        else:
            if optimizer == "sgd":
                bytes_ = (numel if momentum > 0 else 0) * bytes_per_element
            else:
                bytes_ = 2 * numel * bytes_per_element
            estimate.dense_bytes += bytes_
        estimate.per_param[name] = bytes_
    return estimate


def _projected_elements(optimizer: str, projector: VLoRPProjector, compress: bool, momentum: float) -> int:
    n, m = projector.shape
    state = projector.state_numel()
    accumulator = state if compress else 0
    if optimizer == "projfactor":
        return state + n + m + accumulator
    if optimizer == "ss":
        return 2 * state + accumulator
    if optimizer == "os":
        return 2 * n * m + accumulator
    if optimizer == "sgd":
        return (state if momentum > 0 else 0) + accumulator
    raise ValueError(f"unknown optimizer {optimizer!r}; choose projfactor, os, ss, sgd or adamw")
