"""Selection of the weight matrices that VLoRP projects.

No Lightning import: the selection serves plain PyTorch loops and the Lightning mixin.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

__all__ = ["TargetSpec", "Target", "select_targets"]

#: ``"default"`` (attention and MLP linear layers), ``"all-linear"``, a list of module names
#: or name suffixes, or ``"re:<regex>"`` (a regular expression matched against full module names).
TargetSpec = Union[str, Sequence[str]]


@dataclass(frozen=True)
class Target:
    """One projected weight matrix.

    Attributes:
        name: the parameter's name in ``model.named_parameters()`` (for example
            ``"model.layers.0.self_attn.q_proj.weight"``).
        module_name: the owning module's name.
        param: the weight, shape ``(out_features, in_features)`` for ``nn.Linear``.
        transposed: ``True`` for Hugging Face ``Conv1D`` (GPT-2), whose weight is stored as
            ``(in_features, out_features)``.
    """

    name: str
    module_name: str
    param: Tensor
    transposed: bool


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D is a linear layer with a transposed weight; checked by name so that
    # this module does not import transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _matches(module_name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], module_name) is not None
    return module_name == pattern or module_name.endswith("." + pattern)


def _getter_weight(module: nn.Module, getter: str) -> Optional[Tensor]:
    function = getattr(module, getter, None)
    if not callable(function):
        return None
    try:
        found = function()
    except (NotImplementedError, AttributeError, TypeError):
        return None
    return getattr(found, "weight", None) if found is not None else None


def _embedding_ids(model: nn.Module) -> Tuple[set, set]:
    """Ids of input-embedding weights and of output-head weights anywhere in ``model``.

    Hugging Face models expose both through ``get_input_embeddings`` and
    ``get_output_embeddings``; any ``nn.Embedding`` also counts as an input embedding.
    """
    inputs, heads = set(), set()
    for module in model.modules():
        weight = _getter_weight(module, "get_input_embeddings")
        if weight is not None:
            inputs.add(id(weight))
        weight = _getter_weight(module, "get_output_embeddings")
        if weight is not None:
            heads.add(id(weight))
        if isinstance(module, nn.Embedding):
            inputs.add(id(module.weight))
    return inputs, heads


def _near_matches(pattern: str, names: List[str]) -> List[str]:
    candidates = sorted({part for name in names for part in (name, name.rsplit(".", 1)[-1])})
    return difflib.get_close_matches(pattern.removeprefix("re:"), candidates, n=5, cutoff=0.5)


def select_targets(
    model: nn.Module,
    targets: TargetSpec = "default",
    exclude: Optional[Sequence[str]] = None,
) -> List[Target]:
    """Choose the 2-D weights to project, in ``named_parameters`` order.

    Args:
        model: the model; parameters with ``requires_grad=False`` are never selected.
        targets: ``"default"`` selects every ``nn.Linear`` and Hugging Face ``Conv1D`` weight
            except embeddings and the output head (the attention and MLP projections of a
            transformer); ``"all-linear"`` also selects an untied output head; a list selects
            linear modules whose name equals an entry or ends with ``"." + entry``
            (``["q_proj", "v_proj"]``); an entry ``"re:<regex>"`` must match the full module name.
        exclude: entries in the same syntax; matching modules are never selected.

    Returns:
        One :class:`Target` per selected weight. A weight shared by several modules (tied
        weights) appears once, and a weight tied to an input embedding is never selected.

    Raises:
        ValueError: when a listed target or exclude entry matches no module (the message
            lists near matches), or when ``targets`` is an empty list.
    """
    if isinstance(targets, str) and targets not in ("default", "all-linear"):
        targets = [targets]
    if not isinstance(targets, str) and len(targets) == 0:
        raise ValueError("targets is an empty list; use 'default', 'all-linear' or a list of module names")
    exclude = list(exclude or [])

    module_names = [name for name, _ in model.named_modules() if name]
    for entry in exclude + ([] if isinstance(targets, str) else list(targets)):
        if not any(_matches(name, entry) for name in module_names):
            near = _near_matches(entry, module_names)
            hint = f"; near matches: {', '.join(near)}" if near else "; print(model) shows the module names"
            raise ValueError(f"target pattern {entry!r} matches no module of {type(model).__name__}{hint}")

    input_embedding_ids, head_ids = _embedding_ids(model)
    embeddings = input_embedding_ids | head_ids

    param_names = {id(p): n for n, p in model.named_parameters()}
    selected: List[Target] = []
    seen: set = set()
    for module_name, module in model.named_modules():
        if not module_name or not _is_linear(module):
            continue
        weight = module.weight
        if id(weight) in seen or not weight.requires_grad or weight.dim() != 2:
            continue
        if any(_matches(module_name, entry) for entry in exclude):
            continue
        if targets == "default":
            chosen = id(weight) not in embeddings
        elif targets == "all-linear":
            chosen = id(weight) not in input_embedding_ids
        else:
            chosen = any(_matches(module_name, entry) for entry in targets) and id(weight) not in input_embedding_ids
        if chosen:
            seen.add(id(weight))
            selected.append(Target(param_names[id(weight)], module_name, weight, _is_conv1d(module)))
    order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    selected.sort(key=lambda target: order[id(target.param)])
    return selected
