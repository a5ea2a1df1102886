"""Shared fixtures for the model tests: one real GGUF conversion per test session."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vlorp_lightning.models.loading import (
    DEFAULT_MODEL,
    gguf_cache_entry,
    load_causal_lm,
    load_tokenizer,
    resolve_model_source,
)


@dataclass
class ConvertedModel:
    """The SmolLM2 GGUF model converted once into a session cache."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    gguf_path: Path
    entry: Path
    records: list[logging.LogRecord] = field(default_factory=list)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> ConvertedModel:
    """Convert the default GGUF model into a session cache (about 20 s on 2 cores).

    A partial entry (``config.json`` only) is planted first, so the single conversion also
    exercises the detection and rebuild of a corrupt cache entry.
    """
    try:
        gguf_path = resolve_model_source(DEFAULT_MODEL)
    except ImportError as err:
        pytest.skip(f"the default model is unavailable: {err}")

    cache = tmp_path_factory.mktemp("vlorp_cache")
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setenv("VLORP_LIGHTNING_CACHE", str(cache))
        entry = gguf_cache_entry(gguf_path)
        entry.mkdir(parents=True)
        (entry / "config.json").write_text("{}")

        handler = _ListHandler()
        logger = logging.getLogger("vlorp_lightning.models.loading")
        previous_level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            model = load_causal_lm(DEFAULT_MODEL)
            tokenizer = load_tokenizer(DEFAULT_MODEL)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(previous_level)

    # Later tests point the cache at the same folder through the ``smollm2_cache`` fixture.
    return ConvertedModel(model.eval(), tokenizer, Path(gguf_path), entry, handler.records)


@pytest.fixture
def smollm2_cache(smollm2: ConvertedModel, monkeypatch: pytest.MonkeyPatch) -> ConvertedModel:
    """Point ``VLORP_LIGHTNING_CACHE`` at the session cache for one test."""
    monkeypatch.setenv("VLORP_LIGHTNING_CACHE", str(smollm2.entry.parent))
    return smollm2
