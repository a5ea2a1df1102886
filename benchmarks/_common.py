"""Shared pieces of the benchmark scripts: the machine, the model, timing statistics, tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine() -> Dict[str, Any]:
    """Describe this machine and the library versions, for the header of a results page."""
    import lightning
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe_machine(info: Dict[str, Any]) -> str:
    """Return one line naming the CPU or GPU, cores, memory and library versions."""
    device = info.get("gpu") or info["cpu"]
    memory = f", {info['memory_gib']} GiB" if "memory_gib" in info else ""
    return (
        f"{device}, {info['cores']} cores{memory}; Python {info['python']}, torch {info['torch']}, "
        f"lightning {info['lightning']}, transformers {info['transformers']}"
    )


def tiny_llama(vocab_size: int = 256, seed: int = 0) -> torch.nn.Module:
    """Build a 2-layer random Llama for the seconds-long ``--quick`` mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def load_model(source: str, quick: bool, device: torch.device, vocab_size: int = 256) -> torch.nn.Module:
    """Load ``source`` in float32 (or the tiny Llama with ``quick``), in train mode on ``device``."""
    if quick:
        model = tiny_llama(vocab_size)
    else:
        from vlorp_lightning.models.loading import load_causal_lm

        model = load_causal_lm(source, dtype="float32")
    return model.to(device).train()


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """Median, minimum, maximum and count of a list of repeats."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def spread(summary: Dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    """``median (min-max)`` of a :func:`summarize` result, divided by ``scale``."""
    if not summary["n"]:
        return "n/a"
    median, low, high = (summary[key] / scale for key in ("median", "min", "max"))
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a Markdown table whose middle columns are right-aligned."""
    align = ["---"] + ["---:"] * (len(columns) - 2) + ["---"]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Optional[str], payload: Dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON to ``path`` (skipped when ``path`` is None)."""
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def replace_section(page: Path, marker: str, body: str) -> None:
    """Replace the text between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in ``page``.

    The page is created with just that section when it does not exist.

    Raises:
        ValueError: if the page exists but lacks either marker.
    """
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if not page.exists():
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(block + "\n", encoding="utf-8")
        return
    text = page.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise ValueError(f"{page} has no {start} ... {end} section; add both markers where the table belongs")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    page.write_text(before + block + after, encoding="utf-8")


def command_line() -> str:
    """Return the command that ran this script, with the script path relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = str(script)
    return " ".join(["python", script_text, *sys.argv[1:]])


def header_lines(info: Dict[str, Any]) -> list:
    """Return the first lines of a generated section: the command, then the machine and date."""
    return [f"Command: `{command_line()}`", "", f"Machine: {describe_machine(info)}. Date: {info['date']}.", ""]


def add_output_arguments(parser: Any, page: Path, what: str) -> None:
    """Add ``--quick``, ``--json``, ``--docs`` and ``--no-docs``; ``what`` names the section written."""
    parser.add_argument("--quick", action="store_true", help="tiny random Llama and the smallest sizes: a seconds-long check")
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    parser.add_argument(
        "--docs",
        default=None,
        help=f"page whose {what} is replaced; default {page.relative_to(REPO)}, or none with --quick",
    )
    parser.add_argument("--no-docs", action="store_true", help="print the results without writing the docs page")
    parser.set_defaults(default_docs=str(page))


def resolve_output_arguments(args: Any) -> None:
    """Fill ``args.docs`` after parsing: a ``--quick`` run writes a page only when ``--docs`` names one.

    Tiny-model numbers must never replace the measured tables of the real page.
    """
    if args.docs is None:
        if args.quick:
            args.no_docs = True
        args.docs = args.default_docs


def peak_rss_reset() -> bool:
    """Reset the kernel's peak resident size of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident size of this process since the last :func:`peak_rss_reset`, in bytes.

    Reads ``VmHWM`` from ``/proc/self/status`` on Linux, else ``ru_maxrss`` (process lifetime).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
