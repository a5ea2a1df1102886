"""Typed optimizer settings of :class:`~vlorp_lightning.VLoRPMixin`, readable by LightningCLI.

"The paper" below is Wang et al., "Memory-Efficient LLM Training by Various-Grained Low-Rank
Projection of Gradients", ICML 2025, arXiv:2505.01744.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple, Union

from vlorp_lightning.projection import DISTRIBUTIONS, ORIENTATIONS, parse_granularity

__all__ = ["VLoRPConfig", "OPTIMIZERS"]

OPTIMIZERS: Tuple[str, ...] = ("projfactor", "os", "ss", "sgd", "adamw")


@dataclass
class VLoRPConfig:
    """Optimizer, projection and schedule settings of a model that uses :class:`~vlorp_lightning.VLoRPMixin`.

    Every field can be set from a LightningCLI YAML file (``model.init_args.vlorp``).

    Args:
        optimizer: ``"projfactor"`` (default), the paper's reference schemes ``"os"``
            (Adam moments in the original space), ``"ss"`` (Adam moments in the subspace) and
            ``"sgd"``, or ``"adamw"`` (dense ``torch.optim.AdamW``, for comparison).
        lr: peak learning rate; default 1e-4.
        betas: Adam coefficients; default ``(0.9, 0.999)``.
        eps: added to the second-moment root; default 1e-6.
        weight_decay: decoupled weight decay of matrices (dense 1-D parameters get none); default 0.
        momentum: momentum of ``"sgd"`` in ``[0, 1)``; default 0.
        granularity: ``c``, a positive integer or ``"1/k"``; default 1. State grows linearly with it.
        rank: ``r``; default 8. Ignored when ``budget`` is set.
        budget: memory budget per row ``M = c * r``; when set, ``rank = budget / granularity``,
            which must be a positive integer. Default ``None``.
        update_proj_gap: optimizer steps between projection refreshes; default 30 (the paper's).
        scale: back-projection factor; default 1.0 (the paper uses 0.25).
        distribution: ``"normal"`` (default), ``"rademacher"``, ``"orthonormal"`` or ``"svd"``.
        orientation: ``"auto"`` (default), ``"right"`` or ``"left"``.
        seed: base seed of all projections; default 0.
        momentum_transfer: carry the first moment into the new subspace on refresh; default ``False``.
        compress_gradients: accumulate micro-batch gradients in the projected space and free
            full gradients after each backward; default ``True``.
        update_in_backward: update each parameter inside backward at the end of an accumulation
            window, so at most one full gradient exists; default ``False``. Excludes gradient
            clipping, fp16 loss scaling and DDP.
        state_dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"param"``.
        targets: weights to project: ``"default"`` (attention and MLP linear layers),
            ``"all-linear"``, a list of module names or suffixes, or ``"re:<regex>"``.
        exclude: module names, suffixes or ``"re:<regex>"`` never projected; default none.
        schedule: ``"constant"`` (default), ``"linear"`` or ``"cosine"``, stepped once per optimizer step.
        warmup_steps: optimizer steps of linear warmup; default 0.
        min_lr_ratio: final learning rate as a fraction of ``lr``; default 0.
        total_steps: optimizer steps the schedule spans; default ``None`` uses
            ``trainer.estimated_stepping_batches``.
    """

    optimizer: Literal["projfactor", "os", "ss", "sgd", "adamw"] = "projfactor"
    lr: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    momentum: float = 0.0
    granularity: Union[int, float, str] = 1
    rank: int = 8
    budget: Optional[int] = None
    update_proj_gap: int = 30
    scale: float = 1.0
    distribution: Literal["normal", "rademacher", "orthonormal", "svd"] = "normal"
    orientation: Literal["auto", "right", "left"] = "auto"
    seed: int = 0
    momentum_transfer: bool = False
    compress_gradients: bool = True
    update_in_backward: bool = False
    state_dtype: Literal["float32", "bfloat16", "param"] = "float32"
    targets: Union[str, List[str]] = "default"
    exclude: List[str] = field(default_factory=list)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    total_steps: Optional[int] = None

    def __post_init__(self) -> None:
        problems: List[str] = []
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            problems.append(f"lr={self.lr!r} must be > 0")
        if len(tuple(self.betas)) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas={self.betas!r} must be two values in [0, 1), such as [0.9, 0.999]")
        if not self.eps >= 0:
            problems.append(f"eps={self.eps!r} must be >= 0")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay={self.weight_decay!r} must be >= 0")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum={self.momentum!r} must lie in [0, 1)")
        try:
            parse_granularity(self.granularity)
        except ValueError as error:
            problems.append(str(error))
        if self.budget is None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            problems.append(f"rank={self.rank!r} must be an integer >= 1")
        if self.budget is not None:
            try:
                self.resolved_rank()
            except ValueError as error:
                problems.append(str(error))
        if self.update_proj_gap < 1:
            problems.append(f"update_proj_gap={self.update_proj_gap!r} must be >= 1")
        if self.distribution not in DISTRIBUTIONS:
            problems.append(f"distribution={self.distribution!r} is unknown; choose one of {', '.join(DISTRIBUTIONS)}")
        if self.orientation not in ORIENTATIONS:
            problems.append(f"orientation={self.orientation!r} is unknown; choose one of {', '.join(ORIENTATIONS)}")
        if self.schedule not in ("constant", "linear", "cosine"):
            problems.append(f"schedule={self.schedule!r} is unknown; choose constant, linear or cosine")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps!r} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio={self.min_lr_ratio!r} must lie in [0, 1]")
        if self.total_steps is not None and self.total_steps < 1:
            problems.append(f"total_steps={self.total_steps!r} must be >= 1 or null")
        if self.update_in_backward and not self.compress_gradients and self.optimizer != "adamw":
            problems.append("update_in_backward=True needs compress_gradients=True")
        if problems:
            raise ValueError("invalid VLoRPConfig: " + "; ".join(problems))

    def resolved_rank(self) -> int:
        """Return the rank ``r``: ``budget / granularity`` when a budget is set, else ``rank``.

        Raises:
            ValueError: when the budget is not a positive multiple of the granularity.
        """
        if self.budget is None:
            return self.rank
        c = parse_granularity(self.granularity)
        rank = Fraction(self.budget) / c
        if self.budget < 1 or rank.denominator != 1 or rank < 1:
            raise ValueError(
                f"budget={self.budget!r} is not a positive integer multiple of granularity {self.granularity!r}; "
                "choose budget = granularity * rank"
            )
        return int(rank)

    @classmethod
    def from_any(cls, value: "VLoRPConfig | Mapping[str, Any] | None") -> "VLoRPConfig":
        """Build a config from a config, a mapping of field names, or ``None`` (defaults).

        Raises:
            ValueError: on an unknown field name; the message lists the valid names.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(f"unknown VLoRPConfig option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
            return cls(**dict(value))
        raise TypeError(f"vlorp must be a VLoRPConfig, a dict or None, got {type(value).__name__}")

    def to_dict(self) -> Dict[str, Any]:
        """Plain-data copy (lists, numbers, strings), safe for ``save_hyperparameters`` and ``weights_only`` loads."""
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data
