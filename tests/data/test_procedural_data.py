"""ProceduralReasoningDataModule over reasoning-gym: splits, prompts, supervision and scoring."""

from __future__ import annotations

import pytest

from vlorp_lightning.data import DEFAULT_PROCEDURAL_TASKS, ProceduralReasoningDataModule

reasoning_gym = pytest.importorskip("reasoning_gym")


def chat_prompt(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def questions(datamodule, split):
    if split == "train":
        return [example.fields["question"] for example in datamodule._train_rows]
    return [example.fields["question"] for example in datamodule._eval_rows[split]["chain_sum"]]


def test_splits_follow_seeds_and_never_share_questions():
    datamodule = ProceduralReasoningDataModule(train_size=300, val_size=40, test_size=40, train_seed=11, val_seed=12, test_seed=13)
    datamodule.setup()
    config = DEFAULT_PROCEDURAL_TASKS["chain_sum"]
    reference = {
        split: [entry["question"].strip() for entry in reasoning_gym.create_dataset("chain_sum", seed=seed, size=size, **config)]
        for split, seed, size in (("train", 11, 300), ("validate", 12, 40), ("test", 13, 40))
    }
    assert questions(datamodule, "validate") == reference["validate"]
    assert questions(datamodule, "test") == reference["test"]
    held_out = set(reference["validate"]) | set(reference["test"])
    assert questions(datamodule, "train") == [question for question in reference["train"] if question not in held_out]
    assert len(questions(datamodule, "train")) < 300, "small sums repeat, so some training rows are removed"


def test_derived_seeds_are_deterministic_and_distinct():
    first = ProceduralReasoningDataModule(seed=5)
    second = ProceduralReasoningDataModule(seed=5)
    other = ProceduralReasoningDataModule(seed=6)
    assert first.split_seeds == second.split_seeds
    assert len(set(first.split_seeds.values())) == 3
    assert first.split_seeds != other.split_seeds


def test_batches_supervise_the_gold_answer(data_tokenizer):
    datamodule = ProceduralReasoningDataModule(tokenizer=data_tokenizer, train_size=12, val_size=4, test_size=4, batch_size=6, eval_batch_size=4)
    datamodule.setup()
    answer_of = {example.fields["question"]: example.answer for example in datamodule._train_rows}
    for batch in datamodule.train_dataloader():
        for row in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][row] == 1
            supervised = batch["labels"][row] != -100
            prompt = data_tokenizer.decode(batch["input_ids"][row][real & ~supervised])
            answer = data_tokenizer.decode(batch["input_ids"][row][supervised])
            matches = [q for q in answer_of if prompt == chat_prompt(data_tokenizer, f"{q}\nGive only the final answer.")]
            assert len(matches) == 1
            assert answer == answer_of[matches[0]] + data_tokenizer.eos_token

    [loader] = datamodule.val_dataloader()
    batch = next(iter(loader))
    assert (batch["mode"], batch["task"]) == ("generate", "chain_sum")
    assert batch["targets"] == [example.target for example in datamodule._eval_rows["validate"]["chain_sum"]]
    assert (batch["attention_mask"][:, -1] == 1).all()


def test_numeric_answers_match_by_value():
    datamodule = ProceduralReasoningDataModule()
    assert datamodule.is_correct("chain_sum", "The answer is -37.", "-37")
    assert datamodule.is_correct("chain_sum", "-37", "-37")
    assert not datamodule.is_correct("chain_sum", "37", "-37")
    assert not datamodule.is_correct("chain_sum", "", "-37")


def test_text_answers_use_score_answer():
    datamodule = ProceduralReasoningDataModule(tasks=["spell_backward"], train_size=4, val_size=3, test_size=3)
    datamodule.setup("test")
    example = datamodule._eval_rows["test"]["spell_backward"][0]
    target = example.target
    assert not target.lstrip("-").isdigit()
    assert datamodule.is_correct("spell_backward", f"  {target}\n", target)
    assert not datamodule.is_correct("spell_backward", target[:-1], target), "partial credit below 1.0 is wrong"
    assert not datamodule.is_correct("spell_backward", "zzz", target)
    assert datamodule.is_correct("spell_backward", "never generated", "never generated"), "unknown targets use exact match"


def test_zero_val_size_disables_validation(data_tokenizer):
    datamodule = ProceduralReasoningDataModule(tokenizer=data_tokenizer, train_size=4, val_size=0, test_size=2)
    assert datamodule.val_dataloader() == []


def test_unknown_task_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown reasoning-gym task 'chain_summ'\. Did you mean \['chain_sum'"):
        ProceduralReasoningDataModule(tasks=["chain_summ"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"tasks": {"chain_sum": {"seed": 3}}}, r"configuration of task 'chain_sum' sets \['seed'\]\. Remove them", id="reserved-key"),
        pytest.param({"tasks": "chain_sum"}, r"tasks must be a list of names or a dict of name to config, got 'chain_sum'", id="string"),
        pytest.param({"tasks": []}, r"tasks is empty", id="empty"),
        pytest.param({"train_size": 0}, r"train_size must be >= 1, got 0", id="train_size"),
        pytest.param({"val_size": -1}, r"val_size must be >= 0, got -1", id="val_size"),
        pytest.param({"test_size": 0}, r"test_size must be >= 1, got 0", id="test_size"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProceduralReasoningDataModule(**kwargs)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param({"min_terms": 5, "max_terms": 2}, r"invalid reasoning-gym configuration .* for task 'chain_sum': max_terms must be >= min_terms", id="assertion"),
        pytest.param({"bogus": 1}, r"invalid reasoning-gym configuration \{'bogus': 1\} for task 'chain_sum'.*unexpected keyword", id="unknown-key"),
    ],
)
def test_invalid_task_configuration(config, message):
    datamodule = ProceduralReasoningDataModule(tasks={"chain_sum": config}, train_size=2, val_size=1, test_size=1)
    with pytest.raises(ValueError, match=message):
        datamodule.setup("test")
