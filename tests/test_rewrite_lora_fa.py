"""rewrite_lora_fa: structure of the rewritten graph and numerics against PEFT LoRA with A frozen."""

from __future__ import annotations

import pytest
import torch
from conftest import MODELS, make_batch, peft_lora_B, peft_reference, randomize_lora_B, transformed

EXAMPLE_SHAPE = (2, 12)
OTHER_SHAPE = (3, 9)  # not the captured shape: dynamic batch and sequence dims


def _transform(name: str, **config):
    model, gm = transformed(name, EXAMPLE_SHAPE, **{"r": 4, "lora_alpha": 8, **config})
    randomize_lora_B(gm)
    return model, gm


def _grads(module, names):
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_peft_with_frozen_A(name):
    """Reference: PEFT get_peft_model with the same A (frozen) and B: same logits, loss, grads."""
    _assert_matches_peft(name)


@pytest.mark.parametrize("lora_alpha", [4, 5])
def test_matches_peft_at_other_scalings(lora_alpha):
    """scaling 1 (no multiplication) and 1.25 (scaling * x A^T rounds unlike PEFT's (x A^T B^T) * scaling)."""
    _assert_matches_peft("llama", lora_alpha=lora_alpha)


def _assert_matches_peft(name: str, **config) -> None:
    model, gm = _transform(name, **config)
    ref = peft_reference(model, gm)
    gm.eval()
    ref.eval()
    batch = make_batch(name, *OTHER_SHAPE, seed=7)
    out, ref_out = gm(**batch), ref(**batch)
    assert type(out) is type(ref_out)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref_out.loss, atol=2e-5, rtol=0)
    out.loss.backward()
    ref_out.loss.backward()
    for a in gm.lorafa.adapters:
        grad = gm.get_parameter(f"{a.path}.lora_B.weight").grad
        torch.testing.assert_close(grad, peft_lora_B(ref, a.path).grad, atol=2e-5, rtol=1e-3)
    for path in gm.lorafa.config.modules_to_save or ():
        ours = dict(gm.get_submodule(path).named_parameters())
        theirs = dict(ref.base_model.model.get_submodule(path).modules_to_save["default"].named_parameters())
        assert ours.keys() == theirs.keys()
        for k in ours:
            torch.testing.assert_close(ours[k].grad, theirs[k].grad, atol=2e-5, rtol=1e-3)


def test_trainable_parameters_are_lora_B_and_modules_to_save():
    """Reference: PEFT's trainable set (lora_B + modules_to_save) with lora_A frozen."""
    model, gm = _transform("roberta")
    ours = {n for n, p in gm.named_parameters() if p.requires_grad}
    ref = peft_reference(model, gm)
    theirs = {
        n.removeprefix("base_model.model.").replace(".default", "").replace("modules_to_save.", "")
        for n, p in ref.named_parameters() if p.requires_grad
    }
    assert ours == theirs
    assert all(not gm.get_parameter(f"{a.path}.lora_A.weight").requires_grad for a in gm.lorafa.adapters)


@pytest.mark.parametrize("lora_alpha", [8, 4])
def test_graph_structure_per_adapter(lora_alpha):
    """Each adapted linear gets exactly: linear(x, A) -> mul(scaling) -> linear(xa, B) -> add;
    with scaling 1 (lora_alpha == r) no mul."""
    _, gm = _transform("llama", target_modules=["q_proj", "v_proj"], lora_alpha=lora_alpha)
    roles = [n.meta["lorafa"]["role"] for n in gm.graph.nodes if "role" in n.meta.get("lorafa", {})]
    n = len(gm.lorafa.adapters)
    assert n == 4
    scaled = lora_alpha != 4
    assert sorted(roles) == sorted(["lora_A", "lora_B", "xa", "xab", "out"] * n + ["down"] * n * scaled)
    linears = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)
    assert len(linears) == 7 * 2 + 1 + 2 * n  # base linears + lm_head + two per adapter
    for node in gm.graph.nodes:
        info = node.meta.get("lorafa", {})
        if info.get("role") == ("down" if scaled else "xa"):
            x, lora_A = node.args
            assert lora_A.target == f"{info['adapter']}.lora_A.weight"
            assert node.meta["val"].shape[-1] == 4
        if info.get("role") == "xa":
            assert node.target == (torch.ops.aten.mul.Tensor if scaled else torch.ops.aten.linear.default)
            assert [u.meta["lorafa"]["role"] for u in node.users] == ["xab"]


def test_gpt2_conv1d_is_adapted():
    """GPT-2's Conv1D (addmm with a transposed weight) gets an adapter like nn.Linear."""
    _, gm = _transform("gpt2")
    paths = {a.path for a in gm.lorafa.adapters}
    assert "transformer.h.0.attn.c_attn" in paths
    a = next(a for a in gm.lorafa.adapters if a.path == "transformer.h.0.attn.c_attn")
    assert (a.in_features, a.out_features) == (64, 192)
    assert gm.get_parameter(f"{a.path}.lora_A.weight").shape == (4, 64)
    assert gm.get_parameter(f"{a.path}.lora_B.weight").shape == (192, 4)


def test_lora_A_init_is_seeded_and_selectable():
    """Same seed -> same A; init options give their defining statistics (PEFT/paper Table 6)."""
    a1 = _transform("llama", seed=3)[1].get_parameter("model.layers.0.self_attn.q_proj.lora_A.weight")
    a2 = _transform("llama", seed=3)[1].get_parameter("model.layers.0.self_attn.q_proj.lora_A.weight")
    a3 = _transform("llama", seed=4)[1].get_parameter("model.layers.0.self_attn.q_proj.lora_A.weight")
    torch.testing.assert_close(a1, a2)
    assert not torch.equal(a1, a3)
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64, as nn.Linear and PEFT
    assert a1.abs().max() <= bound
    ones = _transform("llama", init_lora_weights="ones")[1].get_parameter("model.layers.0.mlp.up_proj.lora_A.weight")
    assert torch.equal(ones, torch.ones_like(ones))
    orth = _transform("llama", init_lora_weights="orthogonal")[1].get_parameter("model.layers.0.mlp.up_proj.lora_A.weight")
    torch.testing.assert_close(orth @ orth.T, torch.eye(4), atol=1e-5, rtol=0)
