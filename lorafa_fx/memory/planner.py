"""The planner: choose ranks, the loss's form and what each block does with its activations so
a training step fits a memory budget.

Objective, in order: (1) predicted peak <= budget; (2) least predicted time (on a card: the
step's seconds, `timing.py`; without one: the least recomputed FLOPs); (3) most total adapter
rank; (4) the model's outputs as configured (full logits).

**Levers that cost no recomputation** (`Levers`), used only when the config allows them:
adapter ranks lowered to a common cap (``LoraFAConfig.min_r``; 0 drops the adapters; ranks in
``rank_pattern`` are fixed) and a chunked cross-entropy (``chunked_cross_entropy=None``). They
form a ladder from least memory to the configured model; lexicographic order (2) before (3)
means the block decisions are planned with every lever pulled (the ladder's floor), and the
levers are then released as far as those decisions still fit: the top-most rung that fits,
found by bisection (peak is monotone along the ladder). The levers are left alone when the
configured model fits as it is, or when the floor's unplanned peak is no lower than the
configured one's (a chunked loss with a tiny vocabulary).

**Block decisions** (`choices.Decision`, realised by `recompute_regions`): each repeated block
(``model.layers.i``) is kept, offloaded (its saved tensors wait in host memory), recomputed in
backward (from its input on the card, or its input offloaded too: an offloaded checkpoint),
selectively recomputed (its MLP up to the last linear), or recomputed with its MLP in
mini-sequence chunks. The candidates are the mixes of `mix.py` (how many blocks take each
decision, in one layout), each with an estimated peak and a predicted time; the answer is the
mix of least time whose *simulated* step fits (the exact cost model): the cheapest mix whose
estimate, corrected by the simulations made so far, fits is simulated, up to
`MAX_SIMULATIONS` times. A plan with k checkpointed blocks reserves
``(k + 1) * CHECKPOINT_RESERVE_BYTES`` on top of the cost model's peak.

**Offload** needs a GPU profile (`devices.PROFILES`: a CUDA step) and ``offload=True``
(`PlanSettings.offload`); without a profile (a CPU step, or no card named), or with
``offload=False`` (host memory is short), no block is offloaded: the profile still times the
step, and blocks are recomputed on the card.

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
from ..graph import block_of
from ..targets import Adapter, rank_is_fixed
from ..units import format_bytes
from .flops import concrete, needs_grad, step_flops
from .mix import BlockFacts, Candidates, block_facts
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
    step_flops: int  # forward + backward (`flops.step_flops`)
    offload_seconds: float = 0.0  # time compute waits for the host link (`timing.transfer_wait`)


#: Simulated steps the search may spend on one budget (each new layout of decisions is one).
MAX_SIMULATIONS = 8


def plan_recompute(
    gm: fx.GraphModule,
    unplanned: StepEstimate,
    budget_bytes: int,
    simulate: Simulator,
    profile: DeviceProfile | None = None,
    *,
    offload: bool = True,
) -> RecomputePlan:
    """The mix of block decisions (`mix.py`) of least predicted time that fits `budget_bytes`:
    on a card (`profile`) the step's seconds, recomputation and link waits included (offloaded
    blocks and checkpoints only with `offload`); without one, the least recomputed FLOPs.
    Raises `InfeasibleBudgetError` with the least peak any mix reaches."""
    sizes = simulate.sizes(gm)
    facts = block_facts(gm, unplanned, sizes, needs_grad(gm), lambda nodes: _kept(nodes, sizes))
    card = profile is not None and offload
    rate = profile.dense_bf16_flops * ACHIEVED_FRACTION if profile is not None else 1.0
    candidates = Candidates(facts, unplanned.peak, rate, profile.host_link_bytes_per_s if card else None)
    estimated, lower = candidates.estimated.tolist(), candidates.lower.tolist()
    tried: dict[int, RecomputePlan] = {}  # by the mix's index in `candidates`
    errors: list[int] = []  # simulated peak - estimated peak, of each mix simulated

    def cheapest(correction: int, bound: float) -> tuple[float, int] | None:
        """The mix of least seconds, under `bound`, untried, whose estimate plus `correction`
        fits; the link's waits (the costly part of a mix's seconds) are computed only for mixes
        whose lower bound could still win."""
        found = None
        for i in candidates.order:
            if lower[i] >= min(bound, found[0] if found else bound):
                break
            if estimated[i] + correction <= budget_bytes and i not in tried:
                total = lower[i] + candidates.wait_seconds(candidates.mix(i).decisions(facts))
                if total < min(bound, found[0] if found else bound):
                    found = (total, i)
        return found

    def simulated(i: int) -> RecomputePlan:
        if i not in tried:
            decisions = candidates.mix(i).decisions(facts)
            plan = evaluate(gm, decisions, simulate, unplanned, facts=facts)
            tried[i] = dataclasses.replace(plan, offload_seconds=candidates.wait_seconds(decisions))
            errors.append(tried[i].estimate.peak - estimated[i])
        return tried[i]

    # First the cheapest mix whose estimate, corrected by the largest error seen, fits (the
    # estimate misses backward transients); then cheaper mixes whose estimate fits with the
    # smallest error seen less the errors' spread (it also overcounts: a recomputed block's
    # backward is not always where the peak is), cheapest first: each that fits is the answer
    # so far.
    best: tuple[float, RecomputePlan] | None = None
    while len(tried) < MAX_SIMULATIONS:
        spread = max(errors, default=0) - min(errors, default=0)
        if best is None:
            pick = cheapest(max(errors, default=0), float("inf"))
        else:
            pick = cheapest(min(errors) - spread, best[0])
        if pick is None:
            break
        plan = simulated(pick[1])
        if plan.estimate.peak <= budget_bytes:
            best = (pick[0], plan)
    if best is not None:
        return best[1]
    # No estimate, corrected, fits: the mix of least estimated peak may still (the correction
    # is the largest error seen), else the least peak a mix reaches is the smallest budget
    # (not always that mix's: a checkpoint's own bytes can outweigh what it frees).
    floor = simulated(min(candidates.order, key=estimated.__getitem__))
    if floor.estimate.peak <= budget_bytes:
        return floor
    least = min([evaluate(gm, {}, simulate, unplanned), *tried.values(), floor], key=lambda p: p.estimate.peak)
    raise InfeasibleBudgetError(least.estimate.peak, _dominant_terms(least.estimate), budget_bytes)


def evaluate(
    gm: fx.GraphModule,
    decisions: Mapping[str, Decision],
    simulate: Simulator,
    unplanned: StepEstimate | None = None,
    *,
    facts: BlockFacts | None = None,
) -> RecomputePlan:
    """`decisions` on `gm`, priced by the exact cost model (`unplanned`: gm's own estimate,
    reused when nothing is recomputed or offloaded) and the FLOP model."""
    sizes = simulate.sizes(gm)
    changed = {b: d for b, d in decisions.items() if d is not Decision.KEEP}
    if changed:
        estimate = simulate(gm, decisions)
        recomputed = sum(d is not Decision.OFFLOAD for d in changed.values())
        estimate = dataclasses.replace(estimate, peak=estimate.peak + CHECKPOINT_RESERVE_BYTES * (1 + recomputed))
    else:
        estimate = unplanned or simulate(gm)
    if changed and facts is None:  # FLOPs only are read: the realised step's bytes serve
        facts = block_facts(gm, estimate, sizes, needs_grad(gm), lambda nodes: _kept(nodes, sizes))
    recompute_flops = sum(facts.blocks[b].recomputes(d) for b, d in changed.items() if b in facts.blocks) \
        if changed else 0
    return RecomputePlan(dict(decisions), estimate, recompute_flops, sum(step_flops(gm, sizes)))


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


def _dominant_terms(e: StepEstimate) -> str:
    terms = {
        "weights": e.weights + e.buffers,
        "optimizer states": e.optimizer_states,
        "activations and backward transients": e.peak - e.weights - e.buffers - e.optimizer_states - e.batch,
    }
    return ", ".join(f"{name} {format_bytes(v)}" for name, v in sorted(terms.items(), key=lambda kv: -kv[1]))
