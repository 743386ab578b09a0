"""The pipeline, wired once: capture -> graph passes -> adapter passes -> planning -> emit.

    capture (capture.py)
      -> drop_metadata_asserts -> follow_input_device -> follow_param_dtype
      -> drop_full_slices -> recognize_linears -> gate_dropout -> simplify_attention
      -> lean_norms -> lean_gated_mlp -> lean_pointwise -> compact_saved_views -> lean_experts
                                                                        once per model (`Adaptable`)
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

import dataclasses
import warnings
from collections.abc import Callable, Collection, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from .bnb_layers import traceable
from .capture import capture
from .choices import Decision, Sharding
from .config import LoraFAConfig, PlanSettings
from .devices import PROFILES
from .errors import TargetNotFoundError
from .graph import generate_code, graph_copy, set_attributes
from .memory.compose import ComposedSimulator
from .memory.cost_model import CostModel, annotate_saved_bytes
from .memory.planner import Levers, RecomputePlan, evaluate, lever_ladder, plan_memory
from .memory.report import MemoryPlan
from .memory.sharded_cost_model import rank_cost_model
from .memory.simulate import Simulator
from .passes.annotate_saved_tensors import AnnotateSavedTensors
from .passes.chunk_cross_entropy import ChunkCrossEntropy
from .passes.compact_saved_views import CompactSavedViews
from .passes.drop_full_slices import DropFullSlices
from .passes.drop_metadata_asserts import DropMetadataAsserts
from .passes.expand_layers import ExpandLayers, repeats_cleanly
from .passes.follow_input_device import FollowInputDevice
from .passes.follow_param_dtype import FollowParamDtype
from .passes.gate_dropout import GateDropout
from .passes.lean_experts import LeanExperts
from .passes.lean_gated_mlp import LeanGatedMLP
from .passes.lean_norms import LeanNorms
from .passes.lean_pointwise import LeanPointwise
from .passes.outline_layers import OutlineLayers
from .passes.recognize_linears import RecognizeLinears
from .passes.recompute_regions import RecomputeRegions
from .passes.rewrite_lora_fa import RewriteLoraFA, weight_nodes
from .passes.simplify_attention import SimplifyAttention
from .targets import Adapter, cap_ranks, planned_config, rank_is_fixed, select_adapters, select_modules_to_save
from .units import format_bytes

#: Exact rewrites that keep less for backward than eager PyTorch keeps: free memory, applied
#: to every model before anything is planned (after `follow_param_dtype`, whose casts they read).
LEAN_PASSES = (LeanNorms, LeanGatedMLP, LeanPointwise, CompactSavedViews, LeanExperts)

#: Receives a short line per stage ("capturing the model", ...); the CLI shows it.
Progress = Callable[[str], None]


def _silent(stage: str) -> None:
    return None


class Adaptable:
    """The captured model, adapted as a rung of the planner's lever ladder asks (`Levers`):
    capture and the graph-level passes run once, the adapter passes once per rung (the
    planner's `Rungs`).

    `shallow`: the same model with fewer layers (`estimate` builds one from the config). It is
    captured instead of `model` when `model`'s extra layers repeat its last one (same
    parameters, adapters and graph), and `build` grows the graph to `model`'s depth
    (`expand_layers.py`): capture time no longer grows with depth.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Mapping[str, torch.Tensor],
        config: LoraFAConfig,
        progress: Progress = _silent,
        shallow: nn.Module | None = None,
    ) -> None:
        adapters = select_adapters(model, config)
        self.saved_modules = select_modules_to_save(model, config)
        self.depths = _repeated_stacks(shallow, model, config) if shallow is not None else {}
        progress("capturing the model (torch.export)" + (f", {_depth_note(self.depths)}" if self.depths else ""))
        base = self._capture(shallow if self.depths else model, example_inputs)
        if self.depths and not all(repeats_cleanly(base.graph, stack) for stack in self.depths):
            self.depths = {}
            base = self._capture(model, example_inputs)
        weights = weight_nodes(base)
        self.adapters = _drop_unused(adapters, {a.path for a in adapters if _shallow_path(a.weight, self.depths) in weights})
        if not self.adapters and not self.saved_modules:
            raise TargetNotFoundError(
                f"Nothing to train: none of the {len(adapters)} modules target_modules={config.target_modules!r} "
                f"selects runs as a linear layer in the captured forward (e.g. {adapters[0].path}). lorafa_fx adapts "
                "nn.Linear calls and matmuls with a layer's transposed weight; target the linear layers the "
                "forward calls, or name the trained modules in modules_to_save."
            )
        self.base, self.config = base, config
        self._by_rank_cap: dict[int | None, fx.GraphModule] = {}
        chunk_applies = config.chunked_cross_entropy is not False and ChunkCrossEntropy.applies(base)
        adjustable = [a.r for a in self.adapters if not rank_is_fixed(config, a.key)]
        max_r = max(adjustable, default=0)
        # Dropping every adapter would leave nothing to train: then the floor is rank 1.
        keeps_some = len(adjustable) < len(self.adapters) or self.saved_modules
        min_r = 1 if config.min_r == 0 and not keeps_some else config.min_r
        self.ladder = lever_ladder(min_r, max_r, config.chunked_cross_entropy, chunk_applies)

    @staticmethod
    def _capture(model: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> fx.GraphModule:
        with traceable(model):
            base = capture(model, example_inputs)
        causal = frozenset(path for path, m in model.named_modules() if getattr(m, "is_causal", False) is True)
        for p in (DropMetadataAsserts(), FollowInputDevice(), FollowParamDtype(), DropFullSlices(), RecognizeLinears(),
                  GateDropout(), SimplifyAttention(causal), *(lean() for lean in LEAN_PASSES)):
            base = p(base).graph_module
        return base

    def build(self, levers: Levers | None = None) -> fx.GraphModule:
        """The adapted graph at `levers` (default: the configured model, the ladder's top)."""
        levers = levers or self.ladder[-1]
        adapters = cap_ranks(self.adapters, self.config, levers.rank_cap)
        gm = graph_copy(self._adapted(levers.rank_cap))
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

    def _adapted(self, rank_cap: int | None) -> fx.GraphModule:
        """The graph with adapters at `rank_cap`, grown to depth: rungs that differ only in
        the loss (the planner's floor and the configured model) are adapted and grown once."""
        if rank_cap not in self._by_rank_cap:
            gm = graph_copy(self.base)
            adapters = cap_ranks(self.adapters, self.config, rank_cap)
            captured = [a for a in adapters if _shallow_path(a.path, self.depths) == a.path]
            for p in (RewriteLoraFA(captured, self.config), AnnotateSavedTensors()):
                gm = p(gm).graph_module
            self._by_rank_cap[rank_cap] = ExpandLayers(self.depths)(gm).graph_module if self.depths else gm
        return self._by_rank_cap[rank_cap]


#: Layers per stack of the shallow model `estimate` captures: the last is copied, reading its
#: outputs as it read the one before (when the two are the same graph, `repeats_cleanly`).
SHALLOW_LAYERS = 2


def _repeated_stacks(shallow: nn.Module, model: nn.Module, config: LoraFAConfig) -> dict[str, int]:
    """``{stack: depth}`` of `model`'s layer stacks that `shallow` has `SHALLOW_LAYERS` of, if
    every extra layer repeats `shallow`'s last one (modules, parameters, adapters, modules to
    save); else ``{}``."""
    depths = {}
    for path, stack in model.named_modules():
        if isinstance(stack, nn.ModuleList):
            short = _submodule(shallow, path)
            if not isinstance(short, nn.ModuleList):
                return {}
            if len(short) < len(stack):
                if len(short) != SHALLOW_LAYERS:
                    return {}
                depths[path] = len(stack)
    last = {path: _layout(shallow.get_submodule(f"{path}.{SHALLOW_LAYERS - 1}")) for path in depths}
    if any(_layout(model.get_submodule(f"{path}.{i}")) != last[path]
           for path, depth in depths.items() for i in range(SHALLOW_LAYERS - 1, depth)):
        return {}
    short = {a.path: a for a in select_adapters(shallow, config)}
    deep = [dataclasses.replace(a, path=_shallow_path(a.path, depths)) for a in select_adapters(model, config)]
    if not depths or {a.path for a in deep} != set(short) or any(a != short[a.path] for a in deep):
        return {}
    modules = {_shallow_path(m, depths) for m in select_modules_to_save(model, config)}
    return depths if modules == set(select_modules_to_save(shallow, config)) else {}


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _layout(module: nn.Module) -> list[tuple]:
    return [(n, type(m).__name__) for n, m in module.named_modules()] + [
        (n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()
    ]


def _shallow_path(path: str, depths: Mapping[str, int]) -> str:
    """Where `path` of the deep model is in the shallow one: a layer past the shallow stack's
    last is that last layer (the one `ExpandLayers` copies)."""
    for stack in depths:
        if path.startswith(stack + "."):
            index, _, rest = path[len(stack) + 1 :].partition(".")
            if index.isdigit() and int(index) >= SHALLOW_LAYERS:
                return f"{stack}.{SHALLOW_LAYERS - 1}" + (f".{rest}" if rest else "")
    return path


def _depth_note(depths: Mapping[str, int]) -> str:
    return ", ".join(f"{SHALLOW_LAYERS} of {n} {stack}" for stack, n in depths.items())


def plan_and_emit(
    adaptable: Adaptable, batch: Mapping[str, object], settings: PlanSettings, progress: Progress = _silent
) -> fx.GraphModule:
    """The adapted graph planned under ``settings.budget_bytes`` (the configured one without a
    budget), its recomputation realised (and its layers outlined for FSDP2), with its
    `MemoryPlan` on ``gm.lorafa_plan``. `batch`: one process's, or one rank's with
    ``settings.world_size``."""
    progress("simulating a training step" if settings.budget_bytes is None else "planning under the budget")
    with _cost_model(batch, settings) as simulate:
        gm, planned = _plan(adaptable, settings, simulate)
    if settings.world_size is not None and settings.sharding is Sharding.FULL:
        gm = OutlineLayers()(gm).graph_module
    annotate_saved_bytes(gm, planned.estimate)
    plan = MemoryPlan.from_estimate(
        gm, planned.estimate, batch, settings, planned.decisions, planned.recompute_flops, planned.step_flops,
        configured=adaptable.adapters, offload_seconds=planned.offload_seconds,
    )
    set_attributes(gm, lorafa_plan=plan)
    generate_code(gm)
    return gm


def _cost_model(batch: Mapping[str, object], settings: PlanSettings) -> Simulator:
    if settings.world_size is None:
        whole = CostModel(batch, autocast_dtype=settings.autocast_dtype, realise=REALISE)
    else:
        whole = rank_cost_model(batch, settings.world_size, settings.sharding, REALISE, autocast_dtype=settings.autocast_dtype)
    return ComposedSimulator(whole)


class _Realise:
    """The passes a simulator prices the planner's decisions with (`memory.simulate.Realise`)."""

    def regions(self, gm: fx.GraphModule, decisions: Mapping[str, Decision]) -> fx.GraphModule:
        return RecomputeRegions(decisions)(gm).graph_module

    def layers(self, gm: fx.GraphModule) -> fx.GraphModule:
        return OutlineLayers()(gm).graph_module


REALISE = _Realise()


def _plan(adaptable: Adaptable, settings: PlanSettings, simulate: Simulator) -> tuple[fx.GraphModule, RecomputePlan]:
    if settings.budget_bytes is None:
        gm = adaptable.build()
        return gm, evaluate(gm, {}, simulate)
    profile = PROFILES[settings.device_profile] if settings.device_profile else None
    planned = plan_memory(adaptable, settings.budget_bytes, simulate, profile, offload=settings.offload)
    plan = planned.recompute
    gm = RecomputeRegions(plan.decisions)(planned.gm).graph_module
    if gm.lorafa_chunked_cross_entropy and adaptable.config.chunked_cross_entropy is None:
        warnings.warn(
            f"To meet budget={format_bytes(settings.budget_bytes)} the planner computes the loss in chunks: in "
            "train mode the model output's logits are None. Pass LoraFAConfig(chunked_cross_entropy=False) to "
            "keep them.",
            stacklevel=4,
        )
    return gm, plan


def _drop_unused(adapters: list[Adapter], called: Collection[str]) -> list[Adapter]:
    unused = [a.path for a in adapters if a.path not in called]
    if unused:
        warnings.warn(
            f"{len(unused)} targeted modules are not called in the model's forward and get no adapter: "
            f"{', '.join(unused)}.",
            stacklevel=4,
        )
    return [a for a in adapters if a.path in called]


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
