"""calls: every call of the model works on the transformed module and equals PEFT LoRA with the same
A and B (and the same trained head); under no_grad nothing is saved; ``gm.generate`` is PEFT's."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import make_batch, make_model, peft_lora_B, peft_reference, randomize_lora_B, transformed
from transformers import BertConfig, BertForSequenceClassification, DebertaV2Config, DebertaV2ForSequenceClassification

import lorafa_fx
from lorafa_fx.calls import eager_model
from lorafa_fx.errors import LoraFAError

_ENCODER = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                max_position_embeddings=128, num_labels=3)


def _bert(_name):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**_ENCODER))


def _deberta_v2(_name):
    torch.manual_seed(0)
    return DebertaV2ForSequenceClassification(DebertaV2Config(**_ENCODER))


#: name -> (zoo name: the batch and LoraFAConfig, model builder or None for the zoo's)
ARCHS = {"llama": ("llama", None), "gpt2": ("gpt2", None), "t5": ("t5", None), "bert": ("roberta", _bert),
         "roberta": ("roberta", None), "deberta_v2": ("roberta", _deberta_v2)}


def _randomized(model, gm, scale=0.1):
    """A random B, and a perturbed copy of the trained head (modules_to_save), so both show in the outputs;
    the PEFT reference (A frozen) with the same A, B and head."""
    randomize_lora_B(gm, seed=3, scale=scale)
    ref = peft_reference(model, gm)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path in gm.lorafa.config.modules_to_save or ():
            copy_in_ref = ref.base_model.model.get_submodule(path).modules_to_save["default"]
            for name, p in gm.get_submodule(path).named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
                copy_in_ref.get_parameter(name).copy_(p)
    return ref


@pytest.fixture(scope="module", params=list(ARCHS))
def adapted(request):
    zoo_name, model_fn = ARCHS[request.param]
    model, gm = transformed(zoo_name, model_fn=model_fn)
    return request.param, zoo_name, model, gm, _randomized(model, gm)


def _calls(name, zoo_name):
    """The calls a user makes besides the training step, on a batch of another shape with padding."""
    batch = make_batch(zoo_name, 3, 10, seed=5)
    batch["attention_mask"][0, -3:] = 0
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if name == "t5":  # T5 needs the decoder's input when it has no labels (the model raises otherwise)
        inputs["decoder_input_ids"] = batch["labels"]
    calls = {
        "captured": batch,
        "without labels": inputs,
        "labels=None": {**batch, "labels": None, **inputs},
        "without attention_mask": {k: v for k, v in batch.items() if k != "attention_mask"},
    }
    if name == "t5":
        calls["with decoder_attention_mask"] = {**batch, "decoder_attention_mask": torch.ones_like(batch["labels"])}
    else:
        calls["with position_ids"] = {**batch, "position_ids": torch.arange(10).expand(3, 10)}
    if name == "bert":
        calls["with token_type_ids"] = {**inputs, "token_type_ids": (torch.arange(10) >= 5).long().expand(3, 10)}
    return calls


def test_every_call_equals_peft(adapted):
    """Reference: PEFT LoRA (A frozen) with the same A, B and head copy, called the same way, in eval
    mode: same output type, logits (and loss where there are labels); the unadapted model's logits differ."""
    name, zoo_name, model, gm, ref = adapted
    gm.eval(), ref.eval(), model.eval()
    for call, kwargs in _calls(name, zoo_name).items():
        with torch.no_grad():
            out, want, base = gm(**kwargs), ref(**kwargs), model(**kwargs)
        assert type(out) is type(want), call
        torch.testing.assert_close(out.logits, want.logits, atol=2e-5, rtol=0, msg=call)
        assert (out.loss is None) == (want.loss is None), call
        if want.loss is not None:
            torch.testing.assert_close(out.loss, want.loss, atol=2e-5, rtol=0, msg=call)
        assert (out.logits - base.logits).abs().max() > 1e-3, call


def test_no_grad_saves_nothing(adapted):
    """Reference: autograd's pack hook, called for every tensor saved for backward: never under
    no_grad (train mode, the captured call and another), on each path; some with grad enabled."""
    name, zoo_name, _, gm, _ = adapted
    calls = _calls(name, zoo_name)
    gm.train()

    def saved(kwargs) -> int:
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
            gm(**kwargs)
        return len(packed)

    with torch.no_grad():
        assert saved(calls["captured"]) == 0 and saved(calls["without labels"]) == 0
    assert saved(calls["captured"]) > 0


@pytest.fixture(scope="module")
def llama():
    model, gm = transformed("llama")
    return model, gm, _randomized(model, gm)


