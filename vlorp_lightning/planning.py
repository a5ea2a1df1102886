"""Training-memory plans from a model config alone: ``vlorp-lightning plan``.

The model is built from a transformers config JSON on the ``meta`` device, so no weights are
downloaded or allocated, and a 7B model is planned in seconds on a CPU. Each method gets the
bytes of its weights, of the gradients that persist between backward and the optimizer step,
and of its optimizer state. Activations, CUDA workspaces, allocator fragmentation and the
transient buffers of one update are not part of the plan.

Usage::

    vlorp-lightning plan --model-config configs/models/llama2-7b.json --granularity 256 --rank 1
    python -m vlorp_lightning.planning --model-config configs/models/smollm2-135m.json --format markdown

No Lightning import.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from vlorp_lightning.memory import estimate_state_bytes
from vlorp_lightning.projection import GranularityLike, VLoRPProjector, parse_granularity, valid_granularities
from vlorp_lightning.targets import select_targets

__all__ = ["METHODS", "PlanRow", "build_meta_model", "format_plan", "load_model_config", "main", "plan"]

#: Methods that :func:`plan` supports, in the order of the output table.
METHODS = (
    "adamw", "adafactor", "galore", "galore-layerwise", "lora", "apollo",
    "projfactor", "projfactor-inbackward", "floor",
)  # fmt: skip
FORMATS = ("text", "markdown", "csv", "json")

ConfigSource = Union[str, os.PathLike, Dict[str, Any], PretrainedConfig]

ACTIVATIONS_NOTE = (
    "Activations are not included: the totals cover weights, gradients kept between backward "
    "and step, and optimizer state, predicted from shapes alone."
)


@dataclass(frozen=True)
class PlanRow:
    """Predicted memory of one fine-tuning method, in bytes.

    Attributes:
        method: an entry of :data:`METHODS`.
        weights_bytes: model weights, plus LoRA adapters for ``"lora"``.
        gradients_bytes: gradients that exist between backward and the optimizer step, or for
            in-backward updates the largest single gradient.
        state_bytes: optimizer state. Per-tensor scalar ``step`` counters (4 bytes per
            parameter tensor) are left out, as :meth:`~vlorp_lightning.ProjFactor.state_bytes` does.
        ratio_to_adamw: ``total_bytes`` over the AdamW row's total for the same model.
        settings: the rank or granularity the row used, in words.
    """

    method: str
    weights_bytes: int
    gradients_bytes: int
    state_bytes: int
    ratio_to_adamw: float
    settings: str = ""

    @property
    def total_bytes(self) -> int:
        """Weights plus gradients plus optimizer state (activations excluded)."""
        return self.weights_bytes + self.gradients_bytes + self.state_bytes


def load_model_config(source: ConfigSource) -> Any:
    """Read a transformers model config from a JSON file or a dict.

    Args:
        source: a path to a config JSON (as ``config.json`` of a Hugging Face model), a dict of
            the same keys, or a ``PretrainedConfig``. The key ``model_type`` (for example
            ``"llama"``) is required.

    Returns:
        A ``transformers.PretrainedConfig`` of the model type.

    Raises:
        FileNotFoundError: if the path does not exist.
        ValueError: on invalid JSON, a missing or unknown ``model_type``.
    """
    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"model config file not found: {str(path)!r}; pass a transformers config JSON "
                "such as configs/models/llama2-7b.json"
            )
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"model config {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(source, dict):
        raise ValueError(f"model config must be a path, a dict or a PretrainedConfig, got {type(source).__name__}")
    values = dict(source)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ValueError("model config has no 'model_type' key; add the transformers model type, such as \"llama\"")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError:
        raise ValueError(
            f"unknown model_type {model_type!r} in the model config; use a transformers model type such as \"llama\""
        ) from None


def build_meta_model(config: Any) -> nn.Module:
    """Build a causal LM from a config on the ``meta`` device (shapes only, no memory, no download).

    Raises:
        ValueError: if transformers has no causal-LM class for the config.
    """
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan(
    model_config: Union[ConfigSource, nn.Module],
    methods: Sequence[str] = METHODS,
    granularity: GranularityLike = 256,
    rank: int = 1,
    galore_rank: Optional[int] = None,
    apollo_rank: Optional[int] = None,
    lora_rank: Optional[int] = None,
    weight_bytes: int = 2,
    gradient_bytes: Optional[int] = None,
    state_bytes: int = 4,
) -> List[PlanRow]:
    """Predict weights, gradient and optimizer-state bytes of fine-tuning methods.

    Full fine-tuning methods train every parameter. The low-rank methods project the weights
    that :func:`~vlorp_lightning.select_targets` picks by default (attention and MLP linear
    layers) and train the other parameters with AdamW. For a projected ``(n, m)`` matrix:

    * ``adamw``: state ``2*n*m``, full gradients.
    * ``adafactor``: state ``n + m`` per matrix and ``numel`` per vector (``torch.optim.Adafactor``
      with ``beta1=None``: factored second moment, no first moment), full gradients.
    * ``galore``: GaLore projects the smaller side, so the stored projector has ``r*min(n, m)``
      elements and the Adam moments ``2*r*max(n, m)``; ``r`` is capped at ``min(n, m)``.
      Full gradients.
    * ``galore-layerwise``: GaLore's state; gradients are consumed in backward, so only the
      largest single gradient exists at a time.
    * ``lora``: frozen base; adapters ``A (r, m)`` and ``B (n, r)`` on the same matrices add
      ``r*(n + m)`` weights and gradients and ``2*r*(n + m)`` state.
    * ``apollo``: an estimate of APOLLO: Adam moments of the rank-``r`` random projection,
      ``2*r*max(n, m)`` (``r`` capped at ``min(n, m)``), and no stored projection because it is
      regenerated from a seed. Full gradients.
    * ``projfactor``: :func:`~vlorp_lightning.estimate_state_bytes` (moment, factored second
      moment and projected-gradient accumulator); only dense parameters keep full gradients.
    * ``projfactor-inbackward``: the same state; only the largest single gradient at a time.
      With gradient accumulation the dense gradients persist through the window, as for ``projfactor``.
    * ``floor``: SGD updated in backward: weights plus the largest single gradient, no state.

    Args:
        model_config: a transformers config JSON path, a dict with ``model_type``, a config, or an
            already built model (on ``meta`` or any device).
        methods: entries of :data:`METHODS`; default all of them.
        granularity: VLoRP granularity ``c`` of ``projfactor``, an integer or ``"1/k"``; default 256.
        rank: VLoRP rank ``r``; default 1. The budget per row is ``M = c*r``.
        galore_rank: GaLore rank; default ``max(1, ceil(M))``, the same numbers per row at ``c = 1``.
        apollo_rank: APOLLO rank; default the GaLore rank.
        lora_rank: LoRA rank; default the rank whose adapter count ``r * sum(n + m)`` is closest to
            the elements of ProjFactor's state for the projected matrices.
        weight_bytes: bytes per weight element; default 2 (bfloat16).
        gradient_bytes: bytes per gradient element; default ``weight_bytes``.
        state_bytes: bytes per optimizer-state element, for every method; default 4 (float32, as
            ProjFactor keeps for bfloat16 weights). ``torch.optim.AdamW`` keeps moments in the
            parameter dtype, so pass 2 to plan it for bfloat16 weights.

    Returns:
        One :class:`PlanRow` per method, in the order of ``methods``.

    Raises:
        FileNotFoundError: if the config file does not exist.
        ValueError: on an unknown method, a granularity or rank that does not fit a projected
            matrix, a rank or byte size below 1, or an invalid config.
    """
    model = model_config if isinstance(model_config, nn.Module) else build_meta_model(load_model_config(model_config))
    methods = _check_methods(methods)
    gradient_bytes = weight_bytes if gradient_bytes is None else gradient_bytes
    for name, value in (("weight_bytes", weight_bytes), ("gradient_bytes", gradient_bytes), ("state_bytes", state_bytes)):
        _check_positive_int(name, value)
    for name, value in (("rank", rank), ("galore_rank", galore_rank), ("apollo_rank", apollo_rank), ("lora_rank", lora_rank)):
        if value is not None or name == "rank":
            _check_positive_int(name, value)

    c = parse_granularity(granularity)
    targets = select_targets(model)
    lora_auto = lora_rank is None
    needs_vlorp = bool({"projfactor", "projfactor-inbackward"} & set(methods)) or ("lora" in methods and lora_auto)
    if needs_vlorp:
        _check_projection(targets, c, rank)
    params = _unique_trainable(model)
    target_ids = {id(target.param) for target in targets}
    shapes = [tuple(target.param.shape) for target in targets]
    numel = sum(p.numel() for p in params)
    dense_numel = sum(p.numel() for p in params if id(p) not in target_ids)
    largest = max((p.numel() for p in params), default=0)
    budget = c * rank
    galore_rank = galore_rank or max(1, math.ceil(budget))
    apollo_rank = apollo_rank or galore_rank

    estimate = estimate_state_bytes(model, granularity=c, rank=rank, bytes_per_element=state_bytes) if needs_vlorp else None
    vlorp_state = estimate.total_bytes if estimate is not None else 0
    if lora_auto:
        side_sum = sum(n + m for n, m in shapes)
        projected = estimate.projected_bytes // state_bytes if estimate is not None else 0
        lora_rank = max(1, round(projected / side_sum)) if side_sum else 1
    adapters = lora_rank * sum(n + m for n, m in shapes)

    weights = numel * weight_bytes
    full_grads = numel * gradient_bytes
    one_grad = largest * gradient_bytes
    dense_adamw = 2 * dense_numel * state_bytes
    galore_state = dense_adamw + state_bytes * sum(_galore_elements(shape, galore_rank) for shape in shapes)
    apollo_state = dense_adamw + state_bytes * sum(2 * min(apollo_rank, *shape) * max(shape) for shape in shapes)
    adafactor_matrices = sum(sum(p.shape[-2:]) for p in params if p.dim() >= 2)
    adafactor_state = state_bytes * (adafactor_matrices + sum(p.numel() for p in params if p.dim() < 2))
    vlorp = f"c={_format_fraction(c)}, r={rank}, M={_format_fraction(budget)}"

    rows: Dict[str, tuple] = {
        "adamw": (weights, full_grads, 2 * numel * state_bytes, "full AdamW"),
        "adafactor": (weights, full_grads, adafactor_state, "factored second moment, no first moment"),
        "galore": (weights, full_grads, galore_state, f"r={galore_rank}"),
        "galore-layerwise": (weights, one_grad, galore_state, f"r={galore_rank}, one gradient at a time"),
        "lora": (
            weights + adapters * weight_bytes,
            adapters * gradient_bytes,
            2 * adapters * state_bytes,
            f"r={lora_rank}" + (" (adapters sized to ProjFactor state)" if lora_auto else ""),
        ),
        "apollo": (weights, full_grads, apollo_state, f"r={apollo_rank}, estimate"),
        "projfactor": (weights, dense_numel * gradient_bytes, vlorp_state, vlorp),
        "projfactor-inbackward": (weights, one_grad, vlorp_state, f"{vlorp}, update in backward"),
        "floor": (weights, one_grad, 0, "SGD in backward, no state"),
    }
    adamw_total = sum(rows["adamw"][:3])
    result = []
    for method in methods:
        weights_b, grads_b, state_b, settings = rows[method]
        total = weights_b + grads_b + state_b
        ratio = total / adamw_total if adamw_total else 0.0
        result.append(PlanRow(method, int(weights_b), int(grads_b), int(state_b), ratio, settings))
    return result


def format_plan(rows: Sequence[PlanRow], fmt: str = "text", header: Sequence[str] = ()) -> str:
    """Render plan rows as an aligned text table, a Markdown table, CSV or JSON.

    Args:
        rows: the output of :func:`plan`.
        fmt: ``"text"`` (GiB with 2 decimals, default), ``"markdown"``, ``"csv"`` (bytes) or
            ``"json"`` (bytes and GiB).
        header: lines printed above a text or Markdown table and stored under ``"header"`` in JSON.

    Returns:
        The rendered text, ending with a newline.

    Raises:
        ValueError: on an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    columns = ["method", "weights GiB", "gradients GiB", "state GiB", "total GiB", "ratio to AdamW", "settings"]
    cells = [
        [
            row.method,
            *(f"{value / 2**30:.2f}" for value in (row.weights_bytes, row.gradients_bytes, row.state_bytes, row.total_bytes)),
            f"{row.ratio_to_adamw:.3f}",
            row.settings,
        ]
        for row in rows
    ]
    if fmt == "json":
        records = [
            {**asdict(row), "total_bytes": row.total_bytes, "total_gib": row.total_bytes / 2**30} for row in rows
        ]
        return json.dumps({"header": list(header), "note": ACTIVATIONS_NOTE, "rows": records}, indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["method", "weights_bytes", "gradients_bytes", "state_bytes", "total_bytes", "ratio_to_adamw", "settings"])
        for row in rows:
            writer.writerow(
                [row.method, row.weights_bytes, row.gradients_bytes, row.state_bytes, row.total_bytes, f"{row.ratio_to_adamw:.6f}", row.settings]
            )
        return buffer.getvalue()
    if fmt == "markdown":
        lines = [*header, ""] if header else []
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("| --- |" + " ---: |" * 5 + " --- |")
        lines.extend("| " + " | ".join(line) + " |" for line in cells)
        return "\n".join([*lines, "", ACTIVATIONS_NOTE]) + "\n"
    widths = [max(len(columns[i]), *(len(line[i]) for line in cells)) for i in range(len(columns))]
    aligned = [columns, *cells]
    table = [
        "  ".join(text.ljust(widths[i]) if i in (0, 6) else text.rjust(widths[i]) for i, text in enumerate(line)).rstrip()
        for line in aligned
    ]
    return "\n".join([*header, *table, ACTIVATIONS_NOTE]) + "\n"


