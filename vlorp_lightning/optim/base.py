"""Shared machinery of the projected optimizers: projectors, compressed accumulation,
in-backward updates, clipping, non-finite skipping, loss-scaling and checkpoint state.

The update rules live in the subclasses (:mod:`.projfactor`, :mod:`.schemes`); this
module decides *which* tensor each rule receives and *when*. No Lightning import.
"""

from __future__ import annotations

import logging
import math
import warnings
from fractions import Fraction
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

from vlorp_lightning.projection import DISTRIBUTIONS, ORIENTATIONS, VLoRPProjector, derive_seed

log = logging.getLogger(__name__)

#: ``observer(name, grad, projector)``: see :meth:`ProjectedOptimizer.add_grad_observer`.
GradObserver = Callable[[str, Tensor, VLoRPProjector], None]

#: Group keys that configure the projection of a group's parameters.
PROJECTION_KEYS: Tuple[str, ...] = ("granularity", "rank", "update_proj_gap", "scale", "distribution", "orientation")

_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "param": None}

# Scalar counters that stay on the CPU so that reading them never syncs a device.
_CPU_KEYS = ("step", "refresh", "accumulated")


def _check_hyperparameters(lr: float, betas: Tuple[float, float], eps: float, weight_decay: float) -> None:
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"invalid learning rate lr={lr!r}; use a finite value >= 0, such as 1e-3")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"invalid beta{index + 1}={beta!r}; each beta must lie in [0, 1), such as (0.9, 0.999)")
    if not eps >= 0.0:
        raise ValueError(f"invalid eps={eps!r}; use a value >= 0, such as 1e-6")
    if not weight_decay >= 0.0:
        raise ValueError(f"invalid weight_decay={weight_decay!r}; use a value >= 0, such as 0.0 or 0.01")


