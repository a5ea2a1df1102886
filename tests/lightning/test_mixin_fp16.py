"""fp16 loss scaling reaches the projected accumulators (CPU autocast with a GradScaler)."""

from __future__ import annotations

import copy

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from tiny_models import TinyLM, loader, tiny_llama, token_batches

from vlorp_lightning import ProjFactor, vlorp_param_groups

SETTINGS = dict(lr=1e-3, rank=4, granularity=4, update_proj_gap=3)


def fp16_trainer(scaler: torch.amp.GradScaler, max_steps: int = 4) -> L.Trainer:
    # Lightning maps precision="16-mixed" to bf16 on CPU, so the plugin is passed explicitly.
    return L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_fp16_matches_manual_scaler_loop():
    base, data = tiny_llama(), token_batches(count=8)
    module = TinyLM(copy.deepcopy(base), SETTINGS)
    fp16_trainer(torch.amp.GradScaler("cpu", init_scale=2.0**8)).fit(module, loader(data))

    net = copy.deepcopy(base)
    holder = torch.nn.Module()
    holder.net = net
    optimizer = ProjFactor(vlorp_param_groups(holder, rank=4, granularity=4, update_proj_gap=3), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(4):
        for micro in range(2):
            batch = data[2 * step + micro : 2 * step + micro + 1]
            with torch.autocast("cpu", dtype=torch.float16):
                loss = net(input_ids=batch, labels=batch).loss
            scaler.scale(loss / 2).backward()
        scaler.unscale_(optimizer)
        optimizer.unscale_accumulators_(scaler)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()

    for a, b in zip(module.net.parameters(), net.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert module.trainer.optimizers[0].global_step == 4


def test_fp16_overflow_skips_step_and_lowers_scale():
    base, data = tiny_llama(), token_batches(count=8)
    module = TinyLM(copy.deepcopy(base), SETTINGS)
    # 2**40 times an fp16 loss overflows every backward: each step is skipped.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1000)
    trainer = fp16_trainer(scaler, max_steps=3)
    trainer.fit(module, loader(data))
    optimizer = trainer.optimizers[0]
    # Even 2**37 (after three halvings) still overflows, so all three steps were skipped.
    assert optimizer.skipped_steps == 3
    assert optimizer.global_step == 0
    assert scaler.get_scale() == 2.0**37
    for a, b in zip(module.net.parameters(), base.parameters()):
        assert torch.equal(a, b)
