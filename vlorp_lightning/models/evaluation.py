"""Evaluation of a causal language model: greedy answer generation and multiple-choice scoring.

Pure functions of a model and tensors, with no Lightning import, so they also serve plain
PyTorch loops and notebooks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["generate_answers", "score_choices"]

IGNORE_INDEX = -100


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int = 32,
) -> list[str]:
    """Generate greedy continuations of a batch of left-padded prompts.

    Decoding is greedy (no sampling, one beam), regardless of the sampling settings in
    ``model.generation_config``.
    A row stops at its first end-of-sequence token (the tokenizer's, plus those in the model's
    generation config) or after ``max_new_tokens`` tokens. Only the new tokens are decoded,
    with special tokens removed. The model runs in eval mode and is put back into its
    previous mode afterwards.

    Args:
        model: a Hugging Face causal LM with ``generate``.
        tokenizer: the tokenizer that produced ``input_ids``, used for decoding.
        input_ids: prompt token ids, shape ``(B, T)``, left-padded.
        attention_mask: shape ``(B, T)``, 1 on prompt tokens and 0 on padding.
        max_new_tokens: maximum number of generated tokens per row. Default: 32.

    Returns:
        ``B`` decoded answers, in batch order.

    Raises:
        ValueError: shapes differ or are not 2-D, ``max_new_tokens < 1``, or a row is
            right-padded (its last position is padding).
    """
    _check_pair(input_ids, attention_mask, "input_ids", "attention_mask")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    right_padded = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
    if right_padded:
        raise ValueError(
            f"Rows {right_padded} of the prompt batch end in padding. Pad prompts on the left "
            "(tokenizer.padding_side = 'left') for batched generation."
        )

    eos_ids = _eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )

    was_training = model.training
    model.eval()
    try:
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        model.train(was_training)

    new_tokens = output[:, input_ids.shape[1] :].tolist()
    answers = []
    for row in new_tokens:
        stop = next((i for i, token in enumerate(row) if token in eos_ids), len(row))
        answers.append(tokenizer.decode(row[:stop], skip_special_tokens=True))
    return answers


def score_choices(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    owner: Tensor,
    num_examples: int,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Score the options of multiple-choice examples by their log-likelihood.

    Each row is one option: the prompt followed by the option text. The score of a row is

    .. math::
        s_i = \\sum_{t \\in A_i} \\log p(x_{i,t} \\mid x_{i,<t}),

    where :math:`A_i` contains the positions with ``labels != -100`` (the first position is
    never scored because no logit predicts it). With ``normalize=True`` the sum is divided
    by :math:`|A_i|`, which favours neither long nor short options (the length-normalized
    variant of lm-evaluation-harness' ``acc_norm`` but per token, not per byte).

    The prediction of example ``b`` is the index, counted among the rows with ``owner == b``
    in row order, of its highest-scoring option. Ties go to the first option.

    Args:
        model: a causal LM whose forward takes ``input_ids``, ``attention_mask`` and
            ``position_ids`` and returns an object with ``logits`` of shape ``(N, T, V)``.
        input_ids: shape ``(N, T)``, one row per option, padded on either side.
        attention_mask: shape ``(N, T)``, 1 on real tokens.
        labels: shape ``(N, T)``, the option's token ids at scored positions, -100 elsewhere.
        owner: shape ``(N,)`` long, the example index in ``[0, num_examples)`` of each row.
        num_examples: number of examples ``B``. Every example must own at least one row.
        normalize: divide each score by its number of scored tokens. Default: ``False``.

    Returns:
        ``(scores, predictions)``: scores of shape ``(N,)`` (float32, in nats; per token when
        ``normalize``), and predictions of shape ``(B,)`` long.

    Raises:
        ValueError: shapes differ, ``owner`` is out of range, an example owns no row, or a
            row has no scored token.
    """
    _check_pair(input_ids, attention_mask, "input_ids", "attention_mask")
    _check_pair(input_ids, labels, "input_ids", "labels")
    if owner.shape != (input_ids.shape[0],):
        raise ValueError(f"owner must have shape ({input_ids.shape[0]},), one entry per row, got {tuple(owner.shape)}.")
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1, got {num_examples}.")
    if owner.numel() and (owner.min() < 0 or owner.max() >= num_examples):
        raise ValueError(f"owner values must lie in [0, {num_examples}), got {owner.tolist()}.")

    target = labels[:, 1:]
    scored = target != IGNORE_INDEX
    counts = scored.sum(dim=1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"Rows {empty} have no scored token (labels are all -100 after the first position).")
    options_per_example = torch.bincount(owner, minlength=num_examples)
    orphans = (options_per_example == 0).nonzero().flatten().tolist()
    if orphans:
        raise ValueError(f"Examples {orphans} own no option row. Every example needs at least one option.")

    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits

    # Only the scored positions go through log_softmax, which keeps the (K, V) float32 copy
    # small: K is the number of option tokens, usually far below N * T.
    selected = logits[:, :-1][scored].float()
    token_log_probs = torch.log_softmax(selected, dim=-1).gather(1, target[scored].unsqueeze(1)).squeeze(1)
    row_index = scored.nonzero()[:, 0]
    scores = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=logits.device)
    scores = scores.index_add(0, row_index, token_log_probs)
    if normalize:
        scores = scores / counts.to(scores.dtype)

    return scores, _argmax_per_owner(scores, owner.to(scores.device), num_examples)


def _argmax_per_owner(scores: Tensor, owner: Tensor, num_examples: int) -> Tensor:
    """Return, per example, the local index of its best row (first one on ties)."""
    one_hot = torch.nn.functional.one_hot(owner, num_examples)
    local_index = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1

    best = torch.full((num_examples,), float("-inf"), dtype=scores.dtype, device=scores.device)
    best = best.scatter_reduce(0, owner, scores, reduce="amax")
    is_best = scores == best[owner]

    sentinel = int(local_index.max()) + 1
    candidates = torch.where(is_best, local_index, torch.full_like(local_index, sentinel))
    predictions = torch.full((num_examples,), sentinel, dtype=torch.long, device=scores.device)
    return predictions.scatter_reduce(0, owner, candidates, reduce="amin")


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for candidate in (tokenizer.eos_token_id, configured):
        if candidate is None:
            continue
        for token in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if token not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError(
            "Neither the tokenizer nor the model's generation config defines an end-of-sequence token. "
            "Set tokenizer.eos_token so generation can stop."
        )
    return ids


def _check_pair(first: Tensor, second: Tensor, first_name: str, second_name: str) -> None:
    if first.dim() != 2:
        raise ValueError(f"{first_name} must be 2-D (batch, sequence), got shape {tuple(first.shape)}.")
    if first.shape != second.shape:
        raise ValueError(
            f"{first_name} and {second_name} must have the same shape, got {tuple(first.shape)} and "
            f"{tuple(second.shape)}."
        )
