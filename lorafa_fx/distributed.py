"""Data-parallel training of the transformed module on `torch.distributed`: FSDP2 or DDP.

``transform(model, example_inputs=batch, world_size=N, sharding="full")`` plans one rank's step
(`passes/estimate_sharded_memory.py`) and, for ``"full"``, emits each decoder layer as a called
submodule owning its parameters (`passes/outline_layers.py`). Inside the job (``torchrun`` or
``accelerate launch``, process group initialised), `prepare` then hands it to torch:

* ``"full"``: ``fully_shard`` on every outlined layer, then on the root (FSDP2). Every
  parameter is sharded on dim 0 across the ranks, frozen base weights and adapters alike;
  a layer is all-gathered for its forward and its backward. Only ``lora_B`` (and
  ``modules_to_save``) require grad, so only their gradients are reduce-scattered (averaged);
  frozen parameters get no gradient and no gradient communication.
* ``"none"``: ``DistributedDataParallel``: the model is replicated, only the parameters that
  require grad are bucketed and all-reduced (averaged).

The recompute decisions of a budgeted plan run inside each called layer (torch's activation
checkpointing nested in the FSDP unit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from .errors import DistributedPlanError
from .passes.estimate_memory import StepEstimate
from .passes.estimate_sharded_memory import SHARDING_CHOICES, ShardedSimulator, simulate_sharded_step
from .passes.outline_layers import OutlineLayers, outlined_layers
from .passes.plan_memory import with_recompute
from .transform import Captured, realise

__all__ = ["DistributedPlanError", "prepare"]


def prepare(gm: fx.GraphModule, *, mesh=None, **ddp_kwargs) -> nn.Module:
    """Wrap a module from ``transform(..., world_size=N)`` for training in this process's job.

    Returns `gm` itself, sharded by FSDP2, for ``sharding="full"`` (`mesh`: a 1-D
    `DeviceMesh`, default all ranks on this process's device type); a
    `DistributedDataParallel` around `gm` for ``"none"`` (`ddp_kwargs` go to it). Call
    ``torch.distributed.init_process_group`` first (``torchrun`` sets the environment).
    """
    plan = getattr(gm, "lorafa_plan", None)
    if plan is None or plan.world_size is None:
        raise DistributedPlanError(
            "prepare() takes the module returned by lorafa_fx.transform(model, example_inputs=batch, "
            "world_size=N, sharding='full' | 'none')."
        )
    if not dist.is_initialized():
        raise DistributedPlanError(
            "torch.distributed is not initialised: launch with torchrun (or accelerate launch) and call "
            "torch.distributed.init_process_group() before prepare()."
        )
    if dist.get_world_size() != plan.world_size:
        raise DistributedPlanError(
            f"the plan is for world_size={plan.world_size} but this job has {dist.get_world_size()} "
            f"processes: transform with world_size={dist.get_world_size()}."
        )
    if plan.sharding == "none":
        return nn.parallel.DistributedDataParallel(gm, **ddp_kwargs)
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = next(gm.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for path in outlined_layers(gm):
        fully_shard(gm.get_submodule(path), mesh=mesh)
    fully_shard(gm, mesh=mesh)
    return gm


def plan_and_realise_distributed(
    variants: Captured,
    batch: Mapping[str, object],
    budget_bytes: int | None,
    world_size: int,
    sharding: str,
) -> fx.GraphModule:
    """`transform.plan_and_realise` for one rank of a data-parallel job (`batch`: the rank's)."""
    if sharding not in SHARDING_CHOICES:
        raise DistributedPlanError(f"sharding={sharding!r}: use one of {SHARDING_CHOICES}.")
    if not isinstance(world_size, int) or world_size < 1:
        raise DistributedPlanError(f"world_size={world_size!r} must be a positive int (the number of ranks).")

    with contextlib.ExitStack() as stack:
        if sharding == "full":
            sharded = stack.enter_context(ShardedSimulator(batch, world_size))

        def simulate(g: fx.GraphModule) -> StepEstimate:
            if sharding == "none":
                return simulate_sharded_step(g, batch, world_size, "none")
            # The planner realises its choice on a flat candidate: outline a copy, unless `g`
            # is already one (`with_recompute`'s, the only graphs holding recompute regions).
            if not any(n.meta.get("lorafa", {}).get("recompute") for n in g.graph.find_nodes(op="call_module")):
                g = with_recompute(g, {})
            return sharded(OutlineLayers()(g).graph_module)

        realised = realise(variants, budget_bytes, simulate)
    gm = realised.gm
    if sharding == "full":
        gm = OutlineLayers()(gm).graph_module
    _write_saved_bytes(gm, realised.estimate)
    plan = realised.memory_plan(gm, batch, budget_bytes, variants)
    gm.lorafa_plan = plan.per_rank(world_size, sharding)
    return gm


def _write_saved_bytes(gm: fx.GraphModule, estimate: StepEstimate) -> None:
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                saved = estimate.saved_by_node.get(node.name)
                if saved:
                    node.meta.setdefault("lorafa", {})["saved_bytes"] = saved
