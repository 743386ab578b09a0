"""The FLOP model (memory/flops.py) against torch's own count of a real training step.

Reference: `torch.utils.flop_counter.FlopCounterMode` on one step of each zoo architecture's
transformed graph: its forward run node by node (each node's count), then its backward (the
total). torch registers its attention formulas for the CUDA kernels only; the CPU's fused
kernel gets the same formulas here (`sdpa_flop_count`, `sdpa_backward_flop_count`). Attention dropout is
off, so the CPU runs the fused kernel a card runs (a card's kernels count the same FLOPs with
dropout; the CPU's dropout path is unfused and counts fewer).
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODELS, make_batch, transform, transformed
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from lorafa_fx.memory.flops import backward_flops, needs_grad, node_flops, step_flops
from lorafa_fx.memory.simulate import symbol_sizes
from lorafa_fx.ops.attention import SDPAttention

aten = torch.ops.aten
_CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v),
}
SHAPE = (2, 16)


class _Counted(torch.fx.Interpreter):
    """Runs the graph node by node, reading FlopCounterMode's total after each."""

    def __init__(self, gm, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter, self.by_node = counter, {}

    def run_node(self, n):
        before = self.counter.get_total_flops()
        result = super().run_node(n)
        self.by_node[n] = self.counter.get_total_flops() - before
        return result


@pytest.fixture(scope="module", params=MODELS)
def step(request):
    name = request.param
    _, gm = transformed(name, SHAPE)
    for module in gm.modules():
        if isinstance(module, SDPAttention):
            module.dropout_p = 0.0
    batch = make_batch(name, *SHAPE)
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    run = _Counted(gm.train(), counter)
    with counter:
        out = run.run(*torch.fx._pytree.tree_flatten_spec(((), batch), gm.graph._codegen.pytree_info.in_spec))
        forward = counter.get_total_flops()
        out.loss.backward()
    return gm, batch, run.by_node, forward, counter.get_total_flops() - forward


def test_each_nodes_forward_flops_are_flop_counter_modes(step):
    gm, batch, by_node, forward, _ = step
    sizes = symbol_sizes(gm, batch)
    assert sum(by_node.values()) == forward > 0
    assert any(isinstance(gm.get_submodule(n.target), SDPAttention) and by_node[n] > 0
               for n in gm.graph.find_nodes(op="call_module") if n.target.endswith("sdpa"))
    assert {n.name: node_flops(n, sizes) for n in by_node} == {n.name: f for n, f in by_node.items()}


def test_the_steps_backward_flops_are_flop_counter_modes_within_2pct(step):
    gm, batch, _, forward, backward = step
    sizes = symbol_sizes(gm, batch)
    assert step_flops(gm, sizes) == (forward, pytest.approx(backward, rel=0.02))
    # The first layer's frozen linears read hidden states that need no grad: their backward is
    # the adapters' alone, so a step is less than twice its forward.
    grads = needs_grad(gm)
    assert backward < 2 * forward
    assert sum(backward_flops(n, grads, sizes) for n in gm.graph.nodes) == step_flops(gm, sizes)[1]


def test_the_planner_recomputes_the_fewest_flops_flop_counter_mode_counts(monkeypatch):
    """Reference: FlopCounterMode's count of a real step with each mix of block decisions the
    planner may choose without a card (`mix.Candidates`: recomputed, selective, chunked) that the
    cost model says fits the budget; the planner's plan is one with the fewest, and the FLOPs
    it reports recomputing are FlopCounterMode's extra over the unplanned step."""
    from lorafa_fx import LoraFAConfig
    from lorafa_fx.errors import InfeasibleBudgetError
    from lorafa_fx.graph import block_ranges
    from lorafa_fx.memory.cost_model import CostModel
    from lorafa_fx.memory.mix import Candidates, block_facts
    from lorafa_fx.memory.planner import _kept, evaluate
    from lorafa_fx.memory.simulate import with_decisions
    from lorafa_fx.stages import REALISE
    from lorafa_fx.zoo import make_model

    def model():
        torch.manual_seed(0)
        return make_model("llama")

    batch, lora = make_batch("llama", 2, 32), LoraFAConfig(r=8, chunked_cross_entropy=False)
    gm = transform(model(), example_inputs=batch, config=lora)
    with pytest.raises(InfeasibleBudgetError) as floor:
        transform(model(), 1, example_inputs=batch, config=lora)
    budget = (gm.lorafa_plan.predicted_peak_bytes + floor.value.min_budget_bytes) // 2
    planned = transform(model(), budget, example_inputs=batch, config=lora).lorafa_plan

    def counted(decisions) -> int:
        module = with_decisions(gm, decisions, REALISE) if decisions else gm
        with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
            module(**batch).loss.backward()
        return counter.get_total_flops()

    simulate = CostModel(batch, realise=REALISE)
    unplanned = simulate(gm)
    sizes = symbol_sizes(gm, batch)
    facts = block_facts(gm, unplanned, sizes, needs_grad(gm), lambda nodes: _kept(nodes, sizes))
    fitting = {}
    candidates = Candidates(facts, unplanned.peak, 1.0, None)
    for i in range(len(candidates.order)):
        decisions = candidates.mix(i).decisions(facts)
        if evaluate(gm, decisions, simulate, unplanned, facts=facts).estimate.peak <= budget:
            fitting[tuple(decisions.values())] = counted(decisions)
    assert len(fitting) > 1 and len(block_ranges(gm.graph)) == 2
    chosen = counted(planned.recompute_by_block)
    assert chosen == min(fitting.values())
    assert planned.recompute_flops == chosen - counted({})


def test_a_recomputed_block_reruns_its_forward_but_its_last_linear_as_flop_counter_mode_counts():
    """Reference: FlopCounterMode's count of a real step of the zoo Llama with every block
    recomputed with its MLP in mini-sequence chunks, and with every block recomputed whole,
    over the unplanned step's; and a hand count of each block's last linear (down_proj, with
    LoRA-FA's x·A and (x·A)·B: 2·tokens·(i·d + i·r + r·d) FLOPs). Its backward reads only the
    x·A it keeps, so neither recomputation reruns it: a whole block's region leaves it out, a
    chunked block's recomputation skips the MLP and its chunks rerun up to it. Both add each
    block's forward FLOPs less the hand count (what `mix.Block.recomputes` prices both at)."""
    from lorafa_fx.choices import Decision
    from lorafa_fx.graph import block_ranges
    from lorafa_fx.memory.cost_model import CostModel
    from lorafa_fx.memory.mix import block_facts
    from lorafa_fx.memory.planner import _kept
    from lorafa_fx.memory.simulate import with_decisions
    from lorafa_fx.stages import REALISE

    _, gm = transformed("llama", SHAPE)
    batch = make_batch("llama", *SHAPE)

    def counted(decision) -> int:
        blocks = list(block_ranges(gm.graph))
        module = with_decisions(gm, dict.fromkeys(blocks, decision), REALISE) if decision else gm
        with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
            module(**batch).loss.backward()
        return counter.get_total_flops()

    sizes = symbol_sizes(gm, batch)
    facts = block_facts(gm, CostModel(batch, realise=REALISE)(gm), sizes, needs_grad(gm),
                        lambda nodes: _kept(nodes, sizes))
    d, i = gm.get_parameter("model.layers.0.mlp.down_proj.weight").shape
    r = gm.get_parameter("model.layers.0.mlp.down_proj.lora_A.weight").shape[0]
    last_linear = 2 * SHAPE[0] * SHAPE[1] * (i * d + i * r + r * d)
    extra = counted(Decision.MINI_SEQUENCE) - counted(None)
    assert extra == counted(Decision.RECOMPUTE) - counted(None)
    assert extra == sum(b.forward - last_linear for b in facts.blocks.values()) > 0
    assert extra == sum(b.recomputes(Decision.MINI_SEQUENCE) for b in facts.blocks.values())


def test_an_offloaded_selective_block_reruns_its_gate_but_not_its_up_matmul_as_flop_counter_mode_counts():
    """Reference: FlopCounterMode's count of a real step of the zoo Llama with every block
    offloaded recomputing its MLP's gate (`Decision.OFFLOAD_SELECTIVE`), over the unplanned
    step's, and a hand count: each block reruns its gate matmul and both gate's and up's
    adapters (2·tokens·(d·i) + 2 · 2·tokens·(d·r + r·i) FLOPs); up's matmul output was kept, and
    its input gradient (2·tokens·i·d) is taken as the unplanned step takes it."""
    from lorafa_fx.choices import Decision
    from lorafa_fx.graph import block_ranges
    from lorafa_fx.memory.cost_model import CostModel
    from lorafa_fx.memory.mix import block_facts
    from lorafa_fx.memory.planner import _kept
    from lorafa_fx.memory.simulate import with_decisions
    from lorafa_fx.stages import REALISE

    _, gm = transformed("llama", SHAPE)
    batch = make_batch("llama", *SHAPE)
    blocks = list(block_ranges(gm.graph))

    def counted(module) -> int:
        with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
            module(**batch).loss.backward()
        return counter.get_total_flops()

    extra = counted(with_decisions(gm, dict.fromkeys(blocks, Decision.OFFLOAD_SELECTIVE), REALISE)) - counted(gm)
    i, d = gm.get_parameter("model.layers.0.mlp.gate_proj.weight").shape
    r = gm.get_parameter("model.layers.0.mlp.gate_proj.lora_A.weight").shape[0]
    tokens = SHAPE[0] * SHAPE[1]
    assert extra == len(blocks) * (2 * tokens * d * i + 2 * 2 * tokens * (d * r + r * i))
    sizes = symbol_sizes(gm, batch)
    facts = block_facts(gm, CostModel(batch, realise=REALISE)(gm), sizes, needs_grad(gm),
                        lambda nodes: _kept(nodes, sizes))
    assert extra == sum(b.recomputes(Decision.OFFLOAD_SELECTIVE) for b in facts.blocks.values())
