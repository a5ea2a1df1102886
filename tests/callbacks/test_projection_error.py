"""ProjectionErrorMonitor under a real Trainer with a tiny random Llama."""

from __future__ import annotations

import csv
import math
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Dict, List

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from matplotlib.image import imread
from reference import project, project_back
from tiny_models import TinyLM, loader, tiny_llama, token_batches

from vlorp_lightning import VLoRPConfig
from vlorp_lightning.callbacks import ProjectionErrorMonitor

AGGREGATE_KEYS = ["projection_error/mean", "projection_error/max", "projection_cosine/mean"]
# Full-rank orthonormal bases need one unit length everywhere: with right orientation and
# c = 4, every 64x64 and 128x64 weight has units of 16; down_proj (64x128) would have 32.
FULL_RANK = dict(distribution="orthonormal", granularity=4, rank=16, orientation="right", exclude=["down_proj"])


def fit(tmp_path: Path, callbacks: List[Callback], logger=None, **vlorp) -> TinyLM:
    settings = dict(rank=16, lr=1e-3)
    settings.update(vlorp)
    model = TinyLM(tiny_llama(), vlorp=VLoRPConfig(**settings))
    trainer = L.Trainer(
        max_steps=6,
        accumulate_grad_batches=2,
        logger=logger if logger is not None else CSVLogger(tmp_path),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, loader(token_batches(count=24), batch_size=2))
    return model


def optimizer_of(model: TinyLM):
    optimizer = model.trainer.optimizers[0]
    return getattr(optimizer, "_optimizer", optimizer)


def read_metrics(model: TinyLM) -> Dict[str, Dict[int, float]]:
    """``{key: {step: value}}`` from the CSVLogger's metrics.csv; empty when nothing was logged."""
    path = Path(model.trainer.logger.log_dir) / "metrics.csv"
    metrics: Dict[str, Dict[int, float]] = {}
    if not path.exists():
        return metrics
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row.pop("step"))
            for key, value in row.items():
                if value != "":
                    metrics.setdefault(key, {})[step] = float(value)
    return metrics


def dense_error(grad: torch.Tensor, matrix: torch.Tensor, projector) -> float:
    c = Fraction(projector.granularity)
    back = project_back(project(grad, matrix, c, projector.orientation), matrix, projector.shape, c, projector.orientation)
    return float(torch.linalg.matrix_norm(grad.double() - back) / torch.linalg.matrix_norm(grad.double()))


class ObserverSpy(Callback):
    """Record when the monitor attaches and removes its gradient observer (placed before it)."""

    def __init__(self) -> None:
        self.attached: List[tuple] = []
        self.active = 0
        self.active_at_batch_start: List[int] = []
        self.position = (0, 0)

    def on_train_start(self, trainer, pl_module):
        optimizer = optimizer_of(pl_module)
        original = optimizer.add_grad_observer

        def add(observer):
            self.attached.append(self.position)
            self.active += 1
            remove = original(observer)

            def counted_remove():
                self.active -= 1
                remove()

            return counted_remove

        optimizer.add_grad_observer = add

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active_at_batch_start.append(self.active)
        self.position = (trainer.global_step, batch_idx)


class LastMicroBatchProbe(Callback):
    """Independent record of each window's last micro-batch gradient and projection matrix."""

    def __init__(self) -> None:
        self.errors: Dict[int, Dict[str, float]] = {}
        self.last: Dict[str, tuple] = {}

    def on_train_start(self, trainer, pl_module):
        def keep(name, grad, projector):
            self.last[name] = (grad.detach().clone(), projector.matrix(dtype=torch.float64).clone(), projector)

        optimizer_of(pl_module).add_grad_observer(keep)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.errors[trainer.global_step] = {name: dense_error(*entry) for name, entry in self.last.items()}


