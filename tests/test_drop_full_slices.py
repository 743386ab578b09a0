"""drop_full_slices: the captured graph loses its whole-dim slices; numerics against the capture."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cached_capture, make_batch, make_model
from torch.testing import FileCheck

from lorafa_fx.passes.drop_full_slices import DropFullSlices, is_full_slice


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_drops_full_slices_and_keeps_loss_and_grads(name):
    """Reference: the captured graph before the pass (every parameter trained)."""
    ref = cached_capture(make_model(name), make_batch(name, 2, 12))
    gm = DropFullSlices()(copy.deepcopy(ref)).graph_module
    assert any(is_full_slice(n) for n in ref.graph.nodes)
    assert not any(is_full_slice(n) for n in gm.graph.nodes)
    batch = make_batch(name, 3, 9, seed=4)
    losses = []
    for m in (ref, gm):
        torch.manual_seed(0)  # the same dropout masks (GPT-2)
        loss = m(**batch).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=0, rtol=0)
    for (n, p), q in zip(ref.named_parameters(), gm.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=0, rtol=0, msg=n)


def test_partial_slices_stay():
    """Llama's rotate_half slices x[..., :d/2] and x[..., d/2:]: real slices, kept."""
    gm = DropFullSlices()(cached_capture(make_model("llama"), make_batch("llama", 2, 12))).graph_module
    FileCheck().check("aten.slice.Tensor").run(gm.code)
