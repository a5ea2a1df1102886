"""Test the VLoRP paper's claims at small scale: SmolLM2-135M fine-tuned on the real GSM8K file.

Claims, each over ``--seeds`` (default three):

* (a) at a fixed budget M = c * r, finer granularity (larger c, smaller r) gives lower eval
  loss and higher accuracy; the levels of ``--levels`` that divide SmolLM2's shapes, fractional
  ones included;
* (b) ProjFactor tracks the OS scheme (full-size Adam moments of the back-projected gradient)
  and AdamW;
* (c) the SS scheme (Adam moments inside the subspace) is worse than OS;
* (d) a projection fixed for the whole accumulation window against one redrawn for every
  micro-batch: measured on the gradient estimate of ``--micro-batches`` real micro-batches,
  against the true window gradient;
* (e) momentum transfer on refresh, on and off.

Each fine-tune is the loop of ``benchmarks/finetune.py``: the same rows, order, learning rate
and step count for every variant. Plots go to ``docs/figures/``; the tables replace the
``claims`` section of ``docs/paper-claims.md``.

Usage::

    python benchmarks/paper_claims.py                    # all claims, 3 seeds, CPU
    python benchmarks/paper_claims.py --claims a e --steps 200 --device cuda
    python benchmarks/paper_claims.py --quick            # tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, add_output_arguments, command_line, resolve_output_arguments, header_lines, load_model, machine, markdown_table, replace_section, write_json  # noqa: E402
from finetune import (  # noqa: E402
    RunCache,
    add_finetune_arguments,
    check_finetune_arguments,
    finetune_and_score,
    fingerprint,
    run_isolated,
)
from methods import Method  # noqa: E402

from vlorp_lightning import ProjFactor, VLoRPAdam, VLoRPProjector, derive_seed, parse_granularity, select_targets  # noqa: E402
from vlorp_lightning import vlorp_param_groups  # noqa: E402
from vlorp_lightning.data import GSM8KDataModule  # noqa: E402
from vlorp_lightning.diagnostics import cosine_similarity, relative_error  # noqa: E402
from vlorp_lightning.models.loading import load_tokenizer  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("VLORP_SHARED_DATA", REPO.parent / "shared" / "data")) / "gsm8k"
CLAIMS = ("a", "b", "c", "d", "e")


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_finetune_arguments(parser, str(DEFAULT_DATA))
    parser.add_argument("--claims", nargs="+", default=list(CLAIMS), choices=CLAIMS, help="default all")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per fine-tune; default 24")
    parser.add_argument("--budget", type=int, default=32, help="M = c * r for claims a to e; default 32")
    parser.add_argument("--levels", nargs="+", default=["1/4", "1", "4", "16", "32"], help="granularities for claim a")
    parser.add_argument("--granularity", default="16", help="c of claims b, c, d, e; default 16")
    parser.add_argument("--update-proj-gap", type=int, default=8, help="steps between projections; default 8")
    parser.add_argument("--micro-batches", type=int, default=8, help="micro-batches of claim d; default 8")
    add_output_arguments(parser, REPO / "docs" / "paper-claims.md", "claims section (and plots)")
    parser.add_argument("--figures", default=str(REPO / "docs" / "figures"), help="folder of the PNG plots")
    parser.add_argument(
        "--cache",
        default=str(REPO / "outputs" / "benchmarks" / "finetune_runs.jsonl"),
        help="file of finished runs; a rerun with the same settings reuses them (delete it to start over)",
    )
    parser.add_argument("--worker-label", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-seed", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    check_finetune_arguments(parser, args)
    resolve_output_arguments(args)
    for name in ("budget", "update_proj_gap", "micro_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        for level in [*args.levels, args.granularity]:
            rank = Fraction(args.budget) / parse_granularity(level)
            if rank.denominator != 1:
                parser.error(f"granularity {level} does not divide the budget {args.budget}: r = M / c must be an integer")
    except ValueError as error:
        parser.error(str(error))
    if args.quick:
        args.steps, args.eval_rows, args.accuracy_rows, args.max_new_tokens = 2, 4, 2, 4
        args.seeds, args.micro_batches = args.seeds[:1], min(args.micro_batches, 2)
    return args


def rank_for(args: argparse.Namespace, level: str) -> int:
    return int(Fraction(args.budget) / parse_granularity(level))


# ---------------------------------------------------------------------------- variants
def projfactor(args: argparse.Namespace, level: str, momentum_transfer: bool = False) -> Callable[[torch.nn.Module, int], Method]:
    def build(model: torch.nn.Module, seed: int) -> Method:
        rank = rank_for(args, level)
        groups = vlorp_param_groups(model, granularity=level, rank=rank, update_proj_gap=args.update_proj_gap)
        optimizer = ProjFactor(groups, lr=args.lr, seed=seed, momentum_transfer=momentum_transfer)
        transfer = ", momentum transfer" if momentum_transfer else ""
        return Method("projfactor", model, [optimizer], False, f"ProjFactor c={level}, r={rank}{transfer}")

    return build


def scheme(args: argparse.Namespace, name: str) -> Callable[[torch.nn.Module, int], Method]:
    def build(model: torch.nn.Module, seed: int) -> Method:
        level = args.granularity
        rank = rank_for(args, level)
        groups = vlorp_param_groups(model, granularity=level, rank=rank, update_proj_gap=args.update_proj_gap)
        optimizer = VLoRPAdam(groups, lr=args.lr, scheme=name, seed=seed)
        return Method(name, model, [optimizer], False, f"VLoRPAdam scheme={name}, c={level}, r={rank}")

    return build


def adamw(args: argparse.Namespace) -> Callable[[torch.nn.Module, int], Method]:
    def build(model: torch.nn.Module, seed: int) -> Method:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, foreach=True)
        return Method("adamw", model, [optimizer], False, "torch.optim.AdamW")

    return build


def variants(args: argparse.Namespace) -> Dict[str, Tuple[str, Callable[[torch.nn.Module, int], Method]]]:
    """Return the fine-tunes that the selected claims need: label to (variant key, builder), each once.

    The variant key names the optimizer and its settings as :func:`finetune.fingerprint`
    expects, so ``projfactor c=16 r=2`` and ``adamw`` runs are shared with ``quality.py``.
    """
    runs: Dict[str, Tuple[str, Callable]] = {}

    def add_projfactor(level: str, momentum_transfer: bool = False) -> None:
        key = f"projfactor c={level} r={rank_for(args, level)}" + (" momentum-transfer" if momentum_transfer else "")
        label = f"c={level}" + (", momentum transfer" if momentum_transfer else "")
        runs[label] = (key, projfactor(args, level, momentum_transfer))

    if "a" in args.claims:
        for level in args.levels:
            add_projfactor(level)
    if {"b", "c", "e"} & set(args.claims):
        add_projfactor(args.granularity)
    granularity_rank = f"c={args.granularity} r={rank_for(args, args.granularity)}"
    if {"b", "c"} & set(args.claims):
        runs["os"] = (f"os {granularity_rank}", scheme(args, "os"))
    if "b" in args.claims:
        runs["adamw"] = ("adamw", adamw(args))
    if "c" in args.claims:
        runs["ss"] = (f"ss {granularity_rank}", scheme(args, "ss"))
    if "e" in args.claims:
        add_projfactor(args.granularity, momentum_transfer=True)
    return runs


# ---------------------------------------------------------------------------- claim d
def window_estimates(args: argparse.Namespace, tokenizer: Any, seed: int) -> Dict[str, Dict[str, float]]:
    """Compare three estimates of one accumulation window's gradient with the true one.

    Over ``args.micro_batches`` micro-batches of real rows, with ``g_k`` the micro-batch
    gradients and ``G`` their mean, per projected matrix:

    * ``fixed``: one projection ``P`` for the window, accumulated in the subspace and mapped
      back once, ``P P^T G`` (what ProjFactor does);
    * ``redrawn, full-size sum``: a new ``P_k`` per micro-batch, each mapped back before
      summing, ``mean_k P_k P_k^T g_k`` (needs an ``n x m`` accumulator);
    * ``redrawn, subspace sum``: a new ``P_k`` per micro-batch, coordinates summed in the
      subspace and mapped back with the last ``P_K``: ``P_K mean_k P_k^T g_k``.

    Returns the relative error and cosine against ``G``, averaged over matrices.
    """
    device = torch.device(args.device)
    torch.manual_seed(seed)
    model = load_model(args.model, args.quick, device, vocab_size=len(tokenizer))
    datamodule = GSM8KDataModule(
        data_dir=args.data_dir, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length,
        max_train_rows=args.batch_size * args.micro_batches, val_fraction=0.0, seed=seed,
    )  # fmt: skip
    datamodule.setup("fit")
    targets = select_targets(model)
    rank = rank_for(args, args.granularity)
    full = {t.name: torch.zeros_like(t.param) for t in targets}
    fixed = {t.name: None for t in targets}
    redrawn_full = {t.name: torch.zeros_like(t.param) for t in targets}
    redrawn_subspace = {t.name: None for t in targets}
    fixed_projectors = {
        t.name: VLoRPProjector(t.param.shape, args.granularity, rank, seed=derive_seed(seed, index, 0))
        for index, t in enumerate(targets)
    }
    batches = list(datamodule.train_dataloader())[: args.micro_batches]
    last_projectors = {}
    for k, batch in enumerate(batches):
        batch = {key: value.to(device) for key, value in batch.items() if key in ("input_ids", "attention_mask", "labels")}
        model.zero_grad(set_to_none=True)
        (model(**batch).loss / len(batches)).backward()
        for index, target in enumerate(targets):
            grad = target.param.grad.detach()
            full[target.name] += grad
            projected = fixed_projectors[target.name].project(grad)
            fixed[target.name] = projected if fixed[target.name] is None else fixed[target.name] + projected
            fresh = VLoRPProjector(target.param.shape, args.granularity, rank, seed=derive_seed(seed, index, k + 1))
            redrawn_full[target.name] += fresh.project_back(fresh.project(grad))
            coordinates = fresh.project(grad)
            previous = redrawn_subspace[target.name]
            redrawn_subspace[target.name] = coordinates if previous is None else previous + coordinates
            last_projectors[target.name] = fresh
    estimates = {
        "fixed": {name: fixed_projectors[name].project_back(value) for name, value in fixed.items()},
        "redrawn, full-size sum": redrawn_full,
        "redrawn, subspace sum": {name: last_projectors[name].project_back(value) for name, value in redrawn_subspace.items()},
    }
    summary = {}
    for label, estimate in estimates.items():
        errors = [float(relative_error(full[name], estimate[name])) for name in full]
        cosines = [float(cosine_similarity(full[name], estimate[name])) for name in full]
        summary[label] = {"error": statistics.mean(errors), "cosine": statistics.mean(cosines)}
    return summary


# ---------------------------------------------------------------------------- report
def mean_sd(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def run_rows(labels: Sequence[str], runs: Dict[str, List[Dict[str, Any]]]) -> List[List[str]]:
    rows = []
    for label in labels:
        results = runs.get(label, [])
        if not results:
            continue
        losses = [r["eval_loss"] for r in results]
        finals = [statistics.mean(r["train_losses"][-4:]) for r in results]
        accuracy = [100.0 * r["correct"] / max(r["answered"], 1) for r in results]
        rows.append([
            label,
            mean_sd(losses),
            ", ".join(f"{loss:.4f}" for loss in losses),
            mean_sd(finals),
            f"{statistics.mean(accuracy):.1f}",
            ", ".join(f"{r['correct']}/{r['answered']}" for r in results),
        ])  # fmt: skip
    return rows


COLUMNS = ["variant", "eval loss (mean ± sd)", "eval loss per seed", "train loss, last 4 steps", "accuracy, %", "correct per seed"]


def mean_loss(runs: Dict[str, List[Dict[str, Any]]], label: str) -> float:
    return statistics.mean(r["eval_loss"] for r in runs[label])


def verdict(runs: Dict[str, List[Dict[str, Any]]], better: str, worse: str) -> str:
    """Describe whether ``better`` has the lower mean eval loss than ``worse``, against seed noise.

    A difference smaller than the larger of the two seed standard deviations is reported as
    within noise, neither agreeing nor disagreeing.
    """
    difference = mean_loss(runs, worse) - mean_loss(runs, better)
    spreads = [statistics.stdev(r["eval_loss"] for r in runs[label]) for label in (better, worse) if len(runs[label]) > 1]
    noise = max(spreads) if spreads else 0.0
    if abs(difference) <= noise:
        return f"is within seed noise (difference {difference:+.4f}, seed sd up to {noise:.4f})"
    if difference > 0:
        return f"agrees with the paper (difference {difference:+.4f}, seed sd up to {noise:.4f})"
    return f"disagrees with the paper (difference {difference:+.4f}, seed sd up to {noise:.4f})"


def plot_claims(args: argparse.Namespace, runs: Dict[str, List[Dict[str, Any]]], window: Dict[str, List[Dict]], folder: Path) -> List[str]:
    """Write the PNG plots and return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if "a" in args.claims:
        levels = [level for level in args.levels if runs.get(f"c={level}")]
        x = [float(parse_granularity(level)) for level in levels]
        figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
        for seed_index, seed in enumerate(args.seeds):
            loss_axis.plot(x, [runs[f"c={level}"][seed_index]["eval_loss"] for level in levels], marker="o", alpha=0.5, label=f"seed {seed}")
        loss_axis.plot(x, [mean_loss(runs, f"c={level}") for level in levels], marker="s", color="black", label="mean")
        accuracy_axis.plot(
            x,
            [statistics.mean(100.0 * r["correct"] / max(r["answered"], 1) for r in runs[f"c={level}"]) for level in levels],
            marker="s",
            color="black",
        )
        for axis, label in ((loss_axis, "eval loss (nats per answer token)"), (accuracy_axis, "accuracy, % (mean over seeds)")):
            axis.set_xscale("log", base=2)
            axis.set_xticks(x, levels)
            axis.set_xlabel(f"granularity c (r = {args.budget} / c)")
            axis.set_ylabel(label)
        loss_axis.legend()
        loss_axis.set_title(f"(a) fixed budget M = {args.budget}")
        figure.tight_layout()
        figure.savefig(folder / "claim_a_granularity.png", dpi=110)
        plt.close(figure)
        written.append("claim_a_granularity.png")
    curve_labels = [label for label in runs if not label.startswith("c=") or label in (f"c={args.granularity}", f"c={args.granularity}, momentum transfer")]
    if curve_labels and {"b", "c", "e"} & set(args.claims):
        figure, axis = plt.subplots(figsize=(7, 4))
        for label in curve_labels:
            curves = torch.tensor([r["train_losses"] for r in runs[label]])
            axis.plot(range(1, curves.shape[1] + 1), curves.mean(0).tolist(), label=label)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss (mean over seeds)")
        axis.set_title("(b, c, e) training loss")
        axis.legend()
        figure.tight_layout()
        figure.savefig(folder / "claims_bce_training_loss.png", dpi=110)
        plt.close(figure)
        written.append("claims_bce_training_loss.png")
    if window:
        labels = list(window)
        figure, axis = plt.subplots(figsize=(7, 4))
        means = [statistics.mean(item["error"] for item in window[label]) for label in labels]
        axis.bar(range(len(labels)), means)
        axis.set_xticks(range(len(labels)), labels)
        axis.set_ylabel("relative error of the window gradient")
        axis.set_title(f"(d) {args.micro_batches} micro-batches, c={args.granularity}, r={rank_for(args, args.granularity)}")
        figure.tight_layout()
        figure.savefig(folder / "claim_d_window.png", dpi=110)
        plt.close(figure)
        written.append("claim_d_window.png")
    return written


