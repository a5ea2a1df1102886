"""Tests of greedy generation and multiple-choice scoring against independent references."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlorp_lightning.models.evaluation import generate_answers, score_choices

QUESTIONS = [
    "What is 2 + 2? Answer with a number.",
    "Hi",
    "Write the first three letters of the English alphabet, separated by commas, and nothing else.",
]


def _chat_prompt_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def _greedy_reference(model, prompt: list[int], eos_id: int, max_new_tokens: int) -> list[int]:
    """Greedy decoding by full forward passes, without a KV cache."""
    ids = list(prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == eos_id:
                break
            ids.append(token)
            new.append(token)
    return new


def _choice_batch(tokenizer):
    """Two examples (3 and 2 options) as prompt + option rows with option-only labels."""
    examples = [
        ("The capital of France is", [" Paris", " London", " a small green frog"]),
        ("Two plus two equals", [" four", " seven hundred and twelve"]),
    ]
    rows, labels, owner, option_ids = [], [], [], []
    for index, (prompt, options) in enumerate(examples):
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        for option in options:
            ids = tokenizer(option, add_special_tokens=False).input_ids
            rows.append(prompt_ids + ids)
            labels.append([-100] * len(prompt_ids) + ids)
            owner.append(index)
            option_ids.append((prompt_ids, ids))
    return rows, labels, torch.tensor(owner), option_ids


def _reference_scores(model, option_ids) -> torch.Tensor:
    """Sum of option-token log-probs, one unpadded option at a time."""
    scores = []
    with torch.no_grad():
        for prompt_ids, ids in option_ids:
            full = torch.tensor([prompt_ids + ids])
            log_probs = torch.log_softmax(model(full).logits[0].double(), dim=-1)
            total = sum(float(log_probs[len(prompt_ids) + k - 1, token]) for k, token in enumerate(ids))
            scores.append(total)
    return torch.tensor(scores, dtype=torch.float64)


def _labels_tensor(labels: list[list[int]], width: int, side: str) -> torch.Tensor:
    out = torch.full((len(labels), width), -100, dtype=torch.long)
    for i, row in enumerate(labels):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        out[i, span] = torch.tensor(row)
    return out


class _ConstantLM(nn.Module):
    """A causal LM stand-in whose logits are all zero, so every option scores the same."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


