"""Various-grained low-rank projection of a 2-D gradient (VLoRP).

A gradient ``G`` of shape ``(n, m)`` is reshaped so that one *projection unit* is a
slice of ``m / c`` entries (``c`` is the granularity), and every unit is multiplied by
the same matrix ``P`` of shape ``(m / c, r)``. With ``c > 1`` each row of ``G`` is split
into ``c`` units, and with ``c = 1/k`` one unit spans ``k`` consecutive rows. The state
kept per row of ``G`` is ``M = c * r`` numbers, the memory budget of the method.

Source: Wang et al., "Memory-Efficient LLM Training by Various-Grained Low-Rank
Projection of Gradients", ICML 2025, arXiv:2505.01744.

This module has no Lightning import.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "Distribution",
    "GranularityLike",
    "Orientation",
    "VLoRPProjector",
    "derive_seed",
    "parse_granularity",
    "valid_granularities",
]

Distribution = Literal["normal", "rademacher", "orthonormal", "svd"]
Orientation = Literal["auto", "right", "left"]
GranularityLike = Union[int, float, str, Fraction]

DISTRIBUTIONS: Tuple[str, ...] = ("normal", "rademacher", "orthonormal", "svd")
ORIENTATIONS: Tuple[str, ...] = ("auto", "right", "left")

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed with the SplitMix64 finalizer.

    The result depends only on the values and their order, never on the process, the
    device or the Python hash seed, so every rank of a distributed run and every resumed
    run derive the same seed. ``derive_seed(base, index)`` names a parameter and
    ``derive_seed(parameter_seed, refresh)`` one of its projection matrices.

    Args:
        *parts: non-negative or negative Python integers; each is reduced modulo 2**64.

    Returns:
        An integer in ``[0, 2**63)``, accepted by ``torch.Generator.manual_seed``.

    Example:
        >>> derive_seed(0, 1) == derive_seed(0, 1)
        True
        >>> derive_seed(0, 1) != derive_seed(1, 0)
        True
    """
    state = 0x243F6A8885A308D3
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK64))
    return state >> 1


def parse_granularity(value: GranularityLike) -> Fraction:
    """Convert a granularity setting to an exact fraction.

    Args:
        value: a positive integer ``c`` (``c`` projection units per row), or a unit fraction
            ``1/k`` (one unit spans ``k`` rows) written as ``0.25``, ``"1/4"`` or
            ``Fraction(1, 4)``.

    Returns:
        The granularity as a :class:`fractions.Fraction` whose numerator or denominator is 1.

    Raises:
        ValueError: if the value is not a positive integer or a unit fraction.
    """
    if isinstance(value, bool):
        raise ValueError(f"granularity must be a positive integer or a unit fraction 1/k, got {value!r}")
    try:
        if isinstance(value, str):
            parsed = Fraction(value.strip())
        elif isinstance(value, float):
            parsed = Fraction(value).limit_denominator(1 << 20)
        else:
            parsed = Fraction(value)
    except (ValueError, TypeError, ZeroDivisionError):
        raise ValueError(
            f"granularity must be a positive integer or a unit fraction 1/k such as 4, 0.25 or '1/16', got {value!r}"
        ) from None
    if parsed <= 0 or (parsed.numerator != 1 and parsed.denominator != 1):
        raise ValueError(
            f"granularity must be a positive integer or a unit fraction 1/k such as 4, 0.25 or '1/16', got {value!r}"
        )
    return parsed


def _format_granularity(c: Fraction) -> str:
    return str(c.numerator) if c.denominator == 1 else f"1/{c.denominator}"


def valid_granularities(shape: Sequence[int], orientation: Literal["right", "left"] = "right") -> list[str]:
    """List the granularities that divide a matrix shape, from coarsest to finest.

    Args:
        shape: ``(n, m)``, the parameter's shape.
        orientation: ``"right"`` projects the column axis of length ``m`` (units of
            ``m / c`` entries), ``"left"`` the row axis of length ``n``.

    Returns:
        Strings such as ``["1/4", "1/2", "1", "2", ...]``: every ``1/k`` where ``k`` divides the
        other axis and every integer ``c`` that divides the projected axis.
    """
    n, m = int(shape[0]), int(shape[1])
    projected, other = (m, n) if orientation == "right" else (n, m)
    coarse = [f"1/{k}" for k in range(other, 1, -1) if other % k == 0]
    fine = [str(c) for c in range(1, projected + 1) if projected % c == 0]
    return coarse + fine


