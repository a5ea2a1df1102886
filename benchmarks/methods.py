"""The fine-tuning methods the benchmarks compare, each behind one training-step interface.

Every method trains the same model on the same batches. Deferred methods run forward,
backward and ``optimizer.step()``; in-backward methods update each weight inside its
gradient hook, so only one full gradient exists at a time. Budgets are matched to
ProjFactor's ``(c, r)``:

* GaLore and APOLLO get the rank whose state over the projected matrices is closest to
  ProjFactor's (``galore_rank_for_equal_state``); GaLore's scale is its default 0.25.
* LoRA gets the rank whose adapter count is closest to ProjFactor's projected state.

GaLore and APOLLO come from the ``galore-torch`` and ``apollo-torch`` packages, and LoRA from
``peft``. A method whose package is missing raises ``MethodUnavailable`` with the pip command.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from vlorp_lightning import ProjFactor, estimate_state_bytes, select_targets, vlorp_param_groups

METHODS = (
    "adamw", "adafactor", "galore", "galore-layerwise", "apollo", "lora",
    "projfactor", "projfactor-inbackward", "sgd-inbackward",
)  # fmt: skip

# bitsandbytes, imported by galore-torch and apollo-torch, looks up CPU kernels on the Hugging
# Face hub unless the hub is offline; the benchmarks never download anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class MethodUnavailable(RuntimeError):
    """A method's third-party package is not installed."""


@dataclass
class Settings:
    """Hyperparameters shared by every method; ranks of the peers derive from ``granularity * rank``."""

    lr: float = 1e-4
    granularity: int = 16
    rank: int = 2
    update_proj_gap: int = 30
    seed: int = 0


@dataclass
class Method:
    """A built method: the trainable model, how to run one optimizer step, and what to measure.

    Attributes:
        name: an entry of :data:`METHODS`.
        model: the model to call (a ``peft`` wrapper for LoRA).
        optimizers: every optimizer whose state is counted.
        in_backward: whether updates happen inside backward.
        settings: the rank or granularity used, in words.
    """

    name: str
    model: nn.Module
    optimizers: List[torch.optim.Optimizer]
    in_backward: bool
    settings: str
    before_backward: Callable[[], None] = lambda: None
    hooks: List[Any] = field(default_factory=list)

    def train_step(self, batch: Dict[str, Tensor], meter: Optional["GradientMeter"] = None) -> Tuple[float, float, float]:
        """Run forward, backward and the update on one batch; return (loss, fwd+bwd s, step s).

        For in-backward methods the update time is part of the backward time and the step
        time is the bookkeeping after backward only. ``meter`` samples the gradients alive
        at the end of backward.
        """
        started = time.perf_counter()
        loss = self.model(**batch).loss
        self.before_backward()
        loss.backward()
        backward_done = time.perf_counter()
        if meter is not None:
            meter.sample()
        stepping = self.optimizers if not self.in_backward or self.name == "projfactor-inbackward" else []
        for optimizer in stepping:
            optimizer.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        finished = time.perf_counter()
        return float(loss.detach()), backward_done - started, finished - backward_done

    def accumulate_step(self, window: Sequence[Dict[str, Tensor]]) -> float:
        """Run one optimizer step over several micro-batches (each loss divided by their count).

        In-backward methods mark the last micro-batch so that updates happen in its backward.
        Returns the mean loss of the window.

        Raises:
            ValueError: for methods that update inside every backward (galore-layerwise,
                sgd-inbackward), which cannot accumulate.
        """
        if self.in_backward and self.name != "projfactor-inbackward":
            raise ValueError(f"{self.name} updates inside every backward and cannot accumulate micro-batches; use one per step")
        total = 0.0
        for index, batch in enumerate(window):
            loss = self.model(**batch).loss / len(window)
            last = index == len(window) - 1
            for optimizer in self.optimizers:
                if hasattr(optimizer, "mark_accumulation_boundary"):
                    optimizer.mark_accumulation_boundary(last)
            loss.backward()
            total += float(loss.detach())
        stepping = self.optimizers if not self.in_backward or self.name == "projfactor-inbackward" else []
        for optimizer in stepping:
            optimizer.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        return total