class AccumulatedGradProbe(Callback):
    """Keep ``p.grad`` before the step and compare with the matrix the step actually used."""

    def __init__(self) -> None:
        self.errors: Dict[int, Dict[str, float]] = {}
        self.grads: Dict[str, torch.Tensor] = {}
        self.step = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.step = trainer.global_step
        self.grads = {name: p.grad.detach().clone() for name, p in optimizer_of(pl_module).named_projected_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.grads:
            return
        optimizer = optimizer_of(pl_module)
        parameters = dict(optimizer.named_projected_parameters())
        errors = {}
        for name, grad in self.grads.items():
            projector = optimizer.projector_for(parameters[name])
            errors[name] = dense_error(grad, projector.matrix(dtype=torch.float64), projector)
        self.errors[self.step] = errors
        self.grads = {}


@pytest.fixture(scope="module")
def normal_run(tmp_path_factory):
    """One compressed fit with random normal projections, monitored every 2 steps."""
    monitor = ProjectionErrorMonitor(every_n_steps=2)
    spy, probe = ObserverSpy(), LastMicroBatchProbe()
    # The probe registers its own observer before the spy starts counting.
    model = fit(tmp_path_factory.mktemp("normal"), [probe, spy, monitor])
    return model, monitor, spy, probe


# ---------------------------------------------------------------------- logging
def test_documented_keys_in_metrics_csv(normal_run):
    model, monitor, _, _ = normal_run
    metrics = read_metrics(model)
    names = [name for name, _ in optimizer_of(model).named_projected_parameters()]
    keys = AGGREGATE_KEYS + [f"projection_error/{n}" for n in names] + [f"projection_cosine/{n}" for n in names]
    for key in keys:
        assert key in metrics, key
        assert sorted(metrics[key]) == [0, 2, 4], key
        assert all(math.isfinite(value) for value in metrics[key].values()), key
    assert monitor.history["steps"] == [0, 2, 4]


def test_aggregates_match_per_layer_values(normal_run):
    model, _, _, _ = normal_run
    metrics = read_metrics(model)
    for step in (0, 2, 4):
        errors = [v[step] for k, v in metrics.items() if k.startswith("projection_error/net.")]
        cosines = [v[step] for k, v in metrics.items() if k.startswith("projection_cosine/net.")]
        assert metrics["projection_error/mean"][step] == pytest.approx(sum(errors) / len(errors))
        assert metrics["projection_error/max"][step] == pytest.approx(max(errors))
        assert metrics["projection_cosine/mean"][step] == pytest.approx(sum(cosines) / len(cosines))


def test_normal_error_near_theory(normal_run):
    model, monitor, _, _ = normal_run
    optimizer = optimizer_of(model)
    ratios = []
    for name, param in optimizer.named_projected_parameters():
        projector = optimizer.projector_for(param)
        theory = math.sqrt((projector.unit_length + 1) / projector.rank)
        ratios.extend(error / theory for error in monitor.history["error"][name].values())
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.15)


def test_compressed_error_is_last_micro_batch(normal_run):
    _, monitor, _, probe = normal_run
    for step in (0, 2, 4):
        for name, expected in probe.errors[step].items():
            assert monitor.history["error"][name][step] == pytest.approx(expected, rel=1e-4), (step, name)


def test_observer_only_on_monitored_micro_batch(normal_run):
    _, _, spy, _ = normal_run
    # (global_step, batch_idx): the last micro-batch of windows 0, 2 and 4.
    assert spy.attached == [(0, 1), (2, 5), (4, 9)]
    assert spy.active == 0
    assert set(spy.active_at_batch_start) == {0}


def test_heatmap_png_in_log_dir(normal_run):
    model, monitor, _, _ = normal_run
    path = Path(model.trainer.logger.log_dir) / "projection_error_heatmap.png"
    assert monitor.heatmap_path == path
    image = imread(path)
    assert image.ndim == 3
    assert image.shape[0] > 100
    assert image.shape[1] > 100


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "dense-grad"])
def test_full_rank_orthonormal_error_is_zero(tmp_path, compress):
    monitor = ProjectionErrorMonitor(every_n_steps=1, heatmap=False)
    fit(tmp_path, [monitor], compress_gradients=compress, **FULL_RANK)
    errors = [e for per_step in monitor.history["error"].values() for e in per_step.values()]
    cosines = [c for per_step in monitor.history["cosine"].values() for c in per_step.values()]
    assert len(errors) == 12 * 6
    assert max(errors) < 1e-5
    assert min(cosines) > 1 - 1e-5
    assert monitor.heatmap_path is None