class VLoRPProjector:
    r"""Random (or SVD) low-rank projection of one 2-D gradient at a given granularity.

    With the *right* orientation, ``G`` of shape ``(n, m)`` is reshaped to
    ``(n*c, m/c)`` and multiplied by ``P`` of shape ``(m/c, r)``:

    .. math::
        S = \mathrm{reshape}(G, (nc, m/c))\,P \in \mathbb{R}^{nc \times r}, \qquad
        \hat G = \alpha\,\mathrm{reshape}(S P^\top, (n, m)).

    With the *left* orientation the row axis is compressed instead: ``G`` is reshaped
    to ``(n/c, m*c)``, ``P`` has shape ``(n/c, r)`` and ``S = P^T reshape(G)`` has shape
    ``(r, m*c)``. ``"auto"`` picks the orientation whose ``S`` has fewer elements
    (``n*c*r`` against ``m*c*r``), preferring right on a tie.

    The random distributions are scaled so that :math:`E[P P^\top] = I`, which makes
    ``project_back(project(G)) / scale`` an unbiased estimate of ``G``:

    * ``"normal"``: i.i.d. entries from :math:`N(0, 1/r)`.
    * ``"rademacher"``: i.i.d. entries :math:`\pm 1/\sqrt{r}`.
    * ``"orthonormal"``: orthonormal columns (QR of a Gaussian matrix) times :math:`\sqrt{d/r}`,
      where ``d`` is the length of a projection unit. With ``r = d`` this reproduces ``G``.
    * ``"svd"``: the top ``r`` singular vectors of the reshaped gradient passed to
      :meth:`refresh`, a data-dependent basis (GaLore's choice at ``c = 1``). It is biased,
      it is stored, and :meth:`stored_bytes` counts it.

    Random matrices are regenerated from ``derive_seed(seed, refresh_count)`` on the CPU
    and then moved to the gradient's device, so they match across devices and processes.
    Only the matrix for the current refresh is cached (``d * r`` elements); it is never
    part of a checkpoint.

    Args:
        shape: ``(n, m)``, the shape of the parameter and of its gradient.
        granularity: ``c``, a positive integer dividing the projected axis or a unit
            fraction ``1/k`` (``0.25``, ``"1/4"``) with ``k`` dividing the other axis.
            Default in :class:`~vlorp_lightning.ProjFactor` groups: 1.
        rank: ``r``, columns of ``P``; ``1 <= r <= d`` where ``d`` is the unit length
            (``m/c`` right, ``n/c`` left). ``r = d`` compresses nothing and serves as an
            exact reference with ``"orthonormal"`` or ``"svd"``.
        distribution: one of ``"normal"``, ``"rademacher"``, ``"orthonormal"``, ``"svd"``.
            Default ``"normal"``.
        orientation: ``"auto"`` (default), ``"right"`` or ``"left"``.
        seed: seed of this parameter's sequence of matrices. Default 0.
        scale: factor :math:`\alpha` applied by :meth:`project_back`. Default 1.0.

    Memory: the projected state ``S`` has ``n*c*r`` (right) or ``m*c*r`` (left) elements;
    the cached random matrix ``d*r``; an SVD basis ``d*r`` more, which is stored.

    Raises:
        ValueError: on a shape that is not 2-D, a granularity that does not divide the
            shape, a rank below 1 or above ``d``, or an unknown distribution or orientation.
    """

    def __init__(
        self,
        shape: Sequence[int],
        granularity: GranularityLike = 1,
        rank: int = 1,
        distribution: Distribution = "normal",
        orientation: Orientation = "auto",
        seed: int = 0,
        scale: float = 1.0,
    ) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(
                f"VLoRPProjector needs a 2-D shape (n, m), got shape {shape}; "
                "reshape the parameter to 2-D or leave it in a dense group"
            )
        if min(shape) < 1:
            raise ValueError(f"VLoRPProjector needs a non-empty shape, got {shape}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
        if orientation not in ORIENTATIONS:
            raise ValueError(f"unknown orientation {orientation!r}; choose one of {', '.join(ORIENTATIONS)}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r} for shape {shape}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        c = parse_granularity(granularity)

        self.shape: Tuple[int, int] = shape
        self.granularity: Fraction = c
        self.rank: int = rank
        self.distribution: str = distribution
        self.orientation: str = self._resolve_orientation(shape, c, rank, orientation)
        self.seed: int = int(seed)
        self.scale: float = float(scale)
        self.refresh_count: int = 0

        n, m = shape
        if self.orientation == "right":
            self.unit_length = int(m / c)
            self.state_shape: Tuple[int, int] = (int(n * c), rank)
            self._reshaped = (int(n * c), self.unit_length)
        else:
            self.unit_length = int(n / c)
            self.state_shape = (rank, int(m * c))
            self._reshaped = (self.unit_length, int(m * c))

        self._basis: Optional[torch.Tensor] = None  # SVD basis, stored
        self._cache_key: Optional[tuple] = None
        self._cache: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _divides(shape: Tuple[int, int], c: Fraction, side: str) -> bool:
        n, m = shape
        projected, other = (m, n) if side == "right" else (n, m)
        if c.denominator == 1:
            return projected % c.numerator == 0
        return other % c.denominator == 0

    @classmethod
    def _resolve_orientation(cls, shape: Tuple[int, int], c: Fraction, rank: int, orientation: str) -> str:
        n, m = shape
        candidates = ["right", "left"] if orientation == "auto" else [orientation]
        fitting = [side for side in candidates if cls._divides(shape, c, side)]
        if not fitting:
            sides = " or ".join(candidates)
            choices = "; ".join(f"{side}: {', '.join(valid_granularities(shape, side))}" for side in candidates)  # type: ignore[arg-type]
            raise ValueError(
                f"granularity {_format_granularity(c)} does not divide shape {shape} with orientation {sides}. "
                f"An integer c must divide the projected axis, and 1/k needs k to divide the other axis. "
                f"Valid granularities ({choices})"
            )
        if len(fitting) == 2:
            # Right stores n*c*r elements, left m*c*r: keep the smaller.
            fitting = ["right"] if n <= m else ["left"]
        side = fitting[0]
        unit = int((m if side == "right" else n) / c)
        if rank > unit:
            raise ValueError(
                f"rank {rank} exceeds the projection unit length {unit} for shape {shape} at granularity "
                f"{_format_granularity(c)} ({side} orientation), so nothing would be compressed; "
                f"use a rank between 1 and {unit}, or a coarser granularity"
            )
        return side

    # ------------------------------------------------------------------ matrices
    @property
    def stores_basis(self) -> bool:
        """Whether the basis is data-dependent and kept in memory (``"svd"``)."""
        return self.distribution == "svd"

    def matrix(self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Return ``P`` for the current refresh, shape ``(d, r)`` with ``d`` the unit length.

        Args:
            device: where to put the matrix; default CPU.
            dtype: its dtype; default float32.

        Raises:
            RuntimeError: for ``"svd"`` before the first :meth:`refresh` with a gradient.
        """
        device = torch.device("cpu") if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        if self.stores_basis:
            if self._basis is None:
                raise RuntimeError(
                    "the SVD basis is not computed yet; call refresh(grad) with a gradient of shape "
                    f"{self.shape} first"
                )
            return self._basis.to(device=device, dtype=dtype)
        key = (self.refresh_count, device, dtype)
        if self._cache_key != key:
            self._cache = self._generate().to(device=device, dtype=dtype)
            self._cache_key = key
        assert self._cache is not None
        return self._cache

    def _generate(self) -> torch.Tensor:
        d, r = self.unit_length, self.rank
        generator = torch.Generator(device="cpu")
        generator.manual_seed(derive_seed(self.seed, self.refresh_count))
        if self.distribution == "normal":
            return torch.randn(d, r, generator=generator) / math.sqrt(r)
        if self.distribution == "rademacher":
            signs = torch.randint(0, 2, (d, r), generator=generator).to(torch.float32)
            return (signs * 2.0 - 1.0) / math.sqrt(r)
        # orthonormal: QR of a Gaussian matrix, signs fixed so Q is Haar-distributed.
        gaussian = torch.randn(d, r, generator=generator, dtype=torch.float64)
        q, upper = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(upper)).where(torch.diagonal(upper) != 0, torch.ones(r, dtype=torch.float64))
        return (q * math.sqrt(d / r)).to(torch.float32)

    def refresh(self, grad: Optional[torch.Tensor] = None) -> None:
        """Move to the next matrix of the sequence.

        For the random distributions this only advances :attr:`refresh_count`. For
        ``"svd"`` it also recomputes the basis from ``grad`` (shape ``(n, m)``), which is then
        required.
        """
        if self.stores_basis:
            if grad is None:
                raise ValueError("the 'svd' distribution needs the gradient to refresh its basis; pass grad")
            self.set_basis_from(grad)
        self.refresh_count += 1
        self._cache_key = None
        self._cache = None

    def set_basis_from(self, grad: torch.Tensor) -> None:
        """Compute the SVD basis from a gradient of shape ``(n, m)`` without advancing the count.

        A gradient with NaN or Inf has no SVD: the current basis is kept, or, when there is
        none yet, an orthonormal basis drawn from the seed (without the ``sqrt(d/r)`` factor)
        stands in.
        """
        self._check_shape(grad, self.shape, "gradient")
        if not torch.isfinite(grad).all():
            if self._basis is None:
                generator = torch.Generator(device="cpu")
                generator.manual_seed(derive_seed(self.seed, self.refresh_count))
                gaussian = torch.randn(self.unit_length, self.rank, generator=generator, dtype=torch.float64)
                self._basis = torch.linalg.qr(gaussian)[0].to(torch.float32).contiguous()
            return
        unfolded = grad.detach().reshape(self._reshaped).to(torch.float32)
        # A rank above the smaller side of the reshaped gradient needs the full factors: the
        # extra singular vectors (singular value 0) complete the basis to r columns.
        full = self.rank > min(unfolded.shape)
        u, _, vh = torch.linalg.svd(unfolded, full_matrices=full)
        if self.orientation == "right":
            basis = vh[: self.rank].T
        else:
            basis = u[:, : self.rank]
        self._basis = basis.contiguous()

    @property
    def basis(self) -> Optional[torch.Tensor]:
        """The stored SVD basis, shape ``(d, r)``, or ``None`` for random distributions."""
        return self._basis

    def load_basis(self, basis: Optional[torch.Tensor]) -> None:
        """Restore a stored SVD basis (from a checkpoint)."""
        if basis is not None:
            self._check_shape(basis, (self.unit_length, self.rank), "SVD basis")
        self._basis = basis

    # ------------------------------------------------------------------ projection
    @staticmethod
    def _check_shape(tensor: torch.Tensor, expected: Sequence[int], what: str) -> None:
        if tensor.dim() != 2:
            raise ValueError(f"the {what} must be a 2-D tensor, got {tensor.dim()}-D shape {tuple(tensor.shape)}")
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(f"the {what} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """Project a gradient of shape ``(n, m)`` to the subspace.

        Returns:
            ``S`` of :attr:`state_shape`: ``(n*c, r)`` right, ``(r, m*c)`` left, in ``grad``'s dtype.
        """
        self._check_shape(grad, self.shape, "gradient")
        if self.stores_basis and self._basis is None:
            self.set_basis_from(grad)
        p = self.matrix(grad.device, grad.dtype)
        unfolded = grad.reshape(self._reshaped)
        if self.orientation == "right":
            return unfolded @ p
        return p.T @ unfolded

    def project_back(self, projected: torch.Tensor) -> torch.Tensor:
        """Map a subspace tensor of :attr:`state_shape` back to ``(n, m)``, times :attr:`scale`."""
        self._check_shape(projected, self.state_shape, "projected tensor")
        return self.project_back_unscaled(projected).mul_(self.scale)

    def project_back_unscaled(self, projected: torch.Tensor) -> torch.Tensor:
        """Like :meth:`project_back` without the ``scale`` factor."""
        p = self.matrix(projected.device, projected.dtype)
        if self.orientation == "right":
            full = projected @ p.T
        else:
            full = p @ projected
        return full.reshape(self.shape)

    # ------------------------------------------------------------------ accounting
    def state_numel(self) -> int:
        """Elements of one projected tensor: ``n*c*r`` (right) or ``m*c*r`` (left)."""
        return self.state_shape[0] * self.state_shape[1]

    def stored_bytes(self) -> int:
        """Bytes of a stored basis (``"svd"`` only, float32); 0 for regenerated random matrices."""
        return self.unit_length * self.rank * 4 if self.stores_basis else 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, granularity={_format_granularity(self.granularity)}, "
            f"rank={self.rank}, distribution={self.distribution!r}, orientation={self.orientation!r}, "
            f"seed={self.seed}, scale={self.scale})"
        )
