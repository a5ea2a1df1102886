"""MemoryMonitor under a real Trainer with a tiny random Llama."""

from __future__ import annotations

import csv
import logging
import math
import warnings
from pathlib import Path
from typing import Dict, List

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tiny_models import TinyLM, loader, tiny_llama, token_batches

from vlorp_lightning import VLoRPConfig, estimate_state_bytes
from vlorp_lightning.callbacks import MemoryMonitor

STATE_KEYS = [
    "memory/optimizer_state_bytes",
    "memory/adamw_equivalent_bytes",
    "memory/state_ratio",
    "memory/momentum_bytes",
    "memory/second_moment_bytes",
    "memory/accumulator_bytes",
    "memory/projection_bytes",
]
COMPONENTS = ["momentum", "second_moment", "accumulator", "projection"]
# Stand-ins for the process readers, so the logged values can be checked exactly.
FAKE_PEAK_RSS, FAKE_RSS = 123_456_789, 98_765_432


def fit(tmp_path: Path, callbacks: List[Callback], **vlorp) -> TinyLM:
    settings = dict(rank=8, lr=1e-3)
    settings.update(vlorp)
    model = TinyLM(tiny_llama(), vlorp=VLoRPConfig(**settings))
    trainer = L.Trainer(
        max_steps=6,
        accumulate_grad_batches=2,
        logger=CSVLogger(tmp_path),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, loader(token_batches(count=24), batch_size=2))
    return model


def optimizer_of(model: TinyLM):
    optimizer = model.trainer.optimizers[0]
    return getattr(optimizer, "_optimizer", optimizer)


def read_metrics(model: TinyLM) -> Dict[str, Dict[int, float]]:
    """``{key: {step: value}}`` from the CSVLogger's metrics.csv; empty when nothing was logged."""
    path = Path(model.trainer.logger.log_dir) / "metrics.csv"
    metrics: Dict[str, Dict[int, float]] = {}
    if not path.exists():
        return metrics
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row.pop("step"))
            for key, value in row.items():
                if value != "":
                    metrics.setdefault(key, {})[step] = float(value)
    return metrics


@pytest.fixture(scope="module")
def projfactor_run(tmp_path_factory):
    """One ProjFactor fit measured every 2 steps, with the process readers patched."""
    monitor = MemoryMonitor(every_n_steps=2, per_layer=True)
    handler = _ListHandler()
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(handler)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("vlorp_lightning.callbacks.memory.peak_rss_bytes", lambda: FAKE_PEAK_RSS)
        patch.setattr("vlorp_lightning.callbacks.memory.current_rss_bytes", lambda: FAKE_RSS)
        try:
            model = fit(tmp_path_factory.mktemp("memory"), [monitor])
        finally:
            lightning_logger.removeHandler(handler)
    return model, monitor, handler.messages


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_documented_keys_in_metrics_csv(projfactor_run):
    model, _, _ = projfactor_run
    metrics = read_metrics(model)
    for key in STATE_KEYS + ["memory/peak_rss_bytes", "memory/rss_bytes"]:
        assert key in metrics, key
        assert sorted(metrics[key]) == [0, 2, 4], key
        assert all(math.isfinite(value) for value in metrics[key].values()), key
    assert not any(key.startswith("memory/cuda_") for key in metrics)


def test_logged_bytes_equal_state_bytes(projfactor_run):
    model, _, _ = projfactor_run
    optimizer = optimizer_of(model)
    state = optimizer.state_bytes()
    metrics = read_metrics(model)
    numel = sum(p.numel() for p in model.parameters())
    for step in (0, 2, 4):
        assert metrics["memory/optimizer_state_bytes"][step] == state["total"]["total"]
        assert metrics["memory/adamw_equivalent_bytes"][step] == 2 * numel * 4
        assert metrics["memory/state_ratio"][step] == pytest.approx(state["total"]["total"] / (8 * numel))
        for component in COMPONENTS:
            assert metrics[f"memory/{component}_bytes"][step] == state["total"][component], component


def test_per_layer_bytes_equal_state_bytes(projfactor_run):
    model, _, _ = projfactor_run
    state = optimizer_of(model).state_bytes()
    metrics = read_metrics(model)
    per_layer = {key[len("memory/state_bytes/") :] for key in metrics if key.startswith("memory/state_bytes/")}
    assert per_layer == set(state) - {"total"}
    for name in per_layer:
        assert metrics[f"memory/state_bytes/{name}"][4] == state[name]["total"], name


