"""Inside a data-parallel job: hand the transformed module to torch (FSDP2 or DDP).

``transform(model, example_inputs=batch, world_size=N, sharding="full")`` plans one rank's step
(`memory/sharded_cost_model.py`) and, for ``"full"``, emits each decoder layer as a called
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

End the job in order: ``dist.barrier()`` (every rank done with its collectives), then
``dist.destroy_process_group()``. `prepare` keeps each DDP module's process group referenced
from Python until the process exits: DDP's C++ reducer holds the group through a handle whose
destructor keeps the GIL, and a gloo group's destructor joins its worker threads, one of which
may still need the GIL to free the last collective's tensor. When the reducer held the last
reference (the group destroyed before the DDP module was freed, the usual order at the end of
``main()``), a rank hung at exit (the example, 5 of 22 runs on 2 loaded cores); a reference
from Python is freed with the GIL released.
"""

from __future__ import annotations

import atexit

import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from .choices import Sharding
from .errors import DistributedPlanError
from .ops.regions import outlined_layers

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
    if plan.sharding is Sharding.NONE:
        ddp = nn.parallel.DistributedDataParallel(gm, **ddp_kwargs)
        _hold_until_exit(ddp.process_group)
        return ddp
    if mesh is None:
        device = next(gm.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for path in outlined_layers(gm):
        fully_shard(gm.get_submodule(path), mesh=mesh)
    fully_shard(gm, mesh=mesh)
    return gm


#: Process groups of the DDP modules `prepare` made, released at exit (see the module docstring).
_HELD_GROUPS: list[dist.ProcessGroup] = []


def _hold_until_exit(group: dist.ProcessGroup) -> None:
    if not _HELD_GROUPS:
        # atexit runs before the interpreter finalizes, while gloo's threads can still take the GIL.
        atexit.register(_HELD_GROUPS.clear)
    _HELD_GROUPS.append(group)
