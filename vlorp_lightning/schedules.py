"""Learning-rate schedules stepped once per optimizer step (no Lightning import)."""

from __future__ import annotations

import math
from typing import Callable, Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["Schedule", "lr_multiplier", "build_scheduler"]

Schedule = Literal["constant", "linear", "cosine"]


def lr_multiplier(
    step: int, schedule: Schedule, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> float:
    """Return the factor applied to the base learning rate at optimizer step ``step``.

    Linear warmup from ``1 / (warmup_steps + 1)`` to 1 over the first ``warmup_steps``
    steps, then ``"constant"`` stays at 1, ``"linear"`` falls linearly and ``"cosine"`` along
    half a cosine to ``min_lr_ratio`` at ``total_steps`` (and stays there).

    Args:
        step: optimizer steps taken so far (0 for the first step).
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"``.
        total_steps: optimizer steps of the whole run (>= 1).
        warmup_steps: steps of linear warmup (>= 0).
        min_lr_ratio: final factor in ``[0, 1]``.

    Example:
        >>> lr_multiplier(0, "cosine", 100, warmup_steps=0, min_lr_ratio=0.1)
        1.0
        >>> round(lr_multiplier(100, "cosine", 100, min_lr_ratio=0.1), 6)
        0.1
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(
    optimizer: Optimizer, schedule: Schedule, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Wrap :func:`lr_multiplier` in a ``LambdaLR`` for every parameter group.

    Raises:
        ValueError: on an unknown schedule, ``total_steps < 1``, negative warmup or a
            ``min_lr_ratio`` outside ``[0, 1]``.
    """
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; choose 'constant', 'linear' or 'cosine'")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}; set max_steps or max_epochs on the Trainer")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    factor: Callable[[int], float] = lambda step: lr_multiplier(step, schedule, total_steps, warmup_steps, min_lr_ratio)  # noqa: E731
    return LambdaLR(optimizer, factor)
