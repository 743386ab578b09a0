"""Pass (planner): choose which blocks to recompute so a training step fits a memory budget.

Objective, in order: (1) predicted peak <= budget; (2) least recompute FLOPs. Each repeated
block ``b`` (``model.layers.i``) is either kept (``"none"``) or recomputed in backward
(``"full"``, see `recompute_regions`). From the cost model's unplanned step:

    saved(b)    = bytes autograd keeps for b  (estimate_memory's saved_by_module)
    kept(b)     = bytes a recomputed b still keeps: its hidden-state input
    saving(b)   = saved(b) - kept(b)
    flops(b)    = b's forward FLOPs: 2·m·n·k per matmul, 4·b·h·s_q·s_k·d per attention,
                  one per output element for every other op
    peak(S)    ~= peak(none) - sum_{b in S} saving(b) + max_{b in S} saving(b)

(the last term: a recomputed block's activations exist again while its backward runs), and
a plan with k recomputed blocks reserves ``(k + 1) * CHECKPOINT_RESERVE_BYTES`` on top of
the cost model's peak.
Solver: a 0/1 knapsack, "remove at least peak(none) - budget bytes at least FLOPs", solved
greedily by saving per FLOP — exact here because a model's blocks are alike. The candidates
are the prefixes of that order; the additive model above only guesses how long a prefix is
needed, and the answer is the shortest prefix whose realised graph fits by the exact cost model
(a simulated step), found by secant steps of one block's saving. Larger budgets never recompute more: the
candidates are nested and the search returns the shortest that fits.

Reads ``node.meta["val"]``, ``["nn_module_stack"]`` and the cost model's estimate.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import InfeasibleBudgetError
from ..plan import format_bytes, natural_key
from ._graph import block_of
from .estimate_memory import StepEstimate
from .recompute_regions import RecomputeRegions, block_ranges
from .simplify_attention import _Attention

aten = torch.ops.aten

#: Headroom per recomputed block (plus one) for what the fake-tensor run does not see of
#: checkpointing: its bookkeeping (RNG-state copies, Python-side temporaries). Measured
#: excess over the prediction on the test models: about 2 kB in all.
CHECKPOINT_RESERVE_BYTES = 8 * 1024


@dataclass(frozen=True)
class RecomputePlan:
    decisions: dict[str, str]  # block -> "none" | "full"
    estimate: StepEstimate  # exact cost model of the realised graph
    recompute_flops: int
    step_flops: int  # forward + backward, backward ~ forward (frozen weights: no weight grads)


def plan_recompute(
    gm: fx.GraphModule,
    unplanned: StepEstimate,
    budget_bytes: int,
    simulate: Callable[[fx.GraphModule], StepEstimate],
) -> RecomputePlan:
    """The cheapest recomputation that fits `budget_bytes`; raises `InfeasibleBudgetError`."""
    ranges = block_ranges(gm.graph)
    flops = {b: sum(node_flops(n) for n in nodes) for b, nodes in ranges.items()}
    forward_flops = sum(node_flops(n) for n in gm.graph.nodes)
    saving = {b: unplanned.saved_by_module.get(b, 0) - _kept(nodes) for b, nodes in ranges.items()}
    order = sorted(ranges, key=lambda b: (-saving[b] / max(flops[b], 1), natural_key(b)))

    def realise(k: int) -> RecomputePlan:
        decisions = {b: ("full" if b in order[:k] else "none") for b in sorted(ranges, key=natural_key)}
        estimate = unplanned
        if k:
            estimate = simulate(with_recompute(gm, decisions))
            estimate = dataclasses.replace(estimate, peak=estimate.peak + CHECKPOINT_RESERVE_BYTES * (1 + k))
        return RecomputePlan(decisions, estimate, sum(flops[b] for b in order[:k]), 2 * forward_flops)

    # The shortest prefix whose realised plan fits. peak(k) falls by about one block's saving
    # per block (nested prefixes), so a secant step on the simulated peaks lands on it in a
    # few simulations; k-1 is then checked so the answer is the shortest.
    plans: dict[int, RecomputePlan] = {0: realise(0)}

    def peak(k: int) -> int:
        if k not in plans:
            plans[k] = realise(k)
        return plans[k].estimate.peak

    n = len(order)
    per_block = max(min(saving.values(), default=1), 1)
    lo, hi = 0, None  # every k < lo is known not to fit; hi is the shortest known to fit
    k = min(_fewest_blocks(unplanned.peak, budget_bytes, [saving[b] for b in order]), n)
    while True:
        if peak(k) <= budget_bytes:
            hi = k
        else:
            lo = k + 1
        if lo > n:
            raise InfeasibleBudgetError(peak(n), _dominant_terms(plans[n].estimate), budget_bytes)
        if hi == lo:
            return plans[hi]
        if hi is None:
            k = max(lo, min(n, k + -(-(peak(k) - budget_bytes) // per_block)))
        else:
            k = max(lo, hi - max(1, (budget_bytes - peak(hi)) // per_block))


def with_recompute(gm: fx.GraphModule, decisions: Mapping[str, str]) -> fx.GraphModule:
    """A copy of `gm` (sharing its parameters) with `decisions` realised."""
    with warnings.catch_warnings():  # torch's own pytree specs warn when deep-copied
        warnings.simplefilter("ignore", FutureWarning)
        twin = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for name in ("lorafa_config", "lorafa_adapters"):
        setattr(twin, name, getattr(gm, name))
    return RecomputeRegions(decisions)(twin).graph_module


def node_flops(node: fx.Node) -> int:
    """Forward FLOPs of one node at the captured example's shapes (see the module docstring)."""
    return int(_hint(_symbolic_flops(node)))


