"""GSM8K grade-school math word problems (Cobbe et al. 2021, arXiv:2110.14168)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlorp_lightning.data.base import ReasoningDataModule, TaskMode
from vlorp_lightning.data.encoding import Example
from vlorp_lightning.data.records import RowIssues, check_fields, load_hub_rows, read_jsonl, require_file
from vlorp_lightning.data.tokenizer import TokenizerSource

__all__ = ["GSM8KDataModule", "gsm8k_final_answer"]

_FINAL_ANSWER_RE = re.compile(r"####\s*(\S.*?)\s*$", re.DOTALL)
_NUMERIC_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def gsm8k_final_answer(solution: str) -> str | None:
    """Return the final answer of a GSM8K solution: the text after ``####``, commas removed.

    Returns:
        For example ``"1234"`` for ``"... #### 1,234"``, or None when there is no
        ``####`` marker followed by a number.
    """
    match = _FINAL_ANSWER_RE.search(solution)
    if match is None:
        return None
    final = match.group(1).replace(",", "").strip()
    return final if _NUMERIC_RE.fullmatch(final) else None


class GSM8KDataModule(ReasoningDataModule):
    """GSM8K datamodule: train on worked solutions, evaluate by exact final-number match.

    Training answers are the full worked solutions, which end with ``#### <number>``.
    The single evaluation task ``"gsm8k"`` is in generate mode, and :meth:`is_correct`
    compares the number that ``extract_number`` finds in the generated text with the
    gold number by value. GSM8K has no validation split, so validation rows are
    carved from the training rows (``val_fraction``).

    Prompt template fields: ``question``.

    Args:
        data_dir: folder with ``train.jsonl`` and ``test.jsonl`` (JSON Lines with string
            fields ``question`` and ``answer``). None loads ``openai/gsm8k`` (config
            ``main``) from the Hugging Face hub with ``datasets``. Default None.
        tokenizer: see :class:`ReasoningDataModule`.
        **kwargs: the other arguments of :class:`ReasoningDataModule`, such as
            ``batch_size``, ``max_length`` and ``max_eval_rows``.
    """

    hub_id = "openai/gsm8k"
    hub_config = "main"
    default_prompt_template = "Question: {question}\nAnswer:"
    default_chat_prompt_template = "{question}"
    template_fields = ("question",)

    def __init__(self, data_dir: str | None = None, tokenizer: TokenizerSource | None = None, **kwargs: Any) -> None:
        super().__init__(tokenizer=tokenizer, **kwargs)
        self.data_dir = data_dir

    @property
    def eval_tasks(self) -> list[str]:
        """The single evaluation task, ``["gsm8k"]``."""
        return ["gsm8k"]

    def task_mode(self, task: str) -> TaskMode:
        """Return ``"generate"``: GSM8K is scored on generated final numbers."""
        self.check_task(task)
        return "generate"

    def _read_train(self) -> list[Example]:
        return self._read_split("train")

    def _read_test(self) -> dict[str, list[Example]]:
        return {"gsm8k": self._read_split("test")}

    def _read_split(self, split: str) -> list[Example]:
        if self.data_dir is None:
            issues = RowIssues(f"{self.hub_id} ({self.hub_config}, {split})", self.skip_invalid, row_word="row")
            pairs = enumerate(load_hub_rows(self.hub_id, self.hub_config, split), start=1)
        else:
            path = require_file(
                Path(self.data_dir) / f"{split}.jsonl",
                f"GSM8K {split} file",
                "Pass data_dir= a folder with train.jsonl and test.jsonl, or data_dir=None to load "
                f"{self.hub_id} from the Hugging Face hub.",
            )
            issues = RowIssues(path, self.skip_invalid)
            pairs = read_jsonl(path, issues)
        examples = []
        for row, record in pairs:
            example = self._to_example(row, record, issues)
            if example is not None:
                examples.append(example)
        issues.finish(len(examples))
        return examples

    @staticmethod
    def _to_example(row: int, record: Any, issues: RowIssues) -> Example | None:
        problem = check_fields(record, {"question": str, "answer": str})
        if problem is not None:
            issues.reject(row, problem)
            return None
        final = gsm8k_final_answer(record["answer"])
        if final is None:
            issues.reject(row, "field 'answer' does not end with '#### <number>'")
            return None
        return Example(
            task="gsm8k",
            fields={"question": record["question"].strip()},
            answer=record["answer"].strip(),
            target=final,
            row=row,
        )
