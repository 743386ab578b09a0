"""The planner: choose ranks, the loss's form and which blocks to recompute so a training
step fits a memory budget.

Objective, in order: (1) predicted peak <= budget; (2) least recompute FLOPs; (3) most total
adapter rank; (4) the model's outputs as configured (full logits).

**Levers that cost no recomputation** (`Levers`), used only when the config allows them:
adapter ranks lowered to a common cap (``LoraFAConfig.min_r``; 0 drops the adapters; ranks in
``rank_pattern`` are fixed) and a chunked cross-entropy (``chunked_cross_entropy=None``). They
form a ladder from least memory to the configured model; lexicographic order (2) before (3)
means the recomputation is planned with every lever pulled (the ladder's floor), and the
levers are then released as far as that recomputation still fits: the top-most rung that
fits, found by bisection (peak is monotone along the ladder). The levers are left alone when
the configured model fits without recomputation, or when the floor's unplanned peak is no
lower than the configured one's (a chunked loss with a tiny vocabulary).

**Recomputation.** Each repeated block ``b`` (``model.layers.i``) is either kept
(``Decision.KEEP``) or recomputed in backward (``Decision.RECOMPUTE``, see `recompute_regions`). From the cost model's
unplanned step:

    saved(b)    = bytes autograd keeps for b  (the cost model's saved_by_module)
    kept(b)     = bytes a recomputed b still keeps: its hidden-state input
    saving(b)   = saved(b) - kept(b)
    flops(b)    = b's forward FLOPs (`flops.py`)
    peak(S)    ~= peak(none) - sum_{b in S} saving(b) + max_{b in S} saving(b)

(the last term: a recomputed block's activations exist again while its backward runs), and
a plan with k recomputed blocks reserves ``(k + 1) * CHECKPOINT_RESERVE_BYTES`` on top of
the cost model's peak.
Solver: a 0/1 knapsack, "remove at least peak(none) - budget bytes at least FLOPs", solved
greedily by saving per FLOP — exact here because a model's blocks are alike. The candidates
are the prefixes of that order; the additive model above only guesses how long a prefix is
needed, and the answer is the shortest prefix whose realised graph fits by the exact cost model
(a simulated step), found by secant steps of one block's saving. Larger budgets never recompute
more: the candidates are nested and the search returns the shortest that fits.

**Offload** (with a GPU profile, `devices.PROFILES`: a CUDA step): a block's saved tensors
wait in host memory instead (``Decision.OFFLOAD``, `ops/offload.py`). Its cost is time, not
FLOPs: each offloaded block's bytes cross the host link twice, hidden behind the next block's
forward and a later block's backward where they fit (`_exposed_transfer`). The planner finds
the shortest prefix of the same order that fits offloaded, and keeps it when its exposed
transfer time is below the recompute plan's FLOPs time on the card; plans mixing the two per
block are not searched. Without a profile (a CPU step, or no card named), or with
``offload=False`` (`PlanSettings.offload`: host memory is short), nothing is offloaded; the
profile still times the step.

The planner receives two objects: the candidates (`Rungs`: the lever ladder and a way to
build each rung's graph, which the pipeline provides) and the cost model (a `Simulator`, one
process's or one rank's). Its answer is a `Planned`; realising it is the pipeline's job.

Reads ``node.meta["val"]``, ``["nn_module_stack"]`` and the cost model's estimate.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.fx as fx

from ..choices import Decision
from ..config import LoraFAConfig
from ..devices import ACHIEVED_FRACTION, DeviceProfile
from ..errors import InfeasibleBudgetError
from ..graph import block_of, block_ranges
from ..targets import Adapter, rank_is_fixed
from ..units import format_bytes, natural_key
from .flops import concrete, node_flops
from .simulate import Simulator, StepEstimate

#: Headroom per recomputed block (plus one) for what the fake-tensor run does not see of
#: checkpointing: its bookkeeping (RNG-state copies, Python-side temporaries). Measured
#: excess over the prediction on the test models: about 2 kB in all.
CHECKPOINT_RESERVE_BYTES = 8 * 1024


@dataclass(frozen=True)
class Levers:
    """Memory the planner may free without recomputation (see the module docstring)."""

    rank_cap: int | None = None  # adjustable adapters get min(r, rank_cap); 0 drops them
    chunked_cross_entropy: bool = False


def lever_ladder(
    config: LoraFAConfig, adapters: Sequence[Adapter], trains_modules: bool, chunk_applies: bool
) -> list[Levers]:
    """The rungs from least memory to the configured model: each rank cap the config allows
    (``min_r``; ranks in ``rank_pattern`` are fixed), with and without a chunked loss where
    ``chunked_cross_entropy=None`` leaves it to the planner (and `chunk_applies`: the model ends
    in a loss the chunked form computes). `trains_modules`: modules_to_save train beside the
    adapters, so dropping every adapter (``min_r=0``) still leaves something to train."""
    adjustable = [a.r for a in adapters if not rank_is_fixed(config, a.key)]
    keeps_some = len(adjustable) < len(adapters) or trains_modules
    # Dropping every adapter would leave nothing to train: then the floor is rank 1.
    min_r = 1 if config.min_r == 0 and not keeps_some else config.min_r
    chunk = [True, False] if config.chunked_cross_entropy is None else [config.chunked_cross_entropy]
    chunk = [c and chunk_applies for c in chunk]
    caps = range(min_r, max(adjustable, default=0)) if min_r is not None else range(0)
    ladder = [Levers(cap, chunk[0]) for cap in caps] + [Levers(None, c) for c in chunk]
    return list(dict.fromkeys(ladder))


class Rungs(Protocol):
    """The planner's candidates: `ladder` from least memory to the configured model, and the
    graph of each rung (a fresh graph per call; the planner may edit it)."""

    ladder: list[Levers]

    def build(self, levers: Levers) -> fx.GraphModule: ...


@dataclass(frozen=True)
class Planned:
    """`plan_memory`'s answer: the rung it chose, that rung's graph, and its recomputation."""

    gm: fx.GraphModule  # the chosen rung's graph, recomputation not yet realised
    levers: Levers
    recompute: RecomputePlan


def plan_memory(
    rungs: Rungs,
    budget_bytes: int,
    simulate: Simulator,
    profile: DeviceProfile | None = None,
    *,
    offload: bool = True,
) -> Planned:
    """The plan that meets `budget_bytes` by the objective in the module docstring;
    `InfeasibleBudgetError` (from the ladder's floor, every lever pulled) if none does.
    ``offload=False``: blocks are never offloaded, even with a `profile`."""
    # A rung's graph is built once (the search releases levers back to the configured rung).
    build, ladder = functools.cache(rungs.build), rungs.ladder
    configured = build(ladder[-1])
    unplanned = simulate(configured)
    if unplanned.peak > budget_bytes and len(ladder) > 1:
        floor = build(ladder[0])
        floor_unplanned = simulate(floor)
        # A chunked loss can cost more than it saves (a vocabulary no larger than the hidden
        # size: it keeps a hidden-size gradient from forward); then the levers are not used.
        if floor_unplanned.peak < unplanned.peak:
            recompute = plan_recompute(floor, floor_unplanned, budget_bytes, simulate, profile, offload=offload)
            return _release_levers(build, ladder, budget_bytes, simulate, Planned(floor, ladder[0], recompute))
    recompute = plan_recompute(configured, unplanned, budget_bytes, simulate, profile, offload=offload)
    return Planned(configured, ladder[-1], recompute)


def _release_levers(
    build, ladder: list[Levers], budget_bytes: int, simulate: Simulator, floor: Planned
) -> Planned:
    """The top-most rung that fits with the floor's recomputation (bisection)."""
    recompute = floor.recompute
    chosen = {0: floor}

    def fits(i: int) -> bool:
        if i not in chosen:
            gm = build(ladder[i])
            # The rungs differ in ranks and the loss, not in the blocks' activations: the
            # floor's offload transfer time stands for theirs.
            plan = dataclasses.replace(evaluate(gm, recompute.decisions, simulate), offload_seconds=recompute.offload_seconds)
            if plan.estimate.peak > budget_bytes:
                return False
            chosen[i] = Planned(gm, ladder[i], plan)
        return True

    lo, hi = 0, len(ladder) - 1  # rung lo fits; every rung above hi does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return chosen[lo]


@dataclass(frozen=True)
class RecomputePlan:
    decisions: dict[str, Decision]  # block -> what it does with its saved tensors
    estimate: StepEstimate  # exact cost model of the realised graph
    recompute_flops: int
    step_flops: int  # forward + backward, backward ~ forward (frozen weights: no weight grads)
    offload_seconds: float = 0.0  # transfers of offloaded blocks not hidden behind compute


def plan_recompute(
    gm: fx.GraphModule,
    unplanned: StepEstimate,
    budget_bytes: int,
    simulate: Simulator,
    profile: DeviceProfile | None = None,
    *,
    offload: bool = True,
) -> RecomputePlan:
    """The cheapest recomputation, or with a GPU `profile` (and `offload`) the cheapest of it
    and offloading (by predicted time), that fits `budget_bytes`; raises `InfeasibleBudgetError`."""
    ranges, sizes = block_ranges(gm.graph), simulate.sizes(gm)
    flops = {b: sum(node_flops(n, sizes) for n in nodes) for b, nodes in ranges.items()}
    saving = {b: unplanned.saved_by_module.get(b, 0) - _kept(nodes, sizes) for b, nodes in ranges.items()}
    order = sorted(ranges, key=lambda b: (-saving[b] / max(flops[b], 1), natural_key(b)))
    recompute = _shortest_prefix(gm, unplanned, budget_bytes, simulate, order, saving, Decision.RECOMPUTE)
    if profile is None or not offload:
        return recompute
    try:
        offloaded = _shortest_prefix(gm, unplanned, budget_bytes, simulate, order, saving, Decision.OFFLOAD)
    except InfeasibleBudgetError:
        return recompute
    rate = profile.dense_bf16_flops * ACHIEVED_FRACTION
    offloaded = dataclasses.replace(offloaded, offload_seconds=sum(
        _exposed_transfer(unplanned.saved_by_module.get(b, 0), flops[b] / rate, profile)
        for b, d in offloaded.decisions.items() if d is Decision.OFFLOAD
    ))
    return offloaded if offloaded.offload_seconds < recompute.recompute_flops / rate else recompute


def _exposed_transfer(nbytes: int, forward_seconds: float, profile: DeviceProfile) -> float:
    """Seconds a block's offload adds to a step: its copy to the host overlaps the next block's
    forward, its copy back the following block's backward (about twice a forward); what does
    not fit behind them is waited for."""
    transfer = nbytes / profile.host_link_bytes_per_s
    return max(0.0, transfer - forward_seconds) + max(0.0, transfer - 2 * forward_seconds)


def _shortest_prefix(
    gm: fx.GraphModule,
    unplanned: StepEstimate,
    budget_bytes: int,
    simulate: Simulator,
    order: list[str],
    saving: Mapping[str, int],
    mode: Decision,
) -> RecomputePlan:
    """The shortest prefix of `order` whose blocks, `mode` (recompute or offload), fit."""

    def realise(k: int) -> RecomputePlan:
        decisions = {b: (mode if b in order[:k] else Decision.KEEP) for b in sorted(order, key=natural_key)}
        return evaluate(gm, decisions, simulate, unplanned if k == 0 else None)

    # peak(k) falls by about one block's saving per block (nested prefixes), so a secant step
    # on the simulated peaks lands on the shortest prefix that fits in a few simulations; k-1
    # is then checked so the answer is the shortest.
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
            # Recomputing everything is not always the least (on small models a checkpoint's
            # own bytes outweigh what it frees): the smallest budget is the least plan seen.
            least = min(plans.values(), key=lambda p: p.estimate.peak)
            raise InfeasibleBudgetError(least.estimate.peak, _dominant_terms(least.estimate), budget_bytes)
        if hi == lo:
            return plans[hi]
        if hi is None:
            k = max(lo, min(n, k + -(-(peak(k) - budget_bytes) // per_block)))
        else:
            k = max(lo, hi - max(1, (budget_bytes - peak(hi)) // per_block))


def evaluate(
    gm: fx.GraphModule,
    decisions: Mapping[str, Decision],
    simulate: Simulator,
    unplanned: StepEstimate | None = None,
) -> RecomputePlan:
    """`decisions` on `gm`, priced by the exact cost model (`unplanned`: gm's own estimate,
    reused when nothing is recomputed)."""
    ranges = block_ranges(gm.graph)
    recomputed = [b for b, d in decisions.items() if d is Decision.RECOMPUTE and b in ranges]
    if any(d is not Decision.KEEP and b in ranges for b, d in decisions.items()):
        estimate = simulate(gm, decisions)
        estimate = dataclasses.replace(estimate, peak=estimate.peak + CHECKPOINT_RESERVE_BYTES * (1 + len(recomputed)))
    else:
        estimate = unplanned or simulate(gm)
    sizes = simulate.sizes(gm)
    recompute_flops = sum(node_flops(n, sizes) for b in recomputed for n in ranges[b])
    step_flops = 2 * sum(node_flops(n, sizes) for n in gm.graph.nodes)
    return RecomputePlan(dict(decisions), estimate, recompute_flops, step_flops)


def _kept(nodes: list[fx.Node], sizes: Mapping) -> int:
    # A recomputed block keeps its inputs; the residual stream is the large one (rotary
    # tables and masks are shared by every block and stay saved anyway).
    inside = set(nodes)
    nbytes = [
        a.meta["val"].untyped_storage().nbytes()
        for n in nodes for a in n.all_input_nodes
        if a not in inside and a.op == "call_function" and isinstance(a.meta.get("val"), torch.Tensor)
        and block_of(a) != "<root>"
    ]
    return max((concrete(n, sizes) for n in nbytes), default=0)


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
