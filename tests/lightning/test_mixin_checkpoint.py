"""Resuming a fit from a checkpoint continues exactly where it stopped."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_models import TinyLM, loader, tiny_llama, token_batches

# total_steps is fixed so that the shorter first run follows the same schedule.
SETTINGS = dict(lr=1e-3, rank=4, granularity=4, update_proj_gap=3, schedule="cosine", warmup_steps=1, total_steps=8)


def make_trainer(root, max_steps, callbacks=()):
    return L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        default_root_dir=root,
        logger=False,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )


def assert_same_parameters(left: torch.nn.Module, right: torch.nn.Module) -> None:
    for (name, a), b in zip(left.named_parameters(), right.parameters()):
        assert torch.equal(a, b), f"parameter {name} differs after resume"


@pytest.mark.parametrize("optimizer", ["projfactor", "ss"])
def test_resume_at_epoch_end_is_exact(tmp_path, optimizer):
    # 8 micro-batches with accumulation 2 make 4 optimizer steps per epoch, so the
    # checkpoint after the first epoch resumes with exactly the same data order.
    base, data = tiny_llama(), token_batches(count=8)
    settings = {**SETTINGS, "optimizer": optimizer}
    uninterrupted = TinyLM(copy.deepcopy(base), settings)
    make_trainer(tmp_path / "full", 8).fit(uninterrupted, loader(data))

    first = TinyLM(copy.deepcopy(base), settings)
    # Saved after the last optimizer step of the epoch. (A checkpoint written in
    # on_train_epoch_end resumes with one extra batch in Lightning 2.6, a Lightning behaviour.)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=4)
    make_trainer(tmp_path / "first", 4, [checkpoint]).fit(first, loader(data))
    (path,) = sorted((tmp_path / "ckpt").glob("*step=4*.ckpt"))

    resumed = TinyLM(copy.deepcopy(base), settings)
    trainer = make_trainer(tmp_path / "second", 8)
    trainer.fit(resumed, loader(data), ckpt_path=str(path), weights_only=True)
    assert trainer.optimizers[0].global_step == 8
    assert_same_parameters(resumed.net, uninterrupted.net)


def test_resume_mid_epoch_is_exact(tmp_path):
    # Identical batches make the data order irrelevant, so the comparison isolates the
    # optimizer: moments, refresh counters, projection seeds and the scheduler.
    base = tiny_llama()
    data = token_batches(count=1).repeat(32, 1)
    uninterrupted = TinyLM(copy.deepcopy(base), SETTINGS)
    make_trainer(tmp_path / "full", 7).fit(uninterrupted, loader(data))

    first = TinyLM(copy.deepcopy(base), SETTINGS)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=4)
    make_trainer(tmp_path / "first", 4, [checkpoint]).fit(first, loader(data))
    (path,) = sorted((tmp_path / "ckpt").glob("*step=4*.ckpt"))

    resumed = TinyLM(copy.deepcopy(base), SETTINGS)
    trainer = make_trainer(tmp_path / "second", 7)
    trainer.fit(resumed, loader(data), ckpt_path=str(path), weights_only=True)
    assert trainer.optimizers[0].global_step == 7
    assert_same_parameters(resumed.net, uninterrupted.net)


def test_checkpoint_loads_with_weights_only(tmp_path):
    module = TinyLM(tiny_llama(), SETTINGS)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=2)
    make_trainer(tmp_path / "run", 2, [checkpoint]).fit(module, loader(token_batches(count=8)))
    (path,) = sorted(tmp_path.glob("*.ckpt"))
    state = torch.load(path, weights_only=True)
    saved = state["optimizer_states"][0]
    assert saved["vlorp"]["global_step"] == 2
    assert all(torch.is_tensor(v) for entry in saved["state"].values() for v in entry.values())
