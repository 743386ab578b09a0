"""Regions: a block of the graph outlined into a sub-GraphModule and called through a wrapper
that decides what it keeps for backward (`passes/recompute_regions.py` makes them,
`passes/outline_layers.py` nests them in called layers for FSDP2).

`Recompute` runs its region under ``torch.utils.checkpoint(use_reentrant=False)``: the block
keeps only its inputs and backward reruns its forward (checkpointing restores the RNG state, so
dropout draws the same masks; `torch.compile` traces the same call as its activation-checkpoint
higher-order op). `offload.Offload` keeps the region's saved tensors in host memory instead.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.checkpoint import checkpoint

from .. import meta


class Recompute(torch.nn.Module):
    """Calls `region` under activation checkpointing."""

    def __init__(self, region: fx.GraphModule) -> None:
        super().__init__()
        self.region = region

    def forward(self, *args):
        return checkpoint(self.region, *args, use_reentrant=False)


def region_target(block: str) -> str:
    """The region module of `block`, which also names its call (and, suffixed ``_out_<i>``, the
    call's outputs): a block's nodes are named after it, so a node of one block can be matched
    to the same node of another (`memory/compose.py`)."""
    return "lorafa_region_" + block.replace(".", "_")


def has_regions(gm: fx.GraphModule) -> bool:
    """Whether `gm` calls a region (a block with a decision other than keep)."""
    return any(meta.RECOMPUTE in meta.lorafa_meta(n) for n in gm.graph.find_nodes(op="call_module"))


def outlined_layers(gm: fx.GraphModule) -> list[str]:
    """Paths of the layers outlined into called submodules (FSDP2 units), in call order."""
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and meta.LAYER in meta.lorafa_meta(n)]
