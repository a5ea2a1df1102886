"""select_targets and vlorp_param_groups on tiny random-config Llama and GPT-2 models."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from vlorp_lightning import ProjFactor, VLoRPProjector, select_targets, vlorp_param_groups

LLAMA_MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LLAMA_MODULES += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
LLAMA_DEFAULT = [f"model.layers.{layer}.{module}.weight" for layer in range(2) for module in LLAMA_MODULES]
GPT2_MODULES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
GPT2_DEFAULT = [f"transformer.h.{layer}.{module}.weight" for layer in range(2) for module in GPT2_MODULES]


def llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=256,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def grouped_names(groups) -> list[str]:
    return [name for group in groups for name in group["names"]]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_llama_default_targets(tie):
    model = llama(tie)
    targets = select_targets(model)
    assert [t.name for t in targets] == LLAMA_DEFAULT
    assert not any(t.transposed for t in targets)
    names = dict(model.named_parameters())
    assert all(t.param is names[t.name] for t in targets)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_llama_all_linear_targets(tie):
    model = llama(tie)
    names = [t.name for t in select_targets(model, "all-linear")]
    expected = LLAMA_DEFAULT if tie else LLAMA_DEFAULT + ["lm_head.weight"]
    assert names == expected
    assert "model.embed_tokens.weight" not in names


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_param_groups_cover_each_parameter_once(tie):
    model = llama(tie)
    groups = vlorp_param_groups(model, rank=4)
    grouped = [p for group in groups for p in group["params"]]
    assert len({id(p) for p in grouped}) == len(grouped), "a parameter appears in two groups"
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    assert [len(group["params"]) == len(group["names"]) for group in groups] == [True] * len(groups)
    projected = [group for group in groups if group["rank"] is not None]
    assert len(projected) == 1
    assert projected[0]["names"] == LLAMA_DEFAULT
    dense_names = grouped_names(group for group in groups if group["rank"] is None)
    assert "model.embed_tokens.weight" in dense_names
    assert ("lm_head.weight" in dense_names) == (not tie)


def test_frozen_parameters_ignored():
    model = llama(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(False)
    names = [t.name for t in select_targets(model)]
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    assert len(names) == len(LLAMA_DEFAULT) - 1
    grouped = grouped_names(vlorp_param_groups(model, rank=2))
    assert "model.layers.0.self_attn.q_proj.weight" not in grouped
    assert "model.embed_tokens.weight" not in grouped


@pytest.mark.parametrize(
    "targets, exclude, expected",
    [
        pytest.param(["q_proj", "v_proj"], None, 4, id="suffix-list"),
        pytest.param("q_proj", None, 2, id="single-name"),
        pytest.param([r"re:model\.layers\.1\.mlp\..*"], None, 3, id="regex"),
        pytest.param("default", ["down_proj"], 12, id="exclude"),
        pytest.param("all-linear", ["re:.*self_attn.*"], 7, id="exclude-regex"),
    ],
)
def test_target_patterns(targets, exclude, expected):
    names = [t.name for t in select_targets(llama(False), targets, exclude)]
    assert len(names) == expected, names


@pytest.mark.parametrize(
    "targets, exclude, pattern",
    [
        pytest.param(["q_prj"], None, r"'q_prj' matches no module of LlamaForCausalLM; near matches: .*q_proj", id="typo"),
        pytest.param("default", ["down_prj"], r"'down_prj' matches no module.*down_proj", id="exclude-typo"),
        pytest.param(["xyzzy"], None, r"'xyzzy' matches no module.*print\(model\) shows the module names", id="no-near"),
        pytest.param([], None, r"targets is an empty list; use 'default', 'all-linear'", id="empty"),
    ],
)
def test_target_pattern_errors(targets, exclude, pattern):
    with pytest.raises(ValueError, match=pattern):
        select_targets(llama(False), targets, exclude)


def test_gpt2_default_targets_conv1d():
    model = gpt2()
    targets = select_targets(model)
    assert [t.name for t in targets] == GPT2_DEFAULT
    assert all(t.transposed for t in targets)
    names = [t.name for t in select_targets(model, "all-linear")]
    assert names == GPT2_DEFAULT, "the tied GPT-2 head must not be selected"


@pytest.mark.parametrize("orientation, flipped", [("right", "left"), ("left", "right"), ("auto", "auto")])
def test_gpt2_conv1d_orientation_flipped(orientation, flipped):
    model = gpt2()
    groups = vlorp_param_groups(model, rank=2, orientation=orientation)
    projected = [group for group in groups if group["rank"] is not None]
    assert len(projected) == 1
    assert projected[0]["orientation"] == flipped
    if orientation != "auto":
        optimizer = ProjFactor(groups)
        c_attn = model.transformer.h[0].attn.c_attn.weight  # (in_features 64, out_features 192)
        assert optimizer.projector_for(c_attn).orientation == flipped


def test_flipped_orientation_projects_same_axis():
    # A Conv1D weight is the transpose of the equivalent nn.Linear weight, so at c = 1 the
    # flipped orientation with the same seed gives the transposed subspace gradient. For
    # c > 1 both split the input axis into c units, but the row-major reshape makes the
    # left units strided where the right units are contiguous.
    grad_linear = torch.randn(12, 8)
    linear = VLoRPProjector((12, 8), 1, 3, orientation="right", seed=4)
    conv1d = VLoRPProjector((8, 12), 1, 3, orientation="left", seed=4)
    torch.testing.assert_close(conv1d.project(grad_linear.T.contiguous()), linear.project(grad_linear).T)


def test_projfactor_step_on_llama():
    model = llama(True)
    optimizer = ProjFactor(vlorp_param_groups(model, rank=4, granularity=2), lr=1e-3)
    input_ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    projected = [p for name, p in model.named_parameters() if name in LLAMA_DEFAULT]
    assert all(p.grad is None for p in projected)
    optimizer.step()
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} was not updated"
