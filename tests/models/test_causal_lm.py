"""Tests of ``CausalLMModule``: steps, metrics, export and checkpoints, with real Trainers."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from vlorp_lightning.data import CommonsenseDataModule, ProceduralReasoningDataModule
from vlorp_lightning.models import CausalLMModule

VLORP = {"rank": 4, "lr": 1e-3}


def _tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 64) with the SmolLM2 tokenizer's vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _trainer(root: Path, **kwargs) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    settings.update(kwargs)
    return L.Trainer(**settings)


def _procedural(tokenizer, **kwargs) -> ProceduralReasoningDataModule:
    sizes = dict(train_size=16, val_size=4, test_size=4, batch_size=4, eval_batch_size=4)
    sizes.update(kwargs)
    return ProceduralReasoningDataModule(tokenizer=tokenizer, **sizes)


class _LogitsOnly(nn.Module):
    """A plain module (not a transformers model) with the forward contract of a causal LM."""

    def __init__(self, vocab_size: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.head = nn.Linear(8, vocab_size)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return type("Output", (), {"logits": self.head(self.embed(input_ids))})()


class _TrainingModeProbe(L.Callback):
    """Records whether the wrapped model is in training mode at each training batch."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append(pl_module.model.training)


@pytest.fixture(scope="module")
def fitted(smollm2, tmp_path_factory):
    """Two training steps of a tiny Llama on chain sums, with a checkpoint and an export.

    The model is passed in eval mode, as ``from_pretrained`` returns it.
    """
    root = tmp_path_factory.mktemp("fit")
    tokenizer = smollm2.tokenizer
    net = _tiny_llama(tokenizer).eval()
    initial = copy.deepcopy(net.state_dict())
    module = CausalLMModule(model=net, max_new_tokens=4, export_dir=str(root / "export"), vlorp=VLORP)
    datamodule = _procedural(tokenizer)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_train_steps=2)
    probe = _TrainingModeProbe()
    trainer = _trainer(
        root,
        max_steps=2,
        val_check_interval=2,
        num_sanity_val_steps=1,
        enable_checkpointing=True,
        callbacks=[checkpoint, probe],
    )

    trainer.fit(module, datamodule=datamodule)

    return dict(
        module=module,
        trainer=trainer,
        datamodule=datamodule,
        initial=initial,
        root=root,
        metrics=dict(trainer.callback_metrics),
        training_modes=probe.modes,
    )


def test_fit_logs_loss_and_accuracy(fitted):
    metrics = fitted["metrics"]

    for key in ("train/loss", "val/loss", "val/acc/chain_sum", "val/acc_mean"):
        assert key in metrics, sorted(metrics)
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= float(metrics["val/acc/chain_sum"]) <= 1.0
    assert float(metrics["val/acc_mean"]) == float(metrics["val/acc/chain_sum"])
    assert fitted["module"].last_eval_accuracy == {"chain_sum": float(metrics["val/acc/chain_sum"])}


def test_fit_trains_in_training_mode(fitted):
    assert fitted["training_modes"] == [True, True]


def test_fit_updates_weights(fitted):
    state = fitted["module"].model.state_dict()
    changed = [name for name, tensor in fitted["initial"].items() if not torch.equal(tensor, state[name])]

    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert fitted["trainer"].global_step == 2


def test_val_loss_matches_token_weighted_reference(fitted):
    module, datamodule = fitted["module"], fitted["datamodule"]

    (results,) = _trainer(fitted["root"] / "validate").validate(module, datamodule=datamodule, verbose=False)

    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for loader in datamodule.val_dataloader():
            for batch in loader:
                output = module.model(
                    batch["lm_input_ids"], attention_mask=batch["lm_attention_mask"], labels=batch["lm_labels"]
                )
                count = int((batch["lm_labels"][:, 1:] != -100).sum())
                loss_sum += float(output.loss) * count
                tokens += count
    assert results["val/loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)


def test_export_loads_with_auto_class(fitted):
    export = fitted["root"] / "export"
    module = fitted["module"]

    reloaded = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)

    ids = torch.tensor([tokenizer("12 + 30 =").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, module.model(ids).logits)
    assert reloaded.config.use_cache is True


def test_checkpoint_reloads_with_weights_only(fitted, smollm2):
    (path,) = sorted((fitted["root"] / "ckpt").glob("*.ckpt"))

    fresh = _tiny_llama(smollm2.tokenizer, seed=1)

    restored = CausalLMModule.load_from_checkpoint(path, model=fresh, weights_only=True)

    for name, tensor in fitted["module"].model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], tensor), name
    assert restored.vlorp_config.rank == VLORP["rank"]
    assert restored.max_new_tokens == 4


