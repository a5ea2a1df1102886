"""MMLU multiple-choice questions in 57 subjects, zero-shot or k-shot.

Three row layouts are read:

* the original release CSV: no header, columns ``question, A, B, C, D, answer`` with
  the answer as a letter ``A``-``D``;
* CSV with the header ``question,choice0,choice1,choice2,choice3,answer`` and the answer
  as an index ``0``-``3``;
* the Hugging Face hub dataset ``cais/mmlu``: fields ``question``, ``subject``,
  ``choices`` (4 strings) and ``answer`` (an index 0-3).

The CSV layout is detected per file from its first row, and either answer form is
accepted in both CSV layouts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlorp_lightning.data.base import ReasoningDataModule, TaskMode
from vlorp_lightning.data.encoding import Example
from vlorp_lightning.data.mmlu_subjects import MMLU_SUBJECTS, subject_category
from vlorp_lightning.data.records import (
    RowIssues,
    check_fields,
    load_hub_rows,
    read_csv_rows,
    require_file,
    unknown_name_message,
)
from vlorp_lightning.data.tokenizer import TokenizerSource

__all__ = ["MMLUDataModule", "MMLUQuestion", "read_mmlu_csv"]

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
_SPLIT_SUFFIXES = ("_dev", "_val", "_test", "_train")


@dataclass(frozen=True)
class MMLUQuestion:
    """One validated MMLU row: a question, four choices and the correct choice index."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int
    row: int


def _parse_answer(cell: str) -> int | None:
    value = cell.strip()
    if value.upper() in LETTERS:
        return LETTERS.index(value.upper())
    if value in ("0", "1", "2", "3"):
        return int(value)
    return None


def read_mmlu_csv(path: Path, issues: RowIssues, subject: str) -> list[MMLUQuestion]:
    """Read one MMLU CSV file in either CSV layout.

    Args:
        path: the CSV file, which must exist.
        issues: tracker that raises on, or counts, invalid rows.
        subject: subject name stored in every question.

    Returns:
        The valid questions in file order. ``issues.finish`` is called.
    """
    questions = []
    for index, (line, cells) in enumerate(read_csv_rows(path)):
        if index == 0 and cells[0].strip().lower() == "question":
            continue
        if len(cells) != 6:
            issues.reject(line, f"expected 6 columns (question, 4 choices, answer), got {len(cells)}")
            continue
        answer = _parse_answer(cells[5])
        if answer is None:
            issues.reject(line, f"answer {cells[5]!r} must be a letter A-D or an index 0-3")
            continue
        choices = tuple(cell.strip() for cell in cells[1:5])
        questions.append(MMLUQuestion(subject, cells[0].strip(), choices, answer, line))
    issues.finish(len(questions))
    return questions


def _question_from_record(record: Any, row: int, issues: RowIssues, subject: str) -> MMLUQuestion | None:
    """Validate one hub row, whose fields ``auxiliary_train`` may nest under ``"train"``."""
    if isinstance(record, dict) and isinstance(record.get("train"), dict):
        record = record["train"]
    problem = check_fields(record, {"question": str, "choices": list, "answer": int})
    if problem is None and (len(record["choices"]) != 4 or not all(isinstance(c, str) for c in record["choices"])):
        problem = f"field 'choices' must be a list of 4 strings, got {record['choices']!r}"
    if problem is None and record["answer"] not in range(4):
        problem = f"field 'answer' must be an index 0-3, got {record['answer']}"
    if problem is not None:
        issues.reject(row, problem)
        return None
    choices = tuple(choice.strip() for choice in record["choices"])
    return MMLUQuestion(record.get("subject") or subject, record["question"].strip(), choices, record["answer"], row)


def _subject_of_file(path: Path) -> str:
    stem = path.stem
    for suffix in _SPLIT_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


