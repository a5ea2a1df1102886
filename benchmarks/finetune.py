"""The fine-tune-then-score loop that the quality and paper-claims benchmarks share.

One run loads the model, fine-tunes it on GSM8K training rows with a given method for a
fixed number of steps, then measures the teacher-forced loss of the worked answers on test
rows and the exact-match accuracy of greedy answers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from _common import load_model
from methods import Method

from vlorp_lightning.data import GSM8KDataModule
from vlorp_lightning.models.evaluation import generate_answers

IGNORE_INDEX = -100


def add_finetune_arguments(parser: argparse.ArgumentParser, default_data: str) -> None:
    """Add the options of one fine-tune run: model, data, steps, evaluation sizes."""
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model source; default the built-in SmolLM2 GGUF")
    parser.add_argument("--data-dir", default=default_data, help="folder with GSM8K train.jsonl and test.jsonl")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="default 0 1 2")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; default cpu")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per optimizer step; default 4")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per training row; default 256")
    parser.add_argument("--eval-rows", type=int, default=48, help="test rows for the eval loss; default 48")
    parser.add_argument("--accuracy-rows", type=int, default=16, help="test rows scored by greedy generation; default 16")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="maximum generated tokens per test row; default 160")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of every method; default 1e-4")


def check_finetune_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject invalid values of :func:`add_finetune_arguments` options with ``parser.error``."""
    from pathlib import Path

    for name in ("steps", "batch_size", "max_length", "eval_rows", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.accuracy_rows < 0:
        parser.error(f"--accuracy-rows must be >= 0, got {args.accuracy_rows}")
    data_dir = Path(args.data_dir)
    for split in ("train.jsonl", "test.jsonl"):
        if not (data_dir / split).is_file():
            parser.error(f"{data_dir / split} not found; pass --data-dir with GSM8K's train.jsonl and test.jsonl")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} requested but torch sees no CUDA device; use --device cpu")


def finetune_and_score(
    build: Callable[[torch.nn.Module, int], Method], seed: int, args: argparse.Namespace, tokenizer: Any, micro_batches: int = 1
) -> Dict[str, Any]:
    """Fine-tune with ``build(model, seed)`` for ``args.steps`` steps, then score.

    With ``micro_batches > 1`` each optimizer step accumulates that many micro-batches of
    ``args.batch_size`` rows (loss divided by their count) through ``Method.accumulate_step``.

    Returns:
        ``train_losses`` (one per step), ``eval_loss`` [nats per answer token], ``correct``,
        ``answered`` and ``train_seconds``.
    """
    device = torch.device(args.device)
    torch.manual_seed(seed)
    model = load_model(args.model, args.quick, device, vocab_size=len(tokenizer))
    datamodule = GSM8KDataModule(
        data_dir=args.data_dir,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        eval_batch_size=16,
        max_length=args.max_length,
        max_train_rows=args.steps * args.batch_size * micro_batches,
        max_eval_rows=max(args.eval_rows, args.accuracy_rows),
        val_fraction=0.0,
        seed=seed,
    )
    datamodule.setup("fit")
    datamodule.setup("test")
    method = build(model, seed)

    started = time.perf_counter()
    train_losses = []
    batches = itertools.cycle(datamodule.train_dataloader())
    for _ in range(args.steps):
        window = [_to_device(next(batches), device) for _ in range(micro_batches)]
        if micro_batches == 1:
            loss, _, _ = method.train_step(window[0])
        else:
            loss = method.accumulate_step(window)
        train_losses.append(loss)
    train_seconds = time.perf_counter() - started
    for hook in method.hooks:
        hook.remove()

    eval_loss, correct, answered = evaluate(method.model, tokenizer, datamodule, args, device)
    return {
        "settings": method.settings,
        "train_losses": train_losses,
        "eval_loss": eval_loss,
        "correct": correct,
        "answered": answered,
        "train_seconds": train_seconds,
    }


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items() if key in ("input_ids", "attention_mask", "labels")}


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer: Any, datamodule: GSM8KDataModule, args: argparse.Namespace, device: torch.device):
    """Return (mean answer-token loss over ``args.eval_rows`` test rows, correct answers, answered rows)."""
    model.eval()
    loss_sum, tokens, seen = 0.0, 0, 0
    correct, answered = 0, 0
    for batch in datamodule.test_dataloader()[0]:
        size = len(batch["targets"])
        if seen < args.eval_rows:
            keep = min(size, args.eval_rows - seen)
            input_ids = batch["lm_input_ids"][:keep].to(device)
            attention_mask = batch["lm_attention_mask"][:keep].to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            labels = batch["lm_labels"][:keep, 1:].to(device)
            loss_sum += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
            )
            tokens += int((labels != IGNORE_INDEX).sum())
        if answered < args.accuracy_rows:
            keep = min(size, args.accuracy_rows - answered)
            prompts = batch["input_ids"][:keep].to(device)
            mask = batch["attention_mask"][:keep].to(device)
            texts = generate_answers(model, tokenizer, prompts, mask, args.max_new_tokens)
            targets = batch["targets"][:keep]
            correct += sum(datamodule.is_correct("gsm8k", text, target) for text, target in zip(texts, targets))
            answered += keep
        seen += size
        if seen >= args.eval_rows and answered >= args.accuracy_rows:
            break
    model.train()
    return loss_sum / max(tokens, 1), correct, answered


