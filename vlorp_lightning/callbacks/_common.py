"""Trainer helpers shared by the diagnostics callbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from vlorp_lightning.optim import ProjectedOptimizer


def check_every_n_steps(owner: str, every_n_steps: Any) -> None:
    """Raise ``MisconfigurationException`` unless ``every_n_steps`` is an integer >= 1."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise MisconfigurationException(
            f"{owner}: every_n_steps={every_n_steps!r} is invalid; pass an integer >= 1 (optimizer steps between "
            "measurements), such as 50"
        )


def projected_optimizer(trainer: pl.Trainer) -> Optional[ProjectedOptimizer]:
    """Return the trainer's first optimizer, unwrapped from ``LightningOptimizer``, if it is projected."""
    if not trainer.optimizers:
        return None
    optimizer = trainer.optimizers[0]
    optimizer = getattr(optimizer, "_optimizer", optimizer)
    return optimizer if isinstance(optimizer, ProjectedOptimizer) else None


def raw_optimizer_name(trainer: pl.Trainer) -> str:
    """Return the class name of the trainer's first optimizer, or ``"NoneType"`` without one."""
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    return type(getattr(optimizer, "_optimizer", optimizer)).__name__


def is_last_micro_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Check whether ``batch_idx`` ends an accumulation window (Lightning's automatic optimization rule)."""
    window = trainer.accumulate_grad_batches
    return (batch_idx + 1) % window == 0 or (batch_idx + 1) == trainer.num_training_batches


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to every logger of the trainer with an explicit ``step``.

    Lightning's loggers write on rank zero only, so other ranks' values are dropped.
    """
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def logger_directory(trainer: pl.Trainer) -> Path:
    """Return the first logger's ``log_dir`` (else ``save_dir``), or ``trainer.default_root_dir``.

    The folder is created if missing. Unlike ``trainer.log_dir`` this runs no collective call, so it is safe on rank zero alone.
    """
    directory: Optional[str] = None
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is not None:
        directory = getattr(logger, "log_dir", None) or logger.save_dir
    path = Path(directory if directory is not None else trainer.default_root_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
