"""Causal language models: loading (GGUF included), evaluation and the ``CausalLMModule``."""

from vlorp_lightning.models.causal_lm import CausalLMModule
from vlorp_lightning.models.evaluation import generate_answers, score_choices
from vlorp_lightning.models.loading import (
    DEFAULT_MODEL,
    cache_dir,
    load_causal_lm,
    load_tokenizer,
    resolve_model_source,
)

__all__ = [
    "DEFAULT_MODEL",
    "CausalLMModule",
    "cache_dir",
    "generate_answers",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model_source",
    "score_choices",
]
