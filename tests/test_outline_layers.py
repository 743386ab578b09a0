"""outline_layers: each decoder layer becomes a called submodule owning its parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_batch, randomize_lora_B, transformed
from torch.testing import FileCheck

from lorafa_fx.choices import Decision
from lorafa_fx.ops.regions import outlined_layers
from lorafa_fx.passes.outline_layers import OutlineLayers
from lorafa_fx.passes.recompute_regions import RecomputeRegions


def _pair(name: str = "llama", decisions: dict | None = None):
    _, gm = transformed(name, (2, 8), r=4)
    randomize_lora_B(gm)
    if decisions:
        gm = RecomputeRegions(decisions)(gm).graph_module
    flat = copy.deepcopy(gm)
    return flat, OutlineLayers()(gm).graph_module


def _loss_and_grads(gm, batch):
    gm.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = gm(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in gm.named_parameters() if p.requires_grad}


def test_layers_are_called_submodules_with_unchanged_parameter_names():
    flat, gm = _pair()
    assert outlined_layers(gm) == ["model.layers.0", "model.layers.1"]
    FileCheck().check("self.model.layers").check("self.model.layers").run(gm.code)
    assert "lora_B" not in gm.code  # the adapters are read inside the layers now
    layer = gm.get_submodule("model.layers.0")
    assert isinstance(layer, torch.fx.GraphModule)
    assert "self_attn.q_proj.lora_B.weight" in dict(layer.named_parameters())
    assert list(gm.state_dict()) == list(flat.state_dict())
    assert {n: p.requires_grad for n, p in gm.named_parameters()} == {
        n: p.requires_grad for n, p in flat.named_parameters()}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("recompute", [None, Decision.RECOMPUTE])
def test_loss_and_grads_match_the_flat_module(name, recompute):
    """Reference: the flat emitted GraphModule (same weights), in train mode."""
    decisions = {"model.layers.1": recompute} if recompute else None
    if name == "gpt2" and decisions:
        decisions = {"transformer.h.1": recompute}
    flat, gm = _pair(name, decisions)
    batch = make_batch(name, 2, 12, seed=5)
    ref_loss, ref_grads = _loss_and_grads(flat, batch)
    loss, grads = _loss_and_grads(gm, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-7)
    if recompute:
        assert any(type(m).__name__ == "Recompute" for m in gm.get_submodule(next(iter(decisions))).modules())
