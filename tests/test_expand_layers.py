"""A shallow capture grown to full depth (passes/expand_layers.py) against capturing the deep model.

Reference: `CapturedModel` capturing the deep model itself. The grown graph must have the same
parameters (names, shapes, dtypes, trainable), adapters, and simulated step, and plan the
same under a budget; where the deep model's layers do not repeat the shallow one's last, the
deep model is captured instead.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import cached_capture
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import (
    BloomConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Qwen3MoeConfig,
)

from lorafa_fx import LoraFAConfig
from lorafa_fx.api import model_from_config, token_batch
from lorafa_fx.captured_model import CapturedModel
from lorafa_fx.choices import Decision
from lorafa_fx.memory.cost_model import CostModel
from lorafa_fx.pipeline import plan_and_emit
from lorafa_fx.plan_config import PlanSettings
from lorafa_fx.shallow import SHALLOW_LAYERS, shallow_config

LAYERS = 4
SHAPE = (2, 16)


def _llama(**extra) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=LAYERS, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96, max_position_embeddings=128, **extra)


def _captured_pair(config, lora: LoraFAConfig) -> tuple[CapturedModel, CapturedModel, dict]:
    """(grown from a shallow capture, captured deep), with their batch (fake weights, bf16)."""
    shallow = shallow_config(config)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model_from_config(config, torch.bfloat16)
        shallow = model_from_config(shallow, torch.bfloat16) if shallow is not None else None
        batch = token_batch(*SHAPE)
    return (CapturedModel(model, batch, lora, shallow=shallow, capture=cached_capture),
            CapturedModel(model, batch, lora, capture=cached_capture), batch)


def _parameters(gm) -> list[tuple]:
    return sorted((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in gm.named_parameters())


#: Each family's second layer must be the graph every deeper layer is: the shallow model's
#: first layer reads the embeddings and is not copied.
_FAMILIES = {
    "llama": _llama,
    "mistral": lambda: MistralConfig(**_llama().to_dict() | {"sliding_window": None}),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=96, n_positions=128),
    "neox": lambda: GPTNeoXConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, vocab_size=96),
    "bloom": lambda: BloomConfig(hidden_size=64, n_layer=LAYERS, n_head=4, vocab_size=96),
    "opt": lambda: OPTConfig(hidden_size=64, ffn_dim=112, num_hidden_layers=LAYERS, num_attention_heads=4,
                             vocab_size=96, word_embed_proj_dim=64),
    # Mixture of experts: the experts' adapters (PEFT's nested paths) and grouped matmuls are copied too.
    "mixtral": lambda: MixtralConfig(**_llama().to_dict() | {"sliding_window": None, "intermediate_size": 48,
                                                             "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": lambda: Qwen3MoeConfig(**_llama().to_dict() | {"moe_intermediate_size": 48, "num_experts": 4,
                                                                "num_experts_per_tok": 2, "head_dim": 16}),
}


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_grown_graph_is_the_deep_models_graph(family):
    config = _FAMILIES[family]()
    grown, deep, batch = _captured_pair(config, LoraFAConfig(r=4))
    assert grown.depths and not deep.depths
    g, d = grown.build(), deep.build()
    assert _parameters(g) == _parameters(d)
    assert g.lorafa.adapters == d.lorafa.adapters
    ours, reference = CostModel(batch)(g), CostModel(batch)(d)
    # Node names differ (a copy's are new); everything they label is the same.
    for field in ("peak", "peak_phase", "peak_module", "saved_activations", "saved_by_module", "weights",
                  "optimizer_states", "batch"):
        assert getattr(ours, field) == getattr(reference, field), field
    assert sorted(ours.saved_by_node.values()) == sorted(reference.saved_by_node.values())
    assert len(g.graph.nodes) == len(d.graph.nodes)


def test_grown_graph_plans_as_the_deep_one():
    grown, deep, batch = _captured_pair(_llama(), LoraFAConfig(r=4, min_r=1))
    unplanned = plan_and_emit(deep, batch, PlanSettings()).lorafa_plan.predicted_peak_bytes
    settings = PlanSettings(budget_bytes=int(unplanned * 0.9))
    ours, reference = plan_and_emit(grown, batch, settings).lorafa_plan, plan_and_emit(deep, batch, settings).lorafa_plan
    assert sum(d is not Decision.KEEP for d in reference.recompute_by_block.values()) > 0
    # The peak's node is the same op of the same module; a copy's node names are its own.
    assert ours.peak_node.rstrip("0123456789") == reference.peak_node.rstrip("0123456789")
    assert dataclasses.replace(ours, peak_node=reference.peak_node) == reference


def test_layers_that_differ_are_captured_deep():
    # Layer 3 gets another rank, so it does not repeat the shallow model's last: the deep model is captured.
    grown, _, _ = _captured_pair(_llama(), LoraFAConfig(r=4, rank_pattern={r"layers\.3\.mlp\.up_proj": 2}))
    assert grown.depths == {}
    assert {a.path: a.r for a in grown.adapters}["model.layers.3.mlp.up_proj"] == 2
    # A per-layer setting that differs (attention kinds) leaves no shallow config at all.
    kinds = ["full_attention", "sliding_attention"] * (LAYERS // 2)
    assert shallow_config(_llama(layer_types=kinds)) is None
    assert shallow_config(_llama(layer_types=["full_attention"] * LAYERS)).layer_types == ["full_attention"] * SHALLOW_LAYERS
