"""chunk_cross_entropy, run on a transformed module.

Reference for every numeric check: the same transformed module before the pass (a deepcopy),
run with the same dropout seed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, randomize_lora_B, transform, transformed
from torch.testing import FileCheck
from transformers import LlamaConfig, LlamaForCausalLM

from lorafa_fx import LoraFAConfig
from lorafa_fx.measure import measure_peak_bytes
from lorafa_fx.ops.cross_entropy import linear_cross_entropy
from lorafa_fx.passes.chunk_cross_entropy import ChunkCrossEntropy

LINEAR = "torch.ops.aten.linear.default"
NAMES = ["llama", "qwen2", "gpt2", "roberta", "t5"]


def _transformed(name: str, **config):
    model, gm = transformed(name, (2, 16), r=4, **config)
    randomize_lora_B(gm)
    return model, gm


def _with_pass(name: str, make_pass, **config):
    """(user's model, reference = transformed module, the same after the pass, PassResult)."""
    model, gm = _transformed(name, **config)
    ref = copy.deepcopy(gm)
    result = make_pass()(gm)
    return model, ref, result.graph_module, result


def _step(module, batch, seed=0):
    torch.manual_seed(seed)  # the same dropout masks in both modules
    out = module(**batch)
    out.loss.backward()
    return out


def _assert_same_training_step(ref, gm, name):
    batch = make_batch(name, 3, 11, seed=5)  # another shape than the captured one
    loss_ref, loss = _step(ref, batch).loss, _step(gm, batch).loss
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
    grads = [(n, p.grad, gm.get_parameter(n).grad) for n, p in ref.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for _, _, g in grads)
    for n, g_ref, g in grads:
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5, msg=n)


def test_chunk_ce_replaces_the_loss_and_gates_the_logits():
    _, ref, gm, result = _with_pass("llama", lambda: ChunkCrossEntropy(chunk_size=7))
    assert result.modified
    FileCheck().check("cross_entropy_loss").run(ref.code)
    FileCheck().check_not("cross_entropy_loss").check("linear_cross_entropy").run(gm.code)
    FileCheck().check_count(LINEAR, 3 * len(gm.lorafa.adapters), exactly=True).run(gm.code)  # lm_head's gone
    assert isinstance(gm.get_submodule("lm_head.eval_logits"), torch.nn.Module)
    batch = make_batch("llama", 2, 16)
    assert gm(**batch).logits is None  # train mode: never materialised
    ref.eval()
    gm.eval()
    with torch.no_grad():
        out_ref, out = ref(**batch), gm(**batch)
    torch.testing.assert_close(out.logits, out_ref.logits)
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_chunk_ce_same_loss_and_grads(name):
    """chunk_size=5 splits the 33 rows unevenly; RoBERTa's head (trained in full) gets grad_W, grad_b."""
    _, ref, gm, result = _with_pass(name, lambda: ChunkCrossEntropy(chunk_size=5))
    assert result.modified
    _assert_same_training_step(ref, gm, name)


@pytest.mark.parametrize("options", [
    {},
    {"reduction": "sum"},
    {"label_smoothing": 0.1},
    {"ignore_index": 3, "label_smoothing": 0.2},
])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_torch(options, bias):
    """Reference: F.cross_entropy(F.linear(h, W, b)) with autograd, trainable h, W and b."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 9, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True) if bias else None
    target = torch.randint(0, 50, (27,), generator=g)
    target[::4] = options.get("ignore_index", -100)
    ref = F.cross_entropy(F.linear(h, w, b).flatten(0, 1), target, **options)
    grads_ref = torch.autograd.grad(ref * 1.7, [t for t in (h, w, b) if t is not None])
    loss = linear_cross_entropy(h, w, b, target, chunk_size=4, **options)
    grads = torch.autograd.grad(loss * 1.7, [t for t in (h, w, b) if t is not None])
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunk_ce_peak_drops_by_more_than_the_logits():
    """Acceptance (issue 8): with a 128k vocabulary the step's peak falls by >= the fp32 logits."""
    torch.manual_seed(0)
    vocab, batch_size, seq = 128256, 2, 32
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64))
    batch = make_batch("llama", batch_size, seq)
    batch["input_ids"] = torch.randint(0, vocab, (batch_size, seq), generator=torch.Generator().manual_seed(1))
    batch["labels"] = batch["input_ids"].clone()
    peaks, losses = [], []
    for chunk in (False, True):
        gm = transform(copy.deepcopy(model), example_inputs=batch, config=LoraFAConfig(r=4))
        if chunk:
            gm = ChunkCrossEntropy()(gm).graph_module
        opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad])

        def step(gm=gm, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = gm(**batch).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())

        step()
        opt.zero_grad(set_to_none=True)
        peaks.append(measure_peak_bytes(step, gm, opt, batch))
    logits_bytes = batch_size * seq * vocab * 4
    assert peaks[0] - peaks[1] >= logits_bytes, (peaks, logits_bytes)
    torch.testing.assert_close(losses[2], losses[0], atol=1e-5, rtol=0)  # first steps: same weights


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compiled_chunked_equals_eager_unchunked():
    """Reference: the transformed module without the pass, eager; chunk_cross_entropy under torch.compile."""
    # 3 x 11 rows (transformers pads the labels, so every token has one) in chunks of 16: two full
    # chunks and a ragged one of 1 row (dynamo unrolls the chunk loop: every chunk is more to compile)
    _, ref, gm, _ = _with_pass("llama", lambda: ChunkCrossEntropy(chunk_size=16))
    compiled = torch.compile(gm)
    batch = make_batch("llama", 3, 11, seed=5)
    loss_ref, loss = _step(ref, batch).loss, _step(compiled, batch).loss
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
    for a in gm.lorafa.adapters:
        name = f"{a.path}.lora_B.weight"
        torch.testing.assert_close(gm.get_parameter(name).grad, ref.get_parameter(name).grad, atol=1e-5, rtol=1e-5)
