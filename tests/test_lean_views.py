"""Lean views and pointwise chains (passes/compact_saved_views.py, passes/lean_pointwise.py):
attention keeps a compact copy of a value sliced from a fused q/k/v buffer (GPT-NeoX, Phi-3),
and a GELU written as elementwise ops keeps only its input (Bloom, GPT-2's ``gelu_new``).

References: the same captured graph built without each pass (logits, loss and every trained
gradient, bit for bit; the exact bytes each pass frees), PEFT LoRA with A frozen (saved
bytes at most its, issue #17's target; the loss) and the same lean module run eagerly
(`torch.compile`).
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import compiled_step, make_model, peft_reference, randomize_lora_B
from torch.testing import FileCheck
from transformers import BloomConfig, BloomForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, Phi3Config, Phi3ForCausalLM

from lorafa_fx import LoraFAConfig
from lorafa_fx.capture import capture
from lorafa_fx.captured_model import CapturedModel
from lorafa_fx.graph import graph_copy
from lorafa_fx.measure import module_state, saved_activation_bytes
from lorafa_fx.ops.gated_activation import gated_activation
from lorafa_fx.ops.norms import rms_norm
from lorafa_fx.ops.pointwise import RecomputedPointwise
from lorafa_fx.passes.compact_saved_views import CompactSavedViews
from lorafa_fx.passes.lean_pointwise import LeanPointwise
from lorafa_fx.stages import LEAN_PASSES

B, S, D, LAYERS, VOCAB = 2, 8, 64, 2, 96
#: scaling 2, a power of two: PEFT's order of scaling rounds alike.
R, ALPHA = 4, 8
_CONFIGS = {
    "neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        hidden_size=D, intermediate_size=112, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=128)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(
        hidden_size=D, intermediate_size=112, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1)),
    "bloom": lambda: BloomForCausalLM(BloomConfig(hidden_size=D, n_layer=LAYERS, n_head=4, vocab_size=VOCAB)),
    "gpt2": lambda: make_model("gpt2"),
}
_DTYPES = [torch.float32, torch.bfloat16]


@functools.cache
def _export(name: str, dtype: torch.dtype):
    """(model, its torch.export graph): exported once, adapted with several pass lists."""
    torch.manual_seed(0)
    model = _CONFIGS[name]().to(dtype)
    return model, capture(model, _batch())


#: The pass each model exercises: its graph built without that pass is the reference.
_PASS = {"neox": CompactSavedViews, "phi3": CompactSavedViews, "bloom": LeanPointwise, "gpt2": LeanPointwise}


@functools.cache
def _graphs(name: str, dtype: torch.dtype):
    """(model, without, lean): the model in `dtype` and its adapted graph built without the
    pass it exercises and with every pass, both with the same random lora_B."""
    model, exported = _export(name, dtype)
    graphs = []
    for lean in (tuple(p for p in LEAN_PASSES if not isinstance(p, _PASS[name])), LEAN_PASSES):
        captured = CapturedModel(model, _batch(), LoraFAConfig(r=R, lora_alpha=ALPHA), lean_passes=lean,
                                 capture=lambda *_: graph_copy(exported))
        graphs.append(captured.build())
    for gm in graphs:
        randomize_lora_B(gm)
    return model, *graphs


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (B, S), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _step(gm):
    """Forward and backward from zero grads and one seed (GPT-2's dropout): (output,
    {trained parameter: grad})."""
    gm.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = gm(**_batch())
    out.loss.backward()
    return out, {n: p.grad for n, p in gm.named_parameters() if p.requires_grad}


def _saved(module) -> int:
    return saved_activation_bytes(lambda: module(**_batch()).loss, exclude=module_state(module))


def _calls(gm, target) -> int:
    return len(gm.graph.find_nodes(op="call_function", target=target))


def _copies(lean, without) -> int:
    """The compact copies in `lean` that are not in `without`."""
    return _calls(lean, torch.ops.aten.clone.default) - _calls(without, torch.ops.aten.clone.default)


def _chains(gm) -> int:
    return sum(isinstance(gm.get_submodule(n.target), RecomputedPointwise) for n in gm.graph.find_nodes(op="call_module"))


@pytest.mark.parametrize("name, copies, chains", [("neox", 2, 0), ("phi3", 2, 0), ("bloom", 0, 2), ("gpt2", 0, 2)])
def test_one_copy_per_fused_value_and_one_call_per_gelu(name, copies, chains):
    """Structure, against the graph built without the model's pass: one compact copy per layer where attention reads its value from a fused
    q/k/v buffer (Bloom's reshape copies it already; GPT-2's attention keeps all three
    views, the whole buffer), one `RecomputedPointwise` per tanh-GELU and no tanh left; the
    earlier lean passes still match Phi-3's norms and gated MLP."""
    _, without, lean = _graphs(name, torch.float32)
    assert _copies(lean, without) == copies and _chains(lean) == chains
    if chains:
        FileCheck().check("aten.tanh.default").run(without.code)
        FileCheck().check_not("aten.tanh.default").run(lean.code)
    if name == "phi3":
        assert _calls(lean, rms_norm) == 2 * LAYERS + 1 and _calls(lean, gated_activation) == LAYERS


