"""CommonsenseDataModule on the real LLM-Adapters files: choice batches, supervision, bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from vlorp_lightning.data import COMMONSENSE_TASKS, CommonsenseDataModule

CHOICE_KEYS = {
    "mode",
    "task",
    "choice_input_ids",
    "choice_attention_mask",
    "choice_labels",
    "choice_owner",
    "gold",
    "lm_input_ids",
    "lm_attention_mask",
    "lm_labels",
}


@pytest.fixture(scope="module")
def data_commonsense_dir(data_shared_dir):
    return data_shared_dir / "commonsense"


def load_rows(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def chat_prompt(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def test_train_batches_supervise_the_output(data_commonsense_dir, data_tokenizer):
    datamodule = CommonsenseDataModule(
        data_dir=str(data_commonsense_dir), tokenizer=data_tokenizer, batch_size=4, max_train_rows=8, eval_tasks=["boolq"]
    )
    datamodule.setup("fit")
    assert sorted({example.task for example in datamodule._train_rows}) <= sorted(["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"])
    rows = [row for task in ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa") for row in load_rows(data_commonsense_dir / task / "train.json")]
    output_of_prompt = {chat_prompt(data_tokenizer, row["instruction"].strip()): row["output"] for row in rows}

    count = 0
    for batch in datamodule.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        for row in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][row] == 1
            supervised = batch["labels"][row] != -100
            prompt = data_tokenizer.decode(batch["input_ids"][row][real & ~supervised])
            answer = data_tokenizer.decode(batch["input_ids"][row][supervised])
            assert prompt in output_of_prompt
            assert answer == output_of_prompt[prompt] + data_tokenizer.eos_token
            count += 1
    assert count == 8


def test_test_batches_follow_choice_contract(data_commonsense_dir, data_tokenizer):
    datamodule = CommonsenseDataModule(data_dir=str(data_commonsense_dir), tokenizer=data_tokenizer, max_eval_rows=3, eval_batch_size=3)
    datamodule.setup("test")
    loaders = datamodule.test_dataloader()
    assert datamodule.eval_tasks == list(COMMONSENSE_TASKS)
    assert len(loaders) == 8

    for task, loader in zip(datamodule.eval_tasks, loaders):
        assert datamodule.task_mode(task) == "choice"
        name = "test_reconstructed.json" if task == "hellaswag" else "test.json"
        rows = load_rows(data_commonsense_dir / task / name)[:3]
        batch = next(iter(loader))
        assert set(batch) == CHOICE_KEYS
        assert (batch["mode"], batch["task"]) == ("choice", task)
        owners = batch["choice_owner"].tolist()
        assert owners == sorted(owners)
        assert batch["gold"].shape == (3,)
        for index, row in enumerate(rows):
            options = row["instruction"].rsplit("Answer format:", 1)[1].strip().split("/")
            option_rows = [n for n, owner in enumerate(owners) if owner == index]
            assert len(option_rows) == len(options)
            assert options[int(batch["gold"][index])] == row["answer"]
            for option, n in zip(options, option_rows):
                labels = batch["choice_labels"][n]
                real = batch["choice_attention_mask"][n] == 1
                context = data_tokenizer.decode(batch["choice_input_ids"][n][real & (labels == -100)])
                scored = data_tokenizer.decode(batch["choice_input_ids"][n][labels != -100])
                assert scored == " " + option
                assert context == chat_prompt(data_tokenizer, row["instruction"].strip()) + "the correct answer is"
            lm_real = batch["lm_attention_mask"][index] == 1
            lm_supervised = batch["lm_labels"][index] != -100
            assert data_tokenizer.decode(batch["lm_input_ids"][index][lm_supervised]) == row["output"] + data_tokenizer.eos_token
            assert data_tokenizer.decode(batch["lm_input_ids"][index][lm_real & ~lm_supervised]) == chat_prompt(
                data_tokenizer, row["instruction"].strip()
            )


def test_gold_option_tokens_match_training_tokens(data_commonsense_dir, data_tokenizer):
    """Scoring the gold option uses the same ids as training on the output."""
    datamodule = CommonsenseDataModule(data_dir=str(data_commonsense_dir), tokenizer=data_tokenizer, max_eval_rows=4, eval_tasks=["piqa", "ARC-Easy"])
    for loader in datamodule.test_dataloader():
        batch = next(iter(loader))
        for index, gold in enumerate(batch["gold"].tolist()):
            n = [m for m, owner in enumerate(batch["choice_owner"].tolist()) if owner == index][gold]
            option = batch["choice_input_ids"][n][batch["choice_attention_mask"][n] == 1]
            lm = batch["lm_input_ids"][index][batch["lm_attention_mask"][index] == 1]
            assert torch.equal(option, lm[:-1]), "gold option sequence = training sequence without the EOS"


def test_accuracy_from_fixed_option_scores(data_commonsense_dir, data_tokenizer):
    """Argmax over per-option scores against gold gives the hand-computed accuracy."""
    rows = load_rows(data_commonsense_dir / "boolq" / "test.json")[:5]
    assert [row["answer"] for row in rows] == ["false", "true", "true", "true", "true"]
    datamodule = CommonsenseDataModule(data_dir=str(data_commonsense_dir), tokenizer=data_tokenizer, max_eval_rows=5, eval_tasks=["boolq"])
    batch = next(iter(datamodule.test_dataloader()[0]))
    # Fixed model that always prefers "true": option score 0 for true, -1 for false.
    true_id = data_tokenizer(" true", add_special_tokens=False)["input_ids"]
    scores = torch.tensor([0.0 if batch["choice_input_ids"][n][batch["choice_labels"][n] != -100].tolist() == true_id else -1.0 for n in range(len(batch["choice_owner"]))])
    predictions = torch.stack([scores[batch["choice_owner"] == index].argmax() for index in range(5)])
    accuracy = (predictions == batch["gold"]).float().mean().item()
    assert accuracy == pytest.approx(4 / 5)


def test_validation_carves_train_or_samples_test(data_commonsense_dir):
    datamodule = CommonsenseDataModule(data_dir=str(data_commonsense_dir), eval_tasks=["boolq", "piqa"], max_eval_rows=4, val_fraction=0.01)
    with pytest.warns(UserWarning, match=r"no training rows for tasks \['piqa'\].*overlap the test set"):
        datamodule.setup("fit")
    validation = datamodule._eval_rows["validate"]
    assert [len(validation["boolq"]), len(validation["piqa"])] == [4, 4]
    train_prompts = {example.fields["query"] for example in datamodule._train_rows}
    assert not train_prompts & {example.fields["query"] for example in validation["boolq"]}
    piqa_test = {row["instruction"].strip() for row in load_rows(data_commonsense_dir / "piqa" / "test.json")}
    assert {example.fields["query"] for example in validation["piqa"]} <= piqa_test


def test_train_file_and_hub_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    row = {"instruction": "Q?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"}
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs.get("data_files")))
        return [row, row]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    datamodule = CommonsenseDataModule(hub_dataset="someone/llm-adapters", train_file="commonsense_170k.json", eval_tasks=["boolq"])
    with pytest.warns(UserWarning, match=r"no training rows for tasks \['boolq'\]"):
        datamodule.setup()
    assert calls == [
        ("someone/llm-adapters", None, "train", "commonsense_170k.json"),
        ("someone/llm-adapters", None, "train", "boolq/test.json"),
    ]
    assert {example.task for example in datamodule._train_rows} == {"commonsense_170k"}


# ----------------------------------------------------------------------------- bad input
GOOD = {"instruction": "Is it?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"}


def write_task(root, task, name, rows=None, text=None):
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text if text is not None else json.dumps(rows, indent=4), encoding="utf-8")


def test_unknown_task_lists_close_matches():
    with pytest.raises(ValueError, match=r"eval_tasks: unknown task 'ARC-easy'\. Did you mean \['ARC-Easy'"):
        CommonsenseDataModule(data_dir="unused", eval_tasks=["ARC-easy"])
    with pytest.raises(ValueError, match=r"train_tasks: unknown task 'boolqq'\. Did you mean \['boolq'"):
        CommonsenseDataModule(data_dir="unused", train_tasks=["boolqq"])


def test_data_source_is_required():
    with pytest.raises(ValueError, match=r"pass data_dir= .* or hub_dataset="):
        CommonsenseDataModule()


def test_missing_eval_file(tmp_path):
    write_task(tmp_path, "boolq", "train.json", [GOOD])
    with pytest.raises(FileNotFoundError, match=r"evaluation file for task 'piqa' not found: expected test\.json or test_reconstructed\.json"):
        CommonsenseDataModule(data_dir=str(tmp_path), eval_tasks=["piqa"]).setup("test")


def test_missing_train_file(tmp_path):
    write_task(tmp_path, "boolq", "test.json", [GOOD])
    with pytest.raises(FileNotFoundError, match=r"Commonsense data file not found: .*piqa/train\.json"):
        CommonsenseDataModule(data_dir=str(tmp_path), train_tasks=["piqa"], eval_tasks=["boolq"]).setup("fit")


def test_no_training_data(tmp_path):
    write_task(tmp_path, "boolq", "test.json", [GOOD])
    with pytest.raises(ValueError, match=r"no training data.*Pass train_file="):
        CommonsenseDataModule(data_dir=str(tmp_path), eval_tasks=["boolq"]).setup("fit")


def test_empty_file(tmp_path):
    write_task(tmp_path, "boolq", "test.json", text="\n")
    with pytest.raises(ValueError, match=r"Commonsense data file .*boolq/test\.json is empty"):
        CommonsenseDataModule(data_dir=str(tmp_path), eval_tasks=["boolq"]).setup("test")


def test_malformed_json_names_line(tmp_path):
    text = json.dumps([GOOD, GOOD], indent=4).replace('"answer": "true"\n    },', '"answer": "true"\n    }', 1)
    write_task(tmp_path, "boolq", "test.json", text=text)
    with pytest.raises(ValueError, match=r"boolq/test\.json: line 8: invalid JSON"):
        CommonsenseDataModule(data_dir=str(tmp_path), eval_tasks=["boolq"]).setup("test")


def test_top_level_must_be_array(tmp_path):
    write_task(tmp_path, "boolq", "test.json", text=json.dumps(GOOD))
    with pytest.raises(ValueError, match=r"expected a JSON array of objects at the top level, got dict"):
        CommonsenseDataModule(data_dir=str(tmp_path), eval_tasks=["boolq"]).setup("test")


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        pytest.param({k: v for k, v in GOOD.items() if k != "output"}, r"element 2: missing field 'output'", id="missing-field"),
        pytest.param({**GOOD, "answer": 1}, r"element 2: field 'answer' must be str, got int", id="mistyped-answer"),
        pytest.param({**GOOD, "input": None}, r"element 2: field 'input' must be str, got NoneType", id="mistyped-input"),
        pytest.param({**GOOD, "answer": "maybe"}, r"element 2: answer 'maybe' is not one of the options \['true', 'false'\]", id="answer-not-option"),
        pytest.param({**GOOD, "output": "true is right"[::-1]}, r"element 2: field 'output' .* does not end with the answer 'true'", id="output-mismatch"),
        pytest.param("just text", r"element 2: expected a JSON object, got str", id="not-object"),
    ],
)
def test_invalid_row_names_element(tmp_path, bad_row, message):
    write_task(tmp_path, "boolq", "test.json", [GOOD, bad_row, GOOD])
    with pytest.raises(ValueError, match=message + r".*skip_invalid=True"):
        CommonsenseDataModule(data_dir=str(tmp_path), eval_tasks=["boolq"]).setup("test")


def test_skip_invalid_skips_and_counts(tmp_path, caplog):
    write_task(tmp_path, "boolq", "test.json", [GOOD, {**GOOD, "answer": 3}, "x", GOOD])
    datamodule = CommonsenseDataModule(data_dir=str(tmp_path), eval_tasks=["boolq"], skip_invalid=True)
    with caplog.at_level(logging.INFO, logger="vlorp_lightning.data.records"):
        datamodule.setup("test")
    assert len(datamodule._eval_rows["test"]["boolq"]) == 2
    assert any("Skipped 2 invalid rows of" in record.getMessage() for record in caplog.records)