def _check_projection_group(group: Dict[str, Any]) -> None:
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"invalid update_proj_gap={gap!r}; use an integer >= 1 (optimizer steps between refreshes)")
    if group["distribution"] not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {group['distribution']!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    if group["orientation"] not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {group['orientation']!r}; choose one of {', '.join(ORIENTATIONS)}")


class ProjectedOptimizer(Optimizer):
    """Base class of optimizers that update some parameters from projected gradients.

    A parameter group is *projected* when its ``rank`` is not ``None``. Each of its
    parameters must be 2-D and gets a :class:`~vlorp_lightning.VLoRPProjector`. The seed of
    that projector is ``derive_seed(seed, index)``, where ``index`` is the parameter's
    position over all groups.
    Other groups are *dense* and follow the subclass's dense rule (AdamW for ProjFactor).

    Subclasses implement :meth:`_init_projected_state`, :meth:`_projected_update`,
    :meth:`_transfer_momentum` and optionally :meth:`_dense_update`.

    Args:
        params: parameters or parameter groups (dicts). Group keys :data:`PROJECTION_KEYS`
            and ``names`` (a list of parameter names, used in messages and
            :meth:`state_bytes`) are read per group.
        defaults: default group options.
        seed: base seed of every projection; default 0.
        compress_gradients: project each gradient into a per-parameter accumulator of the
            projected shape right after backward and free ``p.grad`` (default ``True``). Saves
            the full gradient (``n*m`` elements) of every projected parameter between backward
            and step, at the cost of one accumulator (``n*c*r`` elements) each.
        update_in_backward: update each parameter inside its gradient hook once the caller
            has marked the last micro-batch of the window with :meth:`mark_accumulation_boundary`,
            so at most one full-size gradient exists at a time (default ``False``). Global
            clipping and loss scaling are unavailable in this mode.
        momentum_transfer: on refresh, map the subspace first moment into the new subspace
            (``m <- project_new(back_old(m))``, one transient ``n*m`` tensor) instead of keeping
            its stale coordinates (default ``False``).
        state_dtype: dtype of moments and accumulators: ``"float32"`` (default, also for
            bf16 or fp16 parameters), ``"bfloat16"``, or ``"param"`` (the parameter's dtype).
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: Dict[str, Any],
        *,
        seed: int = 0,
        compress_gradients: bool = True,
        update_in_backward: bool = False,
        momentum_transfer: bool = False,
        state_dtype: str = "float32",
    ) -> None:
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(f"invalid state_dtype={state_dtype!r}; choose one of {', '.join(_STATE_DTYPES)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        super().__init__(params, defaults)
        self.seed = seed
        self.compress_gradients = bool(compress_gradients)
        self.update_in_backward = bool(update_in_backward)
        self.momentum_transfer = bool(momentum_transfer)
        self.state_dtype = state_dtype

        self._projectors: Dict[Tensor, VLoRPProjector] = {}
        self._names: Dict[Tensor, str] = {}
        self._build_projectors()

        # Optimizer-level counters, saved under the "vlorp" key of state_dict().
        self.global_step = 0
        self.skipped_steps = 0
        self.last_grad_norm = float("nan")
        self._at_boundary = False
        self._nonfinite_in_window = False
        self._norm_from_clip = False
        self._in_backward_sq_norm = 0.0
        self._updated_in_backward: set = set()
        self._warned_nonfinite = False
        self._hooks: List[Any] = []
        self._grad_observers: List[GradObserver] = []
        if self.compress_gradients or self.update_in_backward:
            self.attach_hooks()

    # ------------------------------------------------------------------ construction
    def _build_projectors(self) -> None:
        index = 0
        for group_index, group in enumerate(self.param_groups):
            names = group.get("names")
            if names is not None and len(names) != len(group["params"]):
                raise ValueError(
                    f"param group {group_index} has {len(group['params'])} params but {len(names)} names; "
                    "give one name per parameter or drop 'names'"
                )
            _check_hyperparameters(
                group["lr"], tuple(group.get("betas", (0.0, 0.0))), group.get("eps", 0.0), group["weight_decay"]
            )
            projected = group.get("rank") is not None
            if projected:
                _check_projection_group(group)
            for position, param in enumerate(group["params"]):
                name = names[position] if names is not None else f"group{group_index}.param{position}"
                self._names[param] = name
                if projected:
                    if param.dim() != 2:
                        raise ValueError(
                            f"parameter {name!r} of shape {tuple(param.shape)} is in a projected group but is not "
                            "2-D; put it in a dense group (rank=None)"
                        )
                    try:
                        self._projectors[param] = VLoRPProjector(
                            tuple(param.shape),
                            group["granularity"],
                            group["rank"],
                            distribution=group["distribution"],
                            orientation=group["orientation"],
                            seed=derive_seed(self.seed, index),
                            scale=group["scale"],
                        )
                    except ValueError as error:
                        raise ValueError(f"parameter {name!r}: {error}") from None
                index += 1

    def projector_for(self, param: Tensor) -> VLoRPProjector:
        """Return the projector of a projected parameter.

        Raises:
            KeyError: if ``param`` is dense or not managed by this optimizer.
        """
        try:
            return self._projectors[param]
        except KeyError:
            raise KeyError(
                f"parameter {self._names.get(param, tuple(param.shape))!r} is not projected by this optimizer"
            ) from None

    def is_projected(self, param: Tensor) -> bool:
        """Return whether ``param`` is updated from projected gradients."""
        return param in self._projectors

    def param_name(self, param: Tensor) -> str:
        """Return the name of ``param`` from its group's ``names`` (or a positional name)."""
        return self._names[param]

    def named_projected_parameters(self) -> List[Tuple[str, Tensor]]:
        """``(name, parameter)`` pairs of every projected parameter, in group order."""
        return [(self._names[p], p) for group in self.param_groups for p in group["params"] if p in self._projectors]

    def _state_dtype_for(self, param: Tensor) -> torch.dtype:
        dtype = _STATE_DTYPES[self.state_dtype]
        return param.dtype if dtype is None else dtype

    # ------------------------------------------------------------------ hooks
    def attach_hooks(self) -> None:
        """Register the post-accumulate-grad hooks (idempotent)."""
        if self._hooks:
            return
        for group in self.param_groups:
            for param in group["params"]:
                if not param.requires_grad:
                    continue
                if param in self._projectors or self.update_in_backward:
                    self._hooks.append(param.register_post_accumulate_grad_hook(self._make_hook(group)))

    def detach_hooks(self) -> None:
        """Remove the hooks; gradients then stay in ``p.grad`` until :meth:`step`."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _make_hook(self, group: Dict[str, Any]) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            self._on_grad_ready(param, group)

        return hook

    def add_grad_observer(self, observer: "GradObserver") -> Callable[[], None]:
        """Call ``observer(name, grad, projector)`` with each projected parameter's full micro-batch
        gradient inside the hook, before it is projected and freed.

        Diagnostics (such as the projection-error callback) use this to see true gradients
        that compressed accumulation never keeps. The observer runs under ``torch.no_grad``
        and must not modify ``grad``. Returns a function that removes the observer.
        """
        self._grad_observers.append(observer)

        def remove() -> None:
            if observer in self._grad_observers:
                self._grad_observers.remove(observer)

        return remove

    @torch.no_grad()
    def _on_grad_ready(self, param: Tensor, group: Dict[str, Any]) -> None:
        if param.grad is None:
            return
        projected = param in self._projectors
        if projected and self._grad_observers:
            if self.compress_gradients:
                self._prepare_window(param, param.grad)
            for observer in list(self._grad_observers):
                observer(self._names[param], param.grad, self._projectors[param])
        if projected and self.compress_gradients:
            self._accumulate(param, param.grad)
            param.grad = None
        if self.update_in_backward and self._at_boundary:
            grad = self._subspace_grad(param) if projected else param.grad
            if grad is not None:
                self._in_backward_sq_norm += float(torch.linalg.vector_norm(grad, dtype=torch.float32)) ** 2
            self._update_param(param, group, check_finite=True)
            self._updated_in_backward.add(param)
            param.grad = None

    def _accumulate(self, param: Tensor, grad: Tensor) -> None:
        state = self.state[param]
        self._prepare_window(param, grad)
        accumulator = state.get("accumulator")
        if accumulator is None:
            accumulator = torch.zeros(self._projectors[param].state_shape, dtype=self._state_dtype_for(param), device=param.device)
            state["accumulator"] = accumulator
        accumulator.add_(self._projectors[param].project(grad.to(accumulator.dtype)))
        state["accumulated"] = torch.ones((), dtype=torch.int64)

    def _prepare_window(self, param: Tensor, grad: Optional[Tensor]) -> None:
        """Bring the parameter's projector to the refresh that the current step needs.

        The projection stays fixed inside an accumulation window: it changes only here,
        before the first gradient of a window is projected.
        """
        projector = self._projectors[param]
        target = self.global_step // self._group_of_cached(param)["update_proj_gap"]
        state = self.state[param]
        first_basis = projector.stores_basis and projector.basis is None
        if projector.refresh_count == target and not first_basis:
            return
        if state.get("accumulated") is not None and int(state["accumulated"]) and not first_basis:
            if torch.isfinite(state["accumulator"]).all():
                raise AssertionError("projection refresh inside an accumulation window")
            return  # a window poisoned by NaN/Inf before its SVD refresh; step() skips it
        if projector.stores_basis:
            if grad is None:
                raise AssertionError("an SVD refresh needs a gradient")
            if not torch.isfinite(grad).all():
                # This window will be skipped, so the refresh waits for the next finite
                # gradient. A first basis is still needed to project, so a random one is used until then.
                if first_basis:
                    projector.set_basis_from(grad)
                return
        momentum = self._momentum_to_transfer(param) if projector.refresh_count != target else None
        if projector.stores_basis:
            projector.set_basis_from(grad)
        projector.refresh_count = target
        projector._cache_key = None
        if momentum is not None:
            self._transfer_momentum(param, momentum)
        state["refresh"] = torch.tensor(target, dtype=torch.int64)
        if projector.stores_basis:
            state["basis"] = projector.basis

    def _group_of_cached(self, param: Tensor) -> Dict[str, Any]:
        cache = getattr(self, "_group_cache", None)
        if cache is None:
            cache = {p: g for g in self.param_groups for p in g["params"]}
            self._group_cache = cache
        return cache[param]

    def _momentum_to_transfer(self, param: Tensor) -> Optional[Tensor]:
        """Back-project the subspace momentum with the old basis, before a refresh."""
        if not self.momentum_transfer:
            return None
        momentum = self.state[param].get("exp_avg")
        if momentum is None or momentum.shape != self._projectors[param].state_shape:
            return None
        return self._projectors[param].project_back_unscaled(momentum.float())

    def _transfer_momentum(self, param: Tensor, full_momentum: Tensor) -> None:
        state = self.state[param]
        state["exp_avg"].copy_(self._projectors[param].project(full_momentum))

    # ------------------------------------------------------------------ boundary API
    def mark_accumulation_boundary(self, is_last: bool = True) -> None:
        """Tell the optimizer whether the coming backward is the last of its window.

        Only used with ``update_in_backward=True``: before the backward of the last
        micro-batch call ``mark_accumulation_boundary(True)``, so every parameter is updated
        inside its hook; :meth:`step` then advances the counters and updates whatever the
        hooks did not reach. Before the other backwards call it with ``False``.
        """
        self._at_boundary = bool(is_last)

    # ------------------------------------------------------------------ gradients
    def _subspace_grad(self, param: Tensor) -> Optional[Tensor]:
        """Return the projected gradient of a projected parameter for this step, or ``None``."""
        state = self.state[param]
        if self.compress_gradients:
            if state.get("accumulated") is None or not int(state["accumulated"]):
                return None
            return state["accumulator"]
        if param.grad is None:
            return None
        self._prepare_window(param, param.grad)
        grad = param.grad.to(self._state_dtype_for(param))
        return self._projectors[param].project(grad)

    def _step_gradients(self) -> List[Tuple[Tensor, Dict[str, Any], Tensor]]:
        """``(param, group, gradient)`` for every parameter that has a gradient this step."""
        items = []
        for group in self.param_groups:
            for param in group["params"]:
                if param in self._updated_in_backward:
                    continue
                if param in self._projectors:
                    grad = self._subspace_grad(param)
                else:
                    grad = param.grad
                if grad is not None:
                    items.append((param, group, grad))
        return items

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """Global L2 norm over dense gradients and projected accumulators (float32 scalar).

        Because :math:`E[P P^\\top] = I`, the squared norm of a random projection is an
        unbiased estimate of the squared norm of the true gradient.
        """
        grads = [grad for _, _, grad in self._step_gradients()]
        if not grads:
            return torch.zeros(())
        device = grads[0].device
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in grads])
        return torch.linalg.vector_norm(norms)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Scale dense gradients and projected accumulators so their global norm is at most ``max_norm``.

        Args:
            max_norm: the largest allowed global L2 norm; must be > 0.
            norm_type: only 2.0 is supported.

        Returns:
            The global norm before clipping (float32 scalar); also stored as
            :attr:`last_grad_norm`.
        """
        if norm_type != 2.0:
            raise ValueError(f"only the L2 norm (norm_type=2.0) is supported, got norm_type={norm_type!r}")
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        if self.update_in_backward:
            raise RuntimeError(
                "global gradient clipping is unavailable with update_in_backward=True because each parameter "
                "is updated before the other gradients exist; disable clipping or use update_in_backward=False"
            )
        # Without compressed accumulation the projection of p.grad is a temporary tensor, so
        # p.grad itself is scaled (the projection is linear).
        grads = [
            param.grad if param in self._projectors and not self.compress_gradients else grad
            for param, _, grad in self._step_gradients()
        ]
        total = self.grad_norm()
        self.last_grad_norm = float(total)
        self._norm_from_clip = True
        coefficient = max_norm / (float(total) + 1e-6)
        if coefficient < 1.0 and math.isfinite(coefficient):
            for grad in grads:
                grad.mul_(coefficient)
        return total

    @torch.no_grad()
    def all_reduce_gradients_(self, process_group: Any = None) -> None:
        """Average dense gradients and projected accumulators over the ranks of a process group.

        Every rank regenerates the same projection matrices, and projection is linear, so the
        mean of the ranks' accumulators equals the projection of the mean gradient: the
        reduction sends ``n*c*r`` numbers per projected matrix instead of ``n*m``. Call it once
        per optimizer step, before clipping and :meth:`step`, with DDP's own gradient
        reduction disabled. Does nothing outside ``torch.distributed``.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        world_size = dist.get_world_size(process_group)
        if world_size == 1:
            return
        grads = [grad for _, _, grad in self._step_gradients()]
        for (device, dtype), members in _bucket(grads).items():
            flat = torch.cat([g.reshape(-1) for g in members])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
            flat.div_(world_size)
            offset = 0
            for grad in members:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    @torch.no_grad()
    def unscale_accumulators_(self, grad_scaler: "torch.amp.GradScaler") -> None:
        """Unscale projected accumulators for fp16 loss scaling and report overflow to the scaler.

        ``GradScaler.unscale_`` sees only ``p.grad``; with compressed accumulation the
        projected gradients live in accumulators instead. Call this after
        ``grad_scaler.unscale_(optimizer)`` and before ``grad_scaler.step(optimizer)``: it
        divides every accumulator by the current scale and adds its Inf/NaN flag to the
        scaler's per-device record, so ``step`` is skipped and ``update`` lowers the scale
        as for a dense overflow.
        """
        if self.update_in_backward:
            raise RuntimeError("fp16 loss scaling is not supported with update_in_backward=True; use bf16 instead")
        if not grad_scaler.is_enabled():
            return
        # NOTE: reads GradScaler's per-optimizer record, a private structure that has been
        # stable from torch 1.6 to 2.13; checked by the fp16 tests.
        record = grad_scaler._per_optimizer_states[id(self)]
        # The stage, not found_inf_per_device, tells whether unscale_ ran: that record stays
        # empty after unscale_ when no parameter has a p.grad (all projected and compressed).
        if record["stage"] is not OptState.UNSCALED:
            grad_scaler.unscale_(self)
        # Dense gradients were unscaled above; after an all-reduce they may hold another
        # rank's overflow, so they are checked again for a decision shared by every rank.
        dense = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        scale = grad_scaler.get_scale()
        accumulators = [
            self.state[p]["accumulator"]
            for p in self._projectors
            if self.state[p].get("accumulated") is not None and int(self.state[p]["accumulated"])
        ]
        for accumulator in accumulators:
            device = accumulator.device
            found = torch.zeros((), dtype=torch.float32, device=device)
            inv_scale = torch.full((), 1.0 / scale, dtype=torch.float32, device=device)
            if accumulator.dtype == torch.float32:
                torch._amp_foreach_non_finite_check_and_unscale_([accumulator], found, inv_scale)
            else:
                found += (~torch.isfinite(accumulator)).any().float()
                accumulator.mul_(inv_scale)
            per_device = record["found_inf_per_device"]
            per_device[device] = per_device[device] + found if device in per_device else found
        for grad in dense:
            device = grad.device
            found = (~torch.isfinite(grad)).any().float()
            per_device = record["found_inf_per_device"]
            per_device[device] = per_device[device] + found if device in per_device else found
        if sum(float(v) for v in record["found_inf_per_device"].values()) > 0:
            # GradScaler.step will not call step(): count the skip here.
            self.skipped_steps += 1

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Apply one update from the accumulated gradients.

        Skips the update (no parameter or state changes) when any gradient is NaN or Inf,
        and counts the skip in :attr:`skipped_steps`.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = self._step_gradients()
        in_backward = bool(self._updated_in_backward)
        if in_backward:
            self.last_grad_norm = math.sqrt(self._in_backward_sq_norm)
            self._in_backward_sq_norm = 0.0
        if items:
            norm = self.grad_norm()
            if not in_backward and not self._norm_from_clip:
                self.last_grad_norm = float(norm)
            self._norm_from_clip = False
            if not torch.isfinite(norm):
                self._skip_step(items)
                return loss
        for param, group, _ in items:
            self._update_param(param, group)
        if self._nonfinite_in_window:
            self.skipped_steps += 1
            self._nonfinite_in_window = False
        if items or in_backward:
            self.global_step += 1
        self._updated_in_backward.clear()
        self._at_boundary = False
        return loss

    def _skip_step(self, items: List[Tuple[Tensor, Dict[str, Any], Tensor]]) -> None:
        self.skipped_steps += 1
        if not self._warned_nonfinite:
            bad = next((self._names[p] for p, _, g in items if not torch.isfinite(g).all()), "unknown")
            warnings.warn(
                f"skipped an optimizer step because the gradient of {bad!r} contains NaN or Inf; "
                "later skips are only counted (see skipped_steps)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_nonfinite = True
        self._clear_accumulators()
        self._updated_in_backward.clear()
        self._at_boundary = False

    def _update_param(self, param: Tensor, group: Dict[str, Any], check_finite: bool = False) -> None:
        state = self.state[param]
        if param in self._projectors:
            grad = self._subspace_grad(param)
            if grad is None:
                return
            if check_finite and not torch.isfinite(grad).all():
                self._note_nonfinite_in_backward(param)
                return
            if "step" not in state or "exp_avg" not in state:
                self._init_projected_state(param, state)
            state["step"] += 1
            self._projected_update(param, grad, state, group, self._projectors[param])
            if self.compress_gradients:
                state["accumulator"].zero_()
                state["accumulated"].zero_()
        else:
            grad = param.grad
            if grad is None:
                return
            if check_finite and not torch.isfinite(grad).all():
                self._note_nonfinite_in_backward(param)
                return
            if "step" not in state:
                self._init_dense_state(param, state)
            state["step"] += 1
            self._dense_update(param, grad, state, group)

    def _note_nonfinite_in_backward(self, param: Tensor) -> None:
        # In-backward updates cannot be undone for parameters already updated, so only this
        # parameter is skipped; step() counts the window once in skipped_steps.
        self._nonfinite_in_window = True
        if not self._warned_nonfinite:
            warnings.warn(
                f"skipped the in-backward update of {self._names[param]!r} because its gradient contains NaN or Inf",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned_nonfinite = True
        if param in self._projectors and self.compress_gradients:
            self.state[param]["accumulator"].zero_()
            self.state[param]["accumulated"].zero_()

    def _clear_accumulators(self) -> None:
        for param in self._projectors:
            state = self.state[param]
            if state.get("accumulated") is not None:
                state["accumulator"].zero_()
                state["accumulated"].zero_()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` of every parameter and zero the projected accumulators."""
        super().zero_grad(set_to_none=set_to_none)
        self._clear_accumulators()

    # ------------------------------------------------------------------ subclass API
    def _init_projected_state(self, param: Tensor, state: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _projected_update(
        self, param: Tensor, grad: Tensor, state: Dict[str, Any], group: Dict[str, Any], projector: VLoRPProjector
    ) -> None:
        raise NotImplementedError

    def _init_dense_state(self, param: Tensor, state: Dict[str, Any]) -> None:
        dtype = self._state_dtype_for(param)
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)

    def _dense_update(self, param: Tensor, grad: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        """AdamW with decoupled weight decay (torch.optim.AdamW's formula, one tensor)."""
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        step = float(state["step"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad = grad.to(exp_avg.dtype)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        update = (exp_avg / denom).mul_(lr / bias_correction1)
        if weight_decay:
            param.mul_(1 - lr * weight_decay)
        param.sub_(update.to(param.dtype))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Return torch's optimizer state plus a ``"vlorp"`` entry of plain counters.

        Every value is a tensor or a Python number, so the result loads with
        ``torch.load(..., weights_only=True)``.
        """
        result = super().state_dict()
        for group in result["param_groups"]:
            # A Fraction granularity would make weights_only loading fail; "1/4" parses back.
            if isinstance(group.get("granularity"), Fraction):
                group["granularity"] = str(group["granularity"])
        result["vlorp"] = {
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "last_grad_norm": self.last_grad_norm,
            "seed": self.seed,
        }
        return result

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, restore projector refreshes and re-attach hooks.

        Unlike ``torch.optim.Optimizer``, state tensors keep their saved dtype (float32
        moments of a bf16 parameter stay float32) and only move to the parameter's device;
        counters stay on the CPU.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("vlorp", None)
        if extra is not None and extra.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"the checkpoint was saved with seed={extra['seed']} but this optimizer uses seed={self.seed}; "
                "construct the optimizer with the checkpoint's seed to regenerate the same projections"
            )
        saved_state = state_dict.get("state", {})
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, param in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            self.state[param] = {
                key: value.to(param.device) if torch.is_tensor(value) and key not in _CPU_KEYS else value
                for key, value in saved_state[pid].items()
            }
        if extra is not None:
            self.global_step = int(extra["global_step"])
            self.skipped_steps = int(extra["skipped_steps"])
            self.last_grad_norm = float(extra["last_grad_norm"])
        for param, projector in self._projectors.items():
            state = self.state[param]
            if "refresh" in state:
                projector.refresh_count = int(state["refresh"])
                projector._cache_key = None
            if "basis" in state:
                projector.load_basis(state["basis"].to(torch.float32))
        self._group_cache = None
        self.detach_hooks()
        if self.compress_gradients or self.update_in_backward:
            self.attach_hooks()

    # ------------------------------------------------------------------ memory
    def state_bytes(self) -> Dict[str, Dict[str, int]]:
        """Bytes of optimizer state per parameter name, plus a ``"total"`` entry.

        Each entry maps ``"momentum"``, ``"second_moment"``, ``"accumulator"``,
        ``"projection"`` (a stored SVD basis) and ``"total"`` to bytes of tensors that
        currently exist. Call it after the first step for the steady-state figure.
        """
        result: Dict[str, Dict[str, int]] = {}
        totals = {key: 0 for key in ("momentum", "second_moment", "accumulator", "projection", "total")}
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param, {})
                entry = {
                    "momentum": _nbytes(state.get("exp_avg")),
                    "second_moment": _nbytes(state.get("exp_avg_sq"))
                    + _nbytes(state.get("exp_avg_row"))
                    + _nbytes(state.get("exp_avg_col")),
                    "accumulator": _nbytes(state.get("accumulator")),
                    "projection": self._projectors[param].stored_bytes() if param in self._projectors else 0,
                }
                if param in self._projectors and self._projectors[param].basis is None:
                    entry["projection"] = 0
                entry["total"] = sum(entry.values())
                result[self._names[param]] = entry
                for key, value in entry.items():
                    totals[key] += value
        result["total"] = totals
        return result


def _bucket(tensors: List[Tensor]) -> Dict[Tuple[torch.device, torch.dtype], List[Tensor]]:
    buckets: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return buckets


def _nbytes(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()
