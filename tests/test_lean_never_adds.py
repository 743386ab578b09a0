"""No lean pass ever keeps more for backward (stages.LEAN_PASSES), on every family the zoo
builds; T5 and Mamba keep no more than eager PEFT; T5's attention gets its position bias at the
size eager transformers gives it (passes/simplify_attention.py, ops/attention.py).

References: the same capture adapted with one lean pass fewer (autograd's saved tensors, counted
per storage by `measure.saved_activation_bytes`, fp32), PEFT LoRA with A frozen, and the eager
model's own ``scaled_dot_product_attention`` calls.
"""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch
from conftest import (
    cached_capture,
    make_batch,
    make_model,
    make_task_model,
    peft_reference,
    randomize_lora_B,
    transform,
)

from lorafa_fx import LoraFAConfig
from lorafa_fx.captured_model import CapturedModel
from lorafa_fx.graph import graph_copy
from lorafa_fx.measure import module_state, saved_activation_bytes
from lorafa_fx.stages import LEAN_PASSES
from lorafa_fx.zoo import ARCHITECTURES

SHAPE = (2, 16)
#: (family, head) of every family the zoo builds; Mamba with the linears PEFT may adapt on it.
FAMILIES = [*((name, None) for name in ARCHITECTURES), ("bert", "ForSequenceClassification"),
            ("deberta-v2", "ForSequenceClassification"), ("mamba", "ForCausalLM")]
_CONFIG = {"mamba": LoraFAConfig(target_modules=["in_proj", "x_proj", "dt_proj"])}


@functools.cache
def _model(name: str, head: str | None) -> torch.nn.Module:
    return make_task_model(name, head) if head else make_model(name)


def _batch(name: str, head: str | None) -> dict[str, torch.Tensor]:
    return make_batch(name, *SHAPE, head=head)


@functools.cache
def _captured(name: str, head: str | None) -> torch.fx.GraphModule:
    return cached_capture(_model(name, head), _batch(name, head))


def _saved(module: torch.nn.Module, batch: dict) -> int:
    return saved_activation_bytes(lambda: module(**batch).loss, exclude=module_state(module))


@functools.cache
def _built(name: str, head: str | None, lean: tuple) -> torch.fx.GraphModule:
    """The adapted graph of the one capture with the lean passes `lean`, lora_B random."""
    gm = CapturedModel(_model(name, head), _batch(name, head), _CONFIG.get(name, LoraFAConfig()), lean_passes=lean,
                       capture=lambda *_: graph_copy(_captured(name, head))).build()
    randomize_lora_B(gm)
    return gm


@pytest.mark.parametrize("name, head", FAMILIES)
def test_each_lean_pass_keeps_no_more(name, head):
    """Reference: the graph with the lean passes before it only (LEAN_PASSES is applied in order):
    adding each pass never raises the bytes autograd keeps."""
    batch = _batch(name, head)
    saved = [_saved(_built(name, head, LEAN_PASSES[:i]), batch) for i in range(len(LEAN_PASSES) + 1)]
    assert all(after <= before for before, after in zip(saved, saved[1:])), saved


@pytest.mark.parametrize("name, head", [("t5", None), ("mamba", "ForCausalLM")])
def test_keeps_no_more_than_eager_peft(name, head):
    """Reference: PEFT LoRA with A frozen on the same model and targets, fp32 (Mamba was 1.19x when
    compact_saved_views copied slices of ``exp``'s result, which ``exp`` keeps anyway)."""
    gm = _built(name, head, LEAN_PASSES)
    batch = _batch(name, head)
    assert _saved(gm, batch) <= _saved(peft_reference(_model(name, head), gm), batch)


def test_t5_attention_gets_the_position_bias_at_eager_size():
    """Reference: the eager model's SDPA calls on an unpadded batch, where transformers passes
    T5's position bias as a (1, h, q, k) mask. The transformed module's masks are never batch-sized
    (its cross-attention bias of zeros is dropped outright); with padding the logits equal eager
    PEFT's."""
    model = make_model("t5")
    batch = _batch("t5", None)
    gm = transform(model, example_inputs=batch)
    randomize_lora_B(gm)
    ref = peft_reference(model, gm)
    gm.eval(), ref.eval()
    masks = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for module in (gm, ref):
        shapes = masks[module is gm] = []

        def record(q, k, v, attn_mask=None, *args, **kwargs):
            shapes.append(None if attn_mask is None else tuple(attn_mask.shape))
            return sdpa(q, k, v, attn_mask, *args, **kwargs)

        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", record):
            module(**batch)
    assert all(s is None or s[0] == 1 for s in masks[True] + masks[False])
    # Self-attention (square) masks are eager's; cross-attention's (q != k) zeros are not passed at all.
    assert [s for s in masks[True] if s is not None] == [s for s in masks[False] if s is not None and s[-1] == s[-2]]
    padded = {**batch, "attention_mask": batch["attention_mask"].clone()}
    padded["attention_mask"][0, -5:] = 0
    torch.testing.assert_close(gm(**padded).logits, ref(**padded).logits, atol=2e-5, rtol=0)