def main(argv: Optional[List[str]] = None, prog: str = "vlorp-lightning plan") -> int:
    """Run ``vlorp-lightning plan``: print a memory plan for a model config.

    Args:
        argv: command-line arguments without the program name; default ``sys.argv[1:]``.
        prog: program name shown in usage and error messages.

    Returns:
        0 on success, 2 when the config, a method or a setting is invalid (the error is written
        to stderr). Invalid option syntax exits with status 2 through argparse.
    """
    parser = _build_parser(prog)
    args = parser.parse_args(argv)
    options = ("granularity", "rank", "galore_rank", "apollo_rank", "lora_rank", "weight_bytes", "gradient_bytes", "state_bytes")
    try:
        model = build_meta_model(load_model_config(args.model_config))
        rows = plan(model, args.methods, **{option: getattr(args, option) for option in options})
    except (FileNotFoundError, ValueError) as error:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{prog}: error: {error}\n")
        return 2
    gradient_bytes = args.weight_bytes if args.gradient_bytes is None else args.gradient_bytes
    header = [
        f"Memory plan for {type(model).__name__} from {args.model_config}: "
        f"{sum(p.numel() for p in _unique_trainable(model)):,} parameters, {len(select_targets(model))} projected matrices.",
        f"Bytes per element: weights {args.weight_bytes}, gradients {gradient_bytes}, optimizer state {args.state_bytes}.",
    ]
    sys.stdout.write(format_plan(rows, args.format, header))
    return 0


