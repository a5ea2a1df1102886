"""Pure functions behind the diagnostics callbacks: projection error, state accounting and
process memory readers.

The callbacks in :mod:`vlorp_lightning.callbacks` only collect and log, and the math and
the memory readers they use live here. This module has no Lightning import.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import psutil
import torch
from torch import Tensor

from vlorp_lightning.memory import StateEstimate
from vlorp_lightning.projection import VLoRPProjector

__all__ = [
    "STATE_COMPONENTS",
    "adamw_state_bytes",
    "compare_state_bytes",
    "cosine_similarity",
    "cuda_peak_bytes",
    "current_rss_bytes",
    "format_state_table",
    "peak_rss_bytes",
    "projection_error",
    "reconstruct",
    "relative_error",
]

#: Component keys of :meth:`~vlorp_lightning.optim.ProjectedOptimizer.state_bytes` entries.
STATE_COMPONENTS: Tuple[str, ...] = ("momentum", "second_moment", "accumulator", "projection")


# ---------------------------------------------------------------------- projection error
def reconstruct(grad: Tensor, projector: VLoRPProjector) -> Tensor:
    """Project a gradient and map it back: ``G_hat = project_back(project(G))``.

    The computation runs in float32 (a bf16 or fp16 gradient is upcast first), so the
    rounding of the diagnostic does not hide a small projection error. ``scale`` is applied.

    Args:
        grad: ``G``, shape ``projector.shape`` ``(n, m)``, any floating dtype.
        projector: the projector whose matrix is used as is; it is not refreshed.

    Returns:
        ``G_hat``, float32, shape ``(n, m)``, on ``grad``'s device.

    Raises:
        ValueError: if ``grad`` does not have the projector's shape.
    """
    grad = grad.detach().to(torch.float32)
    return projector.project_back(projector.project(grad))


def relative_error(reference: Tensor, approximation: Tensor) -> Tensor:
    r"""Relative Frobenius error :math:`\|G - \hat G\|_F / \|G\|_F`.

    Args:
        reference: ``G``, any shape.
        approximation: ``G_hat``, the same shape as ``reference``.

    Returns:
        A float32 scalar tensor on ``reference``'s device (no host sync). It is 0 when both
        tensors are zero and ``inf`` when only ``reference`` is zero.

    Raises:
        ValueError: if the shapes differ.

    Example:
        >>> round(float(relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0]))), 6)
        0.8
    """
    _check_same_shape(reference, approximation)
    reference = reference.detach().to(torch.float32)
    difference = torch.linalg.vector_norm(reference - approximation.detach().to(torch.float32))
    norm = torch.linalg.vector_norm(reference)
    ratio = difference / norm
    # 0 / 0 means an exact reconstruction of a zero gradient.
    return torch.where((norm == 0) & (difference == 0), torch.zeros_like(ratio), ratio)


def cosine_similarity(reference: Tensor, approximation: Tensor) -> Tensor:
    r"""Cosine :math:`\langle G, \hat G\rangle / (\|G\|_F \|\hat G\|_F)` of two tensors seen as vectors.

    Args:
        reference: ``G``, any shape.
        approximation: ``G_hat``, the same shape as ``reference``.

    Returns:
        A float32 scalar tensor in ``[-1, 1]`` on ``reference``'s device. It is 1 when both
        tensors are zero and 0 when exactly one of them is zero.

    Raises:
        ValueError: if the shapes differ.

    Example:
        >>> float(cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])))  # doctest: +ELLIPSIS
        0.7071...
    """
    _check_same_shape(reference, approximation)
    reference = reference.detach().to(torch.float32).reshape(-1)
    approximation = approximation.detach().to(torch.float32).reshape(-1)
    norms = torch.linalg.vector_norm(reference) * torch.linalg.vector_norm(approximation)
    cosine = torch.dot(reference, approximation) / norms
    both_zero = (torch.linalg.vector_norm(reference) == 0) & (torch.linalg.vector_norm(approximation) == 0)
    cosine = torch.where(norms == 0, both_zero.to(torch.float32), cosine)
    return cosine.clamp(-1.0, 1.0)


def projection_error(grad: Tensor, projector: VLoRPProjector) -> Tuple[Tensor, Tensor]:
    """Relative error and cosine between a gradient and its projected reconstruction.

    With ``distribution="normal"`` and ``scale=1`` the expected squared relative error is
    ``(d + 1) / r`` for unit length ``d`` and rank ``r``, whatever ``G`` is. With
    ``"orthonormal"`` and ``r = d`` the reconstruction is exact up to rounding.

    Args:
        grad: ``G``, shape ``projector.shape``.
        projector: the projector in use for ``grad``'s accumulation window.

    Returns:
        ``(error, cosine)``, two float32 scalar tensors on ``grad``'s device; see
        :func:`relative_error` and :func:`cosine_similarity`.
    """
    reconstruction = reconstruct(grad, projector)
    return relative_error(grad, reconstruction), cosine_similarity(grad, reconstruction)


def _check_same_shape(reference: Tensor, approximation: Tensor) -> None:
    if reference.shape != approximation.shape:
        raise ValueError(
            f"the approximation has shape {tuple(approximation.shape)} but the reference has shape "
            f"{tuple(reference.shape)}; pass two tensors of the same shape"
        )


# ---------------------------------------------------------------------- state accounting
def adamw_state_bytes(numel: int, bytes_per_element: int = 4) -> int:
    """Bytes of ``torch.optim.AdamW`` state for ``numel`` parameters: two moments each.

    Args:
        numel: number of trainable parameter elements.
        bytes_per_element: 4 (default) for float32 moments.
    """
    if numel < 0 or bytes_per_element < 1:
        raise ValueError(f"numel={numel!r} must be >= 0 and bytes_per_element={bytes_per_element!r} >= 1")
    return 2 * numel * bytes_per_element


def compare_state_bytes(
    measured: Mapping[str, Mapping[str, int]],
    adamw_bytes: int,
    projected_names: Any = (),
    estimate: Optional[StateEstimate] = None,
) -> Dict[str, Any]:
    """Put measured optimizer-state bytes beside the static prediction and AdamW.

    Args:
        measured: the output of :meth:`~vlorp_lightning.optim.ProjectedOptimizer.state_bytes`:
            ``{name: {component: bytes}, "total": {component: bytes}}``.
        adamw_bytes: bytes that AdamW would keep for the same parameters.
        projected_names: names of the projected parameters; the others count as dense.
        estimate: the prediction of :func:`~vlorp_lightning.estimate_state_bytes`, or ``None``.

    Returns:
        A dict with ``"components"`` (measured bytes per component), ``"rows"`` (``projected``,
        ``dense`` and ``total``, each ``{"predicted": bytes or None, "measured": bytes}``),
        ``"per_param"`` (the same per parameter name), ``"mismatches"`` (names whose
        prediction differs from the measurement), ``"adamw_equivalent_bytes"``, ``"ratio"``
        (measured total over AdamW) and ``"predicted_ratio"`` (or ``None``).
    """
    # TODO: StateEstimate has no split by component, so only per-parameter and group totals
    # are compared; components are reported as measured only.
    projected = set(projected_names)
    per_param: Dict[str, Dict[str, Optional[int]]] = {}
    measured_groups = {"projected": 0, "dense": 0}
    for name, entry in measured.items():
        if name == "total":
            continue
        total = int(entry["total"])
        measured_groups["projected" if name in projected else "dense"] += total
        predicted = estimate.per_param.get(name) if estimate is not None else None
        per_param[name] = {"predicted": predicted, "measured": total}

    measured_total = int(measured["total"]["total"])
    predicted_rows: Dict[str, Optional[int]] = {"projected": None, "dense": None, "total": None}
    if estimate is not None:
        predicted_rows = {
            "projected": estimate.projected_bytes,
            "dense": estimate.dense_bytes,
            "total": estimate.total_bytes,
        }
    rows = {
        "projected": {"predicted": predicted_rows["projected"], "measured": measured_groups["projected"]},
        "dense": {"predicted": predicted_rows["dense"], "measured": measured_groups["dense"]},
        "total": {"predicted": predicted_rows["total"], "measured": measured_total},
    }
    mismatches = [
        name
        for name, row in per_param.items()
        if estimate is not None and row["predicted"] != row["measured"]
    ]
    return {
        "components": {key: int(measured["total"].get(key, 0)) for key in STATE_COMPONENTS},
        "rows": rows,
        "per_param": per_param,
        "mismatches": mismatches,
        "adamw_equivalent_bytes": int(adamw_bytes),
        "ratio": measured_total / adamw_bytes if adamw_bytes else 0.0,
        "predicted_ratio": (
            estimate.total_bytes / adamw_bytes if estimate is not None and adamw_bytes else None
        ),
    }


def format_state_table(summary: Mapping[str, Any]) -> str:
    """Render the dict of :func:`compare_state_bytes` as a fixed-width text table in MiB."""
    lines = [f"{'optimizer state':<28}{'predicted MiB':>15}{'measured MiB':>15}"]
    for key, row in summary["rows"].items():
        lines.append(f"{key:<28}{_mib(row['predicted']):>15}{_mib(row['measured']):>15}")
    for key, value in summary["components"].items():
        lines.append(f"{'  measured ' + key:<28}{'':>15}{_mib(value):>15}")
    lines.append(f"{'AdamW equivalent':<28}{'':>15}{_mib(summary['adamw_equivalent_bytes']):>15}")
    predicted_ratio = summary["predicted_ratio"]
    predicted_text = "-" if predicted_ratio is None else f"{100 * predicted_ratio:.1f}%"
    lines.append(f"{'ratio to AdamW':<28}{predicted_text:>15}{100 * summary['ratio']:>14.1f}%")
    if summary["mismatches"]:
        lines.append(f"prediction differs from measurement for: {', '.join(summary['mismatches'])}")
    return "\n".join(lines)


def _mib(value: Optional[Union[int, float]]) -> str:
    return "-" if value is None else f"{value / 2**20:.3f}"


# ---------------------------------------------------------------------- process memory
def peak_rss_bytes() -> Optional[int]:
    """Peak resident set size of this process since it started, in bytes.

    Reads ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which Linux reports in KiB and
    macOS in bytes. The value is a process-lifetime maximum and never decreases.

    Returns:
        Bytes, or ``None`` where the ``resource`` module is unavailable (Windows).
    """
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int:
    """Current resident set size of this process in bytes (``psutil``)."""
    return int(psutil.Process().memory_info().rss)


def cuda_peak_bytes(device: Union[torch.device, int, str, None] = None) -> Tuple[int, int]:
    """Peak bytes allocated and reserved by PyTorch's CUDA allocator since its last reset.

    Args:
        device: the CUDA device; default the current one.

    Returns:
        ``(max_allocated, max_reserved)`` from ``torch.cuda.max_memory_allocated`` and
        ``torch.cuda.max_memory_reserved``. Reset them with ``torch.cuda.reset_peak_memory_stats``.
    """
    return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))
