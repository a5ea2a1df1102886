"""Build optimizer parameter groups that mark which weights are projected."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from vlorp_lightning.projection import Distribution, GranularityLike, Orientation
from vlorp_lightning.targets import TargetSpec, select_targets

__all__ = ["vlorp_param_groups"]

_FLIPPED = {"right": "left", "left": "right", "auto": "auto"}


def vlorp_param_groups(
    model: nn.Module,
    *,
    rank: int,
    granularity: GranularityLike = 1,
    update_proj_gap: int = 30,
    scale: float = 1.0,
    distribution: Distribution = "normal",
    orientation: Orientation = "auto",
    targets: TargetSpec = "default",
    exclude: Optional[Sequence[str]] = None,
    weight_decay: float = 0.0,
    decay_dense_vectors: bool = False,
) -> List[Dict[str, Any]]:
    """Split a model's trainable parameters into projected and dense groups.

    Each group carries ``names`` (parameter names from ``model.named_parameters()``), which
    the optimizers use in messages and in :meth:`~vlorp_lightning.ProjFactor.state_bytes`.

    Args:
        model: the model; frozen parameters are left out, tied weights appear once.
        rank: ``r`` of every projected weight (>= 1).
        granularity: ``c``, an integer or ``1/k``; default 1.
        update_proj_gap: optimizer steps between refreshes; default 30.
        scale: back-projection factor; default 1.0.
        distribution: projection distribution; default ``"normal"``.
        orientation: ``"auto"`` (default), ``"right"`` or ``"left"``, stated for the
            ``(out_features, in_features)`` layout; Hugging Face ``Conv1D`` weights, stored
            transposed, get the opposite orientation so the same logical axis is projected.
        targets: which weights to project; see :func:`~vlorp_lightning.targets.select_targets`.
        exclude: modules never projected.
        weight_decay: decoupled weight decay of projected weights and of dense matrices.
        decay_dense_vectors: also decay dense 1-D parameters (biases, norm scales); default
            ``False``, the usual practice.

    Returns:
        Up to four groups: projected ``nn.Linear`` weights, projected ``Conv1D`` weights,
        dense matrices, and dense vectors; empty groups are left out.
    """
    selected = select_targets(model, targets, exclude)
    projection = dict(
        rank=rank,
        granularity=granularity,
        update_proj_gap=update_proj_gap,
        scale=scale,
        distribution=distribution,
        weight_decay=weight_decay,
    )
    groups: List[Dict[str, Any]] = []
    for transposed in (False, True):
        members = [target for target in selected if target.transposed == transposed]
        if members:
            groups.append(
                {
                    "params": [target.param for target in members],
                    "names": [target.name for target in members],
                    "orientation": _FLIPPED[orientation] if transposed else orientation,
                    **projection,
                }
            )

    projected_ids = {id(target.param) for target in selected}
    matrices: Dict[str, Any] = {"params": [], "names": [], "rank": None, "weight_decay": weight_decay}
    vectors: Dict[str, Any] = {
        "params": [],
        "names": [],
        "rank": None,
        "weight_decay": weight_decay if decay_dense_vectors else 0.0,
    }
    seen = set(projected_ids)
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        group = matrices if param.dim() >= 2 else vectors
        group["params"].append(param)
        group["names"].append(name)
    groups.extend(group for group in (matrices, vectors) if group["params"])
    return groups
