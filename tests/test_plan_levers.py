"""The planner's levers that cost no recomputation: lower ranks, dropped adapters, chunked loss.

References: the cost model of the same transform built with the planner's ranks fixed in the
config (the chosen rank fits, one more does not), PEFT's matching rules (the planned config
selects exactly the planned adapters) and MemTracker's measured peak (<= budget).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import adamw_peak, make_batch, make_model, transform
from transformers import LlamaConfig, LlamaForCausalLM

import lorafa_fx
from lorafa_fx import LoraFAConfig
from lorafa_fx.targets import Adapter, cap_ranks, planned_config, select_adapters

SHAPE = (4, 32)


def _peak(config: LoraFAConfig, budget=None, model=None) -> lorafa_fx.MemoryPlan:
    model = model or make_model("llama")
    return transform(model, budget=budget, example_inputs=make_batch("llama", *SHAPE), config=config).lorafa_plan


def test_cap_ranks_keeps_rank_pattern_and_rescales():
    config = LoraFAConfig(r=16, lora_alpha=32, rank_pattern={"q_proj": 16})
    adapters = [Adapter("m.0.q_proj", 16, 32, 2.0, 8, 8), Adapter("m.0.v_proj", 16, 32, 2.0, 8, 8)]
    capped = cap_ranks(adapters, config, 4)
    assert [(a.r, a.scaling) for a in capped] == [(16, 2.0), (4, 8.0)]
    assert [a.path for a in cap_ranks(adapters, config, 0)] == ["m.0.q_proj"]
    rs = dataclasses.replace(config, use_rslora=True)
    assert cap_ranks(adapters, rs, 4)[1].scaling == pytest.approx(32 / 2)


@pytest.mark.parametrize("exclude", [None, ["o_proj"], r".*\.o_proj"])
def test_planned_config_selects_exactly_the_planned_adapters(exclude):
    model = make_model("llama")
    config = LoraFAConfig(r=8, min_r=0, rank_pattern={"q_proj": 8}, exclude_modules=exclude)
    configured = select_adapters(model, config)
    planned = [a for a in cap_ranks(configured, config, 3) if "layers.1.mlp" not in a.path]
    assert select_adapters(model, planned_config(config, configured, planned)) == planned


def test_lower_ranks_instead_of_recomputing():
    config = LoraFAConfig(r=16, lora_alpha=16, min_r=2, chunked_cross_entropy=False)
    budget = _peak(dataclasses.replace(config, r=5, lora_alpha=5, min_r=None)).predicted_peak_bytes
    assert _peak(dataclasses.replace(config, r=6, lora_alpha=6, min_r=None)).predicted_peak_bytes > budget

    model = make_model("llama")
    gm = transform(model, budget=budget, example_inputs=make_batch("llama", *SHAPE), config=config)
    plan = gm.lorafa_plan
    assert plan.recompute_flops == 0  # the configured ranks would need recomputation
    assert {(layer.r, layer.configured_r) for layer in plan.layers} == {(5, 16)}  # the most rank that fits
    assert {a.scaling for a in gm.lorafa.adapters} == {16 / 5}
    assert plan.predicted_peak_bytes <= budget and "5 (of 16)" in str(plan)
    assert select_adapters(model, gm.lorafa.config) == list(gm.lorafa.adapters)  # saved PEFT config agrees
    assert adamw_peak(gm.train(), make_batch("llama", *SHAPE)) <= budget


def test_drop_adapters_keeps_rank_pattern_ones():
    config = LoraFAConfig(r=8, min_r=0, rank_pattern={"q_proj": 8}, chunked_cross_entropy=False)
    only_q = _peak(LoraFAConfig(r=8, target_modules=["q_proj"])).predicted_peak_bytes
    plan = _peak(config, budget=only_q)
    assert [layer.path.rsplit(".", 1)[-1] for layer in plan.layers] == ["q_proj", "q_proj"]
    assert len(plan.dropped_adapters) == 12 and plan.recompute_flops == 0
    assert "12 dropped" in str(plan)


def test_ranks_stay_as_configured_without_min_r():
    config = LoraFAConfig(r=16, lora_alpha=16, chunked_cross_entropy=False)
    budget = _peak(dataclasses.replace(config, r=5, lora_alpha=5)).predicted_peak_bytes
    plan = _peak(config, budget=budget)
    assert {layer.r for layer in plan.layers} == {16} and plan.recompute_flops > 0


def _big_vocab_llama():
    torch.manual_seed(0)  # logits (b*s*V*4 = 1 MB) outweigh a block's activations
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=2048, max_position_embeddings=128))


def test_planner_chunks_the_loss_before_recomputing_and_says_so():
    batch = make_batch("llama", *SHAPE)
    chunked = _peak(LoraFAConfig(chunked_cross_entropy=True), model=_big_vocab_llama())
    full = _peak(LoraFAConfig(), model=_big_vocab_llama())
    assert chunked.chunked_cross_entropy and not full.chunked_cross_entropy
    budget = chunked.predicted_peak_bytes
    assert budget < full.predicted_peak_bytes
    with pytest.warns(UserWarning, match="logits are None.*chunked_cross_entropy=False"):
        gm = transform(_big_vocab_llama(), budget=budget, example_inputs=batch)
    assert gm.lorafa_plan.chunked_cross_entropy and gm.lorafa_plan.recompute_flops == 0
    assert "chunked cross-entropy" in str(gm.lorafa_plan)
    out = gm.train()(**batch)
    assert out.logits is None
    reference = transform(_big_vocab_llama(), example_inputs=batch).train()(**batch)
    torch.testing.assert_close(out.loss, reference.loss, atol=1e-5, rtol=0)
    # Keeping the logits, even recomputing every block does not reach that budget.
    with pytest.raises(lorafa_fx.InfeasibleBudgetError):
        transform(_big_vocab_llama(), budget=budget, example_inputs=batch,
                            config=LoraFAConfig(chunked_cross_entropy=False))


def test_min_r_is_checked():
    with pytest.raises(ValueError, match=r"min_r=9 must be an int in \[0, r=8\]"):
        LoraFAConfig(r=8, min_r=9)
