"""The ``vlorp-lightning`` command: LightningCLI with accuracy before and after fit and a closing summary.

Usage::

    vlorp-lightning fit --config configs/quickstart.yaml
    vlorp-lightning fit --config configs/gsm8k.yaml --trainer.max_steps 100
    vlorp-lightning fit --print_config
    vlorp-lightning plan --model-config configs/models/llama2-7b.json --granularity 256 --rank 1

Model, datamodule and callbacks are chosen by class path in the YAML file. With
``--evaluate_before_fit true`` the test split is scored before training, and with
``--evaluate_after_fit true`` after it; the closing summary then reports both, the
optimizer memory against AdamW and the training throughput.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from vlorp_lightning.optim import ProjectedOptimizer

log = logging.getLogger("vlorp_lightning.cli")

__all__ = ["VLoRPLightningCLI", "TrainingThroughput", "main"]


class TrainingThroughput(L.Callback):
    """Measure training wall time, samples and supervised tokens of a fit (evaluation excluded).

    Attributes after fit: ``seconds`` [s], ``samples``, ``tokens`` (positions with a label
    other than -100, or all positions of ``input_ids`` without labels), ``optimizer_steps``.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.samples = 0
        self.tokens = 0
        self.optimizer_steps = 0
        self._started: Optional[float] = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
        if isinstance(batch, dict) and "input_ids" in batch:
            self.samples += int(batch["input_ids"].shape[0])
            labels = batch.get("labels")
            self.tokens += int((labels != -100).sum()) if labels is not None else int(batch["input_ids"].numel())
        self.optimizer_steps = trainer.global_step


class VLoRPLightningCLI(LightningCLI):
    """LightningCLI with evaluation before and after ``fit`` and a closing summary."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--evaluate_before_fit",
            type=bool,
            default=False,
            help="Score the test split before training (fit only); default false.",
        )
        parser.add_argument(
            "--evaluate_after_fit",
            type=bool,
            default=False,
            help="Score the test split after training and print accuracy before and after (fit only); default false.",
        )

    def before_fit(self) -> None:
        self._share_tokenizer()
        self.throughput = TrainingThroughput()
        self.trainer.callbacks.append(self.throughput)
        self.accuracy_before: Dict[str, float] = {}
        if self._option("evaluate_before_fit"):
            log.info("Scoring the test split before training")
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            self.accuracy_before = dict(getattr(self.model, "last_eval_accuracy", {}))

    def after_fit(self) -> None:
        accuracy_after: Dict[str, float] = {}
        if self._option("evaluate_after_fit"):
            log.info("Scoring the test split after training")
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            accuracy_after = dict(getattr(self.model, "last_eval_accuracy", {}))
        self._print_summary(self.accuracy_before, accuracy_after)

    def before_validate(self) -> None:
        self._share_tokenizer()

    def before_test(self) -> None:
        self._share_tokenizer()

    def before_predict(self) -> None:
        self._share_tokenizer()

    # ------------------------------------------------------------------ helpers
    def _option(self, name: str) -> bool:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        return bool(config.get(name, False))

    def _share_tokenizer(self) -> None:
        """Give a datamodule without its own tokenizer the model's tokenizer source."""
        datamodule = self.datamodule
        if datamodule is None or getattr(datamodule, "tokenizer_source", "unset") is not None:
            return
        source = getattr(self.model, "tokenizer_source", None) or getattr(self.model, "model_source", None)
        if source is not None:
            datamodule.tokenizer_source = source

    @rank_zero_only
    def _print_summary(self, before: Dict[str, float], after: Dict[str, float]) -> None:
        lines: List[str] = ["", "===== vlorp-lightning summary ====="]
        if before or after:
            tasks = sorted(set(before) | set(after))
            lines.append(f"{'task':<28} {'before':>8} {'after':>8}")
            for task in tasks:
                lines.append(f"{task:<28} {_percent(before.get(task)):>8} {_percent(after.get(task)):>8}")
            if len(tasks) > 1:
                mean_before = sum(before.values()) / len(before) if before else None
                mean_after = sum(after.values()) / len(after) if after else None
                lines.append(f"{'mean':<28} {_percent(mean_before):>8} {_percent(mean_after):>8}")
        optimizer = _unwrap(self.trainer.optimizers[0]) if self.trainer.optimizers else None
        if isinstance(optimizer, ProjectedOptimizer):
            state = optimizer.state_bytes()["total"]["total"]
            adamw = sum(2 * p.numel() * 4 for p in self.model.parameters() if p.requires_grad)
            lines.append(
                f"optimizer state: {state / 2**20:.1f} MiB measured against {adamw / 2**20:.1f} MiB for AdamW "
                f"(float32 moments), {100 * state / adamw:.1f}%"
            )
            lines.append(f"skipped steps (NaN/Inf): {optimizer.skipped_steps}")
        throughput = getattr(self, "throughput", None)
        if throughput is not None and throughput.seconds > 0:
            lines.append(
                f"training: {throughput.optimizer_steps} optimizer steps, {throughput.samples} samples in "
                f"{throughput.seconds:.1f} s: {throughput.samples / throughput.seconds:.2f} samples/s, "
                f"{throughput.tokens / throughput.seconds:.1f} supervised tokens/s"
            )
        if torch.cuda.is_available():
            lines.append(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        log.info("\n".join(lines))


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _unwrap(optimizer: Any) -> Any:
    return getattr(optimizer, "_optimizer", optimizer)


def _configure_logging() -> None:
    package = logging.getLogger("vlorp_lightning")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False


def main(args: Optional[List[str]] = None) -> None:
    """Run the ``vlorp-lightning`` command: ``fit``, ``validate``, ``test``, ``predict`` or ``plan``.

    ``plan`` prints a memory plan from a model config without loading weights (see
    :mod:`vlorp_lightning.planning`); the other subcommands are LightningCLI's.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["plan"]:
        from vlorp_lightning.planning import main as plan_main

        sys.exit(plan_main(argv[1:]))
    _configure_logging()
    VLoRPLightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": _DESCRIPTION},
        args=args,
        auto_configure_optimizers=False,
    )


_DESCRIPTION = (
    "Fine-tune LLMs with VLoRP gradient projection and ProjFactor (LightningCLI subcommands fit, validate, "
    "test, predict). 'vlorp-lightning plan --model-config CONFIG.json' predicts training memory per method "
    "without loading weights; run 'vlorp-lightning plan --help' for its options."
)


if __name__ == "__main__":
    main()
