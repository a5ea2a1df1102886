"""DDP on CPU (gloo): two processes equal one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "ddp_run.py"


def run(devices: int, output: Path, optimizer: str = "projfactor") -> None:
    output.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), str(devices), str(output), optimizer],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]


@pytest.mark.parametrize("optimizer", ["projfactor", "adamw"])
def test_two_processes_match_one(tmp_path, optimizer):
    run(1, tmp_path / "single", optimizer)
    run(2, tmp_path / "ddp", optimizer)
    single = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    assert single["steps"] == rank0["steps"] == rank1["steps"] == 4
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"{name} differs between ranks"
        error = ((value - single["params"][name]).norm() / single["params"][name].norm()).item()
        assert error <= 1e-5, f"{name}: relative error {error:.2e} against the single-process run"
