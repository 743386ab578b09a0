"""capture + emit: call convention, shared weights, dynamic shapes, train/eval, errors."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
from conftest import make_batch, make_model

import lorafa_fx
from lorafa_fx import AlreadyTransformedError, CaptureError, LoraFAConfig
from lorafa_fx.errors import ExampleInputsError, InputShapeError


def test_base_weights_are_shared_not_copied():
    model = make_model("llama")
    gm = lorafa_fx.transform(model, example_inputs=make_batch("llama", 2, 8))
    for name, p in model.named_parameters():
        assert gm.get_parameter(name) is p, name
        assert not p.requires_grad  # frozen in place, as PEFT does


def test_train_and_eval_switch_dropout_like_the_model():
    """Reference: the unmodified GPT-2 (dropout 0.1) under the same RNG seed, in both modes."""
    model = make_model("gpt2")
    batch = make_batch("gpt2", 2, 10)
    gm = lorafa_fx.transform(model, example_inputs=batch)
    for mode in (True, False):
        model.train(mode)
        gm.train(mode)
        assert all(m.training == mode for m in gm.modules())
        torch.manual_seed(5)
        ref = model(**batch).logits
        torch.manual_seed(5)
        torch.testing.assert_close(gm(**batch).logits, ref, atol=1e-5, rtol=0)
    torch.manual_seed(6)
    gm.train()
    assert not torch.allclose(gm(**batch).logits, gm(**batch).logits)  # dropout is really on


def test_keeps_the_models_mode():
    model = make_model("llama").eval()
    assert not lorafa_fx.transform(model, example_inputs=make_batch("llama", 2, 8)).training
    assert not model.training


@functools.cache
def _llama_at_2_by_12() -> tuple[nn.Module, torch.fx.GraphModule]:
    """An eval-mode Llama and its transform at batch 2 x 12, made once per process: the shape
    tests only call both (forward only, nothing trained)."""
    model = make_model("llama").eval()
    return model, lorafa_fx.transform(model, example_inputs=make_batch("llama", 2, 12))


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (5, 3), (4, 128)])
def test_one_capture_serves_other_shapes(shape):
    """Reference: the unmodified model (B = 0, so outputs must be identical) at each shape."""
    model, gm = _llama_at_2_by_12()
    batch = make_batch("llama", *shape, seed=3)
    torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_sequence_longer_than_the_position_limit_is_rejected():
    """Export's own check raises `AssertionError: Guard failed: input_ids.size()[1] <= 128`; the
    error names the input, the size given, the bound, and the config field to raise."""
    _, gm = _llama_at_2_by_12()
    with pytest.raises(InputShapeError) as e:
        gm(**make_batch("llama", 1, 129))
    msg = str(e.value)
    assert "'input_ids' has size 129 in dim 1" in msg and "max_position_embeddings = 128" in msg
    assert "max_position_embeddings is at least 129" in msg


def test_padded_batch_matches_the_model():
    """Reference: the unmodified model with a padded attention mask (mask kept, not elided)."""
    model = make_model("qwen2").eval()
    gm = lorafa_fx.transform(model, example_inputs=make_batch("qwen2", 2, 12))
    batch = make_batch("qwen2", 2, 12, seed=4)
    batch["attention_mask"][0, :5] = 0
    torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


class _NeedsThreeTokens(nn.Module):
    """Its code indexes token 2, so export adds the guard s >= 3 on the sequence dim."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + x[:, 2:3]


def test_guarded_dims_capture_without_user_dims():
    torch.manual_seed(0)
    model = _NeedsThreeTokens()
    with pytest.warns(UserWarning, match=r"bounds dim 1 of input 'x' to sizes 3\.\.any"):
        gm = lorafa_fx.transform(model, example_inputs={"x": torch.randn(2, 5, 8)})
    for shape in [(1, 3), (4, 11)]:
        x = torch.randn(*shape, 8)
        torch.testing.assert_close(gm(x=x), model(x=x))


def test_transforming_twice_raises():
    gm = lorafa_fx.transform(make_model("llama"), example_inputs=make_batch("llama", 2, 8))
    with pytest.raises(AlreadyTransformedError, match="transform the original model"):
        lorafa_fx.transform(gm, example_inputs=make_batch("llama", 2, 8))


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow: export cannot trace it
            return self.proj(x)
        return x