def test_training_call_is_the_captured_graph(llama):
    """Reference: the captured graph's forward called directly: the same loss and grads, bit for bit, and
    the eager model never runs; a call without labels runs it."""
    _, gm, _ = llama
    batch = make_batch("llama", 2, 8, seed=6)
    eager_calls = []
    eager_model(gm).register_forward_pre_hook(lambda *_: eager_calls.append(1))
    gm.train()
    grads = []
    for call in (gm, lambda **b: type(gm).forward(gm, **b)):
        gm.zero_grad()
        loss = call(**batch).loss
        loss.backward()
        grads.append((loss, [gm.get_parameter(f"{a.path}.lora_B.weight").grad.clone() for a in gm.lorafa.adapters]))
    assert not eager_calls
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)
    assert list(inspect.signature(gm.forward).parameters) == ["input_ids", "attention_mask", "labels"]
    with torch.no_grad():
        gm(input_ids=batch["input_ids"])
    assert eager_calls == [1]


def test_training_with_another_call_warns_and_trains_lora_B_like_peft(llama):
    """A loss of the user's own on the logits of a call without labels (as TRL's DPO does). Reference:
    PEFT (A frozen, same A and B), the same loss: the same lora_B grads; the call warns that the plan is not
    what it saves."""
    _, gm, ref = llama
    batch = make_batch("llama", 2, 8, seed=7)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    gm.train(), ref.train()
    gm.zero_grad(), ref.zero_grad()
    with pytest.warns(UserWarning, match="not the call transform captured"):
        gm(**inputs).logits.logsumexp(-1).mean().backward()
    ref(**inputs).logits.logsumexp(-1).mean().backward()
    for a in gm.lorafa.adapters:
        torch.testing.assert_close(gm.get_parameter(f"{a.path}.lora_B.weight").grad, peft_lora_B(ref, a.path).grad,
                                   atol=1e-6, rtol=1e-5, msg=a.path)


def test_a_captured_constant_is_the_graph_for_its_value_only():
    """example_inputs with use_cache=False: that call runs the graph (the eager model never runs), use_cache=True
    (eval mode) runs the model, KV cache returned. Reference: the unmodified model (B = 0) called the same way."""
    model = make_model("llama").eval()
    batch = make_batch("llama", 2, 8) | {"use_cache": False}
    gm = lorafa_fx.transform(model, example_inputs=batch).eval()
    eager_calls = []
    eager_model(gm).register_forward_pre_hook(lambda *_: eager_calls.append(1))
    with torch.no_grad():
        assert gm(**batch).past_key_values is None and not eager_calls
        out, want = gm(**batch | {"use_cache": True}), model(**batch | {"use_cache": True})
    assert eager_calls == [1]
    torch.testing.assert_close(out.logits, want.logits, atol=1e-5, rtol=0)
    for got, expected in zip(out.past_key_values.layers, want.past_key_values.layers, strict=True):
        torch.testing.assert_close(got.keys, expected.keys, atol=1e-5, rtol=0)


def test_deepcopy_runs_its_own_tensors(llama):
    """Reference: the unadapted model (a copy whose lora_B are zeroed computes it) and PEFT (the original,
    untouched): ``copy.deepcopy(gm)`` (EMA, TRL's reference model) takes other calls on its own tensors."""
    model, gm, ref = llama
    twin = copy.deepcopy(gm)
    gm_tensors = {id(t) for t in [*gm.parameters(), *gm.buffers()]}
    twin_tensors = {id(t) for t in [*twin.parameters(), *twin.buffers()]}
    assert {id(p) for p in eager_model(twin).parameters()} <= twin_tensors
    assert not {id(p) for p in eager_model(twin).parameters()} & gm_tensors
    assert inspect.signature(twin.forward) == inspect.signature(gm.forward)
    with torch.no_grad():
        for a in twin.lorafa.adapters:
            twin.get_parameter(f"{a.path}.lora_B.weight").zero_()
    batch = make_batch("llama", 2, 8, seed=8)
    inputs = {"input_ids": batch["input_ids"]}
    for m in (gm, twin, ref, model):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(**inputs).logits, model(**inputs).logits, atol=2e-5, rtol=0)
        torch.testing.assert_close(gm(**inputs).logits, ref(**inputs).logits, atol=2e-5, rtol=0)


def test_other_calls_follow_gm_to(llama):
    """``gm.double()`` replaces gm's buffers (the rotary frequencies): the eager model runs gm's. Reference:
    PEFT made double the same way. ``gm.to("meta")`` replaces every tensor: the eager model's are all on meta,
    the model's own (a buffer the captured call does not read, Llama's original_inv_freq) moved with them."""
    _, gm, ref = llama
    gm, ref = copy.deepcopy(gm).double().eval(), copy.deepcopy(ref).double().eval()
    inputs = {"input_ids": make_batch("llama", 2, 8, seed=8)["input_ids"]}
    with torch.no_grad():
        out = gm(**inputs).logits
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref(**inputs).logits, atol=1e-10, rtol=0)
    assert "model.rotary_emb.original_inv_freq" not in dict(gm.named_buffers())
    eager = eager_model(gm.to("meta"))
    assert "model.rotary_emb.original_inv_freq" in dict(eager.named_buffers())
    assert {t.device.type for t in [*eager.parameters(), *eager.buffers()]} == {"meta"}


