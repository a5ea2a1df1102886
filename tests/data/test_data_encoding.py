"""Shared datamodule behaviour: truncation, padding, labels, templates, arguments, Lightning fit."""

from __future__ import annotations

import copy
import json
import logging

import lightning as L
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlorp_lightning.data import GSM8KDataModule, ProceduralReasoningDataModule
from vlorp_lightning.data.encoding import ExampleEncoder

LONG_QUESTION = "A farmer counts " + ", ".join(f"{i} sheep" for i in range(1, 60)) + ". How many groups did he count?"
SHORT_ANSWER = "He counted 59 groups.\n#### 59"
LONG_ANSWER = "Counting: " + " + ".join("1" for _ in range(80)) + " = 80.\n#### 80"


@pytest.fixture
def data_tiny_gsm8k(tmp_path):
    """A GSM8K-format folder whose train and test rows have known lengths."""
    rows = [{"question": LONG_QUESTION, "answer": SHORT_ANSWER}, {"question": "What is 1 + 1?", "answer": LONG_ANSWER}]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return tmp_path


def answer_ids(tokenizer, answer, separator=""):
    return tokenizer(separator + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def chat_prompt_ids(tokenizer, text):
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_long_prompt_is_cut_from_the_left(data_tiny_gsm8k, data_tokenizer, caplog):
    short = answer_ids(data_tokenizer, SHORT_ANSWER)
    long = answer_ids(data_tokenizer, LONG_ANSWER)
    full_prompt = chat_prompt_ids(data_tokenizer, LONG_QUESTION)
    max_length = len(short) + 6
    assert len(long) >= max_length, "the long answer must not fit, so its row is dropped"

    datamodule = GSM8KDataModule(data_dir=str(data_tiny_gsm8k), tokenizer=data_tokenizer, max_length=max_length, val_fraction=0.0)
    with caplog.at_level(logging.INFO, logger="vlorp_lightning.data.base"):
        batches = list(datamodule.train_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert batch["input_ids"].shape == (1, max_length)
    assert batch["input_ids"][0].tolist() == full_prompt[-6:] + short
    assert batch["labels"][0].tolist() == [-100] * 6 + short

    stats = datamodule.encoding_stats["train"]
    assert (stats.rows, stats.truncated, stats.dropped) == (1, 1, 1)
    lines = [record.getMessage() for record in caplog.records if "GSM8KDataModule train" in record.getMessage()]
    assert lines == [f"GSM8KDataModule train: 1 rows encoded, 1 prompts truncated, 1 rows dropped (answer does not fit max_length={max_length})."]


def test_no_training_row_left_raises(data_tiny_gsm8k, data_tokenizer):
    datamodule = GSM8KDataModule(data_dir=str(data_tiny_gsm8k), tokenizer=data_tokenizer, max_length=4, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"no training row is left, because 2 rows were dropped .* max_length=4 tokens\. Increase max_length"):
        datamodule.train_dataloader()


def test_padding_is_never_supervised_when_pad_equals_eos(data_tiny_gsm8k, data_tokenizer):
    assert data_tokenizer.pad_token_id == data_tokenizer.eos_token_id
    datamodule = GSM8KDataModule(data_dir=str(data_tiny_gsm8k), tokenizer=data_tokenizer, batch_size=2, val_fraction=0.0)
    batch = next(iter(datamodule.train_dataloader()))
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.min() < lengths.max(), "the two rows differ in length, so one is padded"
    eos = data_tokenizer.eos_token_id
    for row in range(2):
        supervised = batch["labels"][row] != -100
        assert int((batch["labels"][row][supervised] == eos).sum()) == 1, "exactly the final EOS is supervised"
        assert not supervised[lengths[row]:].any()
        assert (batch["input_ids"][row][lengths[row]:] == data_tokenizer.pad_token_id).all()


def test_train_on_prompt_supervises_every_real_token(data_tiny_gsm8k, data_tokenizer):
    datamodule = GSM8KDataModule(data_dir=str(data_tiny_gsm8k), tokenizer=data_tokenizer, batch_size=2, train_on_prompt=True, val_fraction=0.0)
    batch = next(iter(datamodule.train_dataloader()))
    real = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == -100).all()


def test_plain_template_puts_one_space_before_answer(data_tiny_gsm8k, data_tokenizer):
    datamodule = GSM8KDataModule(data_dir=str(data_tiny_gsm8k), tokenizer=data_tokenizer, use_chat_template=False, max_eval_rows=1)
    batch = next(iter(datamodule.test_dataloader()[0]))
    prompt = data_tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0] == 1])
    assert prompt == f"Question: {LONG_QUESTION}\nAnswer:"
    supervised = batch["lm_labels"][0] != -100
    assert data_tokenizer.decode(batch["lm_input_ids"][0][supervised]) == " " + SHORT_ANSWER + data_tokenizer.eos_token


def test_plain_prompt_gets_bos_when_tokenizer_adds_it(data_tokenizer):
    tokenizer = copy.deepcopy(data_tokenizer)
    tokenizer.add_bos_token = True
    plain = ExampleEncoder(tokenizer, max_length=64, template="Q: {question}\nAnswer:", use_chat_template=False)
    ids = plain.prompt_ids({"question": "2 + 2?"})
    assert ids == [tokenizer.bos_token_id] + data_tokenizer("Q: 2 + 2?\nAnswer:", add_special_tokens=False)["input_ids"]
    chat = ExampleEncoder(tokenizer, max_length=64, template="{question}")
    assert chat.prompt_ids({"question": "2 + 2?"}) == chat_prompt_ids(data_tokenizer, "2 + 2?"), "chat templates carry their own BOS"


