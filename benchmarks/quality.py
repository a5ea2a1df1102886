"""Final quality of every method after a short fine-tune on the real GSM8K training file.

For each method and seed: load the model, fine-tune it for ``--steps`` optimizer steps on
GSM8K training rows (the same seeded rows and order for every method), then measure the
teacher-forced loss of the worked answers on the first ``--eval-rows`` test rows and the
exact-match accuracy of greedy answers on the first ``--accuracy-rows`` test rows. Every
method uses the same learning rate and the budgets of ``benchmarks/methods.py``.

Usage::

    python benchmarks/quality.py                                  # ../shared/data/gsm8k, 3 seeds
    python benchmarks/quality.py --data-dir path/to/gsm8k --steps 200 --device cuda
    python benchmarks/quality.py --quick                          # tiny random Llama, seconds

Without ``--no-docs`` the table replaces the ``quality`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, add_output_arguments, command_line, resolve_output_arguments, header_lines, machine, markdown_table, replace_section, write_json  # noqa: E402
from finetune import add_finetune_arguments, check_finetune_arguments, finetune_and_score  # noqa: E402
from methods import METHODS, MethodUnavailable, Settings, build_method  # noqa: E402

from vlorp_lightning.models.loading import load_tokenizer  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("VLORP_SHARED_DATA", REPO.parent / "shared" / "data")) / "gsm8k"


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_finetune_arguments(parser, str(DEFAULT_DATA))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD", help="default all")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps; default 16")
    parser.add_argument("--granularity", type=int, default=16, help="ProjFactor c; default 16")
    parser.add_argument("--rank", type=int, default=2, help="ProjFactor r; default 2")
    parser.add_argument("--update-proj-gap", type=int, default=30, help="steps between projections; default 30")
    add_output_arguments(parser, REPO / "docs" / "benchmarks.md", "quality section")
    args = parser.parse_args(argv)
    check_finetune_arguments(parser, args)
    resolve_output_arguments(args)
    for name in ("granularity", "rank", "update_proj_gap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.quick:
        args.steps, args.eval_rows, args.accuracy_rows, args.max_new_tokens = 2, 4, 2, 4
        args.seeds = args.seeds[:1]
    return args


def table(results: List[Dict[str, Any]], args: argparse.Namespace, info: Dict[str, Any]) -> str:
    """The quality table as Markdown: mean and spread over seeds per method, with the targets."""
    rows, by_method = [], {}
    for name in args.methods:
        runs = [r for r in results if r["method"] == name and "error" not in r]
        if not runs:
            continue
        losses = [r["eval_loss"] for r in runs]
        accuracy = [100.0 * r["correct"] / max(r["answered"], 1) for r in runs]
        by_method[name] = statistics.mean(losses)
        rows.append([
            name,
            f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses) if len(losses) > 1 else 0.0:.4f}",
            ", ".join(f"{loss:.4f}" for loss in losses),
            f"{statistics.mean(accuracy):.1f}",
            ", ".join(f"{r['correct']}/{r['answered']}" for r in runs),
            f"{statistics.mean(r['train_seconds'] for r in runs):.0f}",
            runs[0]["settings"],
        ])  # fmt: skip
    lines = [
        *header_lines(info),
        f"Model: {'tiny random Llama (--quick)' if args.quick else args.model}, float32. Data: {Path(args.data_dir).name}, "
        f"{args.steps} optimizer steps of {args.batch_size} training rows (max {args.max_length} tokens), learning rate "
        f"{args.lr:g} for every method, seeds {', '.join(map(str, args.seeds))}. Eval loss: mean cross-entropy of the "
        f"worked-answer tokens of the first {args.eval_rows} test rows. Accuracy: exact match of the final number in "
        f"greedy answers ({args.max_new_tokens} new tokens at most) to the first {args.accuracy_rows} test rows.",
        "",
        markdown_table(
            ["method", "eval loss (mean ± sd)", "eval loss per seed", "accuracy, %", "correct per seed", "train s", "settings"], rows
        ),
        "",
        "### Targets",
        "",
    ]
    adamw, projfactor, galore = (by_method.get(name) for name in ("adamw", "projfactor", "galore"))
    if adamw is not None and projfactor is not None:
        gap = 100.0 * (projfactor / adamw - 1.0)
        lines.append(f"- ProjFactor eval loss within 2% of AdamW's: {'met' if gap <= 2.0 else 'missed'} ({gap:+.2f}%).")
    if galore is not None and projfactor is not None:
        better = projfactor < galore
        lines.append(
            f"- ProjFactor better than GaLore at equal state memory: {'met' if better else 'missed'} "
            f"({projfactor:.4f} against {galore:.4f})."
        )
    for r in results:
        if "error" in r:
            lines.append(f"- {r['method']} (seed {r['seed']}) did not run: {r['error']}")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    info = machine()
    tokenizer = load_tokenizer(args.model)

    results = []
    for name, seed in itertools.product(args.methods, args.seeds):
        started = time.perf_counter()
        settings = Settings(
            lr=args.lr, granularity=args.granularity, rank=args.rank, update_proj_gap=args.update_proj_gap, seed=seed
        )
        try:
            result = {"method": name, "seed": seed}
            result.update(finetune_and_score(lambda model, _: build_method(name, model, settings), seed, args, tokenizer))
        except MethodUnavailable as error:
            result = {"method": name, "seed": seed, "error": str(error)}
        results.append(result)
        if "error" in result:
            print(f"{name} seed {seed}: {result['error']}", file=sys.stderr)
        else:
            print(
                f"{name} seed {seed}: eval loss {result['eval_loss']:.4f}, {result['correct']}/{result['answered']} "
                f"correct, {time.perf_counter() - started:.0f} s",
                file=sys.stderr,
            )

    text = table(results, args, info)
    write_json(args.json, {"machine": info, "command": command_line(), "results": results})
    print(text)
    if not args.no_docs:
        replace_section(Path(args.docs), "quality", text)
    failed = [r for r in results if "error" in r or not math.isfinite(r.get("eval_loss", float("nan")))]
    return 1 if len(failed) == len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