def test_generate_batched_matches_single(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    prompts = [_chat_prompt_ids(tokenizer, question) for question in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)

    input_ids, attention_mask = _pad(prompts, tokenizer.pad_token_id, side="left")
    batched = generate_answers(model, tokenizer, input_ids, attention_mask, max_new_tokens=16)

    single = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        single.extend(generate_answers(model, tokenizer, ids, torch.ones_like(ids), max_new_tokens=16))
    assert batched == single
    assert all(answer.strip() for answer in batched)


def test_generate_matches_greedy_reference(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    prompt = _chat_prompt_ids(tokenizer, QUESTIONS[1])
    ids = torch.tensor([prompt])

    answer = generate_answers(model, tokenizer, ids, torch.ones_like(ids), max_new_tokens=40)

    reference = _greedy_reference(model, prompt, tokenizer.eos_token_id, max_new_tokens=40)
    assert len(reference) < 40, "the reference should stop at the end-of-sequence token"
    assert answer == [tokenizer.decode(reference, skip_special_tokens=True)]
    assert "<|im_end|>" not in answer[0]


def test_generate_restores_training_mode(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    ids = torch.tensor([_chat_prompt_ids(tokenizer, QUESTIONS[0])])
    model.train()
    try:
        generate_answers(model, tokenizer, ids, torch.ones_like(ids), max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_generate_rejects_right_padding(smollm2):
    tokenizer = smollm2.tokenizer
    prompts = [_chat_prompt_ids(tokenizer, question) for question in (QUESTIONS[1], QUESTIONS[0])]
    input_ids, attention_mask = _pad(prompts, tokenizer.pad_token_id, side="right")

    with pytest.raises(ValueError, match=r"Rows \[0\] of the prompt batch end in padding.*padding_side = 'left'"):
        generate_answers(smollm2.model, tokenizer, input_ids, attention_mask)


@pytest.mark.parametrize(
    ("max_new_tokens", "mask_shape", "match"),
    [
        pytest.param(0, (1, 5), "max_new_tokens must be at least 1, got 0", id="zero-tokens"),
        pytest.param(4, (1, 4), r"same shape, got \(1, 5\) and \(1, 4\)", id="shape-mismatch"),
    ],
)
def test_generate_invalid_arguments(smollm2, max_new_tokens, mask_shape, match):
    ids = torch.ones((1, 5), dtype=torch.long)

    with pytest.raises(ValueError, match=match):
        generate_answers(smollm2.model, smollm2.tokenizer, ids, torch.ones(mask_shape), max_new_tokens)


@pytest.mark.parametrize("side", ["right", "left"])
def test_score_choices_matches_reference(smollm2, side):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    rows, labels, owner, option_ids = _choice_batch(tokenizer)
    input_ids, attention_mask = _pad(rows, tokenizer.pad_token_id, side=side)
    label_tensor = _labels_tensor(labels, input_ids.shape[1], side=side)

    with torch.no_grad():
        scores, predictions = score_choices(model, input_ids, attention_mask, label_tensor, owner, num_examples=2)

    reference = _reference_scores(model, option_ids)
    torch.testing.assert_close(scores.double(), reference, rtol=1e-5, atol=2e-4)
    assert predictions.tolist() == [int(reference[:3].argmax()), int(reference[3:].argmax())]
    assert predictions.tolist() == [0, 0]


def test_score_choices_normalized(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    rows, labels, owner, option_ids = _choice_batch(tokenizer)
    input_ids, attention_mask = _pad(rows, tokenizer.pad_token_id, side="right")
    label_tensor = _labels_tensor(labels, input_ids.shape[1], side="right")

    with torch.no_grad():
        scores, predictions = score_choices(
            model, input_ids, attention_mask, label_tensor, owner, num_examples=2, normalize=True
        )

    lengths = torch.tensor([len(ids) for _, ids in option_ids], dtype=torch.float64)
    reference = _reference_scores(model, option_ids) / lengths
    torch.testing.assert_close(scores.double(), reference, rtol=1e-5, atol=1e-4)
    assert predictions.tolist() == [int(reference[:3].argmax()), int(reference[3:].argmax())]


def test_score_choices_interleaved_owner(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    rows, labels, owner, _ = _choice_batch(tokenizer)
    order = [3, 0, 4, 1, 2]
    input_ids, attention_mask = _pad(rows, tokenizer.pad_token_id, side="right")
    label_tensor = _labels_tensor(labels, input_ids.shape[1], side="right")

    with torch.no_grad():
        contiguous, _ = score_choices(model, input_ids, attention_mask, label_tensor, owner, 2)
        scores, predictions = score_choices(
            model, input_ids[order], attention_mask[order], label_tensor[order], owner[order], 2
        )

    torch.testing.assert_close(scores, contiguous[order], rtol=1e-5, atol=2e-4)
    assert predictions.tolist() == [0, 0]


def test_score_choices_ties_pick_first():
    input_ids = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 6], [1, 5, 7], [1, 5, 8]])
    labels = torch.tensor([[-100, -100, 3], [-100, -100, 4], [-100, 5, 6], [-100, 5, 7], [-100, 5, 8]])
    owner = torch.tensor([1, 1, 0, 0, 0])

    scores, predictions = score_choices(_ConstantLM(16), input_ids, torch.ones_like(input_ids), labels, owner, 2)

    uniform = torch.log(torch.tensor(1 / 16))
    torch.testing.assert_close(scores, torch.tensor([1, 1, 2, 2, 2]) * uniform)
    assert predictions.tolist() == [0, 0]


@pytest.mark.parametrize(
    ("owner", "labels_row0", "num_examples", "match"),
    [
        pytest.param([0, 2], [-100, 2, 3], 2, r"owner values must lie in \[0, 2\)", id="owner-out-of-range"),
        pytest.param([0, 0], [-100, 2, 3], 2, r"Examples \[1\] own no option row", id="example-without-option"),
        pytest.param([0, 1], [-100, -100, -100], 2, r"Rows \[0\] have no scored token", id="row-without-label"),
        pytest.param([0, 1, 1], [-100, 2, 3], 2, r"owner must have shape \(2,\)", id="owner-shape"),
        pytest.param([0, 1], [-100, 2, 3], 0, "num_examples must be at least 1, got 0", id="no-examples"),
    ],
)
def test_score_choices_invalid_input(owner, labels_row0, num_examples, match):
    input_ids = torch.tensor([[1, 2, 3], [1, 2, 4]])
    labels = torch.tensor([labels_row0, [-100, -100, 4]])

    with pytest.raises(ValueError, match=match):
        score_choices(_ConstantLM(8), input_ids, torch.ones_like(input_ids), labels, torch.tensor(owner), num_examples)


def test_score_choices_label_shape_mismatch():
    input_ids = torch.tensor([[1, 2, 3]])

    with pytest.raises(ValueError, match=r"input_ids and labels must have the same shape"):
        score_choices(_ConstantLM(8), input_ids, torch.ones_like(input_ids), input_ids[:, :2], torch.tensor([0]), 1)
