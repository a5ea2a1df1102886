"""The mixin under a real Lightning Trainer matches ProjFactor driven by a plain loop."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tiny_models import TinyLM, loader, tiny_llama, token_batches

from vlorp_lightning import ProjFactor, VLoRPConfig, vlorp_param_groups

SETTINGS = dict(lr=1e-3, rank=4, granularity=4, update_proj_gap=3)


def trainer(**kwargs) -> L.Trainer:
    options = dict(
        max_steps=8,
        accumulate_grad_batches=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def plain_loop(net, data, steps=8, window=4, clip=None, autocast=False, **settings):
    """ProjFactor driven by hand: the independent reference for the Trainer runs."""
    holder = torch.nn.Module()
    holder.net = net
    optimizer = ProjFactor(
        vlorp_param_groups(holder, rank=settings["rank"], granularity=settings["granularity"],
                           update_proj_gap=settings["update_proj_gap"]),
        lr=settings["lr"],
    )  # fmt: skip
    for step in range(steps):
        for micro in range(window):
            batch = data[step * window + micro : step * window + micro + 1]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = net(input_ids=batch, labels=batch).loss
            (loss / window).backward()
        if clip is not None:
            optimizer.clip_grad_norm_(clip)
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def max_relative_error(left: torch.nn.Module, right: torch.nn.Module) -> float:
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(left.parameters(), right.parameters()))


@pytest.mark.parametrize(
    ("trainer_options", "loop_options", "tolerance"),
    [
        pytest.param({}, {}, 1e-6, id="fp32"),
        pytest.param({"gradient_clip_val": 0.05}, {"clip": 0.05}, 1e-6, id="norm-clipping"),
        # bf16 autocast rounds activations to 8 mantissa bits; both runs use the same kernels,
        # so the remaining difference comes only from the order of float32 reductions.
        pytest.param({"precision": "bf16-mixed"}, {"autocast": True}, 1e-3, id="bf16-mixed"),
    ],
)
def test_trainer_matches_plain_loop(trainer_options, loop_options, tolerance):
    base = tiny_llama()
    data = token_batches()
    module = TinyLM(copy.deepcopy(base), SETTINGS)
    trainer(**trainer_options).fit(module, loader(data))

    reference = copy.deepcopy(base)
    plain_loop(reference, data, **loop_options, **SETTINGS)
    assert max_relative_error(module.net, reference) <= tolerance


def test_clipping_changes_the_result():
    base = tiny_llama()
    data = token_batches()
    clipped, free = TinyLM(copy.deepcopy(base), SETTINGS), TinyLM(copy.deepcopy(base), SETTINGS)
    trainer(gradient_clip_val=0.05).fit(clipped, loader(data))
    trainer().fit(free, loader(data))
    assert max_relative_error(clipped.net, free.net) > 1e-4


def test_projected_gradients_are_freed_after_backward():
    module = TinyLM(tiny_llama(), SETTINGS)
    seen = {}

    class Probe(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            projected = {id(p) for _, p in optimizer.named_projected_parameters()}
            seen["projected_grads"] = [p.grad for p in pl_module.parameters() if id(p) in projected]
            seen["dense_grads"] = [p.grad for p in pl_module.parameters() if id(p) not in projected]

    trainer(max_steps=1, callbacks=[Probe()]).fit(module, loader(token_batches()))
    assert seen["projected_grads"] and all(g is None for g in seen["projected_grads"])
    assert all(g is not None for g in seen["dense_grads"])


def test_in_backward_updates_once_per_window():
    base = tiny_llama()
    data = token_batches()
    deferred = TinyLM(copy.deepcopy(base), SETTINGS)
    trainer().fit(deferred, loader(data))

    in_backward = TinyLM(copy.deepcopy(base), {**SETTINGS, "update_in_backward": True})
    updates = []
    original = None

    class CountUpdates(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal original
            optimizer = trainer.optimizers[0]
            original = optimizer._update_param

            def counting(param, group, check_finite=False):
                updates.append(id(param))
                return original(param, group, check_finite)

            optimizer._update_param = counting

    run = trainer(callbacks=[CountUpdates()])
    run.fit(in_backward, loader(data))
    parameters = sum(1 for p in in_backward.parameters() if p.requires_grad)
    # 8 optimizer steps over 32 micro-batches: each parameter is updated exactly 8 times.
    assert len(updates) == 8 * parameters
    assert run.optimizers[0].global_step == 8
    assert max_relative_error(in_backward.net, deferred.net) <= 1e-6


@pytest.mark.parametrize("update_in_backward", [False, True], ids=["deferred", "in-backward"])
def test_logged_lr_and_grad_norm(tmp_path, update_in_backward):
    config = {**SETTINGS, "schedule": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1,
              "update_in_backward": update_in_backward}  # fmt: skip
    module = TinyLM(tiny_llama(), config)
    logger = CSVLogger(tmp_path, name="run")
    run = trainer(logger=logger, log_every_n_steps=1, callbacks=[LearningRateMonitor(logging_interval="step")])
    run.fit(module, loader(token_batches()))

    import csv

    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    # LearningRateMonitor names one key per parameter group (lr/pg1, ...) and logs it before
    # every micro-batch; keep one value per optimizer step.
    monitored_by_step = {int(r["step"]): float(r["lr/pg1"]) for r in rows if r.get("lr/pg1")}
    monitored = [monitored_by_step[step] for step in sorted(monitored_by_step)]
    ours = [float(r["vlorp/lr"]) for r in rows if r.get("vlorp/lr")]
    norms = [float(r["vlorp/grad_norm"]) for r in rows if r.get("vlorp/grad_norm")]
    from vlorp_lightning.schedules import lr_multiplier

    expected = [1e-3 * lr_multiplier(step, "cosine", 8, 2, 0.1) for step in range(8)]
    assert monitored == pytest.approx(expected, rel=1e-6)
    # vlorp/lr is read after the scheduler has stepped, so it leads by one step.
    assert ours == pytest.approx(expected[1:] + [1e-3 * lr_multiplier(8, "cosine", 8, 2, 0.1)], rel=1e-6)
    assert len(norms) == 8
    assert all(n > 0 and n == n for n in norms)


def test_value_clipping_is_rejected():
    module = TinyLM(tiny_llama(), SETTINGS)
    with pytest.raises(MisconfigurationException, match="gradient_clip_algorithm='value' is not supported"):
        trainer(gradient_clip_val=1.0, gradient_clip_algorithm="value").fit(module, loader(token_batches()))


def test_in_backward_with_clipping_is_rejected():
    module = TinyLM(tiny_llama(), {**SETTINGS, "update_in_backward": True})
    with pytest.raises(MisconfigurationException, match="remove clipping or set vlorp.update_in_backward=False"):
        trainer(gradient_clip_val=1.0).fit(module, loader(token_batches()))


def test_unknown_target_lists_near_matches():
    module = TinyLM(tiny_llama(), {**SETTINGS, "targets": ["q_prj"]})
    with pytest.raises(ValueError, match="near matches: .*q_proj"):
        trainer().fit(module, loader(token_batches()))


def test_unknown_config_option_is_named():
    with pytest.raises(ValueError, match="unknown VLoRPConfig option\\(s\\) rnak"):
        TinyLM(tiny_llama(), {"rnak": 4})


def test_config_collects_every_problem():
    with pytest.raises(ValueError) as error:
        VLoRPConfig(lr=-1.0, granularity=3.5, warmup_steps=-2)
    message = str(error.value)
    assert "lr=-1.0 must be > 0" in message
    assert "granularity must be a positive integer or a unit fraction" in message
    assert "warmup_steps=-2 must be >= 0" in message


def test_budget_sets_rank():
    assert VLoRPConfig(granularity=4, budget=16).resolved_rank() == 4
    with pytest.raises(ValueError, match="budget=6 is not a positive integer multiple of granularity 4"):
        VLoRPConfig(granularity=4, budget=6)


def test_bf16_true_keeps_float32_state():
    module = TinyLM(tiny_llama(), SETTINGS)
    run = trainer(precision="bf16-true", max_steps=3)
    run.fit(module, loader(token_batches()))
    optimizer = run.optimizers[0]
    assert next(module.parameters()).dtype == torch.bfloat16
    name, param = optimizer.named_projected_parameters()[0]
    state = optimizer.state[param]
    assert state["exp_avg"].dtype == torch.float32
    assert state["exp_avg_row"].dtype == torch.float32
    assert optimizer.global_step == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())
