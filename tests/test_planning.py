"""Memory plans: rows against real optimizers on a tiny Llama, shipped configs, formats, bad input."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlorp_lightning import ProjFactor, vlorp_param_groups
from vlorp_lightning.planning import METHODS, format_plan, main, plan

REPO = Path(__file__).resolve().parents[1]
LLAMA2_7B = REPO / "configs" / "models" / "llama2-7b.json"
SMOLLM2 = REPO / "configs" / "models" / "smollm2-135m.json"

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
FP32 = {"weight_bytes": 4, "state_bytes": 4}


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    values = {key: value for key, value in TINY.items() if key != "model_type"}
    return LlamaForCausalLM(LlamaConfig(**values))


def tiny_loss(model: LlamaForCausalLM) -> torch.Tensor:
    tokens = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    return model(input_ids=tokens, labels=tokens).loss


def row_of(rows, method):
    return next(row for row in rows if row.method == method)


def live_gradient_bytes(model) -> int:
    return sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)


def moment_bytes(optimizer) -> int:
    """Bytes of every state tensor except the 0-d ``step`` counters."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key == "step":
                assert value.dim() == 0, "step counters are expected to be scalars"
                continue
            total += value.nbytes
    return total


# ---------------------------------------------------------------- rows against real optimizers
def test_projfactor_row_matches_optimizer():
    row = row_of(plan(TINY, ["projfactor"], granularity=4, rank=2, **FP32), "projfactor")
    model = tiny_model()
    optimizer = ProjFactor(vlorp_param_groups(model, granularity=4, rank=2), lr=1e-3)
    tiny_loss(model).backward()
    # Projected gradients are compressed in their hooks, so only dense gradients remain.
    assert live_gradient_bytes(model) == row.gradients_bytes
    optimizer.step()
    assert optimizer.state_bytes()["total"]["total"] == row.state_bytes
    assert sum(p.nbytes for p in model.parameters()) == row.weights_bytes


def test_adamw_row_matches_torch():
    row = row_of(plan(TINY, ["adamw"], **FP32), "adamw")
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tiny_loss(model).backward()
    assert live_gradient_bytes(model) == row.gradients_bytes
    optimizer.step()
    assert moment_bytes(optimizer) == row.state_bytes
    assert row.ratio_to_adamw == 1.0


def test_adafactor_row_matches_torch():
    row = row_of(plan(TINY, ["adafactor"], **FP32), "adafactor")
    model = tiny_model()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-3)
    tiny_loss(model).backward()
    optimizer.step()
    assert moment_bytes(optimizer) == row.state_bytes


def test_inbackward_gradient_is_largest_single():
    rows = plan(TINY, ["projfactor-inbackward"], granularity=4, rank=2, **FP32)
    model = tiny_model()
    peak = [0]

    def record(_param):
        peak[0] = max(peak[0], live_gradient_bytes(model))

    # Registered before the optimizer's hooks, so each call receives the gradient before it is freed.
    for param in model.parameters():
        param.register_post_accumulate_grad_hook(record)
    optimizer = ProjFactor(vlorp_param_groups(model, granularity=4, rank=2), lr=1e-3, update_in_backward=True)
    optimizer.mark_accumulation_boundary(True)
    tiny_loss(model).backward()
    optimizer.step()
    assert peak[0] == rows[0].gradients_bytes
    assert live_gradient_bytes(model) == 0
    assert optimizer.state_bytes()["total"]["total"] == rows[0].state_bytes


