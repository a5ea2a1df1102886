"""Peak memory and speed of one fine-tuning step, for every method, on the same model and batch.

Each method runs in a fresh process, so that its peak resident memory is its own. The
process loads the model, builds the method, runs ``--warmup`` steps (the first allocates the
optimizer state, and GaLore computes its first SVD there), then ``--steps`` timed steps on
one fixed batch of random token ids. Per step it records four numbers: the peak resident
memory (Linux ``VmHWM``, reset before the step; on CUDA the max allocated bytes), the
gradient bytes alive at once, the forward+backward time and the optimizer-step time. The tables report the median
and the range over the timed steps.

Usage::

    python benchmarks/memory_speed.py                      # SmolLM2-135M on the CPU, all methods
    python benchmarks/memory_speed.py --device cuda --batch-size 8 --seq-len 512
    python benchmarks/memory_speed.py --quick              # tiny random Llama, seconds

Without ``--no-docs`` the tables replace the ``memory-speed`` section of docs/benchmarks.md
(``--section`` picks another).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    add_output_arguments,
    command_line,
    header_lines,
    load_model,
    machine,
    markdown_table,
    peak_rss_bytes,
    peak_rss_reset,
    replace_section,
    resolve_output_arguments,
    spread,
    summarize,
    write_json,
)
from methods import METHODS, GradientMeter, MethodUnavailable, Settings, build_method, state_bytes  # noqa: E402

from vlorp_lightning import estimate_state_bytes  # noqa: E402

MiB = 2**20


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model source; default the built-in SmolLM2 GGUF")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD", help="default all")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; default cpu")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step; default 4")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence; default 128")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method; default 5")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first; default 1")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--granularity", type=int, default=16, help="ProjFactor c; default 16")
    parser.add_argument("--rank", type=int, default=2, help="ProjFactor r; default 2")
    parser.add_argument("--update-proj-gap", type=int, default=30, help="steps between projections for every method; default 30")
    parser.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="freeze the input embedding (and a head tied to it) in every method, to separate its dense state from the rest",
    )
    add_output_arguments(parser, REPO / "docs" / "benchmarks.md", "section --section")
    parser.add_argument("--section", default="memory-speed", help="marker name of the docs section to replace; default memory-speed")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    resolve_output_arguments(args)
    for name in ("batch_size", "seq_len", "steps", "granularity", "rank", "update_proj_gap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} requested but torch sees no CUDA device; use --device cpu")
    if args.quick:
        args.steps = min(args.steps, 2)
    return args


# ---------------------------------------------------------------------------- worker process
def run_worker(args: argparse.Namespace) -> Dict[str, Any]:
    """Measure one method in this process and return its results."""
    device = torch.device(args.device)
    model = load_model(args.model, args.quick, device)
    if args.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator).to(device)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
    settings = Settings(lr=args.lr, granularity=args.granularity, rank=args.rank, update_proj_gap=args.update_proj_gap)
    weights = sum(p.nbytes for p in {id(p): p for p in model.parameters()}.values())

    meter = GradientMeter(model)  # before the method's hooks, so it receives every gradient
    method = build_method(args.worker, model, settings)
    if method.model is not model:  # LoRA: only the adapters are trainable
        meter.remove()
        meter = GradientMeter(method.model)
        weights = sum(p.nbytes for p in {id(p): p for p in method.model.parameters()}.values())

    first_step = 0.0
    for index in range(args.warmup):
        _, forward_backward, step = method.train_step(batch)
        if index == 0:
            first_step = forward_backward + step
    losses, forward_backward_times, step_times, peaks, gradient_peaks = [], [], [], [], []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        peak_rss_reset()
        meter.reset()
        loss, forward_backward, step = method.train_step(batch, meter)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device))
        else:
            peaks.append(peak_rss_bytes())
        losses.append(loss)
        forward_backward_times.append(forward_backward)
        step_times.append(step)
        gradient_peaks.append(meter.peak)

    result = {
        "method": args.worker,
        "settings": method.settings,
        "in_backward": method.in_backward,
        "weights_bytes": weights,
        "state_bytes": state_bytes(method.optimizers),
        "gradient_peak_bytes": max(gradient_peaks),
        "peak_memory_bytes": peaks,
        "forward_backward_s": forward_backward_times,
        "step_s": step_times,
        "first_step_s": first_step,
        "losses": losses,
        "tokens_per_step": args.batch_size * args.seq_len,
    }
    if args.worker.startswith("projfactor"):
        optimizer = method.optimizers[0]
        result["state_bytes_reported"] = optimizer.state_bytes()["total"]["total"]
        result["state_bytes_formula"] = estimate_state_bytes(model, granularity=args.granularity, rank=args.rank).total_bytes
    return result


# ---------------------------------------------------------------------------- parent process
def worker_environment() -> Dict[str, str]:
    """Return the environment of a worker, with glibc's mmap threshold fixed at 64 KiB.

    By default glibc raises its mmap threshold after freeing a large block, so later tensors
    of that size come from the heap, whose freed pages stay resident. Resident memory then
    reflects what was once allocated rather than what is live. With the threshold fixed, every
    tensor above 64 KiB is its own mapping and is returned to the system when freed.
    """
    environment = dict(os.environ)
    environment.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    return environment


def measure(args: argparse.Namespace, argv: List[str]) -> List[Dict[str, Any]]:
    """Run every method in its own process; a method whose package is missing is reported, not fatal."""
    results = []
    for name in args.methods:
        started = time.perf_counter()
        process = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", name],
            capture_output=True,
            text=True,
            check=False,
            env=worker_environment(),
        )
        if process.returncode != 0:
            message = process.stderr.strip().splitlines()[-1] if process.stderr.strip() else f"exit code {process.returncode}"
            print(f"{name}: failed: {message}", file=sys.stderr)
            results.append({"method": name, "error": message})
            continue
        result = json.loads(process.stdout.strip().splitlines()[-1])
        print(f"{name}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        results.append(result)
    return results


def tables(results: List[Dict[str, Any]], args: argparse.Namespace, info: Dict[str, Any]) -> str:
    """Render the memory and speed tables as Markdown, followed by the checks against the targets."""
    ok = [r for r in results if "error" not in r]
    failed = [r for r in results if "error" in r]

    memory_unit = "max allocated" if args.device.startswith("cuda") else "peak resident memory"
    memory_rows, speed_rows = [], []
    adamw = next((r for r in ok if r["method"] == "adamw"), None)
    adamw_throughput = None
    if adamw:
        adamw_throughput = _throughput(adamw)

    for r in ok:
        peak = summarize(r["peak_memory_bytes"])
        memory_rows.append([
            r["method"],
            spread(peak, MiB, 0),
            f"{r['state_bytes'] / MiB:.1f}",
            f"{r['gradient_peak_bytes'] / MiB:.1f}",
            f"{(r['state_bytes'] + r['gradient_peak_bytes']) / MiB:.1f}",
            r["settings"],
        ])  # fmt: skip

        totals = [a + b for a, b in zip(r["forward_backward_s"], r["step_s"])]
        total = summarize(totals)
        throughput = r["tokens_per_step"] / total["median"]
        gap = args.update_proj_gap
        amortized = ((gap - 1) * total["median"] + r["first_step_s"]) / gap
        ratio = f"{throughput / adamw_throughput:.3f}" if adamw_throughput else "n/a"
        step_cell = "inside backward" if r["in_backward"] and r["method"] != "projfactor-inbackward" else spread(summarize(r["step_s"]), 1e-3, 0)
        speed_rows.append([
            r["method"],
            spread(summarize(r["forward_backward_s"]), 1.0, 2),
            step_cell,
            spread(total, 1.0, 2),
            f"{r['first_step_s']:.2f}",
            f"{throughput:.0f}",
            f"{r['tokens_per_step'] / amortized:.0f}",
            ratio,
        ])  # fmt: skip

    lines = [
        *header_lines(info),
        f"Model: {'tiny random Llama (--quick)' if args.quick else args.model}, float32"
        f"{', input embedding frozen in every method' if args.freeze_embeddings else ''}; batch {args.batch_size} x "
        f"{args.seq_len} random tokens; {args.warmup} warm-up step(s), then {args.steps} timed steps per method, "
        "each method in a fresh process (with glibc's MALLOC_MMAP_THRESHOLD_=65536, so that resident memory follows "
        "live tensors). Cells show the median and, in brackets, the range over the timed steps.",
        "",
        "### Memory",
        "",
        markdown_table(
            ["method", f"{memory_unit}, MiB", "optimizer state, MiB", "gradients alive at once, MiB", "state + gradients, MiB", "settings"],
            memory_rows,
        ),
        "",
        "### Speed",
        "",
        markdown_table(
            ["method", "forward+backward, s", "optimizer step, ms", "training step, s", "first step, s",
             "tokens/s", f"tokens/s with a refresh every {args.update_proj_gap} steps", "throughput / AdamW"],
            speed_rows,
        ),  # fmt: skip
        "",
        "The first step allocates the optimizer state and computes GaLore's first SVD; the column with "
        "refreshes counts one such step per projection gap for every method.",
    ]
    lines += ["", "### Targets", ""] + [f"- {line}" for line in target_checks(ok)]
    for r in failed:
        lines.append(f"- {r['method']} did not run: {r['error']}")
    return "\n".join(lines)


def target_checks(results: List[Dict[str, Any]]) -> List[str]:
    """Sentences comparing the measurements with the targets of the benchmark."""
    by_name = {r["method"]: r for r in results}
    checks = []
    inbackward, floor = by_name.get("projfactor-inbackward"), by_name.get("sgd-inbackward")
    if inbackward:
        peak = summarize(inbackward["peak_memory_bytes"])["median"]
        others = [r for r in results if r["method"] not in ("projfactor-inbackward", "sgd-inbackward")]
        lowest_other = min(others, key=lambda r: summarize(r["peak_memory_bytes"])["median"]) if others else None
        if lowest_other and lowest_other["method"] != "projfactor-inbackward":
            other_peak = summarize(lowest_other["peak_memory_bytes"])["median"]
            if other_peak < peak:
                checks.append(
                    f"Lowest peak among the methods other than the floor: missed. {lowest_other['method']} peaks at "
                    f"{other_peak / MiB:.0f} MiB, projfactor-inbackward at {peak / MiB:.0f} MiB "
                    f"({(peak - other_peak) / MiB:+.0f} MiB)."
                )
            else:
                checks.append(f"Lowest peak among the methods other than the floor: met ({peak / MiB:.0f} MiB).")
        if floor:
            floor_peak = summarize(floor["peak_memory_bytes"])["median"]
            verdict = "met" if peak <= 1.10 * floor_peak else "missed"
            checks.append(
                f"Within 10% of the SGD-in-backward floor: {verdict} ({peak / MiB:.0f} MiB against "
                f"{floor_peak / MiB:.0f} MiB, {100 * (peak / floor_peak - 1):+.1f}%)."
            )
    for name in ("projfactor", "projfactor-inbackward"):
        r = by_name.get(name)
        if r and "state_bytes_formula" in r:
            equal = r["state_bytes_reported"] == r["state_bytes_formula"]
            checks.append(
                f"{name} state equals 2*n*c*r + n + m elements per projected matrix plus AdamW moments of the dense "
                f"parameters: {'yes' if equal else 'no'} ({r['state_bytes_reported']:,} bytes from state_bytes(), "
                f"{r['state_bytes_formula']:,} from the formula; {r['state_bytes']:,} counted in the optimizer's "
                "tensors, step counters included)."
            )
    adamw, projfactor = by_name.get("adamw"), by_name.get("projfactor")
    if adamw and projfactor:
        ratio = _throughput(projfactor) / _throughput(adamw)
        verdict = "met" if ratio >= 0.97 else "missed"
        checks.append(f"ProjFactor throughput at least 0.97 of AdamW's: {verdict} ({ratio:.3f}).")
    galore = by_name.get("galore")
    if galore and projfactor:
        faster = _throughput(projfactor) > _throughput(galore)
        checks.append(
            f"ProjFactor faster than GaLore: {'met' if faster else 'missed'} "
            f"({_throughput(projfactor):.0f} against {_throughput(galore):.0f} tokens/s in steady state; first step "
            f"{projfactor['first_step_s']:.2f} s against {galore['first_step_s']:.2f} s)."
        )
    return checks


def _throughput(result: Dict[str, Any]) -> float:
    totals = [a + b for a, b in zip(result["forward_backward_s"], result["step_s"])]
    return result["tokens_per_step"] / summarize(totals)["median"]


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        try:
            result = run_worker(args)
        except MethodUnavailable as error:
            print(str(error), file=sys.stderr)
            return 3
        print(json.dumps(result))
        return 0
    info = machine()
    results = measure(args, argv)
    text = tables(results, args, info)
    write_json(args.json, {"machine": info, "command": command_line(), "results": results})
    print(text)
    if not args.no_docs:
        replace_section(Path(args.docs), args.section, text)
    return 1 if all("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
