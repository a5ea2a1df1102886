"""Every shipped YAML config parses with the real CLI and instantiates its classes."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlorp_lightning.cli import VLoRPLightningCLI
from vlorp_lightning.mixin import VLoRPMixin

import lightning as L

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {path.relative_to(path.parents[1] if path.parent.name == "paper" else path.parent).as_posix() for path in CONFIGS}
    assert {"quickstart.yaml", "gsm8k.yaml", "commonsense.yaml", "mmlu.yaml"} <= names
    assert {f"paper/llama2-7b-{task}.yaml" for task in ("commonsense", "mmlu", "gsm8k")} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_instantiates(path, tmp_path):
    # The CLI builds model, datamodule, trainer and callbacks without loading weights or
    # data (both happen in setup hooks); GPU configs are moved to the CPU for the check.
    cli = VLoRPLightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        auto_configure_optimizers=False,
        args=["--config", str(path), "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}"],
    )
    assert isinstance(cli.model, VLoRPMixin)
    assert isinstance(cli.datamodule, L.LightningDataModule)
    assert cli.model.model is None, "the config must not load weights before fit"
    assert cli.model.vlorp_config.lr > 0