# ---------------------------------------------------------------- formulas by hand
def test_galore_apollo_lora_by_hand():
    # Tiny Llama per layer: q, k, v, o (64, 64); gate, up (128, 64); down (64, 128).
    # Dense: embedding and head 128*64 each, norms 2*64 per layer plus 64.
    dense = 2 * 128 * 64 + 2 * 2 * 64 + 64
    rows = plan(TINY, ["galore", "apollo", "lora"], galore_rank=8, apollo_rank=8, lora_rank=3, **FP32)
    galore_matrix = {"square": 8 * 64 + 2 * 8 * 64, "mlp": 8 * 64 + 2 * 8 * 128}
    galore = 2 * (4 * galore_matrix["square"] + 3 * galore_matrix["mlp"]) + 2 * dense
    assert row_of(rows, "galore").state_bytes == 4 * galore
    apollo = 2 * (4 * 2 * 8 * 64 + 3 * 2 * 8 * 128) + 2 * dense
    assert row_of(rows, "apollo").state_bytes == 4 * apollo

    model = tiny_model()
    adapters = sum(
        3 * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    )
    lora = row_of(rows, "lora")
    assert lora.weights_bytes == 4 * (sum(p.numel() for p in model.parameters()) + adapters)
    assert lora.gradients_bytes == 4 * adapters
    assert lora.state_bytes == 4 * 2 * adapters


def test_lora_rank_sized_to_projfactor():
    rows = plan(TINY, ["lora", "projfactor"], granularity=4, rank=2, **FP32)
    projected_state = row_of(rows, "projfactor").state_bytes - 4 * 2 * (2 * 128 * 64 + 2 * 2 * 64 + 64)
    adapters = row_of(rows, "lora").gradients_bytes
    side_sum = 2 * (4 * 128 + 3 * 192)
    assert abs(adapters - projected_state) <= 4 * side_sum / 2
    assert "r=" in row_of(rows, "lora").settings


def test_floor_has_no_state():
    row = plan(TINY, ["floor"], **FP32)[0]
    assert row.state_bytes == 0
    assert row.gradients_bytes == 4 * 128 * 64


# ---------------------------------------------------------------- shipped configs
def test_llama2_7b_plan_on_meta():
    rows = plan(str(LLAMA2_7B), granularity=256, rank=1)
    assert [row.method for row in rows] == list(METHODS)
    adamw, projfactor = row_of(rows, "adamw"), row_of(rows, "projfactor")
    assert adamw.weights_bytes == 2 * 6_738_415_616
    assert adamw.state_bytes == 2 * 4 * 6_738_415_616
    # By hand: auto orientation keeps 256 * min(n, m) moment and accumulator elements per matrix,
    # plus n + m second-moment elements; embeddings, the head and norms keep AdamW moments.
    attention = 4 * (2 * 256 * 4096 + 4096 + 4096)
    mlp = 3 * (2 * 256 * 4096 + 4096 + 11008)
    dense = 2 * 32000 * 4096 + 32 * 2 * 4096 + 4096
    assert projfactor.state_bytes == 4 * (32 * (attention + mlp) + 2 * dense)
    assert projfactor.total_bytes < row_of(rows, "lora").total_bytes


def test_smollm2_config_matches_gguf(data_smollm2_gguf):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(data_smollm2_gguf))
    # GGUF lists dimensions innermost first, the reverse of torch's order.
    expected = sorted(tuple(int(d) for d in reversed(tensor.shape)) for tensor in reader.tensors)
    from vlorp_lightning.planning import build_meta_model, load_model_config

    model = build_meta_model(load_model_config(SMOLLM2))
    shapes = sorted(tuple(p.shape) for p in model.parameters())
    assert shapes == expected
    assert plan(SMOLLM2, ["adamw"])[0].weights_bytes == 2 * 134_515_008


# ---------------------------------------------------------------- output formats
def test_formats_round_trip():
    rows = plan(TINY, ["adamw", "projfactor"], granularity=4, rank=2, **FP32)
    parsed = list(csv.DictReader(io.StringIO(format_plan(rows, "csv"))))
    assert [int(record["total_bytes"]) for record in parsed] == [row.total_bytes for row in rows]
    document = json.loads(format_plan(rows, "json", header=["tiny"]))
    assert document["header"] == ["tiny"]
    assert [record["state_bytes"] for record in document["rows"]] == [row.state_bytes for row in rows]
    assert "Activations are not included" in document["note"]
    markdown = format_plan(rows, "markdown").splitlines()
    assert markdown[0].startswith("| method | weights GiB")
    assert markdown[2].startswith("| adamw | ")


