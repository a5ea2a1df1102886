"""Callback that logs optimizer-state and process memory, and compares state with its prediction."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from vlorp_lightning.callbacks._common import check_every_n_steps, log_metrics, projected_optimizer, raw_optimizer_name
from vlorp_lightning.config import VLoRPConfig
from vlorp_lightning.diagnostics import (
    STATE_COMPONENTS,
    adamw_state_bytes,
    compare_state_bytes,
    cuda_peak_bytes,
    current_rss_bytes,
    format_state_table,
    peak_rss_bytes,
)
from vlorp_lightning.memory import StateEstimate, estimate_state_bytes
from vlorp_lightning.optim import ProjectedOptimizer

log = logging.getLogger(__name__)

__all__ = ["MemoryMonitor"]


class MemoryMonitor(Callback):
    """Log the bytes of VLoRP optimizer state against AdamW, and the process's memory.

    A window is measured when ``trainer.global_step % every_n_steps == 0`` at its start
    (so the first window always is). The figures are read right after that window's
    optimizer step, when the state exists, and logged with ``step`` equal to the window's
    starting ``trainer.global_step``, directly to every logger of the trainer. They are this
    rank's own figures; loggers write rank zero's.

    At the end of fit the callback compares the measured state with the static prediction
    of :func:`~vlorp_lightning.estimate_state_bytes` for the module's ``vlorp_config``, logs
    the table on rank zero (logging level INFO) and keeps it in :attr:`summary`.

    Logged metrics:
        - ``memory/optimizer_state_bytes``: bytes of all optimizer state tensors
          (``state_bytes()["total"]["total"]``); step counters are not counted.
        - ``memory/adamw_equivalent_bytes``: bytes ``torch.optim.AdamW`` would keep for the
          same parameters, ``2 * numel * 4`` (float32 moments).
        - ``memory/state_ratio``: the first over the second (dimensionless).
        - ``memory/momentum_bytes``, ``memory/second_moment_bytes``,
          ``memory/accumulator_bytes``, ``memory/projection_bytes``: bytes per state component,
          summed over parameters (``projection`` is a stored ``"svd"`` basis).
        - ``memory/state_bytes/<parameter name>``: bytes of one parameter's state, for every
          parameter of the optimizer, projected or dense; only with ``per_layer=True``.
        - ``memory/cuda_max_allocated_bytes``, ``memory/cuda_max_reserved_bytes``: peaks of
          PyTorch's CUDA allocator on the module's device since the previous measurement
          (reset with ``torch.cuda.reset_peak_memory_stats``); only on CUDA.
        - ``memory/peak_rss_bytes``: peak resident set size of the process since it started,
          from ``ru_maxrss``. It is a lifetime maximum and is never reset. Only on devices
          other than CUDA, and missing where the ``resource`` module is (Windows).
        - ``memory/rss_bytes``: current resident set size of the process (``psutil``); only
          on devices other than CUDA.

    Args:
        every_n_steps: measure one window every this many optimizer steps (integer >= 1);
            default 50.
        per_layer: also log ``memory/state_bytes/<parameter name>``; default ``False``.

    Attributes:
        summary: after fit, the dict of :func:`~vlorp_lightning.diagnostics.compare_state_bytes`
            plus ``"optimizer"`` (class name); ``None`` before, or when nothing is projected.

    Raises:
        MisconfigurationException: on an invalid argument value.
    """

    def __init__(self, every_n_steps: int = 50, per_layer: bool = False) -> None:
        name = type(self).__name__
        check_every_n_steps(name, every_n_steps)
        if not isinstance(per_layer, bool):
            raise MisconfigurationException(f"{name}: per_layer={per_layer!r} is invalid; pass True or False")
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self.summary: Optional[Dict[str, Any]] = None
        self.last_metrics: Dict[str, float] = {}
        self._optimizer: Optional[ProjectedOptimizer] = None
        self._adamw_bytes = 0
        self._window_step: Optional[int] = None
        self._warned = False

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Clear the figures of an earlier fit."""
        if stage == "fit":
            self.summary = None
            self.last_metrics = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the projected optimizer and reset the CUDA peak counters."""
        optimizer = projected_optimizer(trainer)
        if optimizer is None or not optimizer.named_projected_parameters():
            self._optimizer = None
            if not self._warned:
                rank_zero_warn(
                    f"{type(self).__name__}: the optimizer {raw_optimizer_name(trainer)} projects no parameter, "
                    "so there is no VLoRP state to measure; the callback does nothing",
                    category=UserWarning,
                )
                self._warned = True
            return
        self._optimizer = optimizer
        self._adamw_bytes = adamw_state_bytes(_optimizer_numel(optimizer))
        self._window_step = None
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    # ------------------------------------------------------------------ measurement
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Remember a measured window, to be read once its step has run."""
        if self._optimizer is not None and trainer.global_step % self.every_n_steps == 0:
            self._window_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Measure and log after the optimizer step of a measured window."""
        if self._optimizer is None or self._window_step is None or trainer.global_step <= self._window_step:
            return
        step, self._window_step = self._window_step, None
        self.last_metrics = self._measure(pl_module.device)
        log_metrics(trainer, self.last_metrics, step)

    def _measure(self, device: torch.device) -> Dict[str, float]:
        assert self._optimizer is not None
        state = self._optimizer.state_bytes()
        total = state["total"]
        metrics: Dict[str, float] = {
            "memory/optimizer_state_bytes": float(total["total"]),
            "memory/adamw_equivalent_bytes": float(self._adamw_bytes),
            "memory/state_ratio": total["total"] / self._adamw_bytes if self._adamw_bytes else 0.0,
        }
        for component in STATE_COMPONENTS:
            metrics[f"memory/{component}_bytes"] = float(total[component])
        if self.per_layer:
            for name, entry in state.items():
                if name != "total":
                    metrics[f"memory/state_bytes/{name}"] = float(entry["total"])

        if device.type == "cuda":
            # NOTE: only the CUDA-marked test covers this branch, and CPU-only CI skips it.
            allocated, reserved = cuda_peak_bytes(device)
            metrics["memory/cuda_max_allocated_bytes"] = float(allocated)
            metrics["memory/cuda_max_reserved_bytes"] = float(reserved)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            peak = peak_rss_bytes()
            if peak is not None:
                metrics["memory/peak_rss_bytes"] = float(peak)
            metrics["memory/rss_bytes"] = float(current_rss_bytes())
        return metrics

    # ------------------------------------------------------------------ summary
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compare measured and predicted state, keep it in :attr:`summary` and log it on rank zero."""
        optimizer = self._optimizer
        if optimizer is None:
            return
        estimate = _predict(pl_module, optimizer)
        projected = [name for name, _ in optimizer.named_projected_parameters()]
        summary = compare_state_bytes(optimizer.state_bytes(), self._adamw_bytes, projected, estimate)
        summary["optimizer"] = type(optimizer).__name__
        self.summary = summary
        rank_zero_info(f"{type(self).__name__}: optimizer state of {summary['optimizer']}\n{format_state_table(summary)}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Release the reference to the optimizer."""
        self._optimizer = None


def _optimizer_numel(optimizer: torch.optim.Optimizer) -> int:
    seen = set()
    total = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


def _predict(pl_module: pl.LightningModule, optimizer: ProjectedOptimizer) -> Optional[StateEstimate]:
    """Static prediction for the module's ``vlorp_config``, or ``None`` without the mixin."""
    config = getattr(pl_module, "vlorp_config", None)
    if not isinstance(config, VLoRPConfig):
        log.info("MemoryMonitor: %s has no vlorp_config, so no prediction is compared", type(pl_module).__name__)
        return None
    if config.state_dtype == "bfloat16":
        bytes_per_element = 2
    elif config.state_dtype == "param":
        # NOTE: assumes every parameter shares the first projected weight's dtype.
        first = optimizer.named_projected_parameters()[0][1]
        bytes_per_element = first.element_size()
    else:
        bytes_per_element = 4
    return estimate_state_bytes(
        pl_module,
        optimizer=config.optimizer,
        granularity=config.granularity,
        rank=config.resolved_rank(),
        orientation=config.orientation,
        distribution=config.distribution,
        targets=config.targets,
        exclude=config.exclude,
        compress_gradients=config.compress_gradients,
        momentum=config.momentum,
        bytes_per_element=bytes_per_element,
    )
