"""Readers and validators for the raw data files of the reasoning datamodules.

Every reader returns ``(row_number, record)`` pairs, where ``row_number`` is the
1-based line of a JSON Lines or CSV file, or the 1-based index of an element of a
JSON array. An invalid row goes to a :class:`RowIssues` tracker, which either raises
a ``ValueError`` that names the file, the row and the fix, or, with
``skip_invalid=True``, counts the row and reports the count in one log line.
A missing file raises ``FileNotFoundError`` and an empty file raises ``ValueError``
in both modes.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

__all__ = [
    "RowIssues",
    "check_fields",
    "load_hub_rows",
    "read_csv_rows",
    "read_json_records",
    "read_jsonl",
    "require_file",
    "unknown_name_message",
]

log = logging.getLogger(__name__)

_SKIP_HINT = "Fix the row or pass skip_invalid=True to skip invalid rows."


class RowIssues:
    """Raise on, or count, the invalid rows of one data file.

    Args:
        source: the file path or hub dataset name shown in messages.
        skip_invalid: when True, :meth:`reject` counts the row and returns instead
            of raising. Default False.
        row_word: the word for a row position in messages: ``"line"`` for line-based
            files, ``"element"`` for JSON arrays and ``"row"`` for hub rows.
            Default ``"line"``.
    """

    def __init__(self, source: str | Path, skip_invalid: bool = False, row_word: str = "line") -> None:
        self.source = str(source)
        self.skip_invalid = skip_invalid
        self.row_word = row_word
        self.skipped = 0
        self.first_problem: str | None = None

    def reject(self, row_number: int, problem: str) -> None:
        """Raise ``ValueError`` for one invalid row, or count it when skipping.

        Args:
            row_number: 1-based line or element index of the row.
            problem: what is wrong, for example ``"missing field 'answer'"``.

        Raises:
            ValueError: unless ``skip_invalid`` is True.
        """
        message = f"{self.source}: {self.row_word} {row_number}: {problem}."
        if not self.skip_invalid:
            raise ValueError(f"{message} {_SKIP_HINT}")
        self.skipped += 1
        if self.first_problem is None:
            self.first_problem = message

    def finish(self, kept: int) -> None:
        """Log the number of skipped rows once and check that rows remain.

        Args:
            kept: number of valid rows read from the source.

        Raises:
            ValueError: when no valid row remains.
        """
        if self.skipped:
            _log_info(
                "Skipped %d invalid rows of %s (skip_invalid=True). First problem: %s",
                self.skipped,
                self.source,
                self.first_problem,
            )
        if kept == 0:
            raise ValueError(
                f"{self.source} has no valid rows ({self.skipped} invalid rows skipped). "
                "Check that the file has the expected format."
            )


@rank_zero_only
def _log_info(message: str, *args: Any) -> None:
    log.info(message, *args)


def require_file(path: Path, what: str, fix: str) -> Path:
    """Return ``path`` if it is an existing, non-empty file.

    Args:
        path: the file to check.
        what: a short description used in messages, such as ``"GSM8K test file"``.
        fix: the remedy appended to the message, such as ``"Pass data_dir=..."``.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file is empty or only whitespace.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. {fix}")
    with path.open("rb") as handle:
        head = handle.read(4096)
    if not head.strip():
        raise ValueError(f"{what} {path} is empty. {fix}")
    return path


