"""Pass: realise the planner's per-block decisions: recompute a block, or offload what it saves.

Each planned block (a repeated layer such as ``model.layers.3``: the contiguous range of nodes
its ``nn_module_stack`` places in it) is outlined into a parameter-free sub-GraphModule and
called through `Recompute` (decision ``"full"``), which runs it under
``torch.utils.checkpoint(use_reentrant=False)``: the block keeps only its inputs, and backward
reruns its whole forward; or through `_offload.Offload` (``"offload"``): the block's saved
tensors wait in host memory between forward and backward (a CUDA step's lever; see
`_offload.py`).

Parameters stay where they were (``get_attr`` in the outer graph, passed in), so names,
``state_dict`` and the optimizer are unchanged. Checkpointing restores the RNG state before
recomputing, so dropout draws the same masks. The same `torch.utils.checkpoint` call is what
`torch.compile` traces (as its activation-checkpoint higher-order op).

Only whole blocks are recomputed: torch's selective (op-level) policy keeps every matmul
output, more than autograd keeps around frozen linears (a frozen linear saves nothing), and
raised the peak on the test Llama (3.7 vs 2.7 MB).

Reads ``node.meta["nn_module_stack"]``. Writes ``meta.RECOMPUTE`` ("full" or "offload") and
``meta.BLOCK`` (the block's path) on the call of each region.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils.checkpoint import checkpoint

from .. import meta
from ._graph import block_ranges, boundary, call_in_place_of, extract_graph, pass_result
from ._offload import Offload, Offloader

RECOMPUTE_CHOICES = ("none", "full", "offload")


class Recompute(torch.nn.Module):
    """Calls `region` under activation checkpointing."""

    def __init__(self, region: fx.GraphModule) -> None:
        super().__init__()
        self.region = region

    def forward(self, *args):
        return checkpoint(self.region, *args, use_reentrant=False)


class RecomputeRegions(PassBase):
    """`decisions`: ``{block path: "none" | "full"}``."""

    def __init__(self, decisions: Mapping[str, str]) -> None:
        super().__init__()
        bad = {b: d for b, d in decisions.items() if d not in RECOMPUTE_CHOICES}
        if bad:
            raise ValueError(f"unknown recompute decisions {bad}; use one of {RECOMPUTE_CHOICES}")
        self.decisions = decisions

    def call(self, gm: fx.GraphModule) -> PassResult:
        ranges = block_ranges(gm.graph)
        offloader, offloaded = Offloader(), 0
        modified = False
        for block in ranges:  # in graph order: an offloaded region's position is its order in forward
            mode = self.decisions.get(block, "none")
            if mode == "none":
                continue
            if mode == "full":
                wrap = Recompute
            else:
                wrap, offloaded = functools.partial(Offload, offloader=offloader, position=offloaded), offloaded + 1
            _outline(gm, ranges[block], region_target(block), block, mode, wrap)
            modified = True
        return pass_result(gm, modified)


def region_target(block: str) -> str:
    """The region module of `block`, which also names its call (and, suffixed ``_out_<i>``, the
    call's outputs): a block's nodes are named after it, so a node of one block can be matched
    to the same node of another (`memory/compose.py`)."""
    return "lorafa_region_" + block.replace(".", "_")


def has_recompute_regions(gm: fx.GraphModule) -> bool:
    return any(meta.RECOMPUTE in meta.lorafa_meta(n) for n in gm.graph.find_nodes(op="call_module"))


def _outline(gm: fx.GraphModule, span: list[fx.Node], name: str, block: str, mode: str, wrap) -> None:
    # get_attr nodes (the adapters' lora_A/lora_B) move in front of the span: parameters stay
    # owned by the outer module and enter the region as inputs.
    for node in [n for n in span if n.op == "get_attr"]:
        span[0].prepend(node)
    body = [n for n in span if n.op != "get_attr"]
    inputs, outputs = boundary(body)
    modules = torch.nn.Module()
    for n in body:
        if n.op == "call_module":
            parent, _, leaf = n.target.rpartition(".")
            holder = modules
            for part in filter(None, parent.split(".")):
                if not hasattr(holder, part):
                    holder.add_module(part, torch.nn.Module())
                holder = getattr(holder, part)
            holder.add_module(leaf, gm.get_submodule(n.target))
    region = fx.GraphModule(modules, extract_graph(body, inputs, outputs))
    gm.add_submodule(name, wrap(region))
    call = call_in_place_of(gm.graph, body, inputs, outputs, name, {})
    meta.annotate(call, recompute=mode, block=block)