def test_text_table_is_aligned(capsys):
    assert main(["--model-config", str(SMOLLM2), "--methods", "adamw", "projfactor", "--granularity", "16", "--rank", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[2:5]
    assert table[0].startswith("method")
    # Numeric columns are right-aligned, so "ratio to AdamW" ends at the same column in every row.
    end = table[0].index("ratio to AdamW") + len("ratio to AdamW")
    assert table[1][end - 5 : end] == "1.000"
    assert lines[-1].startswith("Activations are not included")


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "vlorp_lightning.planning", "--model-config", str(LLAMA2_7B), "--format", "csv", "--methods", "adamw"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith(f"adamw,{2 * 6_738_415_616},")


# ---------------------------------------------------------------- bad input
def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match="model config file not found: .*absent.json"):
        plan(missing)
    assert main(["--model-config", str(missing)]) == 2
    assert "error: model config file not found" in capsys.readouterr().err


def test_granularity_not_dividing(capsys):
    with pytest.raises(ValueError, match=r"granularity 7 does not divide shape .*divide every projected matrix of this model: .*1/4, .*\b64\b"):
        plan(TINY, granularity=7, rank=1)
    assert main(["--model-config", str(SMOLLM2), "--granularity", "5"]) == 2
    assert "granularity 5 does not divide" in capsys.readouterr().err


def test_unknown_method(capsys):
    with pytest.raises(ValueError, match=r"unknown method 'adam' \(did you mean adamw"):
        plan(TINY, ["adam"])
    assert main(["--model-config", str(SMOLLM2), "--methods", "sgd"]) == 2
    assert "unknown method 'sgd'; choose from adamw" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "kwargs", "error", "message"),
    [
        pytest.param({"hidden_size": 64}, {}, ValueError, "no 'model_type' key", id="no-model-type"),
        pytest.param({"model_type": "nonsense"}, {}, ValueError, "unknown model_type 'nonsense'", id="bad-model-type"),
        pytest.param(TINY, {"methods": []}, ValueError, "no method given", id="no-methods"),
        pytest.param(TINY, {"rank": 0}, ValueError, "rank must be an integer >= 1, got 0", id="rank-zero"),
        pytest.param(TINY, {"lora_rank": -2}, ValueError, "lora_rank must be an integer >= 1, got -2", id="lora-rank"),
        pytest.param(TINY, {"state_bytes": 0}, ValueError, "state_bytes must be an integer >= 1", id="state-bytes"),
        pytest.param(TINY, {"granularity": "3/4"}, ValueError, "unit fraction", id="not-unit-fraction"),
        pytest.param(TINY, {"granularity": 64, "rank": 2}, ValueError, "rank 2 exceeds the projection unit length 1", id="rank-too-large"),
    ],
)
def test_invalid_settings(config, kwargs, error, message):
    with pytest.raises(error, match=message):
        plan(config, **kwargs)


def test_invalid_json(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json' is not valid JSON"):
        plan(broken)


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'xml'; choose one of text, markdown, csv, json"):
        format_plan([], "xml")


def test_cli_plan_subcommand(capsys):
    from vlorp_lightning.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plan", "--model-config", str(LLAMA2_7B), "--format", "csv", "--methods", "adamw", "projfactor"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("adamw,")
    assert lines[2].startswith("projfactor,")


def test_cli_plan_bad_config(tmp_path, capsys):
    from vlorp_lightning.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plan", "--model-config", str(tmp_path / "absent.json")])
    assert exit_info.value.code == 2
    assert "model config file not found" in capsys.readouterr().err
