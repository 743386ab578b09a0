"""The pipeline, wired once: capture -> graph passes -> adapter passes -> planning -> emit.

    capture (capture.py)
      -> drop_metadata_asserts -> follow_input_device -> follow_param_dtype
      -> drop_full_slices -> gate_dropout -> simplify_attention        once per model (`Adaptable`)
      -> rewrite_lora_fa -> annotate_saved_tensors [-> chunk_cross_entropy]
                                                                        once per rung of the
                                                                        planner's lever ladder
      -> cost model (memory/cost_model.py, or memory/sharded_cost_model.py for one rank)
      -> planner (memory/planner.py, under a budget)
      -> recompute_regions [-> outline_layers, FSDP2]
      -> emit: saved bytes on the nodes, `MemoryPlan` on ``gm.lorafa_plan``

`plan_and_emit` runs the planning half for one process or one rank of a data-parallel job
(`PlanSettings.world_size`); the public entry points (`api.py`) call it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from .bnb_layers import traceable
from .capture import capture
from .config import LoraFAConfig, PlanSettings
from .memory.cost_model import CostModel, annotate_saved_bytes
from .memory.planner import Levers, lever_ladder, plan_memory
from .memory.report import MemoryPlan
from .memory.sharded_cost_model import rank_cost_model
from .memory.simulate import Simulator, StepEstimate
from .passes._graph import graph_copy, set_attributes
from .passes.annotate_saved_tensors import AnnotateSavedTensors
from .passes.chunk_cross_entropy import ChunkCrossEntropy
from .passes.drop_full_slices import DropFullSlices
from .passes.drop_metadata_asserts import DropMetadataAsserts
from .passes.follow_input_device import FollowInputDevice
from .passes.follow_param_dtype import FollowParamDtype
from .passes.gate_dropout import GateDropout
from .passes.outline_layers import OutlineLayers
from .passes.recompute_regions import RecomputeRegions
from .passes.rewrite_lora_fa import RewriteLoraFA, linear_nodes
from .passes.simplify_attention import SimplifyAttention
from .targets import Adapter, cap_ranks, planned_config, rank_is_fixed, select_adapters, select_modules_to_save
from .units import format_bytes


class Adaptable:
    """The captured model, adapted as a rung of the planner's lever ladder asks (`Levers`):
    capture and the graph-level passes run once, the adapter passes once per rung (the
    planner's `Rungs`)."""

    def __init__(self, model: nn.Module, example_inputs: Mapping[str, torch.Tensor], config: LoraFAConfig) -> None:
        adapters = select_adapters(model, config)
        self.saved_modules = select_modules_to_save(model, config)
        with traceable(model):
            base = capture(model, example_inputs)
        self.adapters = _drop_unused(adapters, linear_nodes(base))
        causal = frozenset(path for path, m in model.named_modules() if getattr(m, "is_causal", False) is True)
        for p in (DropMetadataAsserts(), FollowInputDevice(), FollowParamDtype(), DropFullSlices(), GateDropout(),
                  SimplifyAttention(causal)):
            base = p(base).graph_module
        self.base, self.config = base, config
        chunk_applies = config.chunked_cross_entropy is not False and ChunkCrossEntropy.applies(base)
        adjustable = [a.r for a in self.adapters if not rank_is_fixed(config, a.path)]
        max_r = max(adjustable, default=0)
        # Dropping every adapter would leave nothing to train: then the floor is rank 1.
        keeps_some = len(adjustable) < len(self.adapters) or self.saved_modules
        min_r = 1 if config.min_r == 0 and not keeps_some else config.min_r
        self.ladder = lever_ladder(min_r, max_r, config.chunked_cross_entropy, chunk_applies)

    def build(self, levers: Levers | None = None) -> fx.GraphModule:
        """The adapted graph at `levers` (default: the configured model, the ladder's top)."""
        levers = levers or self.ladder[-1]
        gm = graph_copy(self.base)
        adapters = cap_ranks(self.adapters, self.config, levers.rank_cap)
        for p in (RewriteLoraFA(adapters, self.config), AnnotateSavedTensors()):
            gm = p(gm).graph_module
        chunked = False
        if levers.chunked_cross_entropy:  # an adapted output projection is not chunked
            result = ChunkCrossEntropy()(gm)
            gm, chunked = result.graph_module, result.modified
        _set_trainable(gm, adapters, self.saved_modules)
        set_attributes(
            gm, lorafa_chunked_cross_entropy=chunked, lorafa_config=planned_config(self.config, self.adapters, adapters),
            lorafa_adapters=tuple(adapters),
        )
        return gm


def plan_and_emit(adaptable: Adaptable, batch: Mapping[str, object], settings: PlanSettings) -> fx.GraphModule:
    """The adapted graph planned under ``settings.budget_bytes`` (the configured one without a
    budget), its recomputation realised (and its layers outlined for FSDP2), with its
    `MemoryPlan` on ``gm.lorafa_plan``. `batch`: one process's, or one rank's with
    ``settings.world_size``."""
    with _cost_model(batch, settings) as simulate:
        gm, estimate, decisions, recompute_flops, step_flops = _plan(adaptable, settings, simulate)
    if settings.world_size is not None and settings.sharding == "full":
        gm = OutlineLayers()(gm).graph_module
    annotate_saved_bytes(gm, estimate)
    plan = MemoryPlan.from_estimate(
        gm, estimate, batch, settings.budget_bytes, decisions, recompute_flops, step_flops,
        configured=adaptable.adapters, world_size=settings.world_size,
        sharding=settings.sharding if settings.world_size is not None else None,
        mixed_precision=settings.mixed_precision,
    )
    set_attributes(gm, lorafa_plan=plan)
    return gm


def _cost_model(batch: Mapping[str, object], settings: PlanSettings) -> Simulator:
    if settings.world_size is None:
        return CostModel(batch, autocast_dtype=settings.autocast_dtype)
    return rank_cost_model(batch, settings.world_size, settings.sharding, autocast_dtype=settings.autocast_dtype)


def _plan(
    adaptable: Adaptable, settings: PlanSettings, simulate: Simulator
) -> tuple[fx.GraphModule, StepEstimate, dict[str, str], int, int]:
    if settings.budget_bytes is None:
        gm = adaptable.build()
        return gm, simulate(gm), {}, 0, 0
    planned = plan_memory(adaptable, settings.budget_bytes, simulate)
    plan = planned.recompute
    gm = RecomputeRegions(plan.decisions)(planned.gm).graph_module
    if gm.lorafa_chunked_cross_entropy and adaptable.config.chunked_cross_entropy is None:
        warnings.warn(
            f"To meet budget={format_bytes(settings.budget_bytes)} the planner computes the loss in chunks: in "
            "train mode the model output's logits are None. Pass LoraFAConfig(chunked_cross_entropy=False) to "
            "keep them.",
            stacklevel=4,
        )
    return gm, plan.estimate, plan.decisions, plan.recompute_flops, plan.step_flops


def _drop_unused(adapters: list[Adapter], linears: Mapping[str, list[fx.Node]]) -> list[Adapter]:
    unused = [a.path for a in adapters if a.path not in linears]
    if unused:
        warnings.warn(
            f"{len(unused)} targeted modules are not called in the model's forward and get no adapter: "
            f"{', '.join(unused)}.",
            stacklevel=4,
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