def report(args: argparse.Namespace, runs: Dict[str, List[Dict[str, Any]]], window: Dict[str, List[Dict]], info: Dict[str, Any], figures: List[str]) -> str:
    base = f"c={args.granularity}"
    lines = [
        *header_lines(info),
        f"Setup: {'tiny random Llama (--quick)' if args.quick else args.model}, float32; {Path(args.data_dir).name} training rows, "
        f"{args.steps} optimizer steps of {args.batch_size} rows (max {args.max_length} tokens), learning rate {args.lr:g} "
        f"for every variant, a new projection every {args.update_proj_gap} steps, budget M = {args.budget}, seeds "
        f"{', '.join(map(str, args.seeds))}. Eval loss: mean cross-entropy of the worked-answer tokens of the first "
        f"{args.eval_rows} test rows. Accuracy: exact match of greedy answers ({args.max_new_tokens} new tokens at most) "
        f"on the first {args.accuracy_rows} test rows.",
    ]
    if "a" in args.claims:
        labels = [f"c={level}" for level in args.levels]
        lines += ["", f"### (a) Granularity at M = {args.budget}", "", markdown_table(COLUMNS, run_rows(labels, runs))]
        present = [label for label in labels if runs.get(label)]
        if len(present) > 1:
            coarse, fine = present[0], present[-1]
            lines += ["", f"Finest ({fine}) against coarsest ({coarse}) eval loss: {mean_loss(runs, fine):.4f} against "
                      f"{mean_loss(runs, coarse):.4f}; the measurement {verdict(runs, fine, coarse)}."]  # fmt: skip
    if {"b", "c"} & set(args.claims):
        labels = [base, "os", "ss", "adamw"]
        lines += ["", "### (b, c) ProjFactor, the OS and SS schemes, AdamW", "", markdown_table(COLUMNS, run_rows(labels, runs))]
        if "b" in args.claims and runs.get("adamw") and runs.get(base):
            gap = 100.0 * (mean_loss(runs, base) / mean_loss(runs, "adamw") - 1.0)
            lines += ["", f"(b) ProjFactor against AdamW: {gap:+.2f}% eval loss; against OS: "
                      f"{100.0 * (mean_loss(runs, base) / mean_loss(runs, 'os') - 1.0):+.2f}%."]  # fmt: skip
        if "c" in args.claims and runs.get("ss") and runs.get("os"):
            lines += ["", f"(c) SS against OS: {mean_loss(runs, 'ss'):.4f} against {mean_loss(runs, 'os'):.4f}; "
                      f"the measurement {verdict(runs, 'os', 'ss')} (the paper finds SS worse)."]  # fmt: skip
    if window:
        rows = []
        for label, items in window.items():
            rows.append([label, mean_sd([item["error"] for item in items]), mean_sd([item["cosine"] for item in items])])
        lines += [
            "",
            f"### (d) Projection fixed per window against redrawn per micro-batch ({args.micro_batches} micro-batches)",
            "",
            markdown_table(["estimate of the window gradient", "relative error (mean ± sd over seeds)", "cosine"], rows),
        ]
    if "e" in args.claims:
        labels = [base, f"{base}, momentum transfer"]
        lines += ["", "### (e) Momentum transfer on refresh", "", markdown_table(COLUMNS, run_rows(labels, runs))]
        if all(runs.get(label) for label in labels):
            gap = mean_loss(runs, labels[1]) - mean_loss(runs, labels[0])
            lines += ["", f"Momentum transfer changes the eval loss by {gap:+.4f} nats."]
    if figures:
        lines += ["", "Plots: " + ", ".join(f"![{name}](figures/{name})" for name in figures)]
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker_label is not None:
        _, build = variants(args)[args.worker_label]
        result = finetune_and_score(build, args.worker_seed, args, load_tokenizer(args.model))
        Path(args.worker_output).write_text(json.dumps(result), encoding="utf-8")
        return 0

    info = machine()
    cache = RunCache(args.cache)
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for label, (key, _) in variants(args).items():
        for seed in args.seeds:
            started = time.perf_counter()
            result = cache.get(fingerprint(args, key), seed)
            if result is None:
                result = run_isolated(str(Path(__file__).resolve()), argv, label, seed)
                cache.put(fingerprint(args, key), seed, result)
                source = f"{time.perf_counter() - started:.0f} s"
            else:
                source = f"cached in {args.cache}"
            runs.setdefault(label, []).append({"seed": seed, **result})
            print(f"{label} seed {seed}: eval loss {result['eval_loss']:.4f}, {source}", file=sys.stderr)

    tokenizer = load_tokenizer(args.model)
    window: Dict[str, List[Dict[str, float]]] = {}
    if "d" in args.claims:
        for seed in args.seeds:
            for label, values in window_estimates(args, tokenizer, seed).items():
                window.setdefault(label, []).append(values)
    figures = [] if args.no_docs else plot_claims(args, runs, window, Path(args.figures))
    text = report(args, runs, window, info, figures)
    write_json(args.json, {"machine": info, "command": command_line(), "runs": runs, "window": window})
    print(text)
    if not args.no_docs:
        replace_section(Path(args.docs), "claims", text)
    finite = all(math.isfinite(r["eval_loss"]) for results in runs.values() for r in results)
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
