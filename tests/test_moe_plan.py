"""The memory model and the planner on mixture-of-experts models (`lorafa_fx.zoo`'s Mixtral,
Qwen2-MoE, Qwen3-MoE): the cost model's step against a measured one, FLOPs of routed rows,
budgets met by recomputing MoE blocks with the unplanned math, ranks of expert adapters
lowered with a config that selects them.

The fake-tensor simulation cannot see the routing; it needs none: transformers' MoE is
dropless (every token goes to its top_k experts, no capacity factor, no padding), so the
routed rows are tokens x top_k whatever the router chooses, and only how they split among
experts (which no byte count depends on) is data-dependent.

References: MemTracker's measured peak and saved-tensor hooks' bytes of a real step, the
closed-form FLOPs of a grouped matmul, the unplanned module's loss and gradients, PEFT's
matching rules (the planned config selects exactly the planned adapters).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from conftest import adamw_peak, lora_B_loss_and_grads, make_batch, make_model, randomize_lora_B, transformed

from lorafa_fx import InfeasibleBudgetError, LoraFAConfig
from lorafa_fx.choices import Decision
from lorafa_fx.measure import module_state, saved_activation_bytes
from lorafa_fx.memory.cost_model import CostModel
from lorafa_fx.memory.flops import node_flops
from lorafa_fx.ops.experts import expert_linear, expert_xa
from lorafa_fx.targets import Adapter, cap_ranks, select_adapters

SHAPE = (2, 16)
R = 4


def _transform(name: str, budget=None, **config):
    model, gm = transformed(name, SHAPE, budget=budget, r=R, lora_alpha=2 * R, **config)
    randomize_lora_B(gm)
    return model, gm.train()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_cost_model_predicts_a_measured_moe_step(name):
    """Reference: MemTracker's peak of a real full step (fwd, bwd, AdamW, 2nd iteration) and
    saved_tensors_hooks' bytes, at another shape than captured; acceptance is 5% and 2%."""
    _, gm = _transform(name)
    batch = make_batch(name, 4, 24, seed=3)
    estimate = CostModel(batch)(gm)
    assert estimate.peak == pytest.approx(adamw_peak(gm, batch), rel=0.05)
    saved = saved_activation_bytes(lambda: gm(**batch).loss, module_state(gm))
    assert estimate.saved_activations == pytest.approx(saved, rel=0.02)


def test_flops_count_each_routed_row_once():
    """Reference: the closed form of a grouped matmul over S = tokens x top_k rows: 2·S·in·out for
    the base projection, + 2·S·r·out for xa B_e^T; 2·S·in·r for xa (Mixtral: top 2 of 4 experts)."""
    _, gm = _transform("mixtral")
    rows = SHAPE[0] * SHAPE[1] * 2
    adapters = {a.path: a for a in gm.lorafa.adapters}
    calls = [n for n in gm.graph.nodes if n.target is expert_linear]
    assert calls
    for call in calls:
        x, w, _, xa, lora_B = call.args
        a = adapters[lora_B.target.removesuffix(".lora_B.weight")]
        assert node_flops(call) == 2 * rows * a.in_features * a.out_features + 2 * rows * a.r * a.out_features
        assert xa.target is expert_xa and node_flops(xa) == 2 * rows * a.in_features * a.r


@functools.cache
def _budgets(name: str) -> tuple[int, int]:
    with pytest.raises(InfeasibleBudgetError) as e:
        _transform(name, budget=1)
    return e.value.min_budget_bytes, _transform(name)[1].lorafa_plan.predicted_peak_bytes


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_a_budget_recomputes_moe_blocks_with_the_unplanned_math(name):
    """References: MemTracker's measured peak of a full step (<= budget) and the unplanned
    module's loss and lora_B grads (equal: recomputing an MoE block reruns its routing and
    grouped matmuls on the same inputs)."""
    low, high = _budgets(name)
    budget = (low + high) // 2
    _, reference = _transform(name)
    batch = make_batch(name, *SHAPE)
    ref_loss, ref_grads = lora_B_loss_and_grads(reference, reference, batch)
    _, gm = _transform(name, budget)
    plan = gm.lorafa_plan
    assert plan.predicted_peak_bytes <= budget
    assert Decision.RECOMPUTE in plan.recompute_by_block.values() and plan.recompute_flops > 0
    loss, grads = lora_B_loss_and_grads(gm, gm, batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert adamw_peak(gm, batch) <= budget


def test_lowered_ranks_reach_the_experts_and_the_planned_config_selects_them():
    """Reference: PEFT's matching rules on the planned config (`gm.lorafa.config`, what a saved
    adapter's config says) give exactly the planned adapters, experts at their lowered rank."""
    config = {"min_r": 1, "chunked_cross_entropy": False}
    low, high = _budgets("mixtral")
    model, gm = _transform("mixtral", budget=high - (high - low) // 8, **config)
    ranks = {(a.parameter, a.r) for a in gm.lorafa.adapters}
    assert any(p == "gate_up_proj" and r < 2 * R for p, r in ranks), ranks
    assert gm.lorafa_plan.recompute_flops == 0
    assert select_adapters(model, gm.lorafa.config) == list(gm.lorafa.adapters)


def test_dropping_one_of_an_experts_two_adapters_moves_the_other_to_peft_path():
    """Reference: PEFT's nesting: one targeted parameter of a module is wrapped once (its adapter at
    the module's path), two are nested (the first registered at ``.base_layer``)."""
    config = LoraFAConfig(r=8, min_r=0, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                          target_modules=[], rank_pattern={"gate_up_proj": 8})
    adapters = select_adapters(make_model("mixtral"), config)
    assert [(a.path, a.parameter) for a in adapters[:2]] == [
        ("model.layers.0.mlp.experts.base_layer", "gate_up_proj"), ("model.layers.0.mlp.experts", "down_proj")]
    capped = cap_ranks(adapters, config, 0)
    assert [(a.path, a.parameter, a.r) for a in capped] == [
        ("model.layers.0.mlp.experts", "gate_up_proj", 8), ("model.layers.1.mlp.experts", "gate_up_proj", 8)]
    assert all(isinstance(a, Adapter) and a.weight.endswith("experts.gate_up_proj") for a in capped)
    assert dataclasses.replace(capped[0], path="x.base_layer.base_layer").module == "x"