def test_uncapturable_model_names_class_line_and_fix():
    with pytest.raises(CaptureError) as e:
        lorafa_fx.transform(_DataDependent(), example_inputs={"x": torch.randn(2, 4)})
    msg = str(e.value)
    assert "could not capture _DataDependent" in msg
    assert "test_capture.py" in msg and "if x.sum() > 0" in msg
    assert "Try:" in msg


def test_example_inputs_must_be_a_keyword_batch():
    with pytest.raises(TypeError, match="keyword batch"):
        lorafa_fx.transform(make_model("llama"), example_inputs=(torch.ones(2, 3, dtype=torch.long),))


def test_lora_dropout_follows_train_mode():
    """lora_dropout acts on the adapter input only in train mode, as PEFT's lora_dropout."""
    model = make_model("llama")
    batch = make_batch("llama", 2, 8)
    gm = lorafa_fx.transform(model, example_inputs=batch, config=LoraFAConfig(lora_dropout=0.5))
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.normal_()
    gm.eval()
    torch.testing.assert_close(gm(**batch).logits, gm(**batch).logits)
    gm.train()
    assert not torch.allclose(gm(**batch).logits, gm(**batch).logits)


def test_a_batch_of_one_captures_a_module_for_any_batch():
    """Export specialises size-1 dims; capture repeats them so batch 1 is not baked in.
    Reference: the unmodified model at batch 3."""
    model = make_model("llama").eval()
    gm = lorafa_fx.transform(model, example_inputs=make_batch("llama", 1, 1))
    batch = make_batch("llama", 3, 7, seed=9)
    torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


class _AtMostSixteenTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._check(x.shape[1] <= 16)
        return self.proj(x)


def test_a_bound_the_models_code_sets_is_warned_and_enforced_by_name():
    """The code's bound (16) is narrower than the one capture asked for (none): capture says so,
    and a longer batch is refused naming the input, the size and the bound. Reference: the
    model itself within the bound."""
    torch.manual_seed(0)
    model = _AtMostSixteenTokens()
    with pytest.warns(UserWarning, match=r"bounds dim 1 of input 'x' to sizes 2\.\.16"):
        gm = lorafa_fx.transform(model, example_inputs={"x": torch.randn(2, 5, 8)})
    x = torch.randn(3, 16, 8)
    torch.testing.assert_close(gm(x=x), model(x=x))
    with pytest.raises(InputShapeError, match=r"input 'x' has size 17 in dim 1; this module was captured for at most 16"):
        gm(x=torch.randn(3, 17, 8))


def test_example_key_the_model_does_not_take_is_refused():
    batch = make_batch("llama", 2, 8) | {"row_id": torch.arange(2)}
    with pytest.raises(ExampleInputsError, match=r"example_inputs has 'row_id', which LlamaForCausalLM.forward does "
                                                 r"not take\. It takes: input_ids, attention_mask"):
        lorafa_fx.transform(make_model("llama"), example_inputs=batch)
    with pytest.raises(ExampleInputsError, match=r"'mask', which _NeedsThreeTokens.forward does not take\. It takes: x\."):
        lorafa_fx.transform(_NeedsThreeTokens(), example_inputs={"x": torch.randn(2, 5, 8), "mask": torch.ones(2, 5)})


def test_example_key_only_kwargs_would_take_is_refused():
    """GPT-2's forward takes **kwargs; torch.export cannot pass an example through them."""
    batch = make_batch("gpt2", 2, 8) | {"output_attentions": False}
    with pytest.raises(ExampleInputsError, match=r"'output_attentions', which GPT2LMHeadModel.forward takes only "
                                                 r"through \*\*kwargs"):
        lorafa_fx.transform(make_model("gpt2"), example_inputs=batch)


@pytest.mark.parametrize(("key", "value", "fix"), [
    ("use_cache", True, "remove 'use_cache' from example_inputs"),
    ("return_dict", False, "remove 'return_dict' from example_inputs"),
])
def test_flags_a_training_graph_cannot_honour_are_refused(key, value, fix):
    batch = make_batch("llama", 2, 8) | {key: value}
    with pytest.raises(ExampleInputsError) as e:
        lorafa_fx.transform(make_model("llama"), example_inputs=batch)
    assert f"example_inputs['{key}'] = {value} cannot be captured" in str(e.value) and fix in str(e.value)


def test_use_cache_false_is_captured_and_taken_by_the_module():
    """Reference: the unmodified model called with the same keyword (B = 0)."""
    model = make_model("llama").eval()
    batch = make_batch("llama", 2, 8) | {"use_cache": False}
    gm = lorafa_fx.transform(model, example_inputs=batch).eval()
    torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
