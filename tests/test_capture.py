"""capture + emit: call convention, shared weights, dynamic shapes, train/eval, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import make_batch, make_model

import lorafa_fx
from lorafa_fx import AlreadyTransformedError, CaptureError, LoraFAConfig


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


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (5, 3), (4, 128)])
def test_one_capture_serves_other_shapes(shape):
    """Reference: the unmodified model (B = 0, so outputs must be identical) at each shape."""
    model = make_model("llama").eval()
    gm = lorafa_fx.transform(model, example_inputs=make_batch("llama", 2, 12))
    batch = make_batch("llama", *shape, seed=3)
    torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_sequence_longer_than_the_position_limit_is_rejected():
    gm = lorafa_fx.transform(make_model("llama"), example_inputs=make_batch("llama", 2, 12))
    with pytest.raises(Exception, match=r"input_ids.size\(\)\[1\] <= 128"):
        gm(**make_batch("llama", 1, 129))


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
