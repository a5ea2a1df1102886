"""Every shipped YAML config runs through the real CLI.

The CPU configs run ``fit`` for two optimizer steps with tiny overrides: a random-config
Llama with SmolLM2's tokenizer replaces the pretrained weights, and row counts are
cut to a few. The GPU configs (``configs/paper/``) are checked with ``--print_config``.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml

from vlorp_lightning.cli import VLoRPLightningCLI, main
from vlorp_lightning.mixin import VLoRPMixin

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
GPU_CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
SHARED_DATA = ROOT.parent / "shared" / "data"


def test_shipped_configs_exist():
    assert {p.name for p in CPU_CONFIGS} >= {"quickstart.yaml", "gsm8k.yaml", "commonsense.yaml", "mmlu.yaml"}
    assert {p.name for p in GPU_CONFIGS} == {f"llama2-7b-{t}.yaml" for t in ("commonsense", "mmlu", "gsm8k")}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, data_tokenizer):
    """A 2-layer random Llama saved with SmolLM2's tokenizer, loadable as a model source."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(data_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    data_tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=[p.stem for p in CPU_CONFIGS])
def test_cpu_config_fits_two_steps(path, tmp_path, tiny_model_dir, monkeypatch):
    config = yaml.safe_load(path.read_text())
    data_dir = config["data"]["init_args"].get("data_dir")
    if data_dir and data_dir.startswith("../shared/data") and not SHARED_DATA.is_dir():
        pytest.skip(f"{path.name} reads {data_dir}, which is absent")
    monkeypatch.chdir(ROOT)  # the configs name data folders relative to the repository root
    monkeypatch.setattr(sys, "argv", ["vlorp-lightning"])  # pytest's own arguments are not the CLI's
    arguments = [
        "fit",
        "--config", str(path),
        "--trainer.max_steps=2",
        "--trainer.accumulate_grad_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=1",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.init_args.model={tiny_model_dir}",
        "--model.init_args.max_new_tokens=2",
        "--data.init_args.max_train_rows=8",
        "--data.init_args.max_eval_rows=2",
        "--data.init_args.batch_size=2",
        "--data.init_args.eval_batch_size=2",
    ]  # fmt: skip
    if path.stem == "quickstart":
        arguments += ["--data.init_args.train_size=8", "--data.init_args.test_size=2"]
    cli = VLoRPLightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=arguments,
    )
    assert isinstance(cli.model, VLoRPMixin)
    assert cli.trainer.global_step == 2
    assert cli.trainer.optimizers[0].global_step == 2


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.stem for p in GPU_CONFIGS])
def test_gpu_config_prints(path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["vlorp-lightning"])
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(output.getvalue())
    vlorp = printed["model"]["init_args"]["vlorp"]
    assert (vlorp["granularity"], vlorp["rank"], vlorp["scale"], vlorp["update_proj_gap"]) == (256, 1, 0.25, 30)
    assert printed["trainer"]["accumulate_grad_batches"] * printed["data"]["init_args"]["batch_size"] == 512
    assert printed["model"]["init_args"]["gradient_checkpointing"] is True