def galore_rank_for_equal_state(model: nn.Module, settings: Settings) -> int:
    """GaLore rank whose state over the projected matrices is closest to ProjFactor's.

    GaLore stores ``r * min(n, m)`` projector elements and ``2 * r * max(n, m)`` moment
    elements per matrix, so the rank is the ratio of ProjFactor's projected-state elements
    to ``sum(min + 2 * max)``, rounded and at least 1.
    """
    shapes = [tuple(target.param.shape) for target in select_targets(model)]
    estimate = estimate_state_bytes(model, granularity=settings.granularity, rank=settings.rank, bytes_per_element=1)
    per_rank = sum(min(shape) + 2 * max(shape) for shape in shapes)
    return max(1, round(estimate.projected_bytes / per_rank))


def lora_rank_for_equal_state(model: nn.Module, settings: Settings) -> int:
    """LoRA rank whose adapter count ``r * sum(n + m)`` is closest to ProjFactor's projected state."""
    shapes = [tuple(target.param.shape) for target in select_targets(model)]
    estimate = estimate_state_bytes(model, granularity=settings.granularity, rank=settings.rank, bytes_per_element=1)
    return max(1, round(estimate.projected_bytes / sum(n + m for n, m in shapes)))


def build_method(name: str, model: nn.Module, settings: Settings) -> Method:
    """Set up ``name`` on ``model`` (LoRA wraps it and freezes the base weights).

    Raises:
        ValueError: on an unknown method name.
        MethodUnavailable: if the method's package is missing.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    builder = _BUILDERS[name]
    return builder(model, settings)


def state_bytes(optimizers: Sequence[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor the optimizers keep between steps, projection matrices included.

    Walks each optimizer's ``state`` recursively, into dicts, lists and the attributes of
    helper objects such as GaLore's projector, and counts each storage once. ``step``
    counters are included (a few bytes per tensor).
    """
    seen: set = set()
    total = 0

    def visit(value: Any, depth: int) -> None:
        nonlocal total
        if isinstance(value, Tensor):
            key = (value.untyped_storage().data_ptr(), value.device.type)
            if value.numel() and key not in seen:
                seen.add(key)
                total += value.untyped_storage().nbytes()
            return
        if depth > 3:
            return
        if isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth + 1)
        elif hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)):
            for item in vars(value).values():
                visit(item, depth + 1)

    for optimizer in optimizers:
        for param_state in optimizer.state.values():
            visit(param_state, 0)
    return total


class GradientMeter:
    """Peak bytes of ``.grad`` tensors alive at once during backward.

    Registers a post-accumulate-grad hook on every trainable parameter. Created before the
    method's own hooks, each call receives the new gradient before an in-backward update or
    a projection frees it. Call :meth:`reset` before a step and read :attr:`peak` after it.
    """

    def __init__(self, model: nn.Module) -> None:
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.peak = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._record) for p in self._params]

    def _record(self, param: Tensor) -> None:
        self.sample()

    def sample(self) -> None:
        """Add the gradients alive now to the peak."""
        live = sum(p.grad.nbytes for p in self._params if p.grad is not None)
        self.peak = max(self.peak, live)

    def reset(self) -> None:
        self.peak = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---------------------------------------------------------------------------- builders
def _dense_and_projected(model: nn.Module) -> Tuple[List[Tensor], List[Tensor]]:
    projected_ids = {id(target.param) for target in select_targets(model)}
    dense, projected, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (projected if id(param) in projected_ids else dense).append(param)
    return dense, projected


def _adamw(model: nn.Module, settings: Settings) -> Method:
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0, foreach=True)
    return Method("adamw", model, [optimizer], False, "torch.optim.AdamW, foreach")


def _adafactor(model: nn.Module, settings: Settings) -> Method:
    optimizer = torch.optim.Adafactor(model.parameters(), lr=settings.lr, weight_decay=0.0)
    return Method("adafactor", model, [optimizer], False, "torch.optim.Adafactor, no first moment")


def _galore_groups(model: nn.Module, settings: Settings, extra: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], int]:
    dense, projected = _dense_and_projected(model)
    rank = galore_rank_for_equal_state(model, settings)
    group = {"params": projected, "rank": rank, "update_proj_gap": settings.update_proj_gap, **extra}
    return [{"params": dense}, group], rank


def _import(module: str, package: str) -> Any:
    try:
        return __import__(module)
    except ImportError as error:
        raise MethodUnavailable(f"{module} is missing ({error}); install it with: pip install {package}") from None


