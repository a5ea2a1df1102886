"""Commonsense reasoning suite in the LLM-Adapters format (Hu et al. 2023, arXiv:2304.01933).

Every file is a JSON array (or JSON Lines) of objects with string fields
``instruction``, ``input``, ``output`` and ``answer``. The instruction contains the
question, its options and a line such as ``Answer format: answer1/answer2/answer3``;
``output`` is ``"the correct answer is <answer>"``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlorp_lightning.data.base import ReasoningDataModule, TaskMode
from vlorp_lightning.data.encoding import Example
from vlorp_lightning.data.records import (
    RowIssues,
    check_fields,
    load_hub_rows,
    read_json_records,
    require_file,
    unknown_name_message,
)
from vlorp_lightning.data.tokenizer import TokenizerSource

__all__ = ["COMMONSENSE_TASKS", "CommonsenseDataModule", "parse_answer_format"]

COMMONSENSE_TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Easy",
    "ARC-Challenge",
    "openbookqa",
)
"""The eight evaluation sets of the LLM-Adapters commonsense suite, in its usual order."""

# Option labels used when an instruction lacks an "Answer format:" line.
_DEFAULT_OPTIONS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4"),
}

# Evaluation file names tried in order inside <data_dir>/<task>/. A rebuilt HellaSwag
# set may be named test_reconstructed.json.
_TEST_FILE_NAMES = ("test.json", "test_reconstructed.json", "test.jsonl")
_ANSWER_FORMAT_RE = re.compile(r"Answer format:\s*([A-Za-z0-9_]+(?:\s*/\s*[A-Za-z0-9_]+)+)\s*$")

_ROW_FIELDS: dict[str, type] = {"instruction": str, "output": str, "answer": str}


def parse_answer_format(instruction: str) -> tuple[str, ...] | None:
    """Return the option labels of an ``Answer format: a/b/c`` line ending the instruction.

    Returns:
        For example ``("answer1", "answer2", "answer3")``, or None without such a line.
    """
    match = _ANSWER_FORMAT_RE.search(instruction.strip())
    if match is None:
        return None
    return tuple(label.strip() for label in match.group(1).split("/"))


class CommonsenseDataModule(ReasoningDataModule):
    """Commonsense suite: train on LLM-Adapters rows, evaluate eight sets by option likelihood.

    Training text is the instruction followed by ``output`` ("the correct answer is
    X"). Every evaluation task is in choice mode: the options are the labels of the
    row's ``Answer format`` line (``true/false``, ``solution1/2``, ``answer1..5``,
    ``option1/2`` or ``ending1..4``), each scored as the label tokens after
    "the correct answer is". The module reports per-task accuracy and their average.

    Validation: a task with training rows from its own ``train.json`` holds out
    ``val_fraction`` of them. A task without training rows (for example when
    training only on ``train_file``) validates on a seeded sample of its test rows,
    with a warning that validation and test overlap.

    Prompt template fields: ``instruction``, ``input``, and ``query`` (the
    instruction, followed by a blank line and the input when the input is not empty).

    Args:
        data_dir: folder in the LLM-Adapters ``dataset/`` layout,
            ``<task>/train.json`` and ``<task>/test.json`` (``test_reconstructed.json``
            is accepted too). Default None.
        train_file: path of one training file such as ``commonsense_170k.json`` (a
            path inside ``hub_dataset`` when that is set). Its rows are tagged with
            the file stem as task name. Default None.
        train_tasks: tasks whose ``<task>/train.json`` is added to the training data.
            None means every task of :data:`COMMONSENSE_TASKS` with such a file in
            ``data_dir`` when ``train_file`` is None, and no task otherwise.
            Default None.
        eval_tasks: evaluation tasks, in dataloader order. None means all eight of
            :data:`COMMONSENSE_TASKS`. Default None.
        hub_dataset: Hugging Face hub dataset repository that contains files in the
            ``data_dir`` layout, used only when ``data_dir`` is None. Files are read
            with ``datasets.load_dataset(hub_dataset, data_files=...)``. Default None.
        tokenizer: see :class:`ReasoningDataModule`.
        **kwargs: the other arguments of :class:`ReasoningDataModule`.

    Raises:
        ValueError: when neither ``data_dir`` nor ``hub_dataset`` is given, or a task
            name is unknown (the message lists close matches).
    """

    default_prompt_template = "{query}\nAnswer:"
    default_chat_prompt_template = "{query}"
    template_fields = ("instruction", "input", "query")

    def __init__(
        self,
        data_dir: str | None = None,
        train_file: str | None = None,
        train_tasks: list[str] | None = None,
        eval_tasks: list[str] | None = None,
        hub_dataset: str | None = None,
        tokenizer: TokenizerSource | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer=tokenizer, **kwargs)
        if data_dir is None and hub_dataset is None:
            raise ValueError(
                "CommonsenseDataModule: pass data_dir= (a folder in the LLM-Adapters dataset layout) "
                "or hub_dataset= (a hub repository with that layout)."
            )
        for arg, tasks in (("train_tasks", train_tasks), ("eval_tasks", eval_tasks)):
            for task in tasks or []:
                if task not in COMMONSENSE_TASKS:
                    raise ValueError(unknown_name_message(f"CommonsenseDataModule {arg}", "task", task, COMMONSENSE_TASKS))
        self.data_dir = data_dir
        self.train_file = train_file
        self.train_tasks = train_tasks
        self.hub_dataset = hub_dataset
        self._eval_tasks = list(eval_tasks) if eval_tasks is not None else list(COMMONSENSE_TASKS)

    @property
    def eval_tasks(self) -> list[str]:
        """Evaluation tasks in dataloader order (default: all of :data:`COMMONSENSE_TASKS`)."""
        return list(self._eval_tasks)

    def task_mode(self, task: str) -> TaskMode:
        """Return ``"choice"``: every commonsense task is scored by option log-likelihood."""
        self.check_task(task)
        return "choice"

    # ------------------------------------------------------------------ reading
    def _resolved_train_tasks(self) -> list[str]:
        if self.train_tasks is not None:
            return list(self.train_tasks)
        if self.train_file is not None:
            return []
        if self.data_dir is None:
            return list(COMMONSENSE_TASKS)
        return [task for task in COMMONSENSE_TASKS if (Path(self.data_dir) / task / "train.json").is_file()]

    def _read_train(self) -> list[Example]:
        tasks = self._resolved_train_tasks()
        if not tasks and self.train_file is None:
            raise ValueError(
                f"CommonsenseDataModule: no training data, because no <task>/train.json exists in {self.data_dir}. "
                "Pass train_file= (such as commonsense_170k.json) or train_tasks=."
            )
        examples: list[Example] = []
        if self.train_file is not None:
            records, issues = self._records(self.train_file, is_relative=self.hub_dataset is not None)
            examples.extend(self._to_examples(records, issues, Path(self.train_file).stem, for_eval=False))
        for task in tasks:
            records, issues = self._records(f"{task}/train.json", is_relative=True)
            examples.extend(self._to_examples(records, issues, task, for_eval=False))
        return examples

    def _read_test(self) -> dict[str, list[Example]]:
        result = {}
        for task in self._eval_tasks:
            records, issues = self._records(self._test_file(task), is_relative=True)
            result[task] = self._to_examples(records, issues, task, for_eval=True)
        return result

    def _test_file(self, task: str) -> str:
        if self.data_dir is None:
            return f"{task}/test.json"
        for name in _TEST_FILE_NAMES:
            if (Path(self.data_dir) / task / name).is_file():
                return f"{task}/{name}"
        names = " or ".join(_TEST_FILE_NAMES)
        raise FileNotFoundError(
            f"Commonsense evaluation file for task '{task}' not found: expected {names} in {Path(self.data_dir) / task}. "
            "Pass data_dir= the LLM-Adapters dataset folder, or drop the task from eval_tasks."
        )

    def _records(self, file: str, is_relative: bool) -> tuple[Any, RowIssues]:
        if self.data_dir is None and self.hub_dataset is not None:
            issues = RowIssues(f"{self.hub_dataset}/{file}", self.skip_invalid, row_word="row")
            rows = load_hub_rows(self.hub_dataset, None, "train", data_files=file)
            return enumerate(rows, start=1), issues
        path = Path(self.data_dir) / file if is_relative else Path(file)
        require_file(
            path,
            "Commonsense data file",
            "Pass data_dir= a folder in the LLM-Adapters layout (<task>/train.json, <task>/test.json), "
            "or fix train_file / train_tasks.",
        )
        issues = RowIssues(path, self.skip_invalid, row_word="line" if path.suffix == ".jsonl" else "element")
        return read_json_records(path, issues), issues

    def _to_examples(self, records: Any, issues: RowIssues, task: str, for_eval: bool) -> list[Example]:
        examples = []
        for row, record in records:
            example = self._to_example(row, record, issues, task, for_eval)
            if example is not None:
                examples.append(example)
        issues.finish(len(examples))
        return examples

    @staticmethod
    def _to_example(row: int, record: Any, issues: RowIssues, task: str, for_eval: bool) -> Example | None:
        """Validate one row. Training rows need options only when their task defines them."""
        problem = check_fields(record, _ROW_FIELDS)
        if problem is None and not isinstance(record.get("input", ""), str):
            problem = f"field 'input' must be str, got {type(record['input']).__name__}"
        if problem is not None:
            issues.reject(row, problem)
            return None

        instruction = record["instruction"].strip()
        context = record.get("input", "").strip()
        query = f"{instruction}\n\n{context}" if context else instruction
        fields = {"instruction": instruction, "input": context, "query": query}
        output = record["output"].strip()

        options = parse_answer_format(instruction) or _DEFAULT_OPTIONS.get(task)
        if options is None and not for_eval:
            # A row of a mixed training file (such as commonsense_170k) without an
            # "Answer format" line can still be trained on.
            return Example(task=task, fields=fields, answer=output, row=row)

        answer = record["answer"].strip()
        if answer not in options:
            issues.reject(row, f"answer '{answer}' is not one of the options {list(options)}")
            return None
        if not output.endswith(answer):
            issues.reject(row, f"field 'output' ({output!r}) does not end with the answer '{answer}'")
            return None
        return Example(
            task=task,
            fields=fields,
            answer=output,
            options=options,
            gold=options.index(answer),
            answer_prefix=output[: len(output) - len(answer)].strip(),
            row=row,
        )
