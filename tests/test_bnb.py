"""QLoRA-FA: bitsandbytes Linear4bit (NF4, double quant) and Linear8bitLt bases, on CPU, against
PEFT's QLoRA (peft.tuners.lora.bnb) with lora_A frozen on the same quantised model."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_batch, make_model, peft_lora_B, peft_reference, randomize_lora_B

import lorafa_fx
from lorafa_fx import LoraFAConfig
from lorafa_fx.bnb_layers import traceable

bnb = pytest.importorskip("bitsandbytes")

EXAMPLE_SHAPE = (2, 12)
OTHER_SHAPE = (3, 9)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_model("llama").save_pretrained(path)
    return path


def _quantised(path, bits: int, compute_dtype=torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings(action="ignore"):
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu")
    # bnb repacks 4-bit weights for CPU inference on an eval-mode no-grad call; train mode
    # keeps the trainable layout, for the model and for the PEFT copy of it.
    return model.train()


def _transform(model, **config):
    with traceable(model):  # a no-op once transform enters it itself
        gm = lorafa_fx.transform(model, example_inputs=make_batch("llama", *EXAMPLE_SHAPE),
                                 config=LoraFAConfig(**{"r": 4, "lora_alpha": 8, **config}))
    randomize_lora_B(gm)
    return gm


def test_capture_keeps_one_quantised_op_per_layer(llama_dir):
    """Reference: the model's own bnb layers — one lorafa_fx.matmul_4bit per Linear4bit, on the
    model's packed Params4bit (shared, not copied) and its absmax buffers; the adapter's input
    is the op's input and A/B are in the layer's compute dtype."""
    model = _quantised(llama_dir, 4)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    gm = _transform(model)
    ops = gm.graph.find_nodes(op="call_function", target=torch.ops.lorafa_fx.matmul_4bit.default)
    assert len(ops) == len(layers) == len(gm.lorafa.adapters) == 14
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "bitsandbytes" in str(n.target)]
    for op in ops:
        path = op.args[1].target.removesuffix(".weight")
        assert gm.get_parameter(f"{path}.weight") is layers[path].weight
        assert op.args[2].target == f"{path}.quant_absmax"
        # the down-projection x A^T ("xa" itself when scaling is 1)
        down = next(u for u in op.args[0].users if u.meta.get("lorafa", {}).get("role") in ("down", "xa"))
        assert down.meta["lorafa"]["adapter"] == path
    assert not hasattr(next(iter(layers.values())), "quant_absmax")  # the model is left as it was

    model16 = _quantised(llama_dir, 4, compute_dtype=torch.bfloat16)
    gm16 = _transform(model16, target_modules=["q_proj"])
    assert {gm16.get_parameter(f"{a.path}.lora_{x}.weight").dtype for a in gm16.lorafa.adapters for x in "AB"} == {
        torch.bfloat16}


@pytest.mark.parametrize("bits", [4, 8])
def test_matches_peft_qlora_with_frozen_A(llama_dir, bits):
    """Reference: PEFT QLoRA (lora.bnb.Linear4bit / Linear8bitLt) on the same quantised model with
    the same A (frozen) and B: same logits, loss, every lora_B grad, and 3 AdamW steps' losses."""
    model = _quantised(llama_dir, bits)
    gm = _transform(model)
    ref = peft_reference(model, gm)
    batch = make_batch("llama", *OTHER_SHAPE, seed=7)
    out, ref_out = gm(**batch), ref(**batch)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref_out.loss, atol=2e-5, rtol=0)
    out.loss.backward()
    ref_out.loss.backward()
    for a in gm.lorafa.adapters:
        grad = gm.get_parameter(f"{a.path}.lora_B.weight").grad
        torch.testing.assert_close(grad, peft_lora_B(ref, a.path).grad, atol=2e-5, rtol=1e-3)

    losses = []
    for module in (gm, ref):
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
        opt.zero_grad()
        losses.append([])
        for _ in range(3):
            loss = module(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[-1].append(loss.item())
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=2e-5, rtol=0)


def test_backward_saves_no_dequantised_weight(llama_dir):
    """Reference: bnb's MatMul4Bit, which keeps only the packed weight for backward — no saved
    tensor has a base weight's (out, in) float shape."""
    model = _quantised(llama_dir, 4)
    gm = _transform(model)
    shapes = {(a.out_features, a.in_features) for a in gm.lorafa.adapters}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = gm(**make_batch("llama", *OTHER_SHAPE)).loss
    assert saved
    assert not [t for t in saved if t.dtype.is_floating_point and tuple(t.shape) in shapes]
    loss.backward()
    assert all(gm.get_parameter(f"{a.path}.lora_B.weight").grad is not None for a in gm.lorafa.adapters)


def test_bf16_compute_matches_peft_to_bf16_precision(llama_dir):
    """Reference: PEFT QLoRA with the same A/B (PEFT keeps its adapter in float32; ours is in the
    bnb compute dtype, bfloat16): logits and lora_B grads agree to bfloat16 precision."""
    model = _quantised(llama_dir, 4, compute_dtype=torch.bfloat16)
    gm = _transform(model, target_modules=["q_proj", "v_proj"])
    ref = peft_reference(model, gm)
    batch = make_batch("llama", *OTHER_SHAPE, seed=7)
    out, ref_out = gm(**batch), ref(**batch)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=2e-2, rtol=0)
    out.loss.backward()
    ref_out.loss.backward()
    for a in gm.lorafa.adapters:
        grad, ref_grad = gm.get_parameter(f"{a.path}.lora_B.weight").grad, peft_lora_B(ref, a.path).grad
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.float(), ref_grad, atol=2e-2 * ref_grad.abs().max().item(), rtol=0)


def test_other_calls_and_generate_leave_the_4bit_weights_as_the_graph_reads_them(llama_dir):
    """An eval-mode call without labels and gm.generate run bnb's own Linear4bit on gm's shared weights.
    Reference: PEFT QLoRA with the same A (frozen) and B, in train mode (bnb cannot repack layers this small for
    CPU inference; Llama has no dropout): the same logits and greedy tokens. The training call's loss is the same
    before and after them: bnb's in-place repacking for CPU inference would change the layout the graph reads."""
    model = _quantised(llama_dir, 4)
    gm = _transform(model)
    ref = peft_reference(model, gm)
    batch = make_batch("llama", *OTHER_SHAPE, seed=7)
    before = gm(**batch).loss
    gm.eval()
    prompt = {"input_ids": batch["input_ids"][:, :5], "attention_mask": batch["attention_mask"][:, :5]}
    with torch.no_grad():
        torch.testing.assert_close(gm(**prompt).logits, ref(**prompt).logits, atol=2e-5, rtol=0)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gm.generate(**prompt, **greedy), ref.generate(**prompt, **greedy))
    gm.train()
    torch.testing.assert_close(gm(**batch).loss, before, atol=0, rtol=0)
