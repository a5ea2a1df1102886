"""Callback that measures how well the low-rank projection preserves the true gradient."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from vlorp_lightning.callbacks._common import (
    check_every_n_steps,
    is_last_micro_batch,
    log_metrics,
    logger_directory,
    projected_optimizer,
    raw_optimizer_name,
)
from vlorp_lightning.callbacks._heatmap import save_error_heatmap
from vlorp_lightning.diagnostics import projection_error
from vlorp_lightning.optim import ProjectedOptimizer
from vlorp_lightning.projection import VLoRPProjector

log = logging.getLogger(__name__)

__all__ = ["ProjectionErrorMonitor"]

HEATMAP_FILENAME = "projection_error_heatmap.png"


class ProjectionErrorMonitor(Callback):
    r"""Log the relative error and cosine between true gradients and their VLoRP reconstructions.

    Every ``every_n_steps`` optimizer steps, for each monitored projected weight with true
    gradient :math:`G` and reconstruction :math:`\hat G` = ``project_back(project(G))`` under
    the projection in use for that accumulation window, it logs
    :math:`\|G - \hat G\|_F / \|G\|_F` and :math:`\langle G, \hat G\rangle / (\|G\|_F \|\hat G\|_F)`.
    With ``distribution="normal"`` and ``scale=1`` the expected squared error is
    :math:`(d + 1) / r` (unit length ``d``, rank ``r``); ``scale`` multiplies :math:`\hat G`.

    Which gradient is measured:

    * With ``compress_gradients=True`` (the default) full gradients are freed after each
      backward. The callback therefore registers a gradient observer on the optimizer for
      the last micro-batch of a monitored window only and removes it afterwards, so other
      micro-batches and steps run no extra code. The figures describe that one
      micro-batch's gradient, not the sum over the window.
    * With ``compress_gradients=False`` it reads the window's accumulated ``p.grad`` in
      ``on_before_optimizer_step``.

    Both figures are invariant to scaling ``G``, so fp16 loss scaling does not change them.

    A window is monitored when ``trainer.global_step % every_n_steps == 0`` at its start,
    so the first window (step 0) always is. Values are logged with ``step`` equal to that
    ``trainer.global_step``, directly to every logger of the trainer. Each rank computes them
    from its own local gradients (before any averaging across ranks); loggers write rank zero's.

    At the end of fit, rank zero saves a heatmap of the error over layers and monitored
    steps to ``projection_error_heatmap.png`` in the logger's ``log_dir``, or in
    ``trainer.default_root_dir`` without a logger. A TensorBoard logger also receives it as
    the image ``projection_error/heatmap``, and other loggers only get the file. The
    collected values stay available as :attr:`history`.

    Logged metrics:
        - ``projection_error/<parameter name>``: relative Frobenius error of one weight
          (dimensionless; 0 is exact), only with ``log_per_layer=True``.
        - ``projection_cosine/<parameter name>``: cosine between :math:`G` and :math:`\hat G`
          (dimensionless, in [-1, 1]), only with ``log_per_layer=True``.
        - ``projection_error/mean``: mean relative error over the monitored weights.
        - ``projection_error/max``: largest relative error over the monitored weights.
        - ``projection_cosine/mean``: mean cosine over the monitored weights.

    Args:
        every_n_steps: monitor one accumulation window every this many optimizer steps
            (integer >= 1); default 50.
        layers: which projected weights to monitor: ``None`` (default) for all, or a list of
            parameter-name substrings and ``"re:<regex>"`` patterns (searched anywhere in
            the name); a weight is monitored when any entry matches.
        heatmap: save and log the heatmap at the end of fit; default ``True``.
        log_per_layer: log the per-weight keys besides the aggregates; default ``True``.

    Attributes:
        history: ``{"steps": [step, ...], "error": {name: {step: value}}, "cosine": {...}}``
            of the current or last fit, on every rank.
        heatmap_path: the saved PNG after fit on rank zero, else ``None``.

    Raises:
        MisconfigurationException: on an invalid argument value or regular expression.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        layers: Optional[Union[str, Sequence[str]]] = None,
        heatmap: bool = True,
        log_per_layer: bool = True,
    ) -> None:
        name = type(self).__name__
        check_every_n_steps(name, every_n_steps)
        self.every_n_steps = every_n_steps
        self.layers: Optional[List[str]] = _check_layers(name, layers)
        self._patterns = [_compile(name, entry) for entry in self.layers] if self.layers is not None else None
        for argument, value in (("heatmap", heatmap), ("log_per_layer", log_per_layer)):
            if not isinstance(value, bool):
                raise MisconfigurationException(f"{name}: {argument}={value!r} is invalid; pass True or False")
        self.heatmap = heatmap
        self.log_per_layer = log_per_layer

        self.history: Dict[str, Any] = _empty_history()
        self.heatmap_path: Optional[Path] = None
        self._monitored: Dict[str, Tensor] = {}
        self._optimizer: Optional[ProjectedOptimizer] = None
        self._remove_observer: Optional[Callable[[], None]] = None
        self._read_grad_at_step = False
        self._pending: Dict[str, Tuple[Tensor, Tensor]] = {}
        self._warned = False

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Reset the history and warn about ``layers`` entries that match no parameter name."""
        if stage != "fit":
            return
        self.history = _empty_history()
        self.heatmap_path = None
        if self._patterns is None:
            return
        names = [name for name, _ in pl_module.named_parameters()]
        unmatched = [entry for entry, pattern in zip(self.layers or [], self._patterns) if not any(map(pattern, names))]
        if unmatched:
            rank_zero_warn(
                f"{type(self).__name__}: layers entries {unmatched} match no parameter name of "
                f"{type(pl_module).__name__}; names look like {names[0]!r}",
                category=UserWarning,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve the monitored weights once the optimizer exists."""
        optimizer = projected_optimizer(trainer)
        projected = optimizer.named_projected_parameters() if optimizer is not None else []
        if not projected:
            self._disable(
                f"{type(self).__name__}: the optimizer {raw_optimizer_name(trainer)} projects no "
                "parameter, so there is no projection error to monitor; the callback does nothing"
            )
            return
        monitored = {name: param for name, param in projected if self._selected(name)}
        if not monitored:
            self._disable(
                f"{type(self).__name__}: layers={self.layers} match none of the {len(projected)} projected "
                f"weights (such as {projected[0][0]!r}); the callback does nothing"
            )
            return
        self._optimizer = optimizer
        self._monitored = monitored
        rank_zero_info(
            f"{type(self).__name__}: monitoring {len(monitored)} projected weights every {self.every_n_steps} steps"
        )

    # ------------------------------------------------------------------ collection
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Arm the measurement before the backward of a monitored window's last micro-batch."""
        if self._optimizer is None or trainer.global_step % self.every_n_steps != 0:
            return
        if not is_last_micro_batch(trainer, batch_idx):
            return
        self._pending = {}
        optimizer = self._optimizer
        if optimizer.compress_gradients or optimizer.update_in_backward:
            # The full gradient only exists inside the optimizer's post-accumulate-grad hook.
            self._detach_observer()
            self._remove_observer = optimizer.add_grad_observer(self._observe)
        else:
            self._read_grad_at_step = True

    def _observe(self, name: str, grad: Tensor, projector: VLoRPProjector) -> None:
        if name in self._monitored:
            self._pending[name] = projection_error(grad, projector)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Collect the window's figures and log them."""
        if self._optimizer is None:
            return
        self._detach_observer()
        if self._read_grad_at_step:
            self._read_grad_at_step = False
            for name, param in self._monitored.items():
                if param.grad is not None:
                    projector = _projector_for_window(self._optimizer, param, param.grad)
                    self._pending[name] = projection_error(param.grad, projector)
        if self._pending:
            self._log(trainer, trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Drop the observer and partial figures of a window whose optimizer step did not run."""
        self._detach_observer()
        self._read_grad_at_step = False
        self._pending = {}

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the observer so that it cannot outlive a failed fit."""
        self._detach_observer()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the observer and release the references to the optimizer and weights."""
        self._detach_observer()
        self._optimizer = None
        self._monitored = {}

    # ------------------------------------------------------------------ logging
    def _log(self, trainer: pl.Trainer, step: int) -> None:
        names = [name for name in self._monitored if name in self._pending]
        values = torch.stack([torch.stack(self._pending[name]).cpu() for name in names]).tolist()
        self._pending = {}
        errors = [error for error, _ in values]
        cosines = [cosine for _, cosine in values]
        metrics: Dict[str, float] = {}
        if self.log_per_layer:
            for name, (error, cosine) in zip(names, values):
                metrics[f"projection_error/{name}"] = error
                metrics[f"projection_cosine/{name}"] = cosine
        metrics["projection_error/mean"] = sum(errors) / len(errors)
        metrics["projection_error/max"] = max(errors)
        metrics["projection_cosine/mean"] = sum(cosines) / len(cosines)
        log_metrics(trainer, metrics, step)

        self.history["steps"].append(step)
        for name, error, cosine in zip(names, errors, cosines):
            self.history["error"].setdefault(name, {})[step] = error
            self.history["cosine"].setdefault(name, {})[step] = cosine

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the error heatmap and add it to TensorBoard."""
        if not self.heatmap or not self.history["steps"]:
            return
        directory = logger_directory(trainer)
        path = directory / HEATMAP_FILENAME
        figure = save_error_heatmap(self.history, path)
        self.heatmap_path = path
        log.info("%s: saved the projection-error heatmap to %s", type(self).__name__, path)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("projection_error/heatmap", figure, trainer.global_step, dataformats="HWC")

    # ------------------------------------------------------------------ helpers
    def _selected(self, name: str) -> bool:
        return self._patterns is None or any(pattern(name) for pattern in self._patterns)

    def _disable(self, message: str) -> None:
        self._optimizer = None
        self._monitored = {}
        if not self._warned:
            rank_zero_warn(message, category=UserWarning)
            self._warned = True

    def _detach_observer(self) -> None:
        if self._remove_observer is not None:
            self._remove_observer()
            self._remove_observer = None


def _empty_history() -> Dict[str, Any]:
    return {"steps": [], "error": {}, "cosine": {}}


def _check_layers(name: str, layers: Optional[Union[str, Sequence[str]]]) -> Optional[List[str]]:
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    entries = list(layers) if isinstance(layers, (list, tuple)) else None
    if not entries or not all(isinstance(entry, str) and entry and entry != "re:" for entry in entries):
        raise MisconfigurationException(
            f"{name}: layers={layers!r} is invalid; pass None for every projected weight or a non-empty list of "
            "non-empty name substrings or 're:<regex>' patterns, such as ['q_proj', 're:layers\\.0\\.']"
        )
    return entries


def _compile(name: str, entry: str) -> Callable[[str], bool]:
    if not entry.startswith("re:"):
        return lambda parameter_name: entry in parameter_name
    try:
        pattern = re.compile(entry[3:])
    except re.error as error:
        raise MisconfigurationException(
            f"{name}: layers entry {entry!r} is not a valid regular expression ({error}); fix the pattern after 're:'"
        ) from None
    return lambda parameter_name: pattern.search(parameter_name) is not None


def _projector_for_window(optimizer: ProjectedOptimizer, param: Tensor, grad: Tensor) -> VLoRPProjector:
    """The projector that ``optimizer.step`` will use for the current window.

    Without compression the optimizer refreshes a projector only inside ``step``, so at a
    refresh boundary the stored projector still uses the previous matrix. A copy at the
    new refresh is built instead, leaving the optimizer untouched.
    """
    projector = optimizer.projector_for(param)
    gap = next(group["update_proj_gap"] for group in optimizer.param_groups if any(p is param for p in group["params"]))
    target = optimizer.global_step // gap
    if projector.refresh_count == target and not (projector.stores_basis and projector.basis is None):
        return projector
    fresh = VLoRPProjector(
        projector.shape,
        projector.granularity,
        projector.rank,
        distribution=projector.distribution,  # type: ignore[arg-type]
        orientation=projector.orientation,  # type: ignore[arg-type]
        seed=projector.seed,
        scale=projector.scale,
    )
    fresh.refresh_count = target
    if fresh.stores_basis:
        fresh.set_basis_from(grad)
    return fresh

