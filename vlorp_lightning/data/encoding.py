"""Conversion of validated examples into token ids, with answer-preserving truncation.

Prompt and answer are tokenized separately and their ids concatenated, so the
boundary between them is exact: the supervised positions are precisely the answer
tokens followed by the end-of-sequence token. When a sequence is longer than
``max_length`` tokens, the prompt is shortened, never the answer. A shorter prompt
built from :attr:`Example.fallback_fields` (such as fewer few-shot examples) is tried first,
then the prompt loses tokens from its left end. A row whose answer alone needs
``max_length`` tokens or more is dropped. :class:`EncodingStats` counts both cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

__all__ = ["EncodingStats", "Example", "ExampleEncoder"]


@dataclass(frozen=True)
class Example:
    """One validated row of a reasoning dataset, before tokenization.

    Attributes:
        task: name of the task the row belongs to, such as ``"gsm8k"`` or ``"boolq"``.
        fields: values of the prompt template fields, such as ``{"question": ...}``.
        answer: the text the model is trained to produce after the prompt.
        target: gold final answer compared with generated text (generate tasks).
        options: option labels scored by log-likelihood (choice tasks), such as
            ``("A", "B", "C", "D")``. Empty for generate tasks.
        gold: index of the correct option in ``options``, or -1 for generate tasks.
        answer_prefix: text that precedes the option label in a choice answer, such
            as ``"the correct answer is"``. Empty when the answer is the bare label.
        fallback_fields: field values of shorter prompts (for example with fewer
            few-shot examples), from longest to shortest, tried in order when the
            prompt does not fit into ``max_length`` tokens.
        row: 1-based row number in the source file, kept for messages.
    """

    task: str
    fields: Mapping[str, str]
    answer: str
    target: str = ""
    options: tuple[str, ...] = ()
    gold: int = -1
    answer_prefix: str = ""
    fallback_fields: tuple[Mapping[str, str], ...] = ()
    row: int = 0


@dataclass
class EncodingStats:
    """Row counts of one encoded split.

    Attributes:
        rows: rows kept after encoding.
        truncated: kept rows whose prompt was shortened to fit ``max_length``.
        dropped: rows removed because the answer alone did not fit.
    """

    rows: int = 0
    truncated: int = 0
    dropped: int = 0


@dataclass
class ExampleEncoder:
    """Tokenizes examples into the id lists that the collate functions pad.

    Without a chat template the answer follows the prompt after one space, so plain
    prompt templates end with a cue such as ``"Answer:"``. With a chat template the
    prompt becomes one user message followed by the assistant header, and the answer
    follows the header directly.

    Attributes:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id`` set.
        max_length: maximum tokens of one sequence (prompt, answer and EOS).
        template: ``str.format`` template filled with :attr:`Example.fields`.
        use_chat_template: apply ``tokenizer.chat_template`` when the tokenizer has one.
        system_prompt: optional system message for the chat template. None keeps the
            template's default.
    """

    tokenizer: Any
    max_length: int
    template: str
    use_chat_template: bool = True
    system_prompt: str | None = None
    _chat: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.tokenizer.eos_token_id is None:
            raise ValueError(
                f"Tokenizer {type(self.tokenizer).__name__} has no eos_token. "
                "Set tokenizer.eos_token before building the datamodule."
            )
        self._chat = bool(self.use_chat_template and getattr(self.tokenizer, "chat_template", None))

    @property
    def separator(self) -> str:
        """Text inserted between prompt and answer: ``""`` with a chat template, else ``" "``."""
        return "" if self._chat else " "

    @property
    def uses_chat_template(self) -> bool:
        """Whether prompts go through the tokenizer's chat template."""
        return self._chat

    def prompt_ids(self, fields: Mapping[str, str]) -> list[int]:
        """Fill the template with ``fields`` and tokenize it, through the chat template when enabled."""
        prompt = self.template.format(**fields)
        if self._chat:
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if bos is not None and getattr(self.tokenizer, "add_bos_token", False) and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def text_ids(self, text: str) -> list[int]:
        """Tokenize a piece of answer text without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def answer_ids(self, answer: str) -> list[int]:
        """Tokenize the separator and answer, then append the EOS id."""
        return self.text_ids(self.separator + answer) + [self.tokenizer.eos_token_id]

    def fit_prompt(self, example: Example, reserved: int, stats: EncodingStats) -> list[int] | None:
        """Return prompt ids that leave ``reserved`` tokens free, or None to drop the row.

        The full prompt is used when it fits. Otherwise the prompt of each entry of
        ``example.fallback_fields`` is tried, and the last candidate is cut from the
        left. At least one prompt token must remain, otherwise the row is dropped.
        """
        budget = self.max_length - reserved
        if budget < 1:
            stats.dropped += 1
            return None
        ids = self.prompt_ids(example.fields)
        if len(ids) <= budget:
            return ids
        stats.truncated += 1
        for fields in example.fallback_fields:
            ids = self.prompt_ids(fields)
            if len(ids) <= budget:
                return ids
        return ids[len(ids) - budget :]

    def encode_train(self, example: Example, stats: EncodingStats) -> dict[str, Any] | None:
        """Encode one training row as ``{"input_ids", "prompt_length"}``, or None if dropped."""
        answer = self.answer_ids(example.answer)
        prompt = self.fit_prompt(example, len(answer), stats)
        if prompt is None:
            return None
        stats.rows += 1
        return {"input_ids": prompt + answer, "prompt_length": len(prompt)}

    def encode_generate(self, example: Example, stats: EncodingStats) -> dict[str, Any] | None:
        """Encode one generate-mode row with its prompt, answer ids and gold target."""
        answer = self.answer_ids(example.answer)
        prompt = self.fit_prompt(example, len(answer), stats)
        if prompt is None:
            return None
        stats.rows += 1
        return {"prompt_ids": prompt, "answer_ids": answer, "target": example.target}

    def encode_choice(self, example: Example, stats: EncodingStats) -> dict[str, Any] | None:
        """Encode one choice-mode row.

        Each option sequence is ``prompt + prefix + option label``. The prefix is
        ``separator + answer_prefix`` and the label is preceded by one space when a
        prefix exists, else by the separator. Only the label ids are scored.
        """
        if not example.options:
            raise ValueError(
                f"Task '{example.task}' row {example.row} has no answer options, so it cannot be evaluated in "
                "choice mode. Evaluate the task on rows that define their options."
            )
        answer = self.answer_ids(example.answer)
        if example.answer_prefix:
            prefix = self.text_ids(self.separator + example.answer_prefix)
            options = [self.text_ids(" " + option) for option in example.options]
        else:
            prefix = []
            options = [self.text_ids(self.separator + option) for option in example.options]
        reserved = max(len(answer), len(prefix) + max(len(option) for option in options))
        prompt = self.fit_prompt(example, reserved, stats)
        if prompt is None:
            return None
        stats.rows += 1
        return {
            "prompt_ids": prompt,
            "answer_ids": answer,
            "prefix_ids": prefix,
            "option_ids": options,
            "gold": example.gold,
        }