@pytest.mark.parametrize("name, dtype, intermediates", [
    *((name, dtype, n) for name, n in (("neox", 0), ("phi3", 0), ("bloom", 6)) for dtype in _DTYPES),
    ("gpt2", torch.float32, 3),
], ids=str)
def test_same_bits_exact_saving_and_at_most_peft(name, dtype, intermediates, record_property):
    """Reference: the graph without each pass: the same logits, loss and lora_B gradients bit
    for bit, and exactly the bytes each pass frees: per layer, the fused q/k/v buffer less
    value's copy (b·s·2d), and the tanh-GELU's intermediates autograd keeps besides its b·s·4d
    input: Bloom's six (0.5x, 0.79788456x, 0.044715x, 1 + 0.044715x², tanh, 1 + tanh),
    GPT-2's three (0.5x, tanh, 1 + tanh). PEFT
    LoRA with A frozen: at most its saved bytes, the same loss to rounding."""
    model, without, lean = _graphs(name, dtype)
    (expected, expected_grads), (out, grads) = _step(without), _step(lean)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
    assert sorted(grads) == sorted(expected_grads)
    assert all(torch.equal(grads[n], expected_grads[n]) for n in expected_grads)
    per_layer = B * S * 2 * D if _PASS[name] is CompactSavedViews else intermediates * B * S * 4 * D
    assert _saved(without) - _saved(lean) == LAYERS * per_layer * dtype.itemsize
    ref = peft_reference(model, lean)
    ratio = _saved(lean) / _saved(ref)
    record_property("saved_vs_peft_a_frozen", round(ratio, 3))
    print(f"{name} {dtype}: saved / PEFT A-frozen = {ratio:.3f}")
    assert ratio <= 1.0
    torch.manual_seed(0)  # the same dropout masks as `_step`
    torch.testing.assert_close(out.loss, ref(**_batch()).loss, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)


def test_autocast_same_bits_and_less_saved():
    """Reference: Bloom's graph without the passes, fp32 weights under ``torch.autocast("cpu",
    torch.bfloat16)``: the same loss and gradients bit for bit (CPU autocast retypes none of
    the GELU's ops), fewer saved bytes."""
    _, plain, lean = _graphs("bloom", torch.float32)

    def run(gm):
        with torch.autocast("cpu", torch.bfloat16):
            return _step(gm), _saved(gm)

    ((expected, expected_grads), plain_saved), ((out, grads), lean_saved) = run(plain), run(lean)
    assert torch.equal(out.loss, expected.loss)
    assert all(torch.equal(grads[n], expected_grads[n]) for n in expected_grads)
    assert lean_saved < plain_saved


@pytest.mark.parametrize("name", ["neox", "bloom"])
def test_compiled_equals_eager_and_saves_the_same(name):
    """Reference: the same lean module run eagerly. ``torch.compile`` traces the copies and
    the Function whole (``fullgraph``), computes the same loss and gradients, and keeps the
    same activations. Tensors smaller than one b·s·d activation are left out: compiled,
    attention keeps its mask (`simplify_attention` elides it only eagerly) and rotary its
    tables in other shapes, with or without these passes."""
    _, _, lean = _graphs(name, torch.float32)
    eager_saved = _saved_activations(lambda: lean(**_batch()).loss, lean)
    expected, expected_grads = _step(lean)
    saved, loss = compiled_step(lean, _batch(), lambda forward: _saved_activations(forward, lean))
    assert saved == eager_saved
    assert torch.equal(loss, expected.loss)
    for n, grad in expected_grads.items():
        assert torch.equal(lean.get_parameter(n).grad, grad), n


def _saved_activations(step, module) -> list[int]:
    """Sizes of the storages autograd keeps while `step()` runs of at least b·s·d elements."""
    excluded = {t.untyped_storage().data_ptr() for t in module_state(module)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded and storage.nbytes() >= B * S * D * t.element_size():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sorted(saved.values())
