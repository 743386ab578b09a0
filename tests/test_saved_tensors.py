"""Saved-for-backward bytes of one training step, measured with saved_tensors_hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import CONFIG_KWARGS, MODELS, make_batch, make_model, peft_reference, transform

from lorafa_fx import LoraFAConfig
from lorafa_fx.measure import module_state, saved_activation_bytes

SHAPE = (2, 16)


def _saved(module, batch) -> int:
    module.train()
    return saved_activation_bytes(lambda: module(**batch).loss, exclude=module_state(module))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_saved_bytes_full_ft_gt_lora_gt_lora_frozen_A_ge_ours(name):
    """References: the unmodified model trained in full, PEFT LoRA, PEFT LoRA with lora_A frozen."""
    batch = make_batch(name, *SHAPE)
    config = LoraFAConfig(r=4, **CONFIG_KWARGS.get(name, {}))
    model = make_model(name)
    gm = transform(model, example_inputs=batch, config=config)
    full_ft = _saved(make_model(name), batch)
    lora = _saved(peft_reference(make_model(name), gm, lora_A_trainable=True), batch)
    lora_fa = _saved(peft_reference(make_model(name), gm), batch)
    ours = _saved(gm, batch)
    assert full_ft > lora > lora_fa >= ours, (full_ft, lora, lora_fa, ours)


def test_gqa_graph_saves_no_more_than_eager():
    """Reference: the eager Qwen2 (GQA) model. Under export transformers materialises the causal
    mask and expands k/v heads; simplify_attention must undo both."""
    batch = make_batch("qwen2", *SHAPE)
    eager = make_model("qwen2")
    for p in eager.parameters():
        p.requires_grad_(False)
    eager.model.embed_tokens.weight.requires_grad_(True)  # so every activation needs grad
    gm = transform(make_model("qwen2"), example_inputs=batch, config=LoraFAConfig(target_modules=["lm_head"]))
    gm.get_parameter("model.embed_tokens.weight").requires_grad_(True)
    eager_bytes, ours = _saved(eager, batch), _saved(gm, batch)
    lm_head_xa = SHAPE[0] * SHAPE[1] * 8 * 4  # the one adapter's b*s*r fp32 values
    assert ours <= eager_bytes + lm_head_xa, (eager_bytes, ours)


class _LinearStack(nn.Module):
    """Frozen linears in a row: nothing but the adapters needs a linear's input for backward."""

    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


@pytest.mark.parametrize("r", [2, 8])
def test_saves_exactly_b_s_r_per_adapted_linear(r):
    """Reference: the paper's Table 1, LoRA-FA activation memory = b*s*r per adapted linear."""
    torch.manual_seed(0)
    b, s, d, n = 3, 10, 32, 4
    x = torch.randn(b, s, d)
    gm = transform(_LinearStack(d, n), example_inputs={"hidden_states": x}, config=LoraFAConfig(r=r))
    saved = saved_activation_bytes(lambda: gm(hidden_states=torch.randn(b, s, d)).sum(), exclude=module_state(gm))
    assert saved == n * b * s * r * 4