def test_dense_grad_uses_refreshed_projection(tmp_path):
    # update_proj_gap=2 refreshes at steps 2 and 4, inside step(); the figure must use the new matrix.
    monitor, probe = ProjectionErrorMonitor(every_n_steps=1, heatmap=False), AccumulatedGradProbe()
    fit(tmp_path, [monitor, probe], compress_gradients=False, update_proj_gap=2, rank=4)
    assert sorted(probe.errors) == list(range(6))
    for step, errors in probe.errors.items():
        for name, expected in errors.items():
            assert monitor.history["error"][name][step] == pytest.approx(expected, rel=1e-4), (step, name)


# ---------------------------------------------------------------------- layer filter
def test_layer_filter_and_unmatched_warning(tmp_path):
    monitor = ProjectionErrorMonitor(every_n_steps=3, layers=["q_proj", r"re:layers\.1\.mlp\.down", "no_such_layer"])
    with pytest.warns(UserWarning, match=r"layers entries \['no_such_layer'\] match no parameter name of TinyLM"):
        model = fit(tmp_path, [monitor])
    expected = {
        "net.model.layers.0.self_attn.q_proj.weight",
        "net.model.layers.1.self_attn.q_proj.weight",
        "net.model.layers.1.mlp.down_proj.weight",
    }
    assert set(monitor.history["error"]) == expected
    per_layer = {k for k in read_metrics(model) if k.startswith("projection_error/net.")}
    assert per_layer == {f"projection_error/{name}" for name in expected}


def test_layers_matching_no_projected_weight_warn(tmp_path):
    monitor = ProjectionErrorMonitor(every_n_steps=1, layers=["embed_tokens"])
    with pytest.warns(UserWarning, match=r"layers=\['embed_tokens'\] match none of the 14 projected weights"):
        model = fit(tmp_path, [monitor])
    assert monitor.history["steps"] == []
    assert not any(key.startswith("projection_") for key in read_metrics(model))


def test_adamw_model_warns_once(tmp_path):
    monitor = ProjectionErrorMonitor(every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fit(tmp_path, [monitor], optimizer="adamw")
    messages = [str(w.message) for w in caught if "ProjectionErrorMonitor" in str(w.message)]
    assert len(messages) == 1
    assert "the optimizer AdamW projects no parameter" in messages[0]
    assert not any(key.startswith("projection_") for key in read_metrics(model))
    assert not (Path(model.trainer.logger.log_dir) / "projection_error_heatmap.png").exists()


# ---------------------------------------------------------------------- TensorBoard
def test_tensorboard_scalars_and_heatmap_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = ProjectionErrorMonitor(every_n_steps=2, log_per_layer=False)
    logger = TensorBoardLogger(tmp_path)
    fit(tmp_path, [monitor], logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert set(AGGREGATE_KEYS) <= scalars
    assert not any(tag.startswith("projection_error/net.") for tag in scalars)
    assert [event.step for event in events.Scalars("projection_error/mean")] == [0, 2, 4]
    assert all(math.isfinite(event.value) for event in events.Scalars("projection_error/mean"))
    assert "projection_error/heatmap" in events.Tags()["images"]
    assert (Path(logger.log_dir) / "projection_error_heatmap.png").is_file()


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(dict(every_n_steps=0), r"ProjectionErrorMonitor: every_n_steps=0 is invalid", id="zero-steps"),
        pytest.param(dict(every_n_steps=True), r"every_n_steps=True is invalid", id="bool-steps"),
        pytest.param(dict(every_n_steps=2.5), r"every_n_steps=2.5 is invalid; pass an integer >= 1", id="float-steps"),
        pytest.param(dict(layers=[]), r"ProjectionErrorMonitor: layers=\[\] is invalid", id="empty-layers"),
        pytest.param(dict(layers=["q_proj", ""]), r"layers=\['q_proj', ''\] is invalid", id="empty-entry"),
        pytest.param(dict(layers=[3]), r"layers=\[3\] is invalid", id="int-entry"),
        pytest.param(dict(layers="re:("), r"layers entry 're:\(' is not a valid regular expression", id="bad-regex"),
        pytest.param(dict(heatmap="yes"), r"ProjectionErrorMonitor: heatmap='yes' is invalid", id="heatmap"),
        pytest.param(dict(log_per_layer=None), r"log_per_layer=None is invalid; pass True or False", id="per-layer"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        ProjectionErrorMonitor(**kwargs)


def test_single_string_layer_is_one_pattern():
    assert ProjectionErrorMonitor(layers="q_proj").layers == ["q_proj"]