def _build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Predict the training memory (weights, gradients, optimizer state; activations excluded) "
        "of fine-tuning methods from a transformers config JSON, built on the meta device without weights.",
    )
    parser.add_argument("--model-config", required=True, help="transformers config JSON, such as configs/models/llama2-7b.json")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"methods to plan; default all: {' '.join(METHODS)}")
    parser.add_argument("--granularity", default="256", help="VLoRP granularity c, an integer or 1/k; default 256")
    parser.add_argument("--rank", type=int, default=1, help="VLoRP rank r; default 1")
    parser.add_argument("--galore-rank", type=int, default=None, help="GaLore rank; default max(1, ceil(c*r))")
    parser.add_argument("--apollo-rank", type=int, default=None, help="APOLLO rank; default the GaLore rank")
    parser.add_argument("--lora-rank", type=int, default=None, help="LoRA rank; default sized to ProjFactor's projected state")
    parser.add_argument("--weight-bytes", type=int, default=2, help="bytes per weight element; default 2 (bfloat16)")
    parser.add_argument("--gradient-bytes", type=int, default=None, help="bytes per gradient element; default --weight-bytes")
    parser.add_argument("--state-bytes", type=int, default=4, help="bytes per optimizer-state element; default 4 (float32)")
    parser.add_argument("--format", choices=FORMATS, default="text", help="output format; default text (GiB)")
    return parser