def _hint(n) -> int:
    # Captured sizes are symbolic (dynamic batch/sequence); their hint is the example's size.
    return n.node.hint if isinstance(n, torch.SymInt) else n


def _symbolic_flops(node: fx.Node):
    out = node.meta.get("val")
    if node.op not in ("call_function", "call_module") or not isinstance(out, torch.Tensor):
        return 0
    if node.target in (aten.linear.default, aten.mm.default, aten.addmm.default):
        x = node.args[1] if node.target == aten.addmm.default else node.args[0]
        inner = x.meta["val"].shape[-1] if isinstance(x, fx.Node) and "val" in x.meta else 1
        return 2 * out.numel() * int(inner)
    if node.op == "call_module" and isinstance(node.graph.owning_module.get_submodule(node.target), _Attention):
        q, k = (a.meta["val"] for a in node.args[:2])
        return 4 * q.numel() * int(k.shape[-2])
    return out.numel()


def _kept(nodes: list[fx.Node]) -> int:
    # A recomputed block keeps its inputs; the residual stream is the large one (rotary
    # tables and masks are shared by every block and stay saved anyway).
    inside = set(nodes)
    sizes = [
        a.meta["val"].untyped_storage().nbytes()
        for n in nodes for a in n.all_input_nodes
        if a not in inside and a.op == "call_function" and isinstance(a.meta.get("val"), torch.Tensor)
        and block_of(a) != "<root>"
    ]
    return int(_hint(max(sizes, default=0, key=_hint)))


def _fewest_blocks(peak: int, budget: int, savings: list[int]) -> int:
    for k in range(len(savings) + 1):
        freed = sum(savings[:k]) - (max(savings[:k]) if k else 0)
        if peak - freed <= budget:
            return k
    return len(savings)


def _dominant_terms(e: StepEstimate) -> str:
    terms = {
        "weights": e.weights + e.buffers,
        "optimizer states": e.optimizer_states,
        "activations and backward transients": e.peak - e.weights - e.buffers - e.optimizer_states - e.batch,
    }
    return ", ".join(f"{name} {format_bytes(v)}" for name, v in sorted(terms.items(), key=lambda kv: -kv[1]))