def test_custom_template_and_system_prompt(data_tiny_gsm8k, data_tokenizer):
    datamodule = GSM8KDataModule(
        data_dir=str(data_tiny_gsm8k), tokenizer=data_tokenizer, prompt_template="Solve: {question}", system_prompt="Be brief.", max_eval_rows=1
    )
    batch = next(iter(datamodule.test_dataloader()[0]))
    prompt = data_tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0] == 1])
    expected = data_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Solve: {LONG_QUESTION}"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == expected


def test_generation_prompts_are_left_padded(data_tiny_gsm8k, data_tokenizer):
    datamodule = GSM8KDataModule(data_dir=str(data_tiny_gsm8k), tokenizer=data_tokenizer, eval_batch_size=2)
    batch = next(iter(datamodule.test_dataloader()[0]))
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1)
    width = mask.shape[1]
    for row in range(2):
        assert mask[row].tolist() == [0] * (width - lengths[row]) + [1] * lengths[row]
    assert batch["targets"] == ["59", "80"]


def test_pad_token_is_set_from_eos(data_tiny_gsm8k, data_tokenizer):
    tokenizer = copy.deepcopy(data_tokenizer)
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None
    datamodule = GSM8KDataModule(data_dir=str(data_tiny_gsm8k), tokenizer=tokenizer, val_fraction=0.0)
    next(iter(datamodule.train_dataloader()))
    assert tokenizer.pad_token == tokenizer.eos_token


def test_gguf_path_tokenizer_is_loaded(data_tiny_gsm8k, data_smollm2_gguf, data_tokenizer):
    datamodule = GSM8KDataModule(data_dir=str(data_tiny_gsm8k), tokenizer=str(data_smollm2_gguf), val_fraction=0.0)
    batch = next(iter(datamodule.train_dataloader()))
    reference = GSM8KDataModule(data_dir=str(data_tiny_gsm8k), tokenizer=data_tokenizer, val_fraction=0.0)
    assert torch.equal(batch["input_ids"], next(iter(reference.train_dataloader()))["input_ids"])
    assert datamodule.hparams["tokenizer"] == str(data_smollm2_gguf)


def test_missing_tokenizer_raises_at_dataloader(data_tiny_gsm8k):
    datamodule = GSM8KDataModule(data_dir=str(data_tiny_gsm8k))
    datamodule.setup("fit")
    with pytest.raises(ValueError, match=r"a tokenizer is required to build dataloaders\. Pass tokenizer="):
        datamodule.train_dataloader()


def test_zero_val_fraction_disables_validation(data_tiny_gsm8k, data_tokenizer):
    datamodule = GSM8KDataModule(data_dir=str(data_tiny_gsm8k), tokenizer=data_tokenizer, val_fraction=0.0)
    assert datamodule.val_dataloader() == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"batch_size": 0}, r"GSM8KDataModule: batch_size must be >= 1, got 0", id="batch_size"),
        pytest.param({"eval_batch_size": -1}, r"eval_batch_size must be >= 1, got -1", id="eval_batch_size"),
        pytest.param({"max_length": 1}, r"max_length must be >= 2 tokens .*got 1", id="max_length"),
        pytest.param({"num_workers": -1}, r"num_workers must be >= 0, got -1", id="num_workers"),
        pytest.param({"max_train_rows": 0}, r"max_train_rows must be None or >= 1, got 0", id="max_train_rows"),
        pytest.param({"max_eval_rows": 0}, r"max_eval_rows must be None or >= 1, got 0", id="max_eval_rows"),
        pytest.param({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\), got 1.0", id="val_fraction"),
        pytest.param({"prompt_template": "Q: {question} {hint}"}, r"prompt_template uses unknown fields \['hint'\]\. Use only the available fields \['question'\]", id="template-field"),
        pytest.param({"prompt_template": "Q: {question"}, r"invalid prompt_template 'Q: \{question'", id="template-syntax"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GSM8KDataModule(data_dir="unused", **kwargs)


class _TinyCausalLM(L.LightningModule):
    """Consumes the batch contract the way the project's causal-LM module does."""

    def __init__(self, vocab_size):
        super().__init__()
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        self.net = LlamaForCausalLM(config)
        self.seen_tasks = []

    def training_step(self, batch, batch_idx):
        return self.net(**batch).loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.seen_tasks.append((dataloader_idx, batch["task"]))
        loss = self.net(input_ids=batch["lm_input_ids"], attention_mask=batch["lm_attention_mask"], labels=batch["lm_labels"]).loss
        self.log("val_loss", loss, batch_size=batch["lm_input_ids"].shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_runs_on_the_batches(data_tokenizer, tmp_path):
    datamodule = ProceduralReasoningDataModule(
        tasks=["chain_sum", "basic_arithmetic"], tokenizer=data_tokenizer, train_size=8, val_size=2, test_size=2, batch_size=4
    )
    model = _TinyCausalLM(len(data_tokenizer))
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 2
    assert sorted(set(model.seen_tasks)) == [(0, "chain_sum"), (1, "basic_arithmetic")]
