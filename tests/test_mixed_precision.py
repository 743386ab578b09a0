"""Mixed precision: under autocast, and cast with ``gm.to(dtype)``, the transformed module
computes what the eager model (and PEFT LoRA with A frozen) computes in the same setting.

Capture used to pin the example's dtypes (export's ``_assert_tensor_metadata``), so these
setups failed with ``Tensor dtype mismatch! Expected: Float, Got: c10::BFloat16``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_batch, make_model, peft_lora_B, peft_reference, randomize_lora_B, transformed

import lorafa_fx

SEQ = 12
#: scaling 2, a power of two: PEFT scales x A^T B^T where the module scales x A^T, and a power
#: of two rounds alike in either place, so the two agree beyond the precision's rounding.
R, ALPHA = 4, 8
#: Relative error (Frobenius) allowed between a lora_B gradient and PEFT's.
GRAD_RTOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


def _transform(name: str) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    # Eval mode: dropout off, so the module and its references draw no random numbers.
    model, gm = transformed(name, (2, SEQ), r=R, lora_alpha=ALPHA)
    return model.eval(), gm.eval()


def _lora_B_grads(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return {a.path: gm.get_parameter(f"{a.path}.lora_B.weight").grad for a in gm.lorafa.adapters}


def _assert_grads_close(gm, ref, dtype: torch.dtype) -> None:
    for path, grad in _lora_B_grads(gm).items():
        expected = peft_lora_B(ref, path).grad
        assert expected.norm() > 0, path
        assert (grad - expected).norm() <= GRAD_RTOL[dtype] * expected.norm(), path


def _check_autocast(name: str, dtype: torch.dtype) -> None:
    model, gm = _transform(name)
    batch = make_batch(name, 2, SEQ, seed=3)
    with torch.autocast("cpu", dtype=dtype):
        ours, base = gm(**batch), model(**batch)
    full = gm(**batch).logits
    # B = 0: the same function as the model, so under the same autocast the same numbers. The
    # fp32 logits are outside a 10x looser tolerance: autocast really ran inside the graph.
    assert not torch.allclose(ours.logits.float(), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.logits, base.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.loss, base.loss, rtol=1e-6, atol=1e-6)

    randomize_lora_B(gm)
    ref = peft_reference(model, gm).eval()
    with torch.autocast("cpu", dtype=dtype):
        ours, theirs = gm(**batch).loss, ref(**batch).loss
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)
    _assert_grads_close(gm, ref, dtype)


#: T5 (two stacks, cross-attention) takes over 20 s to capture and run on 2 busy cores.
ARCHS = ["llama", "gpt2", "roberta", pytest.param("t5", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", ARCHS)
def test_autocast_bf16_matches_the_model_and_peft(name):
    """Reference: the unmodified model (B = 0) and PEFT LoRA with the same A (frozen) and a random B,
    under the same ``torch.autocast("cpu", torch.bfloat16)``: loss and every lora_B gradient."""
    _check_autocast(name, torch.bfloat16)


def test_autocast_fp16_matches_the_model_and_peft():
    """As the bf16 test, with ``torch.autocast("cpu", torch.float16)`` (CPU fp16 autocast, torch >= 2.4)."""
    _check_autocast("llama", torch.float16)


def test_transforming_under_autocast_gives_the_full_precision_module():
    """Capture switches autocast off: a module transformed inside ``torch.autocast`` has the code
    of the one transformed outside, equals the fp32 model outside autocast (it used
    to fail there) and the model under autocast inside it."""
    model = make_model("llama").eval()
    outside = lorafa_fx.transform(model, example_inputs=make_batch("llama", 2, SEQ))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gm = lorafa_fx.transform(model, example_inputs=make_batch("llama", 2, SEQ)).eval()
    assert gm.code == outside.code
    batch = make_batch("llama", 2, SEQ, seed=3)
    torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_gm_to_bf16_equals_model_to_bf16(name):
    """Reference: a copy of the fp32 base model cast with ``.to(torch.bfloat16)`` (B = 0, so the
    adapters add nothing): same logits, dtype and loss. The eager model casts back to bf16 after
    its fp32 RMSNorm/rotary/loss arithmetic; a graph keeping capture's fp32 literals fails."""
    model, gm = _transform(name)
    reference = copy.deepcopy(model).to(torch.bfloat16)  # before gm.to: gm shares the model's weights
    gm.to(torch.bfloat16)
    batch = make_batch(name, 2, SEQ, seed=3)
    ours, theirs = gm(**batch), reference(**batch)
    assert ours.logits.dtype == theirs.logits.dtype == torch.bfloat16
    # one bf16 rounding step at most
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=2**-8, atol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=2**-8, atol=0)


@pytest.mark.slow
def test_compiled_autocast_step_equals_eager():
    """Reference: the same module run eagerly under the same bf16 autocast: loss and lora_B grads."""
    _, gm = _transform("llama")
    randomize_lora_B(gm)
    batch = make_batch("llama", 2, SEQ, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = gm(**batch).loss
    eager.backward()
    expected = {path: g.clone() for path, g in _lora_B_grads(gm).items()}
    gm.zero_grad()
    compiled = torch.compile(gm, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(**batch).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=0)
    for path, grad in _lora_B_grads(gm).items():
        torch.testing.assert_close(grad, expected[path], rtol=1e-5, atol=1e-6, msg=path)