def read_jsonl(path: Path, issues: RowIssues) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, value)`` for every non-blank line of a JSON Lines file.

    A line that is not valid JSON goes to ``issues`` with its 1-based line number.
    The values are not checked further, so the caller validates their type.
    """
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                issues.reject(line_number, f"invalid JSON ({error.msg} at column {error.colno})")
                continue
            yield line_number, value


def read_json_records(path: Path, issues: RowIssues) -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, value)`` for a JSON array file or a JSON Lines file.

    A ``.jsonl`` file is read line by line (row number = line). Any other file must
    hold one JSON array, and the row number is the 1-based element index, which is
    how ``issues`` reports it when its ``row_word`` is ``"element"``.

    Raises:
        ValueError: when the file is not valid JSON (with line and column) or its
            top level is not an array. Both raise even with ``skip_invalid=True``,
            because no row can be recovered.
    """
    if path.suffix == ".jsonl":
        yield from read_jsonl(path, issues)
        return
    with path.open(encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}: line {error.lineno}: invalid JSON ({error.msg} at column {error.colno}). "
                "The file must contain one JSON array of objects, so fix the file."
            ) from error
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a JSON array of objects at the top level, got {type(data).__name__}. "
            "Convert the file to the LLM-Adapters format (a list of objects)."
        )
    yield from enumerate(data, start=1)


def read_csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, cells)`` for every non-empty record of a CSV file.

    Quoted cells may contain commas and newlines, so ``line_number`` is the line on
    which the record ends (1-based), which equals its only line for one-line records.
    """
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        for cells in reader:
            if not cells or all(not cell.strip() for cell in cells):
                continue
            yield reader.line_num, cells


def check_fields(record: Any, fields: Mapping[str, type | tuple[type, ...]]) -> str | None:
    """Return what is wrong with one record, or None when it is valid.

    Args:
        record: a parsed row, expected to be a dict.
        fields: required field names mapped to their allowed Python type(s).
            ``bool`` never counts as ``int``.

    Returns:
        A short problem description such as ``"missing field 'answer'"`` or
        ``"field 'answer' must be str, got int"``, or None.
    """
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for name, expected in fields.items():
        if name not in record:
            return f"missing field '{name}'"
        value = record[name]
        types = expected if isinstance(expected, tuple) else (expected,)
        if isinstance(value, bool) and bool not in types:
            return f"field '{name}' must be {_type_names(types)}, got bool"
        if not isinstance(value, types):
            return f"field '{name}' must be {_type_names(types)}, got {type(value).__name__}"
    return None


def _type_names(types: Iterable[type]) -> str:
    return " or ".join(t.__name__ for t in types)


def load_hub_rows(dataset_id: str, config: str | None, split: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Download (or read from the local cache) one split of a Hugging Face hub dataset.

    ``datasets`` is imported here, so modules that never touch the hub do not need it.

    Args:
        dataset_id: hub repository, for example ``"openai/gsm8k"``.
        config: dataset configuration name, for example ``"main"``, or None.
        split: split name, for example ``"train"``.
        **kwargs: extra arguments for ``datasets.load_dataset``, such as ``data_files``.

    Returns:
        The rows as a list of dicts.
    """
    import datasets

    # TODO: check against the live hub; the tests replace datasets.load_dataset with a stub,
    # so the dataset ids, configurations and row layouts used here are unverified.
    _log_info("Loading %s (config=%s, split=%s) with datasets.load_dataset", dataset_id, config, split)
    dataset = datasets.load_dataset(dataset_id, config, split=split, **kwargs)
    return [dict(row) for row in dataset]


def unknown_name_message(owner: str, kind: str, name: str, valid: Sequence[str], listing: str | None = None) -> str:
    """Build the message for an unknown name, with up to three close matches from ``valid``.

    Args:
        owner: the class or argument named at the start of the message.
        kind: what the name is, such as ``"subject"``.
        name: the unknown name.
        valid: every valid name.
        listing: where the valid names are documented. When given, the message
            points there instead of listing every valid name. Default None.

    Example:
        >>> unknown_name_message("MMLUDataModule", "subject", "anatomyy", ["anatomy", "virology"])
        "MMLUDataModule: unknown subject 'anatomyy'. Did you mean ['anatomy']? Valid names: ['anatomy', 'virology']."
    """
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    names = f"See {listing} for the {len(valid)} valid names." if listing else f"Valid names: {list(valid)}."
    return f"{owner}: unknown {kind} '{name}'.{hint} {names}"
