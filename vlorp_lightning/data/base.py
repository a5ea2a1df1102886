"""Shared LightningDataModule for the reasoning fine-tuning sources.

A source subclass reads and validates its raw rows into :class:`Example` objects and
declares its evaluation tasks. This base class carves validation rows, applies row
limits, tokenizes lazily once a tokenizer is known, and builds the dataloaders whose
batches follow the contract of ``collate.py``: one training loader, and lists of
evaluation loaders ordered like :attr:`ReasoningDataModule.eval_tasks`.
"""

from __future__ import annotations

import logging
import math
import os
import string
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader

from vlorp_lightning.data.answers import extract_number, numbers_match
from vlorp_lightning.data.collate import ListDataset, collate_choice, collate_generate, collate_train
from vlorp_lightning.data.encoding import EncodingStats, Example, ExampleEncoder
from vlorp_lightning.data.records import unknown_name_message
from vlorp_lightning.data.splits import carve_validation, sample_rows
from vlorp_lightning.data.tokenizer import TokenizerSource, resolve_tokenizer

__all__ = ["ReasoningDataModule", "TaskMode"]

log = logging.getLogger(__name__)

TaskMode = Literal["generate", "choice"]
EvalStage = Literal["validate", "test"]


class ReasoningDataModule(L.LightningDataModule):
    """Base datamodule: validation carving, row limits, tokenization and dataloaders.

    Training batches are dicts of ``input_ids``, ``attention_mask`` and ``labels``, each
    ``(B, T)`` long, with labels ``-100`` on padding and (unless ``train_on_prompt``)
    on prompt tokens. ``val_dataloader`` and ``test_dataloader`` return one loader per
    entry of :attr:`eval_tasks`, whose batches are generate-mode or choice-mode dicts
    as :meth:`task_mode` returns.

    Args:
        tokenizer: a Hugging Face tokenizer, or a hub id, local directory or ``.gguf``
            path passed to ``vlorp_lightning.models.loading.load_tokenizer``. Needed
            only by the dataloader methods, because ``setup`` reads and validates rows
            without it. A tokenizer without a pad token gets ``pad_token = eos_token``.
        batch_size: training rows per batch. Default 8.
        eval_batch_size: evaluation rows per batch. A choice-mode batch holds every
            option of each row, so its model input has up to 5 times as many
            sequences. Default 16.
        max_length: maximum tokens per sequence (prompt, answer and EOS). Prompts are
            shortened from the left to fit. Rows whose answer alone does not fit are
            dropped, and both counts are logged once per split. Default 512.
        num_workers: ``DataLoader`` worker processes. Default 0.
        seed: seed of the training shuffle, the validation carving and the row
            subsets. Default 0.
        max_train_rows: keep a seeded random subset of this many training rows.
            None keeps all. Default None.
        max_eval_rows: keep at most this many rows per evaluation task, in both
            validation and test. None keeps all. Default None.
        val_fraction: share of each task's training rows held out for validation when
            the source has no validation split (a task without training rows uses a
            seeded sample of its test rows instead, with a warning). 0 disables such
            validation. Default 0.05.
        train_on_prompt: supervise prompt tokens too. Default False.
        skip_invalid: skip and count invalid rows instead of raising. A missing file
            or an unknown task still raises. Default False.
        prompt_template: ``str.format`` template of the prompt, using the fields that
            the source documents. None uses the source's default. Without a chat
            template the answer follows the prompt after one space. Default None.
        use_chat_template: wrap the prompt as one user message with the tokenizer's
            chat template (``add_generation_prompt=True``) when it has one.
            Default True.
        system_prompt: system message for the chat template. None keeps the
            template's own default. Default None.

    Raises:
        ValueError: when a size, limit or fraction is out of range, or the prompt
            template uses a field the source does not provide.
    """

    default_prompt_template: ClassVar[str] = ""
    """Prompt template used without a chat template, set by each subclass."""
    default_chat_prompt_template: ClassVar[str] = ""
    """Prompt template used inside the chat template's user message, set by each subclass."""
    template_fields: ClassVar[tuple[str, ...]] = ()
    """Field names that :attr:`Example.fields` provides for the prompt template."""

    def __init__(
        self,
        tokenizer: TokenizerSource | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        max_length: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        max_train_rows: int | None = None,
        max_eval_rows: int | None = None,
        val_fraction: float = 0.05,
        train_on_prompt: bool = False,
        skip_invalid: bool = False,
        prompt_template: str | None = None,
        use_chat_template: bool = True,
        system_prompt: str | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"{name}: {arg} must be >= 1, got {value}.")
        if max_length < 2:
            raise ValueError(f"{name}: max_length must be >= 2 tokens (one prompt token and EOS), got {max_length}.")
        if num_workers < 0:
            raise ValueError(f"{name}: num_workers must be >= 0, got {num_workers}.")
        for arg, limit in (("max_train_rows", max_train_rows), ("max_eval_rows", max_eval_rows)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name}: {arg} must be None or >= 1, got {limit}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"{name}: val_fraction must be in [0, 1), got {val_fraction}.")
        if prompt_template is not None:
            self._check_template(prompt_template)

        # Collects the arguments of this and every subclass __init__ up the call stack.
        self.save_hyperparameters(ignore=_hparams_ignore(tokenizer))
        self.tokenizer_source = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.seed = seed
        self.max_train_rows = max_train_rows
        self.max_eval_rows = max_eval_rows
        self.val_fraction = val_fraction
        self.train_on_prompt = train_on_prompt
        self.skip_invalid = skip_invalid
        self.prompt_template = prompt_template
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt

        self._tokenizer: Any = None
        self._encoder: ExampleEncoder | None = None
        self._train_rows: list[Example] | None = None
        self._eval_rows: dict[str, dict[str, list[Example]]] = {}
        self._all_test_rows: dict[str, list[Example]] | None = None
        self._encoded: dict[str, list[dict[str, Any]]] = {}
        self.encoding_stats: dict[str, EncodingStats] = {}
        """Row counts per encoded split, keyed ``"train"``, ``"validate/<task>"`` or ``"test/<task>"``."""

    # ----------------------------------------------------------------- source hooks
    @property
    def eval_tasks(self) -> list[str]:
        """Evaluation task names, in the order of the evaluation dataloaders."""
        raise NotImplementedError

    def task_mode(self, task: str) -> TaskMode:
        """Return ``"generate"`` or ``"choice"``: how the module scores ``task``."""
        raise NotImplementedError

    def _read_train(self) -> list[Example]:
        """Read and validate the training rows, tagged with their task."""
        raise NotImplementedError

    def _read_validation(self) -> dict[str, list[Example]] | None:
        """Read the validation split per evaluation task, or None when none exists."""
        return None

    def _read_test(self) -> dict[str, list[Example]]:
        """Read the test split per evaluation task."""
        raise NotImplementedError

    # ------------------------------------------------------------------- scoring
    def is_correct(self, task: str, generated_text: str, target: str) -> bool:
        """Return whether generated text answers a generate-mode row correctly.

        The default compares the number that :func:`extract_number` finds in the text
        with ``target`` by value.

        Args:
            task: an entry of :attr:`eval_tasks` whose mode is ``"generate"``.
            generated_text: the decoded model output, without the prompt.
            target: the gold final answer from the batch's ``targets``.

        Raises:
            ValueError: when ``task`` is unknown or is a choice task.
        """
        self._check_generate_task(task)
        return numbers_match(extract_number(generated_text), target)

    def _check_generate_task(self, task: str) -> None:
        self.check_task(task)
        if self.task_mode(task) != "generate":
            raise ValueError(
                f"{type(self).__name__}: task '{task}' is a choice task, scored by option log-likelihood. "
                "is_correct applies only to generate tasks."
            )

    def check_task(self, task: str) -> None:
        """Raise ``ValueError`` naming close matches when ``task`` is not an evaluation task."""
        if task not in self.eval_tasks:
            raise ValueError(unknown_name_message(type(self).__name__, "evaluation task", task, self.eval_tasks))

    # ------------------------------------------------------------ rows and setup
    def setup(self, stage: str | None = None) -> None:
        """Read and validate the raw rows that ``stage`` needs, without the tokenizer.

        ``"fit"`` and ``"validate"`` read training and validation rows, ``"test"`` reads
        test rows, and None reads all. Repeated calls reuse the rows already read.
        """
        if stage in (None, "fit", "validate") and self._train_rows is None:
            self._prepare_fit_rows()
        if stage in (None, "test") and "test" not in self._eval_rows:
            self._eval_rows["test"] = self._limit_eval(self._test_rows())

    def _prepare_fit_rows(self) -> None:
        train = self._read_train()
        validation = self._read_validation()
        if validation is None:
            train, validation = self._carve_validation(train)
        self._eval_rows["validate"] = self._limit_eval(validation)
        if self.max_train_rows is not None:
            train = sample_rows(train, self.max_train_rows, self.seed, "train")
        self._train_rows = train

    def _carve_validation(self, train: list[Example]) -> tuple[list[Example], dict[str, list[Example]]]:
        """Hold out ``val_fraction`` of each evaluation task's training rows.

        A task without training rows validates on a seeded sample of its test rows
        (``max_eval_rows`` rows, else a ``val_fraction`` share), with a warning.
        """
        if self.val_fraction == 0:
            _log_info("%s: val_fraction=0 and no validation split, so validation is disabled.", type(self).__name__)
            return train, {}
        remaining, validation, without_train = carve_validation(
            train, self.eval_tasks, self.val_fraction, self.seed, task_of=lambda example: example.task
        )
        if without_train:
            test = self._test_rows()
            for task in without_train:
                rows = test[task]
                count = self.max_eval_rows or max(1, math.ceil(self.val_fraction * len(rows)))
                validation[task] = sample_rows(rows, count, self.seed, task)
            rank_zero_warn(
                f"{type(self).__name__}: no validation split and no training rows for tasks {without_train}, "
                "so their validation rows are a seeded sample of their test rows and overlap the test set."
            )
        return remaining, validation

    def _test_rows(self) -> dict[str, list[Example]]:
        """Return all test rows per task, read once."""
        if self._all_test_rows is None:
            self._all_test_rows = self._read_test()
        return self._all_test_rows

    def _limit_eval(self, rows_by_task: dict[str, list[Example]]) -> dict[str, list[Example]]:
        limited = {}
        for task in self.eval_tasks:
            rows = rows_by_task.get(task, [])
            limited[task] = rows[: self.max_eval_rows] if self.max_eval_rows is not None else rows
        return limited

    # -------------------------------------------------------------- tokenization
    @property
    def tokenizer(self) -> Any:
        """The resolved Hugging Face tokenizer, loaded on first use."""
        if self._tokenizer is None:
            if self.tokenizer_source is None:
                raise ValueError(
                    f"{type(self).__name__}: a tokenizer is required to build dataloaders. Pass tokenizer= "
                    "(a PreTrainedTokenizerBase, hub id, local directory or .gguf path)."
                )
            self._tokenizer = resolve_tokenizer(self.tokenizer_source)
        return self._tokenizer

    @property
    def encoder(self) -> ExampleEncoder:
        """The :class:`ExampleEncoder` built from the tokenizer and the length settings."""
        if self._encoder is None:
            tokenizer = self.tokenizer
            chat = self.use_chat_template and bool(getattr(tokenizer, "chat_template", None))
            template = self.prompt_template
            if template is None:
                template = self.default_chat_prompt_template if chat else self.default_prompt_template
            self._encoder = ExampleEncoder(
                tokenizer=tokenizer,
                max_length=self.max_length,
                template=template,
                use_chat_template=self.use_chat_template,
                system_prompt=self.system_prompt,
            )
        return self._encoder

    def _check_template(self, template: str) -> None:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: invalid prompt_template {template!r}: {error}.") from error
        unknown = sorted(names - set(self.template_fields))
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: prompt_template uses unknown fields {unknown}. "
                f"Use only the available fields {list(self.template_fields)}."
            )

    def _encode(self, key: str, rows: Sequence[Example], mode: str) -> list[dict[str, Any]]:
        if key in self._encoded:
            return self._encoded[key]
        stats = EncodingStats()
        method = {"train": self.encoder.encode_train, "generate": self.encoder.encode_generate}.get(
            mode, self.encoder.encode_choice
        )
        encoded = []
        for example in rows:
            item = method(example, stats)
            if item is not None:
                encoded.append(item)
        self._encoded[key] = encoded
        self.encoding_stats[key] = stats
        _log_info(
            "%s %s: %d rows encoded, %d prompts truncated, %d rows dropped (answer does not fit max_length=%d).",
            type(self).__name__,
            key,
            stats.rows,
            stats.truncated,
            stats.dropped,
            self.max_length,
        )
        return encoded

    # --------------------------------------------------------------- dataloaders
    def _pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        """Return the shuffled training loader, whose order depends only on ``seed``."""
        if self._train_rows is None:
            self.setup("fit")
        encoded = self._encode("train", self._train_rows, "train")
        if not encoded:
            stats = self.encoding_stats["train"]
            raise ValueError(
                f"{type(self).__name__}: no training row is left, because {stats.dropped} rows were dropped with "
                f"answers longer than max_length={self.max_length} tokens. Increase max_length or max_train_rows."
            )
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return DataLoader(
            ListDataset(encoded),
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=partial(collate_train, pad_id=self._pad_id(), train_on_prompt=self.train_on_prompt),
        )

    def val_dataloader(self) -> list[DataLoader]:
        """Return one validation loader per entry of :attr:`eval_tasks` that has rows."""
        if "validate" not in self._eval_rows:
            self.setup("validate")
        return self._eval_loaders("validate")

    def test_dataloader(self) -> list[DataLoader]:
        """Return one test loader per entry of :attr:`eval_tasks`."""
        if "test" not in self._eval_rows:
            self.setup("test")
        return self._eval_loaders("test")

    def _eval_loaders(self, stage: EvalStage) -> list[DataLoader]:
        rows_by_task = self._eval_rows[stage]
        if not any(rows_by_task.values()):
            return []
        loaders = []
        for task in self.eval_tasks:
            mode = self.task_mode(task)
            encoded = self._encode(f"{stage}/{task}", rows_by_task[task], mode)
            collate = collate_generate if mode == "generate" else collate_choice
            loaders.append(
                DataLoader(
                    ListDataset(encoded),
                    batch_size=self.eval_batch_size,
                    shuffle=False,
                    num_workers=self.num_workers,
                    persistent_workers=self.num_workers > 0,
                    collate_fn=partial(collate, pad_id=self._pad_id(), task=task),
                )
            )
        return loaders


def _hparams_ignore(tokenizer: object) -> list[str]:
    """Return ``["tokenizer"]`` unless the tokenizer argument is a plain, loggable value."""
    return [] if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)) else ["tokenizer"]


@rank_zero_only
def _log_info(message: str, *args: Any) -> None:
    log.info(message, *args)
