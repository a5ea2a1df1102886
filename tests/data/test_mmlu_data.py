"""MMLUDataModule on the real MMLU CSV files: both CSV layouts, k-shot prompts, hub layout, bad input."""

from __future__ import annotations

import csv
import logging
from collections import Counter

import pytest
import torch

from vlorp_lightning.data import MMLU_SUBJECTS, MMLUDataModule, subject_category

LETTERS = "ABCD"
SUBJECTS = ["anatomy", "high_school_physics"]


def read_header_csv(path):
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
    return rows[1:]


@pytest.fixture(scope="module")
def data_mmlu_dir(data_shared_dir):
    return data_shared_dir / "mmlu"


@pytest.fixture
def data_original_layout(tmp_path, data_mmlu_dir):
    """The first rows of two subjects rewritten in the original layout (no header, letter answers)."""
    for split, count in (("dev", 5), ("test", 6)):
        (tmp_path / split).mkdir()
        for subject in SUBJECTS:
            rows = read_header_csv(data_mmlu_dir / split / f"{subject}_{split}.csv")[:count]
            with open(tmp_path / split / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as handle:
                csv.writer(handle).writerows([*row[:5], LETTERS[int(row[5])]] for row in rows)
    return tmp_path


def mmlu_prompt(subject, question_row, shot_rows):
    """Independent rendering of the standard MMLU prompt."""

    def block(row):
        choices = "\n".join(f"{letter}. {choice.strip()}" for letter, choice in zip(LETTERS, row[1:5]))
        return f"{row[0].strip()}\n{choices}\nAnswer:"

    shots = "".join(f"{block(row)} {LETTERS[int(row[5])]}\n\n" for row in shot_rows)
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
    return f"{header}\n\n{shots}{block(question_row)}"


def chat_prompt(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def test_both_csv_layouts_give_identical_batches(data_mmlu_dir, data_original_layout, data_tokenizer):
    batches = []
    for folder in (data_mmlu_dir, data_original_layout):
        datamodule = MMLUDataModule(data_dir=str(folder), subjects=SUBJECTS, num_shots=2, tokenizer=data_tokenizer, max_eval_rows=6, eval_batch_size=6)
        batches.append([next(iter(loader)) for loader in datamodule.test_dataloader()])
    for header_batch, original_batch in zip(*batches):
        for key, value in header_batch.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, original_batch[key]), key
            else:
                assert value == original_batch[key], key


def test_test_batches_follow_choice_contract(data_mmlu_dir, data_tokenizer):
    datamodule = MMLUDataModule(data_dir=str(data_mmlu_dir), subjects=SUBJECTS, num_shots=2, tokenizer=data_tokenizer, max_eval_rows=4, eval_batch_size=4)
    loaders = datamodule.test_dataloader()
    assert datamodule.eval_tasks == SUBJECTS
    assert len(loaders) == 2
    for subject, loader in zip(SUBJECTS, loaders):
        assert datamodule.task_mode(subject) == "choice"
        rows = read_header_csv(data_mmlu_dir / "test" / f"{subject}_test.csv")[:4]
        shots = read_header_csv(data_mmlu_dir / "dev" / f"{subject}_dev.csv")[:2]
        batch = next(iter(loader))
        assert (batch["mode"], batch["task"]) == ("choice", subject)
        assert batch["choice_owner"].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
        assert batch["gold"].tolist() == [int(row[5]) for row in rows]
        for index, row in enumerate(rows):
            expected_prompt = chat_prompt(data_tokenizer, mmlu_prompt(subject, row, shots))
            for letter_index in range(4):
                n = index * 4 + letter_index
                labels = batch["choice_labels"][n]
                real = batch["choice_attention_mask"][n] == 1
                assert data_tokenizer.decode(batch["choice_input_ids"][n][labels != -100]) == LETTERS[letter_index]
                assert data_tokenizer.decode(batch["choice_input_ids"][n][real & (labels == -100)]) == expected_prompt
            supervised = batch["lm_labels"][index] != -100
            assert data_tokenizer.decode(batch["lm_input_ids"][index][supervised]) == LETTERS[int(row[5])] + data_tokenizer.eos_token


def test_shots_are_dropped_before_tokens_are_cut(data_mmlu_dir, data_tokenizer):
    subject = "anatomy"
    row = read_header_csv(data_mmlu_dir / "test" / f"{subject}_test.csv")[0]
    shots = read_header_csv(data_mmlu_dir / "dev" / f"{subject}_dev.csv")
    one_shot = chat_prompt(data_tokenizer, mmlu_prompt(subject, row, shots[:1]))
    one_shot_length = len(data_tokenizer(one_shot, add_special_tokens=False)["input_ids"])
    datamodule = MMLUDataModule(
        data_dir=str(data_mmlu_dir), subjects=[subject], num_shots=5, tokenizer=data_tokenizer, max_eval_rows=1, max_length=one_shot_length + 2
    )
    batch = next(iter(datamodule.test_dataloader()[0]))
    real = batch["lm_attention_mask"][0] == 1
    supervised = batch["lm_labels"][0] != -100
    assert data_tokenizer.decode(batch["lm_input_ids"][0][real & ~supervised]) == one_shot
    assert datamodule.encoding_stats["test/anatomy"].truncated == 1


def test_training_on_a_csv_folder(data_original_layout, data_tokenizer, tmp_path_factory):
    train_dir = tmp_path_factory.mktemp("auxiliary")
    source = data_original_layout / "test" / "anatomy_test.csv"
    (train_dir / "arc_easy.csv").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    (train_dir / "anatomy_train.csv").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    datamodule = MMLUDataModule(
        data_dir=str(data_original_layout), train_dir=str(train_dir), subjects=SUBJECTS, tokenizer=data_tokenizer, use_chat_template=False, val_fraction=0.2
    )
    with pytest.warns(UserWarning, match=r"no training rows for tasks \['high_school_physics'\]"):
        datamodule.setup("fit")
    tasks = Counter(example.task for example in datamodule._train_rows)
    assert tasks == {"arc_easy": 6, "anatomy": 4}, "two anatomy rows are held out for validation"
    headers = {example.task: example.fields["header"] for example in datamodule._train_rows}
    assert headers["arc_easy"] == "The following are multiple choice questions (with answers)."
    assert headers["anatomy"] == "The following are multiple choice questions (with answers) about anatomy."
    batch = next(iter(datamodule.train_dataloader()))
    supervised = batch["labels"] != -100
    answers = [data_tokenizer.decode(batch["input_ids"][row][supervised[row]]) for row in range(batch["input_ids"].shape[0])]
    assert all(answer in {f" {letter}{data_tokenizer.eos_token}" for letter in LETTERS} for answer in answers)


def test_hub_layout(monkeypatch, data_tokenizer):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if name == "auxiliary_train":
            return [{"train": {"question": "Aux?", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": ""}}]
        return [
            {"question": f"{subject} {split}?", "subject": subject, "choices": ["w", "x", "y", "z"], "answer": 3}
            for subject in ("anatomy", "virology")
        ]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    datamodule = MMLUDataModule(subjects=["virology"], num_shots=1, tokenizer=data_tokenizer)
    datamodule.setup()
    assert calls == [
        ("cais/mmlu", "auxiliary_train", "train"),
        ("cais/mmlu", "all", "validation"),
        ("cais/mmlu", "all", "dev"),
        ("cais/mmlu", "all", "test"),
    ]
    test = datamodule._eval_rows["test"]["virology"]
    assert [example.fields["question"] for example in test] == ["virology test?"]
    assert test[0].fields["shots"] == "virology dev?\nA. w\nB. x\nC. y\nD. z\nAnswer: D\n\n"
    assert [example.answer for example in datamodule._train_rows] == ["C"]


def test_subject_categories():
    assert len(MMLU_SUBJECTS) == 57
    assert Counter(MMLU_SUBJECTS.values()) == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}
    assert subject_category("college_physics") == "STEM"
    assert subject_category("professional_law") == "humanities"
    assert subject_category("econometrics") == "social sciences"
    assert MMLUDataModule.subject_category("anatomy") == "other"


def test_default_subjects_match_the_files(data_mmlu_dir):
    files = sorted(path.name.removesuffix("_test.csv") for path in (data_mmlu_dir / "test").glob("*_test.csv"))
    assert MMLUDataModule(data_dir=str(data_mmlu_dir)).eval_tasks == files


# ----------------------------------------------------------------------------- bad input
def test_unknown_subject_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown subject 'high_school_physic'\. Did you mean \['high_school_physics'"):
        MMLUDataModule(data_dir="unused", subjects=["high_school_physic"])
    with pytest.raises(ValueError, match=r"unknown subject 'anatomyy'\. Did you mean \['anatomy', 'astronomy'\]\? See .*MMLU_SUBJECTS for the 57 valid names"):
        subject_category("anatomyy")


def test_invalid_num_shots(data_mmlu_dir):
    with pytest.raises(ValueError, match=r"num_shots must be >= 0, got -1"):
        MMLUDataModule(data_dir=str(data_mmlu_dir), num_shots=-1)
    datamodule = MMLUDataModule(data_dir=str(data_mmlu_dir), subjects=["anatomy"], num_shots=6)
    with pytest.raises(ValueError, match=r"num_shots=6 but the dev split of 'anatomy' has only 5 valid rows"):
        datamodule.setup("test")


def test_missing_subject_file(data_original_layout):
    (data_original_layout / "test" / "anatomy_test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"MMLU test file of subject 'anatomy' not found: .*anatomy_test\.csv"):
        MMLUDataModule(data_dir=str(data_original_layout), subjects=SUBJECTS).setup("test")


def test_empty_subject_file(data_original_layout):
    (data_original_layout / "test" / "anatomy_test.csv").write_text("")
    with pytest.raises(ValueError, match=r"anatomy_test\.csv is empty"):
        MMLUDataModule(data_dir=str(data_original_layout), subjects=SUBJECTS).setup("test")


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        pytest.param("Only a question,A1,B1,C1,A\n", r"anatomy_test\.csv: line 3: expected 6 columns .* got 5", id="columns"),
        pytest.param("Q,a,b,c,d,E\n", r"anatomy_test\.csv: line 3: answer 'E' must be a letter A-D or an index 0-3", id="answer-letter"),
        pytest.param("Q,a,b,c,d,4\n", r"line 3: answer '4' must be a letter A-D or an index 0-3", id="answer-index"),
    ],
)
def test_invalid_csv_row_names_line(data_original_layout, bad_line, message):
    path = data_original_layout / "test" / "anatomy_test.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + bad_line + "".join(lines[2:]), encoding="utf-8")
    with pytest.raises(ValueError, match=message + r".*skip_invalid=True"):
        MMLUDataModule(data_dir=str(data_original_layout), subjects=["anatomy"]).setup("test")


def test_skip_invalid_skips_and_counts(data_original_layout, caplog):
    path = data_original_layout / "test" / "anatomy_test.csv"
    path.write_text(path.read_text(encoding="utf-8") + "Q,a,b,c,d,Z\nshort,row\n", encoding="utf-8")
    datamodule = MMLUDataModule(data_dir=str(data_original_layout), subjects=["anatomy"], skip_invalid=True)
    with caplog.at_level(logging.INFO, logger="vlorp_lightning.data.records"):
        datamodule.setup("test")
    assert len(datamodule._eval_rows["test"]["anatomy"]) == 6
    assert any("Skipped 2 invalid rows of" in record.getMessage() for record in caplog.records)


def test_invalid_hub_row(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *args, **kwargs: [{"question": "Q", "subject": "anatomy", "choices": ["a", "b"], "answer": 0}]
    )
    with pytest.raises(ValueError, match=r"cais/mmlu \(all, test\): row 1: field 'choices' must be a list of 4 strings"):
        MMLUDataModule(subjects=["anatomy"]).setup("test")