def _check_methods(methods: Sequence[str]) -> List[str]:
    if isinstance(methods, str):
        methods = [methods]
    methods = list(methods)
    if not methods:
        raise ValueError(f"no method given; choose from {', '.join(METHODS)}")
    for method in methods:
        if method not in METHODS:
            near = difflib.get_close_matches(str(method), METHODS, n=2)
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            raise ValueError(f"unknown method {method!r}{hint}; choose from {', '.join(METHODS)}")
    return methods


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_projection(targets: Sequence[Any], c: Fraction, rank: int) -> None:
    """Raise one ValueError naming the parameter when ``(c, rank)`` does not fit a projected shape."""
    checked = set()
    for target in targets:
        shape = tuple(target.param.shape)
        if shape in checked:
            continue
        checked.add(shape)
        try:
            VLoRPProjector(shape, c, rank)
        except ValueError as error:
            shapes = {tuple(t.param.shape) for t in targets}
            common = set.intersection(
                *(set(valid_granularities(s, "right")) | set(valid_granularities(s, "left")) for s in shapes)
            )
            choices = ", ".join(sorted(common, key=lambda text: float(parse_granularity(text))))
            raise ValueError(
                f"{error}. Parameter {target.name!r} is projected; granularities that divide every projected "
                f"matrix of this model: {choices}"
            ) from None


def _galore_elements(shape: tuple, rank: int) -> int:
    effective = min(rank, *shape)
    return effective * min(shape) + 2 * effective * max(shape)


def _unique_trainable(model: nn.Module) -> List[nn.Parameter]:
    seen, params = set(), []
    for param in model.parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            params.append(param)
    return params


def _format_fraction(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


if __name__ == "__main__":
    sys.exit(main())
