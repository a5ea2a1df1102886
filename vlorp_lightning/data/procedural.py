"""Procedurally generated reasoning tasks from ``reasoning-gym``, created offline.

``reasoning_gym.create_dataset(name, seed=..., size=..., **config)`` returns a dataset
whose entries are dicts with ``question``, ``answer`` (a string) and ``metadata``. The
train, validation and test splits of a task come from three different seeds, and a
training row whose question also occurs in that task's validation or test split is
removed, so the splits never share a question.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from vlorp_lightning.data.answers import extract_number, numbers_match
from vlorp_lightning.data.base import ReasoningDataModule, TaskMode
from vlorp_lightning.data.encoding import Example
from vlorp_lightning.data.records import unknown_name_message
from vlorp_lightning.data.tokenizer import TokenizerSource

__all__ = ["DEFAULT_PROCEDURAL_TASKS", "ProceduralReasoningDataModule"]

log = logging.getLogger(__name__)

DEFAULT_PROCEDURAL_TASKS: dict[str, dict[str, Any]] = {
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
}
"""Short integer sums and differences such as ``23 - 60 =``: quick to learn on a CPU."""

_NUMERIC_RE = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")
_RESERVED_CONFIG_KEYS = ("seed", "size")


def _split_seed(seed: int, split: str) -> int:
    """Derive a 31-bit seed for one split from the base seed, stable across processes."""
    digest = hashlib.sha256(f"{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class ProceduralReasoningDataModule(ReasoningDataModule):
    """Generate-mode datamodule over ``reasoning-gym`` tasks, each one an evaluation task.

    The training answer is the gold answer string itself, and the prompt requests the
    final answer only, which keeps sequences short. :meth:`is_correct` compares
    numbers by value when the gold answer is numeric, and otherwise calls the task's
    own ``score_answer`` (a score of at least 1.0 is correct).

    Prompt template fields: ``question``.

    Args:
        tasks: task names mapped to their ``reasoning-gym`` configuration, or a list of
            names that use the default configuration. None means
            :data:`DEFAULT_PROCEDURAL_TASKS`. Default None.
        train_size: training rows generated per task. Default 1000.
        val_size: validation rows generated per task. 0 disables validation.
            Default 50.
        test_size: test rows generated per task. Default 200.
        train_seed: seed of the training split. None derives it from ``seed``.
            Default None.
        val_seed: seed of the validation split. None derives it from ``seed``.
            Default None.
        test_seed: seed of the test split. None derives it from ``seed``. Default None.
        tokenizer: see :class:`ReasoningDataModule`.
        **kwargs: the other arguments of :class:`ReasoningDataModule`.

    Raises:
        ValueError: when a task is not registered in ``reasoning-gym`` (the message
            lists close matches), a configuration sets ``seed`` or ``size``, or a size
            is out of range.
    """

    default_prompt_template = "{question}\nGive only the final answer.\nAnswer:"
    default_chat_prompt_template = "{question}\nGive only the final answer."
    template_fields = ("question",)

    def __init__(
        self,
        tasks: dict[str, dict[str, Any]] | list[str] | None = None,
        train_size: int = 1000,
        val_size: int = 50,
        test_size: int = 200,
        train_seed: int | None = None,
        val_seed: int | None = None,
        test_seed: int | None = None,
        tokenizer: TokenizerSource | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer=tokenizer, **kwargs)
        for arg, value, minimum in (("train_size", train_size, 1), ("val_size", val_size, 0), ("test_size", test_size, 1)):
            if value < minimum:
                raise ValueError(f"ProceduralReasoningDataModule: {arg} must be >= {minimum}, got {value}.")
        self.tasks = _normalize_tasks(tasks)
        self.train_size = train_size
        self.val_size = val_size
        self.test_size = test_size
        self.split_seeds = {
            "train": train_seed if train_seed is not None else _split_seed(self.seed, "train"),
            "validate": val_seed if val_seed is not None else _split_seed(self.seed, "validate"),
            "test": test_seed if test_seed is not None else _split_seed(self.seed, "test"),
        }
        self._generated: dict[tuple[str, str], Any] = {}
        self._scoring: dict[tuple[str, str], tuple[Any, dict[str, Any]]] = {}
        self._scoring_failures: set[str] = set()

    @property
    def eval_tasks(self) -> list[str]:
        """The task names, in dataloader order."""
        return list(self.tasks)

    def task_mode(self, task: str) -> TaskMode:
        """Return ``"generate"``: the model generates each answer, which :meth:`is_correct` checks."""
        self.check_task(task)
        return "generate"

    # --------------------------------------------------------------- generation
    def _dataset(self, task: str, split: str) -> Any:
        """Create (once) the ``reasoning-gym`` dataset of one task and split."""
        key = (task, split)
        if key not in self._generated:
            import reasoning_gym

            size = {"train": self.train_size, "validate": self.val_size, "test": self.test_size}[split]
            config = self.tasks[task]
            try:
                dataset = reasoning_gym.create_dataset(task, seed=self.split_seeds[split], size=size, **config)
            except (TypeError, ValueError, AssertionError) as error:
                raise ValueError(
                    f"ProceduralReasoningDataModule: invalid reasoning-gym configuration {config} for task "
                    f"'{task}': {error}. Fix the entry of tasks['{task}']."
                ) from error
            self._generated[key] = dataset
        return self._generated[key]

    def _examples(self, task: str, split: str) -> list[Example]:
        if split == "validate" and self.val_size == 0:
            return []
        dataset = self._dataset(task, split)
        examples = []
        for index in range(len(dataset)):
            entry = dataset[index]
            question, answer = entry.get("question"), entry.get("answer")
            if not isinstance(question, str) or not isinstance(answer, str):
                raise ValueError(
                    f"reasoning-gym task '{task}' ({split} split) entry {index + 1} has no string question and "
                    "answer. Choose a task whose answers are strings."
                )
            self._scoring.setdefault((task, answer.strip()), (dataset, entry))
            examples.append(
                Example(task=task, fields={"question": question.strip()}, answer=answer.strip(), target=answer.strip(), row=index + 1)
            )
        return examples

    def _read_train(self) -> list[Example]:
        examples = []
        for task in self.tasks:
            held_out = {example.fields["question"] for split in ("validate", "test") for example in self._examples(task, split)}
            rows = self._examples(task, "train")
            kept = [example for example in rows if example.fields["question"] not in held_out]
            if len(kept) < len(rows):
                _log_info(
                    "Task %s: removed %d training rows whose question is also in the validation or test split.",
                    task,
                    len(rows) - len(kept),
                )
            examples.extend(kept)
        return examples

    def _read_validation(self) -> dict[str, list[Example]] | None:
        return {task: self._examples(task, "validate") for task in self.tasks}

    def _read_test(self) -> dict[str, list[Example]]:
        return {task: self._examples(task, "test") for task in self.tasks}

    # ------------------------------------------------------------------ scoring
    def is_correct(self, task: str, generated_text: str, target: str) -> bool:
        """Return whether generated text answers a row of ``task`` correctly.

        A numeric ``target`` is compared by value with the number that
        ``extract_number`` finds in the text. Any other target is scored by the
        task's ``score_answer`` on the stripped text (>= 1.0 is correct), using the
        generated entry with that answer. A target not generated by this module, or
        a scorer that raises, falls back to exact string equality.

        Raises:
            ValueError: when ``task`` is not one of :attr:`eval_tasks`.
        """
        self._check_generate_task(task)
        if _NUMERIC_RE.fullmatch(target):
            return numbers_match(extract_number(generated_text), target)
        answer = generated_text.strip()
        found = self._scoring.get((task, target.strip()))
        if found is None or not hasattr(found[0], "score_answer"):
            return answer == target.strip()
        dataset, entry = found
        try:
            score = dataset.score_answer(answer=answer, entry=entry)
        except Exception as error:  # a third-party scorer may fail on arbitrary model output
            if task not in self._scoring_failures:
                self._scoring_failures.add(task)
                log.warning("score_answer of task %s raised %r, so this output is scored by exact match.", task, error)
            return answer == target.strip()
        return score is not None and float(score) >= 1.0


def _normalize_tasks(tasks: Mapping[str, Mapping[str, Any]] | list[str] | None) -> dict[str, dict[str, Any]]:
    """Check task names against the ``reasoning-gym`` registry and return ``{name: config}``."""
    if tasks is None:
        return {name: dict(config) for name, config in DEFAULT_PROCEDURAL_TASKS.items()}
    if isinstance(tasks, str) or not isinstance(tasks, (list, tuple, Mapping)):
        raise ValueError(
            f"ProceduralReasoningDataModule: tasks must be a list of names or a dict of name to config, got {tasks!r}."
        )
    normalized = {name: {} for name in tasks} if not isinstance(tasks, Mapping) else {name: dict(config or {}) for name, config in tasks.items()}
    if not normalized:
        raise ValueError("ProceduralReasoningDataModule: tasks is empty. Name at least one reasoning-gym task.")
    from reasoning_gym.factory import DATASETS

    for name, config in normalized.items():
        if name not in DATASETS:
            raise ValueError(unknown_name_message("ProceduralReasoningDataModule", "reasoning-gym task", name, sorted(DATASETS), "reasoning_gym.factory.DATASETS"))
        reserved = [key for key in _RESERVED_CONFIG_KEYS if key in config]
        if reserved:
            raise ValueError(
                f"ProceduralReasoningDataModule: the configuration of task '{name}' sets {reserved}. Remove them, "
                "because train_size/val_size/test_size and the split seeds set them."
            )
    return normalized


@rank_zero_only
def _log_info(message: str, *args: Any) -> None:
    log.info(message, *args)