def _galore(model: nn.Module, settings: Settings) -> Method:
    galore_torch = _import("galore_torch", "galore-torch bitsandbytes")
    groups, rank = _galore_groups(model, settings, {"scale": 0.25, "proj_type": "std"})
    optimizer = galore_torch.GaLoreAdamW(groups, lr=settings.lr, weight_decay=0.0)
    return Method("galore", model, [optimizer], False, f"GaLoreAdamW r={rank}, scale 0.25, SVD every {settings.update_proj_gap} steps")


def _galore_layerwise(model: nn.Module, settings: Settings) -> Method:
    galore_torch = _import("galore_torch", "galore-torch bitsandbytes")
    dense, projected = _dense_and_projected(model)
    rank = galore_rank_for_equal_state(model, settings)
    projected_ids = {id(p) for p in projected}
    optimizers: Dict[Tensor, torch.optim.Optimizer] = {}
    for param in dense + projected:
        group: Dict[str, Any] = {"params": [param]}
        if id(param) in projected_ids:
            group.update(rank=rank, update_proj_gap=settings.update_proj_gap, scale=0.25, proj_type="std")
        optimizers[param] = galore_torch.GaLoreAdamW([group], lr=settings.lr, weight_decay=0.0)

    def update(param: Tensor) -> None:
        optimizers[param].step()
        optimizers[param].zero_grad(set_to_none=True)

    hooks = [param.register_post_accumulate_grad_hook(update) for param in optimizers]
    return Method(
        "galore-layerwise", model, list(optimizers.values()), True, f"GaLoreAdamW r={rank} per parameter, in backward", hooks=hooks
    )


def _apollo(model: nn.Module, settings: Settings) -> Method:
    apollo_torch = _import("apollo_torch", "apollo-torch bitsandbytes")
    extra = {"proj": "random", "scale_type": "channel", "scale": 1.0, "proj_type": "std"}
    groups, rank = _galore_groups(model, settings, extra)
    optimizer = apollo_torch.APOLLOAdamW(groups, lr=settings.lr, weight_decay=0.0)
    return Method("apollo", model, [optimizer], False, f"APOLLOAdamW r={rank}, channel scaling, random projection")


def _lora(model: nn.Module, settings: Settings) -> Method:
    peft = _import("peft", "peft")
    rank = lora_rank_for_equal_state(model, settings)
    modules = sorted({target.name.rsplit(".", 2)[-2] for target in select_targets(model)})
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=modules, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0, foreach=True)
    return Method("lora", wrapped, [optimizer], False, f"peft LoRA r={rank} on {', '.join(modules)}, base frozen")


def _projfactor(model: nn.Module, settings: Settings, in_backward: bool = False) -> Method:
    groups = vlorp_param_groups(
        model, granularity=settings.granularity, rank=settings.rank, update_proj_gap=settings.update_proj_gap
    )
    optimizer = ProjFactor(groups, lr=settings.lr, seed=settings.seed, update_in_backward=in_backward)
    budget = f"c={settings.granularity}, r={settings.rank}"
    if not in_backward:
        return Method("projfactor", model, [optimizer], False, f"{budget}, compressed accumulation")
    return Method(
        "projfactor-inbackward",
        model,
        [optimizer],
        True,
        f"{budget}, updates in backward",
        before_backward=lambda: optimizer.mark_accumulation_boundary(True),
    )


def _sgd_inbackward(model: nn.Module, settings: Settings) -> Method:
    def update(param: Tensor) -> None:
        with torch.no_grad():
            param.add_(param.grad, alpha=-settings.lr)
        param.grad = None

    hooks = [p.register_post_accumulate_grad_hook(update) for p in model.parameters() if p.requires_grad]
    return Method("sgd-inbackward", model, [], True, "plain SGD inside backward, no state (the floor)", hooks=hooks)


_BUILDERS: Dict[str, Callable[[nn.Module, Settings], Method]] = {
    "adamw": _adamw,
    "adafactor": _adafactor,
    "galore": _galore,
    "galore-layerwise": _galore_layerwise,
    "apollo": _apollo,
    "lora": _lora,
    "projfactor": _projfactor,
    "projfactor-inbackward": lambda model, settings: _projfactor(model, settings, in_backward=True),
    "sgd-inbackward": _sgd_inbackward,
}
