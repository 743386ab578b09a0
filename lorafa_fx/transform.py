"""`transform`: the pipeline, from a Hugging Face model to a LoRA-FA GraphModule.

capture (`capture.py`) -> drop_full_slices -> gate_dropout -> simplify_attention -> rewrite_lora_fa ->
annotate_saved_tensors [-> chunk_cross_entropy] -> estimate_memory (the cost model) ->
plan_memory (the planner, under a budget; it may rebuild the adapted graph with lower ranks or
a chunked loss) -> recompute_regions -> emit (this file: freeze, attach the adapter table and
the `MemoryPlan`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from accelerate.utils import convert_file_size_to_int

from .bnb_layers import traceable
from .capture import capture
from .config import LoraFAConfig
from .errors import AlreadyTransformedError
from .hf_compat import attach_hf_attributes
from .passes._graph import graph_copy
from .passes.annotate_saved_tensors import AnnotateSavedTensors
from .passes.chunk_cross_entropy import ChunkCrossEntropy
from .passes.drop_full_slices import DropFullSlices
from .passes.estimate_memory import EstimateMemory, StepEstimate
from .passes.plan_memory import Levers, lever_ladder, plan_memory
from .passes.recompute_regions import RecomputeRegions
from .passes.gate_dropout import GateDropout
from .passes.rewrite_lora_fa import RewriteLoraFA, linear_nodes
from .passes.simplify_attention import SimplifyAttention
from .plan import MemoryPlan, format_bytes
from .targets import Adapter, cap_ranks, planned_config, rank_is_fixed, select_adapters, select_modules_to_save


def transform(
    model: nn.Module,
    budget: int | str | None = None,
    *,
    example_inputs: Mapping[str, torch.Tensor],
    config: LoraFAConfig | None = None,
    world_size: int | None = None,
    sharding: str = "full",
) -> fx.GraphModule:
    """Capture `model` and return a GraphModule that trains it with LoRA-FA.

    Args:
        model: a Hugging Face (or any `torch.export`-able) model. Its base weights are shared
            with the result, not copied, and frozen in place (as PEFT does).
        budget: memory budget of one training step (AdamW) at the example batch's shape: bytes
            as an int, or a string with accelerate's units ("40GB" = 40e9, "40GiB" = 40*2^30).
            The planner recomputes the fewest blocks in backward that make the predicted peak
            fit (first lowering ranks and chunking the loss where ``config`` allows it);
            `InfeasibleBudgetError` (with ``min_budget_bytes``) if nothing does.
        example_inputs: one keyword batch, as passed to ``model(**batch)``. Batch and sequence
            dims are captured as dynamic, so other shapes work too.
        config: what to adapt; defaults to ``LoraFAConfig()`` (all linears, r=8).
        world_size: plan one rank of a data-parallel job of this many processes
            (`example_inputs` is then one rank's batch); train the result with
            ``lorafa_fx.distributed.prepare(gm)`` inside the job (``torchrun``).
        sharding: with `world_size`: ``"full"`` (FSDP2, every parameter sharded 1/world_size,
            each decoder layer emitted as a called submodule owning its parameters) or
            ``"none"`` (DDP, replicated).

    Returns:
        a `torch.fx.GraphModule` called like the model (``gm(**batch)`` returns the model's
        output type). Trainable parameters: every ``lora_B`` and the ``modules_to_save``.
        ``gm.lorafa_adapters`` lists the adapters (module path, rank, scaling);
        ``gm.lorafa_plan`` is the `MemoryPlan` of a training step at the example batch's shape
        (AdamW; print it).
    """
    if hasattr(model, "lorafa_adapters"):
        raise AlreadyTransformedError(
            "This module was already transformed by lorafa_fx.transform; transform the original "
            "model instead (its weights are shared with the result)."
        )
    budget_bytes = parse_budget(budget)
    if not isinstance(example_inputs, Mapping):
        raise TypeError(
            f"example_inputs must be the keyword batch for model(**batch) (a dict such as "
            f"{{'input_ids': ..., 'labels': ...}}), got {type(example_inputs).__name__}."
        )
    variants = Captured(model, example_inputs, config or LoraFAConfig())
    if world_size is None:
        gm = plan_and_realise(variants, example_inputs, budget_bytes)
    else:
        from .distributed import plan_and_realise_distributed

        gm = plan_and_realise_distributed(variants, example_inputs, budget_bytes, world_size, sharding)
    gm.train(model.training)
    attach_hf_attributes(gm, model)
    return gm


def parse_budget(budget: int | str | None) -> int | None:
    """Bytes from an int or a size string, with accelerate's conventions ("40GB" = 40e9)."""
    if budget is None:
        return None
    accepted = "an int number of bytes, or a string such as '40GB' (40*10^9) or '40GiB' (40*2^30)"
    if isinstance(budget, int) and not isinstance(budget, bool):
        if budget <= 0:
            raise ValueError(f"budget={budget!r} must be positive: pass {accepted}.")
        return budget
    if isinstance(budget, str):
        try:
            value = convert_file_size_to_int(budget.strip())
        except ValueError:
            value = None
        if value is not None and value > 0:
            return value
    raise ValueError(f"budget={budget!r} is not a memory size: pass {accepted}.")


@dataclass(frozen=True)
class Realised:
    """The planned graph, its recomputation realised, and what the cost model predicts."""

    gm: fx.GraphModule
    estimate: StepEstimate
    decisions: dict[str, str] = field(default_factory=dict)
    recompute_flops: int = 0
    step_flops: int = 0

    def memory_plan(self, gm: fx.GraphModule, batch: Mapping[str, object], budget_bytes: int | None,
                    variants: Captured) -> MemoryPlan:
        return MemoryPlan.from_estimate(gm, self.estimate, batch, budget_bytes, self.decisions,
                                        self.recompute_flops, self.step_flops, configured=variants.adapters)


def realise(
    variants: Captured,
    budget_bytes: int | None,
    simulate: Callable[[fx.GraphModule], StepEstimate],
) -> Realised:
    """The configured graph without a budget, else `plan_memory`'s choice with its
    recomputation realised; `simulate` is the cost model (one process's or one rank's)."""
    if budget_bytes is None:
        gm = variants.build(variants.ladder[-1])
        return Realised(gm, simulate(gm))
    planned = plan_memory(variants.build, variants.ladder, budget_bytes, simulate)
    plan = planned.recompute
    gm = RecomputeRegions(plan.decisions)(planned.gm).graph_module
    if gm.lorafa_chunked_cross_entropy and variants.config.chunked_cross_entropy is None:
        warnings.warn(
            f"To meet budget={format_bytes(budget_bytes)} the planner computes the loss in chunks: in train mode "
            "the model output's logits are None. Pass LoraFAConfig(chunked_cross_entropy=False) to keep them.",
            stacklevel=4,
        )
    return Realised(gm, plan.estimate, plan.decisions, plan.recompute_flops, plan.step_flops)


def plan_and_realise(variants: Captured, batch: Mapping[str, object], budget_bytes: int | None) -> fx.GraphModule:
    """`realise` in one process, with its `MemoryPlan` attached."""
    realised = realise(variants, budget_bytes, lambda g: simulate_step(g, batch))
    realised.gm.lorafa_plan = realised.memory_plan(realised.gm, batch, budget_bytes, variants)
    return realised.gm


def build(model: nn.Module, example_inputs: Mapping[str, torch.Tensor], config: LoraFAConfig) -> fx.GraphModule:
    """Capture `model` and run the rewrite passes; `transform` without the memory plan."""
    variants = Captured(model, example_inputs, config)
    return variants.build(variants.ladder[-1])


class Captured:
    """The captured model, adapted as a rung of the planner's lever ladder asks (`Levers`):
    capture and the graph-level passes run once, the adapter passes once per rung."""

    def __init__(self, model: nn.Module, example_inputs: Mapping[str, torch.Tensor], config: LoraFAConfig) -> None:
        adapters = select_adapters(model, config)
        self.saved_modules = select_modules_to_save(model, config)
        with traceable(model):
            base = capture(model, example_inputs)
        self.adapters = _drop_unused(adapters, linear_nodes(base))
        causal = frozenset(path for path, m in model.named_modules() if getattr(m, "is_causal", False) is True)
        for p in (DropFullSlices(), GateDropout(), SimplifyAttention(causal)):
            base = p(base).graph_module
        self.base, self.config = base, config
        chunk_applies = config.chunked_cross_entropy is not False and ChunkCrossEntropy.applies(base)
        adjustable = [a.r for a in self.adapters if not rank_is_fixed(config, a.path)]
        max_r = max(adjustable, default=0)
        # Dropping every adapter would leave nothing to train: then the floor is rank 1.
        keeps_some = len(adjustable) < len(self.adapters) or self.saved_modules
        min_r = 1 if config.min_r == 0 and not keeps_some else config.min_r
        self.ladder = lever_ladder(min_r, max_r, config.chunked_cross_entropy, chunk_applies)

    def build(self, levers: Levers) -> fx.GraphModule:
        gm = graph_copy(self.base)
        adapters = cap_ranks(self.adapters, self.config, levers.rank_cap)
        for p in (RewriteLoraFA(adapters, self.config), AnnotateSavedTensors()):
            gm = p(gm).graph_module
        chunked = False
        if levers.chunked_cross_entropy:  # an adapted output projection is not chunked
            result = ChunkCrossEntropy()(gm)
            gm, chunked = result.graph_module, result.modified
        gm.lorafa_chunked_cross_entropy = chunked
        _set_trainable(gm, adapters, self.saved_modules)
        gm.lorafa_config = planned_config(self.config, self.adapters, adapters)
        gm.lorafa_adapters = tuple(adapters)
        return gm


def simulate_step(gm: fx.GraphModule, batch: Mapping[str, object]) -> StepEstimate:
    """Run the cost model on `gm` for a training step (train mode) at `batch`'s shapes."""
    training = gm.training
    gm.train()
    try:
        cost = EstimateMemory(batch)
        cost(gm)
    finally:
        gm.train(training)
    return cost.estimate


def plan_step(gm: fx.GraphModule, batch: Mapping[str, object]) -> MemoryPlan:
    """The `MemoryPlan` of `gm` as it is (no budget) at `batch`'s shapes."""
    return MemoryPlan.from_estimate(gm, simulate_step(gm, batch), batch, None)


def _drop_unused(adapters: list[Adapter], linears: Mapping[str, list[fx.Node]]) -> list[Adapter]:
    unused = [a.path for a in adapters if a.path not in linears]
    if unused:
        warnings.warn(
            f"{len(unused)} targeted modules are not called in the model's forward and get no adapter: "
            f"{', '.join(unused)}.",
            stacklevel=3,
        )
    return [a for a in adapters if a.path in linears]


def _set_trainable(gm: fx.GraphModule, adapters: list[Adapter], saved_modules: list[str]) -> None:
    for p in gm.parameters():
        p.requires_grad_(False)
    for a in adapters:
        gm.get_parameter(f"{a.path}.lora_B.weight").requires_grad_(True)
    # modules_to_save train a copy, as PEFT's ModulesToSaveWrapper does, so the user's model
    # keeps its original head.
    for path in saved_modules:
        module = gm.get_submodule(path)
        for name, p in list(module.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, nn.Parameter(p.detach().clone()))
