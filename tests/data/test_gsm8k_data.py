"""GSM8KDataModule on the real GSM8K files: batch contract, supervision, scoring, bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from vlorp_lightning.data import GSM8KDataModule

TRAIN_KEYS = {"input_ids", "attention_mask", "labels"}
GENERATE_KEYS = {"mode", "task", "input_ids", "attention_mask", "targets", "lm_input_ids", "lm_attention_mask", "lm_labels"}


@pytest.fixture(scope="module")
def data_gsm8k_rows(data_shared_dir):
    """Raw GSM8K rows per split, read with json as an independent reference."""
    rows = {}
    for split in ("train", "test"):
        with open(data_shared_dir / "gsm8k" / f"{split}.jsonl", encoding="utf-8") as handle:
            rows[split] = [json.loads(line) for line in handle]
    return rows


def chat_prompt(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def split_supervised(tokenizer, input_ids, attention_mask, labels):
    """Decode the unsupervised and the supervised real tokens of one row."""
    real = attention_mask == 1
    supervised = labels != -100
    assert torch.equal(labels[supervised], input_ids[supervised])
    assert not (supervised & ~real).any(), "padding must never be supervised"
    positions = supervised.nonzero().flatten().tolist()
    length = int(real.sum())
    assert positions == list(range(length - len(positions), length)), "supervised tokens must end the sequence"
    return tokenizer.decode(input_ids[real & ~supervised]), tokenizer.decode(input_ids[supervised])


def test_train_batches_supervise_answer_only(data_shared_dir, data_tokenizer, data_gsm8k_rows):
    datamodule = GSM8KDataModule(
        data_dir=str(data_shared_dir / "gsm8k"), tokenizer=data_tokenizer, batch_size=3, max_train_rows=6, max_eval_rows=2
    )
    datamodule.setup("fit")
    question_of = {row["answer"].strip(): row["question"].strip() for row in data_gsm8k_rows["train"]}
    eos = data_tokenizer.eos_token

    seen = 0
    for batch in datamodule.train_dataloader():
        assert set(batch) == TRAIN_KEYS
        assert all(tensor.dtype == torch.long for tensor in batch.values())
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        for row in range(batch["input_ids"].shape[0]):
            prompt, answer = split_supervised(data_tokenizer, batch["input_ids"][row], batch["attention_mask"][row], batch["labels"][row])
            assert answer.endswith(eos)
            gold_answer = answer[: -len(eos)]
            assert gold_answer in question_of
            assert prompt == chat_prompt(data_tokenizer, question_of[gold_answer])
            seen += 1
    assert seen == 6


def test_validation_batches_follow_generate_contract(data_shared_dir, data_tokenizer, data_gsm8k_rows):
    datamodule = GSM8KDataModule(data_dir=str(data_shared_dir / "gsm8k"), tokenizer=data_tokenizer, max_eval_rows=3, eval_batch_size=3)
    datamodule.setup("validate")
    loaders = datamodule.val_dataloader()
    assert datamodule.eval_tasks == ["gsm8k"]
    assert datamodule.task_mode("gsm8k") == "generate"
    assert len(loaders) == 1

    batch = next(iter(loaders[0]))
    assert set(batch) == GENERATE_KEYS
    assert batch["mode"] == "generate"
    assert batch["task"] == "gsm8k"
    assert (batch["attention_mask"][:, -1] == 1).all(), "generation prompts are left-padded"
    assert (batch["lm_attention_mask"][:, 0] == 1).all(), "teacher-forced rows are right-padded"

    solution_of_prompt = {chat_prompt(data_tokenizer, row["question"].strip()): row["answer"] for row in data_gsm8k_rows["train"]}
    for row, target in enumerate(batch["targets"]):
        prompt = data_tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row] == 1])
        assert prompt in solution_of_prompt, "each validation prompt is a training question in the chat template"
        solution = solution_of_prompt[prompt]
        assert target == solution.split("####")[-1].strip().replace(",", "")
        lm_prompt, lm_answer = split_supervised(
            data_tokenizer, batch["lm_input_ids"][row], batch["lm_attention_mask"][row], batch["lm_labels"][row]
        )
        assert lm_prompt == prompt
        assert lm_answer == solution.strip() + data_tokenizer.eos_token


def test_validation_is_carved_from_train(data_shared_dir, data_tokenizer):
    datamodule = GSM8KDataModule(data_dir=str(data_shared_dir / "gsm8k"), tokenizer=data_tokenizer, val_fraction=0.01)
    datamodule.setup("fit")
    validation = datamodule._eval_rows["validate"]["gsm8k"]
    train_questions = {example.fields["question"] for example in datamodule._train_rows}
    assert len(validation) == 75  # ceil(0.01 * 7473)
    assert len(datamodule._train_rows) == 7473 - 75
    assert not train_questions & {example.fields["question"] for example in validation}

    again = GSM8KDataModule(data_dir=str(data_shared_dir / "gsm8k"), val_fraction=0.01)
    again.setup("validate")
    assert [example.row for example in again._eval_rows["validate"]["gsm8k"]] == [example.row for example in validation]


def test_accuracy_from_fixed_outputs(data_shared_dir, data_tokenizer, data_gsm8k_rows):
    datamodule = GSM8KDataModule(data_dir=str(data_shared_dir / "gsm8k"), tokenizer=data_tokenizer, max_eval_rows=5, eval_batch_size=2)
    datamodule.setup("test")
    targets = [target for batch in datamodule.test_dataloader()[0] for target in batch["targets"]]
    expected = [row["answer"].split("####")[-1].strip().replace(",", "") for row in data_gsm8k_rows["test"][:5]]
    assert targets == expected == ["18", "3", "70000", "540", "20"]

    outputs = [
        "She sells 9 eggs for $2 each.\n#### 18",  # right, GSM8K style
        "The answer is 3 bolts.",  # right, "The answer is"
        "Profit = 200,000 - 130,000 = 70,000 dollars",  # right, last number with separators
        "He runs 3 * 3 * 60 = 500 meters. The answer is 500.",  # wrong
        "I am not sure.",  # wrong: no number
    ]
    correct = [datamodule.is_correct("gsm8k", output, target) for output, target in zip(outputs, targets)]
    assert correct == [True, True, True, False, False]
    assert sum(correct) / len(correct) == pytest.approx(3 / 5)


def test_is_correct_rejects_unknown_task(data_shared_dir):
    datamodule = GSM8KDataModule(data_dir=str(data_shared_dir / "gsm8k"))
    with pytest.raises(ValueError, match=r"unknown evaluation task 'gsm8kk'\. Did you mean \['gsm8k'\]"):
        datamodule.is_correct("gsm8kk", "18", "18")


def test_shuffle_is_deterministic_by_seed(data_shared_dir, data_tokenizer):
    def first_batches(seed, num_workers=0):
        datamodule = GSM8KDataModule(
            data_dir=str(data_shared_dir / "gsm8k"),
            tokenizer=data_tokenizer,
            batch_size=4,
            max_train_rows=16,
            seed=seed,
            num_workers=num_workers,
        )
        datamodule.setup("fit")
        return [batch["input_ids"] for batch in datamodule.train_dataloader()]

    reference = first_batches(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(reference, first_batches(seed=3)))
    assert all(torch.equal(a, b) for a, b in zip(reference, first_batches(seed=3, num_workers=1)))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(reference, first_batches(seed=4)))


def test_hub_path_loads_openai_gsm8k(monkeypatch, data_tokenizer):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return [{"question": f"{split} question {i}?", "answer": f"Add.\n#### {i}"} for i in range(4)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    datamodule = GSM8KDataModule(data_dir=None, tokenizer=data_tokenizer, val_fraction=0.25)
    datamodule.setup()
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert [example.target for example in datamodule._eval_rows["test"]["gsm8k"]] == ["0", "1", "2", "3"]


# ----------------------------------------------------------------------------- bad input
def write_jsonl(folder, name, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


GOOD = json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"})


def test_missing_file_names_path_and_fix(tmp_path):
    write_jsonl(tmp_path, "test.jsonl", [GOOD])
    datamodule = GSM8KDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"GSM8K train file not found: .*train\.jsonl\. Pass data_dir="):
        datamodule.setup("fit")


def test_empty_file(tmp_path):
    write_jsonl(tmp_path, "train.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=r"GSM8K train file .*train\.jsonl is empty"):
        GSM8KDataModule(data_dir=str(tmp_path)).setup("fit")


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        pytest.param('{"question": "x", "answer": ', r"train\.jsonl: line 3: invalid JSON", id="malformed-json"),
        pytest.param(json.dumps({"question": "x"}), r"train\.jsonl: line 3: missing field 'answer'", id="missing-field"),
        pytest.param(json.dumps({"question": 7, "answer": "#### 7"}), r"line 3: field 'question' must be str, got int", id="mistyped-field"),
        pytest.param(json.dumps({"question": "x", "answer": True}), r"line 3: field 'answer' must be str, got bool", id="bool-field"),
        pytest.param(json.dumps(["question", "answer"]), r"line 3: expected a JSON object, got list", id="not-object"),
        pytest.param(json.dumps({"question": "x", "answer": "no marker"}), r"line 3: field 'answer' does not end with '#### <number>'", id="no-final-answer"),
    ],
)
def test_invalid_row_names_file_and_line(tmp_path, bad_line, message):
    write_jsonl(tmp_path, "train.jsonl", [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(ValueError, match=message + r".*skip_invalid=True"):
        GSM8KDataModule(data_dir=str(tmp_path)).setup("fit")


def test_skip_invalid_skips_and_counts(tmp_path, caplog):
    lines = [GOOD, '{"broken', json.dumps({"question": "x"}), GOOD, json.dumps({"question": 1, "answer": "#### 1"})]
    write_jsonl(tmp_path, "train.jsonl", lines)
    datamodule = GSM8KDataModule(data_dir=str(tmp_path), skip_invalid=True, val_fraction=0.0)
    with caplog.at_level(logging.INFO, logger="vlorp_lightning.data.records"):
        datamodule.setup("fit")
    assert len(datamodule._train_rows) == 2
    skipped = [record.getMessage() for record in caplog.records if "Skipped" in record.getMessage()]
    assert len(skipped) == 1
    assert "Skipped 3 invalid rows of" in skipped[0]
    assert "line 2: invalid JSON" in skipped[0]


def test_skip_invalid_with_no_valid_row_raises(tmp_path):
    write_jsonl(tmp_path, "train.jsonl", ['{"broken'])
    with pytest.raises(ValueError, match=r"train\.jsonl has no valid rows \(1 invalid rows skipped\)"):
        GSM8KDataModule(data_dir=str(tmp_path), skip_invalid=True).setup("fit")