class MMLUDataModule(ReasoningDataModule):
    """MMLU datamodule: one choice-mode evaluation task per subject, letters A-D as options.

    Each subject of ``subjects`` is an evaluation task, so the module reports
    per-subject accuracy and can average it per category with :meth:`subject_category`.
    With ``num_shots = k`` the first k rows of the subject's dev split precede each
    question. When such a prompt does not fit ``max_length``, shots are dropped from
    the end of the shot list before any token is cut.

    Validation uses the ``val`` split when there is one (``<data_dir>/val/`` or the
    hub's ``validation`` split), else a seeded sample of each subject's test rows,
    with a warning that validation and test overlap.

    Prompt template fields: ``header`` ("The following are multiple choice questions
    (with answers) about <subject>."), ``subject`` (with spaces), ``shots`` (the
    solved examples, each ending with a blank line), ``question`` and ``choices``
    (lines ``A. ...`` to ``D. ...``).

    Args:
        data_dir: folder with ``dev/<subject>_dev.csv``, ``test/<subject>_test.csv`` and
            optionally ``val/<subject>_val.csv``, in either CSV layout. None loads
            ``cais/mmlu`` (config ``all``) from the Hugging Face hub. Default None.
        train_dir: folder whose ``*.csv`` files are all training rows, in either CSV
            layout, such as the original ``auxiliary_train/``. None uses
            ``<data_dir>/auxiliary_train/`` when it exists, else the hub's
            ``auxiliary_train`` configuration. Default None.
        subjects: subjects to evaluate, in dataloader order. None means all 57 of
            :data:`MMLU_SUBJECTS`. Default None.
        num_shots: solved dev examples before each evaluation question (0 to 5;
            the standard protocol uses 5). Default 0.
        tokenizer: see :class:`ReasoningDataModule`.
        **kwargs: the other arguments of :class:`ReasoningDataModule`.

    Raises:
        ValueError: when a subject is unknown (the message lists close matches) or
            ``num_shots`` is negative.
    """

    hub_id = "cais/mmlu"
    default_prompt_template = "{header}\n\n{shots}{question}\n{choices}\nAnswer:"
    default_chat_prompt_template = default_prompt_template
    template_fields = ("header", "subject", "shots", "question", "choices")

    def __init__(
        self,
        data_dir: str | None = None,
        train_dir: str | None = None,
        subjects: list[str] | None = None,
        num_shots: int = 0,
        tokenizer: TokenizerSource | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer=tokenizer, **kwargs)
        for subject in subjects or []:
            if subject not in MMLU_SUBJECTS:
                listing = "vlorp_lightning.data.mmlu_subjects.MMLU_SUBJECTS"
                raise ValueError(unknown_name_message("MMLUDataModule subjects", "subject", subject, list(MMLU_SUBJECTS), listing))
        if num_shots < 0:
            raise ValueError(f"MMLUDataModule: num_shots must be >= 0, got {num_shots}.")
        self.data_dir = data_dir
        self.train_dir = train_dir
        self.subjects = list(subjects) if subjects is not None else list(MMLU_SUBJECTS)
        self.num_shots = num_shots
        self._questions: dict[str, dict[str, list[MMLUQuestion]]] = {}

    @property
    def eval_tasks(self) -> list[str]:
        """The evaluated subjects, in dataloader order."""
        return list(self.subjects)

    def task_mode(self, task: str) -> TaskMode:
        """Return ``"choice"``: MMLU is scored by the log-likelihood of the letters A-D."""
        self.check_task(task)
        return "choice"

    @staticmethod
    def subject_category(subject: str) -> str:
        """Return the category of ``subject``: STEM, humanities, social sciences or other."""
        return subject_category(subject)

    # ------------------------------------------------------------------ reading
    def _split_questions(self, split: str) -> dict[str, list[MMLUQuestion]]:
        """Read one split (``dev``, ``val`` or ``test``) for every selected subject, cached."""
        if split in self._questions:
            return self._questions[split]
        by_subject: dict[str, list[MMLUQuestion]] = {}
        if self.data_dir is None:
            hub_split = {"val": "validation"}.get(split, split)
            issues = RowIssues(f"{self.hub_id} (all, {hub_split})", self.skip_invalid, row_word="row")
            grouped: dict[str, list[MMLUQuestion]] = defaultdict(list)
            for row, record in enumerate(load_hub_rows(self.hub_id, "all", hub_split), start=1):
                question = _question_from_record(record, row, issues, subject="")
                if question is not None:
                    grouped[question.subject].append(question)
            issues.finish(sum(len(rows) for rows in grouped.values()))
            by_subject = {subject: grouped.get(subject, []) for subject in self.subjects}
        else:
            for subject in self.subjects:
                path = require_file(
                    Path(self.data_dir) / split / f"{subject}_{split}.csv",
                    f"MMLU {split} file of subject '{subject}'",
                    "Pass data_dir= a folder with dev/ and test/ CSV files, data_dir=None to load "
                    f"{self.hub_id} from the hub, or drop the subject from subjects.",
                )
                by_subject[subject] = read_mmlu_csv(path, RowIssues(path, self.skip_invalid), subject)
        self._questions[split] = by_subject
        return by_subject

    def _shots(self, subject: str) -> list[MMLUQuestion]:
        if self.num_shots == 0:
            return []
        dev = self._split_questions("dev")[subject]
        if len(dev) < self.num_shots:
            raise ValueError(
                f"MMLUDataModule: num_shots={self.num_shots} but the dev split of '{subject}' has only "
                f"{len(dev)} valid rows. Lower num_shots."
            )
        return dev[: self.num_shots]

    def _examples(self, questions: list[MMLUQuestion], task: str, shots: list[MMLUQuestion]) -> list[Example]:
        examples = []
        for question in questions:
            candidates = [_prompt_fields(question, shots[:count]) for count in range(len(shots), -1, -1)]
            examples.append(
                Example(
                    task=task,
                    fields=candidates[0],
                    answer=LETTERS[question.answer],
                    options=LETTERS,
                    gold=question.answer,
                    fallback_fields=tuple(candidates[1:]),
                    row=question.row,
                )
            )
        return examples

    def _read_test(self) -> dict[str, list[Example]]:
        test = self._split_questions("test")
        return {subject: self._examples(test[subject], subject, self._shots(subject)) for subject in self.subjects}

    def _read_validation(self) -> dict[str, list[Example]] | None:
        if self.data_dir is not None and not (Path(self.data_dir) / "val").is_dir():
            return None
        validation = self._split_questions("val")
        return {subject: self._examples(validation[subject], subject, self._shots(subject)) for subject in self.subjects}

    def _read_train(self) -> list[Example]:
        folder = Path(self.train_dir) if self.train_dir is not None else None
        if folder is None and self.data_dir is not None and (Path(self.data_dir) / "auxiliary_train").is_dir():
            folder = Path(self.data_dir) / "auxiliary_train"
        if folder is None:
            issues = RowIssues(f"{self.hub_id} (auxiliary_train)", self.skip_invalid, row_word="row")
            rows = load_hub_rows(self.hub_id, "auxiliary_train", "train")
            questions = [_question_from_record(record, row, issues, "") for row, record in enumerate(rows, start=1)]
            valid = [question for question in questions if question is not None]
            issues.finish(len(valid))
            return self._examples(valid, "auxiliary_train", [])
        if not folder.is_dir():
            raise FileNotFoundError(
                f"MMLU training folder not found: {folder}. Pass train_dir= a folder of MMLU-style CSV files."
            )
        files = sorted(folder.glob("*.csv"))
        if not files:
            raise FileNotFoundError(f"MMLU training folder {folder} has no *.csv files. Pass train_dir= a folder of CSV files.")
        examples: list[Example] = []
        for path in files:
            # Files named after an MMLU subject get its header, and others (such as
            # auxiliary_train/arc_easy.csv) get the header without a subject.
            task = _subject_of_file(path)
            subject = task if task in MMLU_SUBJECTS else ""
            require_file(path, "MMLU training file", "Fix or remove the file.")
            questions = read_mmlu_csv(path, RowIssues(path, self.skip_invalid), subject)
            examples.extend(self._examples(questions, task, []))
        return examples


def _prompt_fields(question: MMLUQuestion, shots: list[MMLUQuestion]) -> dict[str, str]:
    subject = question.subject.replace("_", " ").strip()
    header = "The following are multiple choice questions (with answers)"
    header += f" about {subject}." if subject else "."
    shot_text = "".join(
        f"{shot.question}\n{_format_choices(shot.choices)}\nAnswer: {LETTERS[shot.answer]}\n\n" for shot in shots
    )
    return {
        "header": header,
        "subject": subject,
        "shots": shot_text,
        "question": question.question,
        "choices": _format_choices(question.choices),
    }


def _format_choices(choices: tuple[str, ...]) -> str:
    return "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
