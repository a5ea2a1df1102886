"""Rendering of the projection-error heatmap (matplotlib, drawn off-screen with Agg)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, List, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# More row labels than this overlap; every k-th label is shown instead.
_MAX_ROW_LABELS = 64


def save_error_heatmap(history: Mapping[str, Any], path: Path) -> np.ndarray:
    """Draw the relative projection error over weights (rows) and monitored steps (columns).

    The figure is drawn on its own Agg canvas, so pyplot's global backend is neither used
    nor changed. Missing values (a weight without gradient at a step) are left blank.

    Args:
        history: ``{"steps": [step, ...], "error": {name: {step: error}}}`` as kept by
            :class:`~vlorp_lightning.callbacks.ProjectionErrorMonitor`.
        path: where to write the PNG; the folder must exist.

    Returns:
        The rendered image, ``uint8`` of shape ``(height, width, 3)``.
    """
    steps: List[int] = list(history["steps"])
    names = list(history["error"])
    values = np.full((len(names), len(steps)), np.nan, dtype=np.float64)
    for row, name in enumerate(names):
        for column, step in enumerate(steps):
            values[row, column] = history["error"][name].get(step, math.nan)

    labels = _short_labels(names)
    height = min(2.0 + 0.18 * len(names), 40.0)
    width = min(4.0 + 0.25 * len(steps), 30.0)
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", cmap="viridis")
    figure.colorbar(image, ax=axes, label="relative error ||G - G_hat|| / ||G||")

    label_every = max(1, math.ceil(len(names) / _MAX_ROW_LABELS))
    rows = list(range(0, len(names), label_every))
    axes.set_yticks(rows, [labels[row] for row in rows], fontsize=7)
    column_every = max(1, math.ceil(len(steps) / 20))
    columns = list(range(0, len(steps), column_every))
    axes.set_xticks(columns, [str(steps[column]) for column in columns], fontsize=7)
    axes.set_xlabel("optimizer step")
    axes.set_title("VLoRP projection error")

    figure.savefig(path)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _short_labels(names: List[str]) -> List[str]:
    """Drop the prefix shared by every name and a trailing ``.weight``."""
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    labels = [name[len(prefix) :] for name in names]
    return [label[: -len(".weight")] if label.endswith(".weight") else label for label in labels]