def test_training_step_matches_hf_loss(smollm2):
    net = _tiny_llama(smollm2.tokenizer)
    module = CausalLMModule(model=net, vlorp=VLORP)
    input_ids = torch.randint(0, len(smollm2.tokenizer), (3, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100

    loss = module.training_step({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, 0)

    reference = net(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    torch.testing.assert_close(loss, reference)


def test_gradient_checkpointing_keeps_gradients(smollm2):
    batch = {"input_ids": torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(3))}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["labels"] = batch["input_ids"].clone()
    plain = CausalLMModule(model=_tiny_llama(smollm2.tokenizer), vlorp=VLORP)
    checkpointed = CausalLMModule(model=_tiny_llama(smollm2.tokenizer), gradient_checkpointing=True, vlorp=VLORP)
    for module in (plain, checkpointed):
        module.configure_model()
        module.train()
        module.training_step(batch, 0).backward()

    assert checkpointed.model.is_activation_checkpointing
    assert checkpointed.model.config.use_cache is False
    assert not plain.model.is_activation_checkpointing
    for (name, expected), actual in zip(plain.model.named_parameters(), checkpointed.model.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, msg=name)


def test_gradient_checkpointing_needs_transformers_model():
    module = CausalLMModule(model=_LogitsOnly(), gradient_checkpointing=True)

    with pytest.raises(TypeError, match="gradient_checkpointing=True needs a transformers model.*_LogitsOnly"):
        module.configure_model()


def test_compile_keeps_parameter_names(smollm2):
    net = _tiny_llama(smollm2.tokenizer)
    names = [name for name, _ in net.named_parameters()]
    module = CausalLMModule(model=net, compile=True)

    module.configure_model()

    assert module.model is net
    assert module.model._compiled_call_impl is not None
    assert [name for name, _ in module.model.named_parameters()] == names


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    """torch.compile on CPU builds C++ kernels first (about 35 s on 2 busy cores)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )
    net = LlamaForCausalLM(config)
    eager = CausalLMModule(model=copy.deepcopy(net))
    compiled = CausalLMModule(model=net, compile=True)
    compiled.configure_model()
    batch = {"input_ids": torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["labels"] = batch["input_ids"].clone()

    losses = []
    for module in (eager, compiled):
        module.train()
        loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())

    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, expected), actual in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_default_module_defers_loading():
    module = CausalLMModule()

    assert module.model is None
    assert module.hparams["model"] == "smollm2-135m-instruct"
    assert module.hparams["vlorp"]["rank"] == 8
    with pytest.raises(RuntimeError, match="the model is not loaded yet.*configure_model"):
        module(torch.ones((1, 2), dtype=torch.long))


def test_configure_model_loads_default_once(smollm2_cache):
    module = CausalLMModule(dtype="bfloat16")

    module.configure_model()
    loaded = module.model
    module.configure_model()

    assert module.model is loaded
    assert loaded.dtype == torch.bfloat16
    assert module.tokenizer("Hi").input_ids == smollm2_cache.tokenizer("Hi").input_ids


def test_cli_parses_without_loading_weights(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["vlorp-train"])

    cli = LightningCLI(
        CausalLMModule,
        run=False,
        save_config_callback=None,
        trainer_defaults={"logger": False, "default_root_dir": str(tmp_path)},
        args=["--model.vlorp.rank=4", "--model.vlorp.granularity=2", "--model.max_new_tokens=8"],
    )

    assert cli.model.model is None
    assert cli.model.vlorp_config.rank == 4
    assert cli.model.vlorp_config.granularity == 2
    assert cli.model.max_new_tokens == 8


def test_choice_accuracy_matches_reference(smollm2, data_shared_dir, tmp_path):
    datamodule = CommonsenseDataModule(
        data_dir=str(data_shared_dir / "commonsense"),
        eval_tasks=["ARC-Easy"],
        max_eval_rows=4,
        eval_batch_size=2,
        tokenizer=smollm2.tokenizer,
    )
    module = CausalLMModule(model=smollm2.model, tokenizer=smollm2.tokenizer)

    (results,) = _trainer(tmp_path).test(module, datamodule=datamodule, verbose=False)

    correct, total = 0, 0
    with torch.no_grad():
        for batch in datamodule.test_dataloader()[0]:
            scores = []
            options = zip(batch["choice_input_ids"], batch["choice_attention_mask"], batch["choice_labels"])
            for ids, mask, labels in options:
                length = int(mask.sum())
                logits = smollm2.model(ids[None, :length]).logits[0]
                positions = (labels[:length] != -100).nonzero().flatten()
                log_probs = torch.log_softmax(logits[positions - 1].double(), dim=-1)
                scores.append(float(sum(log_probs[k, labels[p]] for k, p in enumerate(positions))))
            for example, gold in enumerate(batch["gold"].tolist()):
                rows = [i for i, owner in enumerate(batch["choice_owner"].tolist()) if owner == example]
                best = max(rows, key=lambda i: scores[i])
                correct += rows.index(best) == gold
                total += 1
    assert total == 4
    assert results["test/acc/ARC-Easy"] == pytest.approx(correct / total)
    assert module.last_eval_accuracy == {"ARC-Easy": pytest.approx(correct / total)}


def test_generate_accuracy_matches_reference(smollm2, tmp_path):
    datamodule = _procedural(smollm2.tokenizer, test_size=6, eval_batch_size=3)
    module = CausalLMModule(model=smollm2.model, tokenizer=smollm2.tokenizer, max_new_tokens=8)

    (results,) = _trainer(tmp_path).test(module, datamodule=datamodule, verbose=False)

    outcomes = []
    eos = smollm2.tokenizer.eos_token_id
    with torch.no_grad():
        for batch in datamodule.test_dataloader()[0]:
            for ids, mask, target in zip(batch["input_ids"], batch["attention_mask"], batch["targets"]):
                prompt = ids[mask.bool()][None]
                generated = smollm2.model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=eos)
                output = generated[0, prompt.shape[1] :]
                stop = (output == eos).nonzero()
                new = output[: int(stop[0])] if len(stop) else output
                text = smollm2.tokenizer.decode(new, skip_special_tokens=True)
                outcomes.append(datamodule.is_correct("chain_sum", text, target))
    assert len(outcomes) == 6
    assert results["test/acc/chain_sum"] == pytest.approx(sum(outcomes) / len(outcomes))
    assert results["test/acc_mean"] == results["test/acc/chain_sum"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"dtype": "float64"}, ValueError, "invalid dtype='float64'. Use one of float32", id="dtype"),
        pytest.param({"max_new_tokens": 0}, ValueError, "max_new_tokens must be at least 1, got 0", id="tokens"),
        pytest.param({"model": 3}, TypeError, "model must be a model source string or an nn.Module", id="model"),
        pytest.param({"tokenizer": 3}, TypeError, "tokenizer must be None, a tokenizer source.*got int", id="tok"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CausalLMModule(**kwargs)


def test_export_needs_transformers_model(tmp_path):
    module = CausalLMModule(model=_LogitsOnly())

    with pytest.raises(TypeError, match="export needs a transformers PreTrainedModel, got _LogitsOnly"):
        module.export(tmp_path)


def test_unknown_batch_mode():
    module = CausalLMModule(model=_LogitsOnly())
    batch = {"mode": "ranking", "task": "demo", "lm_input_ids": torch.ones((1, 3), dtype=torch.long)}
    batch["lm_attention_mask"] = torch.ones((1, 3))
    batch["lm_labels"] = torch.ones((1, 3), dtype=torch.long)

    with pytest.raises(ValueError, match="task 'demo' has mode='ranking'. Expected 'generate' or 'choice'"):
        module.validation_step(batch, 0)


def test_generate_batch_needs_datamodule(smollm2):
    module = CausalLMModule(model=_tiny_llama(smollm2.tokenizer), tokenizer=smollm2.tokenizer)
    ids = torch.tensor([[1, 2, 3]])
    batch = {"mode": "generate", "task": "chain_sum", "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["targets"] = ["5"]

    with pytest.raises(ValueError, match="need a datamodule with is_correct"):
        module.test_step(batch, 0)


def test_tokenizer_missing_for_model_object():
    module = CausalLMModule(model=_LogitsOnly())

    with pytest.raises(ValueError, match="no tokenizer is known.*Pass tokenizer="):
        module.tokenizer
