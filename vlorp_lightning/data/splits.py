"""Seeded row subsets: validation carving and row limits.

Every random choice uses ``random.Random(f"{seed}:{name}")``, whose string seeding
does not depend on ``PYTHONHASHSEED``, so the same seed selects the same rows in
every process and on every rank.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["carve_validation", "sample_rows"]

Row = TypeVar("Row")


def sample_rows(rows: Sequence[Row], count: int, seed: int, name: str) -> list[Row]:
    """Return a seeded random subset of ``count`` rows, kept in their original order.

    Args:
        rows: the rows to choose from.
        count: subset size. All rows are returned when it is at least ``len(rows)``.
        seed: base seed.
        name: name mixed into the seed, so that different subsets are independent.
    """
    if count >= len(rows):
        return list(rows)
    chosen = random.Random(f"{seed}:{name}").sample(range(len(rows)), count)
    return [rows[index] for index in sorted(chosen)]


def carve_validation(
    rows: Sequence[Row], tasks: Sequence[str], fraction: float, seed: int, task_of: Callable[[Row], str]
) -> tuple[list[Row], dict[str, list[Row]], list[str]]:
    """Hold out ``ceil(fraction * n)`` (at least 1) of each task's ``n`` rows for validation.

    Args:
        rows: training rows.
        tasks: tasks that need validation rows.
        fraction: held-out share, in (0, 1).
        seed: base seed. Each task's choice is seeded by ``seed`` and its name.
        task_of: returns the task name of a row.

    Returns:
        The remaining training rows (original order), the held-out rows per task
        (original order), and the tasks that have no training row.
    """
    held_out: set[int] = set()
    validation: dict[str, list[Row]] = {}
    without_rows: list[str] = []
    for task in tasks:
        indices = [index for index, row in enumerate(rows) if task_of(row) == task]
        if not indices:
            without_rows.append(task)
            continue
        count = max(1, math.ceil(fraction * len(indices)))
        chosen = sorted(random.Random(f"{seed}:{task}").sample(indices, count))
        validation[task] = [rows[index] for index in chosen]
        held_out.update(chosen)
    remaining = [row for index, row in enumerate(rows) if index not in held_out]
    return remaining, validation, without_rows
