"""Linears written by hand (passes/recognize_linears.py): Falcon's ``FalconLinear`` computes
``x @ W.T (+ b)``; every one of them gets an adapter. References: the unmodified model (outputs
with lora_B at zero), PEFT LoRA with A frozen (loss and lora_B gradients with lora_B random),
and for a layer that is no linear at all, the error naming it."""

from __future__ import annotations

import pytest
import torch
from conftest import peft_lora_B, peft_reference, randomize_lora_B, transform
from torch import nn
from transformers import FalconConfig, FalconForCausalLM

import lorafa_fx
from lorafa_fx.errors import TargetNotFoundError

LAYERS, VOCAB = 2, 96
PROJECTIONS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def _falcon(bias: bool) -> FalconForCausalLM:
    torch.manual_seed(0)
    return FalconForCausalLM(FalconConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                          vocab_size=VOCAB, bias=bias))


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("bias", [False, True])
def test_every_falcon_linear_is_adapted_and_trains_as_peft(bias):
    model = _falcon(bias)
    gm = transform(model, example_inputs=_batch(), config=lorafa_fx.LoraFAConfig(r=4))
    assert sorted(a.path for a in gm.lorafa.adapters) == sorted(
        f"transformer.h.{i}.{p}" for i in range(LAYERS) for p in PROJECTIONS)
    assert "numpy_T" not in gm.code  # no weight left multiplied by hand
    with torch.no_grad():  # lora_B is zero: the model itself
        torch.testing.assert_close(gm(**_batch()).logits, model(**_batch()).logits, rtol=1e-6, atol=1e-6)

    randomize_lora_B(gm)
    ref = peft_reference(model, gm)
    out, expected = gm(**_batch()), ref(**_batch())
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-6, atol=0)
    out.loss.backward()
    expected.loss.backward()
    for a in gm.lorafa.adapters:
        torch.testing.assert_close(gm.get_parameter(f"{a.path}.lora_B.weight").grad, peft_lora_B(ref, a.path).grad,
                                   rtol=1e-5, atol=1e-7)


class _Untransposed(nn.Module):
    """A linear module whose weight the forward multiplies as it is stored (``x @ W``): no linear."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (x @ self.proj.weight).square().mean()}


def test_targets_that_never_run_as_linears_are_an_error_naming_them():
    with pytest.warns(UserWarning, match="not called in the model's forward"), \
            pytest.raises(TargetNotFoundError, match=r"Nothing to train: .*\(e\.g\. proj\).*modules_to_save"):
        lorafa_fx.transform(_Untransposed(), example_inputs={"x": torch.randn(2, 3, 8)})
