"""The planning half of the pipeline, wired once: cost model -> planner -> realise -> emit.

    CapturedModel (captured_model.py: capture, graph and adapter stages, one graph per rung)
      -> cost model (memory/cost_model.py, or memory/sharded_cost_model.py for one rank;
         memory/compose.py composes a deep step from a sample of its repeated blocks)
      -> planner (memory/planner.py, under a budget: ranks, chunked loss, block decisions)
      -> realise (stages.REALISE: recompute_regions [-> outline_layers, FSDP2])
      -> emit: saved bytes on the nodes, the `MemoryPlan` on ``gm.lorafa_plan``

`plan_and_emit` runs it for one process or one rank of a data-parallel job
(`PlanSettings.world_size`); the public entry points (`api.py`) call it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch.fx as fx
import torch.nn as nn

from . import stages
from .captured_model import CapturedModel, Progress, silent
from .choices import Sharding
from .devices import PROFILES
from .graph import generate_code
from .hf_compat import attach_hf_attributes
from .memory.compose import ComposedSimulator
from .memory.cost_model import CostModel, annotate_saved_bytes
from .memory.planner import RecomputePlan, evaluate, plan_memory
from .memory.report import MemoryPlan
from .memory.sharded_cost_model import rank_cost_model
from .memory.simulate import Simulator
from .plan_config import PlanSettings
from .state import attach
from .units import format_bytes


def plan_and_emit(
    captured: CapturedModel, batch: Mapping[str, object], settings: PlanSettings, progress: Progress = silent
) -> fx.GraphModule:
    """The adapted graph planned under ``settings.budget_bytes`` (the configured one without a
    budget), its recomputation realised (and its layers outlined for FSDP2), with its
    `MemoryPlan` on ``gm.lorafa_plan``. `batch`: one process's, or one rank's with
    ``settings.world_size``."""
    progress("simulating a training step" if settings.budget_bytes is None else "planning under the budget")
    with _cost_model(batch, settings) as simulate:
        gm, planned = _plan(captured, settings, simulate)
    if settings.world_size is not None and settings.sharding is Sharding.FULL:
        gm = stages.REALISE.layers(gm)
    annotate_saved_bytes(gm, planned.estimate)
    plan = MemoryPlan.from_estimate(
        gm, planned.estimate, batch, settings, planned.decisions, planned.recompute_flops, planned.step_flops,
        configured=captured.adapters, offload_seconds=planned.offload_seconds, task=captured.task,
        trained_modules=captured.saved_modules,
    )
    attach(gm, plan=plan)
    generate_code(gm)
    return gm


def emit(
    captured: CapturedModel, model: nn.Module, example_inputs: Mapping[str, object], settings: PlanSettings
) -> fx.GraphModule:
    """`transform`'s result for `captured` (a capture of `model`): planned at the example batch,
    in `model`'s train/eval mode, with the attributes Trainer and accelerate read of `model`."""
    gm = plan_and_emit(captured, example_inputs, settings)
    gm.train(model.training)
    attach_hf_attributes(gm, model)
    return gm


def _cost_model(batch: Mapping[str, object], settings: PlanSettings) -> Simulator:
    if settings.world_size is None:
        whole = CostModel(batch, autocast_dtype=settings.autocast_dtype, realise=stages.REALISE)
    else:
        whole = rank_cost_model(batch, settings.world_size, settings.sharding, stages.REALISE, autocast_dtype=settings.autocast_dtype)
    return ComposedSimulator(whole)


def _plan(captured: CapturedModel, settings: PlanSettings, simulate: Simulator) -> tuple[fx.GraphModule, RecomputePlan]:
    if settings.budget_bytes is None:
        gm = captured.build()
        return gm, evaluate(gm, {}, simulate)
    profile = PROFILES[settings.device_profile] if settings.device_profile else None
    planned = plan_memory(captured, settings.budget_bytes, simulate, profile, offload=settings.offload)
    plan = planned.recompute
    gm = stages.REALISE.regions(planned.gm, plan.decisions)
    if gm.lorafa.chunked_loss and captured.config.chunked_cross_entropy is None:
        warnings.warn(
            f"To meet budget={format_bytes(settings.budget_bytes)} the planner computes the loss in chunks: in "
            "train mode the model output's logits are None. Pass LoraFAConfig(chunked_cross_entropy=False) to "
            "keep them.",
            stacklevel=4,
        )
    return gm, plan
