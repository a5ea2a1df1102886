"""Collate functions that pad encoded rows into the batch dicts of the datamodules.

All tensors are ``torch.long``. Padding is dynamic (to the longest row of the batch),
on the right for teacher-forced sequences and on the left for generation prompts, so
that every prompt ends at the last column. Labels are ``-100`` on padding and, for
answer-only supervision, on prompt tokens. Padding positions are found from the
lengths, never from the pad id, because the pad id often equals the EOS id.

The functions are module-level so that ``functools.partial`` objects built from them
can be pickled into ``DataLoader`` worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["IGNORE_INDEX", "ListDataset", "collate_choice", "collate_generate", "collate_train"]

IGNORE_INDEX = -100


class ListDataset(torch.utils.data.Dataset):
    """A map-style dataset over an in-memory list of encoded rows."""

    def __init__(self, rows: Sequence[Any]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.rows[index]


def _pad(
    sequences: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]] | None,
    pad_id: int,
    left: bool = False,
) -> dict[str, torch.Tensor]:
    """Pad id lists (and optional label lists of the same lengths) to one length.

    Returns:
        ``input_ids`` and ``attention_mask`` of shape ``(len(sequences), T)`` and, when
        ``labels`` is given, ``labels`` of the same shape with ``-100`` on padding.
    """
    width = max(len(sequence) for sequence in sequences)
    count = len(sequences)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((count, width), dtype=torch.long)
    label_tensor = torch.full((count, width), IGNORE_INDEX, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        length = len(sequence)
        columns = slice(width - length, width) if left else slice(0, length)
        input_ids[row, columns] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, columns] = 1
        if labels is not None:
            label_tensor[row, columns] = torch.tensor(labels[row], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        batch["labels"] = label_tensor
    return batch


def _answer_only_labels(prompt_length: int, ids: Sequence[int]) -> list[int]:
    return [IGNORE_INDEX] * prompt_length + list(ids[prompt_length:])


def collate_train(rows: Sequence[dict[str, Any]], pad_id: int, train_on_prompt: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad training rows into ``input_ids``, ``attention_mask`` and ``labels``.

    Args:
        rows: dicts with ``input_ids`` (prompt then answer ids) and ``prompt_length``.
        pad_id: token id written into padding positions.
        train_on_prompt: supervise the prompt tokens as well. Default False.

    Returns:
        Three ``(B, T)`` long tensors. ``labels`` equals ``input_ids`` on supervised
        positions and is ``-100`` elsewhere.
    """
    sequences = [row["input_ids"] for row in rows]
    if train_on_prompt:
        labels = [list(sequence) for sequence in sequences]
    else:
        labels = [_answer_only_labels(row["prompt_length"], row["input_ids"]) for row in rows]
    return _pad(sequences, labels, pad_id)


def _teacher_forced(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    sequences = [row["prompt_ids"] + row["answer_ids"] for row in rows]
    labels = [_answer_only_labels(len(row["prompt_ids"]), sequence) for row, sequence in zip(rows, sequences)]
    padded = _pad(sequences, labels, pad_id)
    return {
        "lm_input_ids": padded["input_ids"],
        "lm_attention_mask": padded["attention_mask"],
        "lm_labels": padded["labels"],
    }


def collate_generate(rows: Sequence[dict[str, Any]], pad_id: int, task: str) -> dict[str, Any]:
    """Build one generate-mode evaluation batch.

    Args:
        rows: dicts with ``prompt_ids``, ``answer_ids`` (answer and EOS) and ``target``.
        pad_id: token id written into padding positions.
        task: the evaluation task name stored in the batch.

    Returns:
        ``mode`` (``"generate"``), ``task``, left-padded prompts ``input_ids`` and
        ``attention_mask`` ``(B, T)``, ``targets`` (list of B gold answers), and the
        right-padded prompt-plus-answer ``lm_input_ids``, ``lm_attention_mask`` and
        answer-only ``lm_labels`` ``(B, T')``.
    """
    prompts = _pad([row["prompt_ids"] for row in rows], None, pad_id, left=True)
    batch: dict[str, Any] = {
        "mode": "generate",
        "task": task,
        "input_ids": prompts["input_ids"],
        "attention_mask": prompts["attention_mask"],
        "targets": [row["target"] for row in rows],
    }
    batch.update(_teacher_forced(rows, pad_id))
    return batch


def collate_choice(rows: Sequence[dict[str, Any]], pad_id: int, task: str) -> dict[str, Any]:
    """Build one choice-mode evaluation batch with every option of every row.

    Args:
        rows: dicts with ``prompt_ids``, ``answer_ids``, ``prefix_ids``,
            ``option_ids`` (one id list per option label) and ``gold``.
        pad_id: token id written into padding positions.
        task: the evaluation task name stored in the batch.

    Returns:
        ``mode`` (``"choice"``), ``task``, and right-padded ``choice_input_ids``,
        ``choice_attention_mask`` and ``choice_labels`` of shape ``(N, T)``, where N is
        the total number of options in the batch. The labels are ``-100`` except on
        the option label tokens. ``choice_owner`` ``(N,)`` is the row index of each
        option and ``gold`` ``(B,)`` the correct option index within each row. The
        teacher-forced ``lm_input_ids``, ``lm_attention_mask`` and ``lm_labels`` contain
        the prompt plus the correct answer.
    """
    sequences: list[list[int]] = []
    labels: list[list[int]] = []
    owners: list[int] = []
    for owner, row in enumerate(rows):
        context = row["prompt_ids"] + row["prefix_ids"]
        for option in row["option_ids"]:
            sequences.append(context + option)
            labels.append([IGNORE_INDEX] * len(context) + list(option))
            owners.append(owner)
    padded = _pad(sequences, labels, pad_id)
    batch: dict[str, Any] = {
        "mode": "choice",
        "task": task,
        "choice_input_ids": padded["input_ids"],
        "choice_attention_mask": padded["attention_mask"],
        "choice_labels": padded["labels"],
        "choice_owner": torch.tensor(owners, dtype=torch.long),
        "gold": torch.tensor([row["gold"] for row in rows], dtype=torch.long),
    }
    batch.update(_teacher_forced(rows, pad_id))
    return batch
