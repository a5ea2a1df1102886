"""Resolution of the ``tokenizer`` argument of the datamodules."""

from __future__ import annotations

import os
from typing import Union

from transformers import PreTrainedTokenizerBase

__all__ = ["TokenizerSource", "resolve_tokenizer"]

TokenizerSource = Union[str, PreTrainedTokenizerBase]
"""A tokenizer object, or a hub id, local directory or ``.gguf`` file path."""


def resolve_tokenizer(source: TokenizerSource | os.PathLike) -> PreTrainedTokenizerBase:
    """Return a ready tokenizer for ``source``, with a pad token set.

    Strings and paths go to ``vlorp_lightning.models.loading.load_tokenizer``, which
    is imported here so that the data package imports without the models package.
    A tokenizer without a pad token gets ``pad_token = eos_token``, which modifies the
    tokenizer object that was passed in.

    Args:
        source: a ``PreTrainedTokenizerBase``, a hub id, a local directory or a path
            to a ``.gguf`` file.

    Raises:
        ValueError: when the tokenizer has neither a pad token nor an EOS token.
    """
    if isinstance(source, (str, os.PathLike)):
        tokenizer = _load_tokenizer(source)
    else:
        tokenizer = source
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"Tokenizer {type(tokenizer).__name__} has neither a pad token nor an EOS token. "
                "Set tokenizer.eos_token (and optionally pad_token) before building the datamodule."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_tokenizer(source: str | os.PathLike) -> PreTrainedTokenizerBase:
    from vlorp_lightning.models.loading import load_tokenizer

    return load_tokenizer(source)