@pytest.mark.slow
def test_compiled_module_takes_other_calls(llama):
    """``torch.compile(gm, fullgraph=True)`` compiles a call without labels too (the model's own code with
    the adapters' hooks). Reference: the same module run eagerly."""
    _, gm, _ = llama
    gm.eval()
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    inputs = {"input_ids": make_batch("llama", 2, 8, seed=8)["input_ids"]}
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, gm(**inputs).logits, atol=1e-5, rtol=0)


def test_lora_dropout_draws_peft_masks():
    """lora_dropout=0.1, train mode, a call without labels, from the same RNG seed. Reference: PEFT with the same
    A, B and dropout: the same logits (the same masks on the adapters' inputs); in eval mode nothing is dropped."""
    model, gm = transformed("llama", lora_dropout=0.1)
    ref = _randomized(model, gm)
    inputs = {"input_ids": make_batch("llama", 2, 8, seed=8)["input_ids"]}
    outs = []
    for m in (gm, ref):
        m.train()
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(m(**inputs).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=0)
    gm.eval()
    with torch.no_grad():
        assert (gm(**inputs).logits - outs[0]).abs().max() > 1e-3


def test_other_calls_follow_gm_dropout_modules():
    """GPT-2 (dropout 0.1) in train mode, a call without labels, from the same RNG seed. Reference: PEFT with the
    same A and B whose dropout modules are edited like gm's: the same logits with p = 0.1 (the same masks), and
    after p = 0 on each nn.Dropout gm has (what TRL's disable_dropout_in_model does)."""
    model, gm = transformed("gpt2")
    ref = _randomized(model, gm)
    inputs = {"input_ids": make_batch("gpt2", 2, 8, seed=8)["input_ids"]}

    def logits(m):
        m.train()
        torch.manual_seed(0)
        with torch.no_grad():
            return m(**inputs).logits

    dropped = logits(gm)
    torch.testing.assert_close(dropped, logits(ref), atol=2e-5, rtol=0)
    for name, module in gm.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = ref.base_model.model.get_submodule(name).p = 0.0
    torch.testing.assert_close(logits(gm), logits(ref), atol=2e-5, rtol=0)
    assert (logits(gm) - dropped).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_generate_equals_peft(name):
    """Reference: PEFT's generate with the same A and B: the same greedy tokens, which the unadapted model
    does not produce; gm.generate shares gm's tensors (no copy of the base weights)."""
    model, gm = transformed(name)
    ref = _randomized(model, gm, scale=1.0)
    for m in (gm, ref, model):
        m.eval()
    ids = make_batch(name, 2, 6, seed=9)["input_ids"]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    tokens = gm.generate(**kwargs)
    assert torch.equal(tokens, ref.generate(**kwargs))
    assert not torch.equal(tokens, model.generate(**kwargs))
    gm_tensors = {id(t) for t in [*gm.parameters(), *gm.buffers()]}
    assert {id(p) for p in eager_model(gm).parameters()} <= gm_tensors
    assert gm.can_generate() is True
    # A generation_config set on gm (as Seq2SeqTrainer and TRL do) is the one it follows, as the model would.
    for m in (gm, model):
        m.generation_config = copy.deepcopy(model.generation_config)
        m.generation_config.max_new_tokens = 3
    del kwargs["max_new_tokens"]
    assert gm.generate(**kwargs).shape == model.generate(**kwargs).shape == (2, 4 if name == "t5" else 9)


def test_generate_mid_training_equals_peft_trained_alike():
    """Reference: PEFT (A frozen, same A and B) trained by the same AdamW steps: after 2 and after 4 steps
    gm.generate (in train mode, between optimizer steps) gives PEFT's tokens, new ones as the adapters
    change; generating changes nothing in training (same losses) and leaves gm in train mode."""
    model, gm = transformed("llama")
    ref = _randomized(model, gm)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.2) for m in (gm, ref)]
    prompt = make_batch("llama", 1, 5, seed=9)["input_ids"]
    kwargs = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                  pad_token_id=0)
    gm.train(), ref.train()
    generated = []
    for step in range(4):
        batch = make_batch("llama", 2, 8, seed=10 + step)
        losses = []
        for m, opt in zip((gm, ref), opts):
            loss = m(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-5)
        if step % 2 == 1:
            tokens = gm.generate(**kwargs)
            assert gm.training
            assert torch.equal(tokens, ref.generate(**kwargs))
            generated.append(tokens)
    assert not torch.equal(*generated)


def test_a_model_that_cannot_generate_says_so():
    """Reference: the model's own can_generate() (False for sequence classification)."""
    model, gm = transformed("roberta")
    assert gm.can_generate() is model.can_generate() is False
    with pytest.raises(LoraFAError, match="cannot generate"):
        gm.generate(input_ids=make_batch("roberta", 1, 4)["input_ids"])
