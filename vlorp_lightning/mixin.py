"""Lightning glue: a mixin that gives a LightningModule VLoRP optimizers.

This module contains no optimizer math. It wires :mod:`vlorp_lightning.optim` into
Lightning's hooks (accumulation boundaries, clipping, loss scaling, DDP, logging).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Union

import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn.parallel import DistributedDataParallel

from vlorp_lightning.config import VLoRPConfig
from vlorp_lightning.memory import estimate_state_bytes
from vlorp_lightning.optim import ProjectedOptimizer, ProjFactor, VLoRPAdam, VLoRPSGD, vlorp_param_groups
from vlorp_lightning.schedules import build_scheduler

log = logging.getLogger(__name__)

__all__ = ["VLoRPMixin", "VLoRPConfig", "LOGGED_KEYS"]

#: Keys logged once per optimizer step (units in brackets).
LOGGED_KEYS = {
    "vlorp/grad_norm": "global L2 gradient norm before clipping; projected gradients count through their accumulators",
    "vlorp/skipped_steps": "optimizer steps skipped so far because a gradient was NaN or Inf [count]",
    "vlorp/lr": "learning rate of the first parameter group after the scheduler step",
}


class VLoRPMixin:
    """Give a ``LightningModule`` VLoRP optimizers through ``configure_optimizers``.

    Put it first among the bases and pass ``vlorp`` on to it::

        class MyModel(VLoRPMixin, L.LightningModule):
            def __init__(self, vlorp: VLoRPConfig | None = None):
                super().__init__(vlorp=vlorp)
                self.net = ...

            def training_step(self, batch, batch_idx):
                ...  # unchanged

    The mixin implements ``configure_optimizers``, ``configure_gradient_clipping``,
    ``on_train_batch_start``, ``on_before_optimizer_step`` and ``on_train_batch_end``; a
    subclass that overrides one of these hooks must call ``super()``.

    What it does with each Lightning feature:

    * ``accumulate_grad_batches=k``: micro-batch gradients of projected weights are summed in
      the projected space (full gradients freed after each backward).
    * ``gradient_clip_val`` with ``gradient_clip_algorithm="norm"`` clips the global norm
      over dense gradients and projected accumulators; ``"value"`` is rejected for projected
      optimizers, because clamping projected coordinates does not clamp the gradient.
    * ``precision="16-mixed"``: the accumulators are unscaled and checked for Inf/NaN with the
      dense gradients, and an overflow skips the step and lowers the scale, as AMP does.
    * DDP: DDP's own gradient all-reduce is switched off; before each step the mixin
      averages dense gradients and projected accumulators over the ranks (every rank draws
      the same projections), so the communication is compressed too.
    * ``update_in_backward``: the mixin marks the last micro-batch of each window, so each
      parameter is updated inside backward; Lightning still calls ``optimizer.step``, which
      advances the counters, and the scheduler still ticks once per optimizer step.

    Logged every optimizer step: see :data:`LOGGED_KEYS`.

    Args:
        vlorp: a :class:`VLoRPConfig`, a dict of its fields, or ``None`` for the defaults.
    """

    def __init__(self, *args: Any, vlorp: Union[VLoRPConfig, Mapping[str, Any], None] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vlorp_config = VLoRPConfig.from_any(vlorp)
        self._vlorp_logged_step = -1

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> Dict[str, Any]:
        """Build the optimizer and a per-step learning-rate scheduler from :attr:`vlorp_config`."""
        config = self.vlorp_config
        self._vlorp_check_trainer(config)
        optimizer = self._vlorp_build_optimizer(config)
        total = config.total_steps or self._vlorp_total_steps()
        scheduler = build_scheduler(optimizer, config.schedule, total, config.warmup_steps, config.min_lr_ratio)
        self._vlorp_log_summary(config, optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"},
        }

    def _vlorp_build_optimizer(self, config: VLoRPConfig) -> torch.optim.Optimizer:
        if config.optimizer == "adamw":
            groups = _dense_groups(self, config.weight_decay)
            return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)
        groups = vlorp_param_groups(
            self,
            rank=config.resolved_rank(),
            granularity=config.granularity,
            update_proj_gap=config.update_proj_gap,
            scale=config.scale,
            distribution=config.distribution,
            orientation=config.orientation,
            targets=config.targets,
            exclude=config.exclude,
            weight_decay=config.weight_decay,
        )
        if not any(group["rank"] is not None for group in groups):
            raise MisconfigurationException(
                f"{type(self).__name__}: VLoRP selected no weight to project with targets={config.targets!r}; "
                "set vlorp.targets to module names of your model, or use optimizer='adamw'"
            )
        common = dict(
            seed=config.seed,
            compress_gradients=config.compress_gradients,
            update_in_backward=config.update_in_backward,
            momentum_transfer=config.momentum_transfer,
            state_dtype=config.state_dtype,
        )
        if config.optimizer == "projfactor":
            return ProjFactor(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, **common)
        if config.optimizer in ("os", "ss"):
            return VLoRPAdam(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, scheme=config.optimizer, **common)
        return VLoRPSGD(groups, lr=config.lr, momentum=config.momentum, **common)

    def _vlorp_total_steps(self) -> int:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            raise MisconfigurationException(
                f"{type(self).__name__}: the learning-rate schedule needs the run length; attach a Trainer "
                "or set vlorp.total_steps"
            )
        total = trainer.estimated_stepping_batches
        if total == float("inf") or total is None:
            if self.vlorp_config.schedule == "constant" and self.vlorp_config.warmup_steps == 0:
                return 1
            raise MisconfigurationException(
                f"{type(self).__name__}: schedule={self.vlorp_config.schedule!r} needs a finite run; set Trainer "
                "max_steps or max_epochs, or vlorp.total_steps"
            )
        return max(1, int(total))

    def _vlorp_check_trainer(self, config: VLoRPConfig) -> None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or config.optimizer == "adamw":
            return
        name = type(self).__name__
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "value":
            raise MisconfigurationException(
                f"{name}: gradient_clip_algorithm='value' is not supported with projected optimizers, because "
                "clamping projected coordinates does not clamp the gradient; use gradient_clip_algorithm='norm'"
            )
        if config.update_in_backward:
            if trainer.gradient_clip_val:
                raise MisconfigurationException(
                    f"{name}: update_in_backward=True updates each weight before the other gradients exist, so "
                    f"global clipping (gradient_clip_val={trainer.gradient_clip_val}) cannot work; remove clipping "
                    "or set vlorp.update_in_backward=False"
                )
            if trainer.world_size > 1:
                raise MisconfigurationException(
                    f"{name}: update_in_backward=True would update weights from local gradients before they are "
                    f"averaged over the {trainer.world_size} processes, so the replicas would diverge; "
                    "set vlorp.update_in_backward=False for distributed training"
                )
            if _grad_scaler(trainer) is not None:
                raise MisconfigurationException(
                    f"{name}: update_in_backward=True cannot be combined with fp16 loss scaling "
                    "(precision='16-mixed'); use precision='bf16-mixed' or update_in_backward=False"
                )

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Optional[int]:
        """Mark the last micro-batch of a window and keep DDP's own gradient sync off."""
        optimizer = self._vlorp_optimizer()
        if optimizer is None:
            return None
        trainer = self.trainer
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            # The mixin averages gradients itself (compressed); DDP's hooks must stay idle.
            model.require_backward_grad_sync = False
        if optimizer.update_in_backward:
            window = trainer.accumulate_grad_batches
            last = (batch_idx + 1) % window == 0 or (batch_idx + 1) == trainer.num_training_batches
            optimizer.mark_accumulation_boundary(last)
        return None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Average gradients over ranks and unscale fp16 accumulators before clipping and the step."""
        optimizer = _unwrap(optimizer)
        if not isinstance(optimizer, ProjectedOptimizer):
            return
        if self.trainer.world_size > 1:
            optimizer.all_reduce_gradients_()
        scaler = _grad_scaler(self.trainer)
        if scaler is not None:
            optimizer.unscale_accumulators_(scaler)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: Optional[Union[int, float]] = None,
        gradient_clip_algorithm: Optional[str] = None,
    ) -> None:
        """Clip the global norm over dense gradients and projected accumulators."""
        raw = _unwrap(optimizer)
        if not isinstance(raw, ProjectedOptimizer):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise MisconfigurationException(
                f"{type(self).__name__}: gradient_clip_algorithm={gradient_clip_algorithm!r} is not supported with "
                "projected optimizers; use 'norm'"
            )
        raw.clip_grad_norm_(float(gradient_clip_val))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log gradient norm, skipped steps and learning rate after each optimizer step."""
        optimizer = self._vlorp_optimizer()
        if optimizer is None:
            return
        steps = optimizer.global_step + optimizer.skipped_steps
        if steps == self._vlorp_logged_step:
            return
        self._vlorp_logged_step = steps
        metrics = {
            "vlorp/grad_norm": float(optimizer.last_grad_norm),
            "vlorp/skipped_steps": float(optimizer.skipped_steps),
            "vlorp/lr": float(optimizer.param_groups[0]["lr"]),
        }
        self.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    # ------------------------------------------------------------------ helpers
    def _vlorp_optimizer(self) -> Optional[ProjectedOptimizer]:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.optimizers:
            return None
        optimizer = _unwrap(trainer.optimizers[0])
        return optimizer if isinstance(optimizer, ProjectedOptimizer) else None

    @rank_zero_only
    def _vlorp_log_summary(self, config: VLoRPConfig, optimizer: torch.optim.Optimizer) -> None:
        rank = config.resolved_rank() if config.optimizer != "adamw" else 0
        estimate = estimate_state_bytes(
            self,
            optimizer=config.optimizer,
            granularity=config.granularity,
            rank=max(rank, 1),
            orientation=config.orientation,
            distribution=config.distribution,
            targets=config.targets,
            exclude=config.exclude,
            compress_gradients=config.compress_gradients,
            momentum=config.momentum,
            bytes_per_element=2 if config.state_dtype == "bfloat16" else 4,
        )
        shapes: Dict[tuple, int] = {}
        for shape in estimate.projected_shapes:
            shapes[shape] = shapes.get(shape, 0) + 1
        shape_text = ", ".join(f"{count} x {shape[0]}x{shape[1]}" for shape, count in sorted(shapes.items()))
        dense = sum(p.numel() for p in self.parameters() if p.requires_grad) - sum(
            s[0] * s[1] for s in estimate.projected_shapes
        )
        log.info(
            "VLoRP %s: %d projected matrices (%s) at granularity %s, rank %d; %d dense parameters; "
            "predicted optimizer state %.1f MiB against %.1f MiB for AdamW (%.1f%%)",
            config.optimizer,
            len(estimate.projected_shapes),
            shape_text or "none",
            config.granularity,
            rank,
            dense,
            estimate.total_bytes / 2**20,
            estimate.adamw_bytes / 2**20,
            100 * estimate.ratio_to_adamw,
        )


def _unwrap(optimizer: Any) -> Any:
    return getattr(optimizer, "_optimizer", optimizer)


def _grad_scaler(trainer: Any) -> Optional[torch.amp.GradScaler]:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _dense_groups(module: torch.nn.Module, weight_decay: float) -> list:
    matrices, vectors, seen = [], [], set()
    for _, param in module.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            (matrices if param.dim() >= 2 else vectors).append(param)
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