def test_process_readers_are_logged(projfactor_run):
    model, monitor, _ = projfactor_run
    metrics = read_metrics(model)
    assert set(metrics["memory/peak_rss_bytes"].values()) == {FAKE_PEAK_RSS}
    assert set(metrics["memory/rss_bytes"].values()) == {FAKE_RSS}
    assert monitor.last_metrics["memory/rss_bytes"] == FAKE_RSS


def test_summary_prediction_equals_measurement(projfactor_run):
    model, monitor, _ = projfactor_run
    state = optimizer_of(model).state_bytes()
    config = model.vlorp_config
    estimate = estimate_state_bytes(model, rank=config.rank, targets=config.targets)
    summary = monitor.summary
    assert summary["optimizer"] == "ProjFactor"
    assert summary["mismatches"] == []
    assert summary["rows"]["total"] == {"predicted": estimate.total_bytes, "measured": state["total"]["total"]}
    assert summary["rows"]["projected"]["predicted"] == summary["rows"]["projected"]["measured"]
    assert summary["rows"]["dense"]["predicted"] == summary["rows"]["dense"]["measured"]
    assert summary["adamw_equivalent_bytes"] == estimate.adamw_bytes
    assert summary["ratio"] == pytest.approx(summary["predicted_ratio"])


def test_summary_table_is_logged(projfactor_run):
    _, _, messages = projfactor_run
    tables = [message for message in messages if message.startswith("MemoryMonitor: optimizer state of ProjFactor")]
    assert len(tables) == 1
    assert "AdamW equivalent" in tables[0]
    assert "ratio to AdamW" in tables[0]


@pytest.mark.parametrize(
    "vlorp",
    [
        pytest.param(dict(compress_gradients=False, granularity=2, rank=4), id="uncompressed-c2"),
        pytest.param(dict(granularity="1/2", rank=4, state_dtype="bfloat16"), id="c1/2-bf16"),
    ],
)
def test_prediction_matches_other_settings(tmp_path, vlorp):
    monitor = MemoryMonitor(every_n_steps=5)
    model = fit(tmp_path, [monitor], **vlorp)
    assert monitor.summary["mismatches"] == []
    assert monitor.summary["rows"]["total"]["predicted"] == optimizer_of(model).state_bytes()["total"]["total"]
    assert sorted(read_metrics(model)["memory/optimizer_state_bytes"]) == [0, 5]


def test_adamw_model_warns_once(tmp_path):
    monitor = MemoryMonitor(every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fit(tmp_path, [monitor], optimizer="adamw")
    messages = [str(w.message) for w in caught if "MemoryMonitor" in str(w.message)]
    assert len(messages) == 1
    assert "the optimizer AdamW projects no parameter" in messages[0]
    assert monitor.summary is None
    assert not any(key.startswith("memory/") for key in read_metrics(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peaks_are_logged(tmp_path):
    monitor = MemoryMonitor(every_n_steps=1)
    model = TinyLM(tiny_llama(), vlorp=VLoRPConfig(rank=8))
    trainer = L.Trainer(
        max_steps=3, logger=CSVLogger(tmp_path), callbacks=[monitor], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, accelerator="cuda", devices=1,
    )  # fmt: skip
    trainer.fit(model, loader(token_batches(count=6), batch_size=2))
    metrics = read_metrics(model)
    for key in ("memory/cuda_max_allocated_bytes", "memory/cuda_max_reserved_bytes"):
        assert sorted(metrics[key]) == [0, 1, 2], key
        assert all(value > 0 for value in metrics[key].values()), key
    assert "memory/rss_bytes" not in metrics


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(dict(every_n_steps=0), r"MemoryMonitor: every_n_steps=0 is invalid; pass an integer >= 1", id="zero"),
        pytest.param(dict(every_n_steps="5"), r"MemoryMonitor: every_n_steps='5' is invalid", id="string"),
        pytest.param(dict(per_layer=1), r"MemoryMonitor: per_layer=1 is invalid; pass True or False", id="per-layer"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        MemoryMonitor(**kwargs)