# ---------------------------------------------------------------------------- run cache
FINGERPRINT_FIELDS = (
    "model", "steps", "batch_size", "max_length", "eval_rows", "accuracy_rows", "max_new_tokens", "lr",
    "update_proj_gap", "quick",
)  # fmt: skip


def fingerprint(args: argparse.Namespace, variant: str) -> str:
    """Identify a fine-tune by its settings and variant, so that a cached result is reused only when all match.

    ``variant`` names the optimizer and its projection settings, for example
    ``"projfactor c=16 r=2"``; two scripts that run the same variant with the same settings
    share results.
    """
    from pathlib import Path

    values = {name: getattr(args, name) for name in FINGERPRINT_FIELDS}
    values["data_dir"] = str(Path(args.data_dir).resolve())
    values["variant"] = variant
    return json.dumps(values, sort_keys=True)


class RunCache:
    """Results of finished fine-tunes, one JSON line each, so that an interrupted script resumes.

    Each line contains ``key`` (from :func:`fingerprint`), ``seed`` and ``result``. Lines are
    appended and flushed as runs finish.
    """

    def __init__(self, path: Any) -> None:
        from pathlib import Path

        self.path = Path(path)
        self._results: Dict[tuple, Dict[str, Any]] = {}
        if self.path.is_file():
            for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self._results[(record["key"], int(record["seed"]))] = record["result"]
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise ValueError(f"{self.path}:{number}: not a run-cache record; delete the file to start over") from None

    def get(self, key: str, seed: int) -> Optional[Dict[str, Any]]:
        """Return the cached result of ``(key, seed)``, or None."""
        return self._results.get((key, seed))

    def put(self, key: str, seed: int, result: Dict[str, Any]) -> None:
        """Store a result in memory and append it to the file."""
        self._results[(key, seed)] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "seed": seed, "result": result}) + "\n")


def run_isolated(script: str, argv: List[str], label: str, seed: int) -> Dict[str, Any]:
    """Run one fine-tune of ``script`` in a fresh Python process and return its result.

    A process per run returns all of a run's memory to the system when it ends. One process
    for many runs can grow until the system kills it.

    Raises:
        RuntimeError: if the worker fails, with the end of its error output.
    """
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "result.json"
        command = [sys.executable, script, *argv, "--worker-label", label, "--worker-seed", str(seed), "--worker-output", str(output)]
        process = subprocess.run(command, capture_output=True, text=True, check=False)
        if process.returncode != 0 or not output.is_file():
            tail = "\n".join(process.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"run {label!r} seed {seed} failed with exit code {process.returncode}:\n{tail}")
        return json.loads(output.read_text(encoding="utf-8"))
