"""Regions: a block of the graph outlined into a sub-GraphModule and called through a wrapper
that decides what it keeps for backward (`passes/recompute_regions.py` makes them,
`passes/outline_layers.py` nests them in called layers for FSDP2).

`Recompute` runs its region under ``torch.utils.checkpoint(use_reentrant=False)``: the block
keeps only its inputs and backward reruns its forward (checkpointing restores the RNG state, so
dropout draws the same masks; `torch.compile` traces the same call as its activation-checkpoint
higher-order op). The whole forward is rerun (no early stop after the last tensor backward
needs): what `memory/flops.py` counts is then what FlopCounterMode measures, at the cost of a
block's last adapter product (about 1% of its forward). `offload.Offload` keeps the region's
saved tensors in host memory instead.

`MiniSequence` runs a token-wise region (a block's MLP, `graph.mlp_spans`) a chunk of tokens at
a time, each chunk checkpointed (the Mini-Sequence Transformer's scheme): inside a recomputed
block, the MLP's b·s·intermediate tensors then exist a chunk at a time, in the block's
recomputation and in its backward (which reruns each chunk's forward once more). Each output
row is the unchunked region's row, so the forward and the input gradients are the same bits;
the gradients of parameters the region trains (its adapters' lora_B) are sums over tokens
taken a chunk at a time, equal up to the rounding of that order.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from .. import meta


class Recompute(torch.nn.Module):
    """Calls `region` under activation checkpointing."""

    def __init__(self, region: fx.GraphModule) -> None:
        super().__init__()
        self.region = region

    def forward(self, *args):
        with set_checkpoint_early_stop(False):
            return checkpoint(self.region, *args, use_reentrant=False)


#: Chunks of tokens a `MiniSequence` region runs in: its b·s·intermediate tensors exist an
#: eighth at a time, under the block's b·s·hidden ones for Llama's 11008/4096 (MsT: a chunk
#: count of intermediate/hidden keeps the chunk under the hidden states).
MINI_SEQUENCE_CHUNKS = 8


class MiniSequence(torch.nn.Module):
    """Calls `region` on `chunks` chunks of tokens (dim -2) of the arguments at `split` (the
    others, its parameters, whole) and concatenates its one output."""

    def __init__(self, region: fx.GraphModule, chunks: int, split: tuple[int, ...]) -> None:
        super().__init__()
        self.region, self.chunks, self.split = region, chunks, split

    def forward(self, *args):
        tokens = args[self.split[0]].shape[-2]
        size = -(-tokens // self.chunks)
        pieces = {i: args[i].split(size, dim=-2) for i in self.split}
        # On fake tensors (the cost model) one chunk runs and the others are left empty: one
        # chunk's tensors are what the real loop holds at a time, and the output is whole.
        count = 1 if is_fake(args[self.split[0]]) else len(pieces[self.split[0]])
        with set_checkpoint_early_stop(False):
            outputs = [
                checkpoint(self.region, *(pieces[i][c] if i in pieces else a for i, a in enumerate(args)),
                           use_reentrant=False)[0]
                for c in range(count)
            ]
        if count < len(pieces[self.split[0]]):
            rest = [p.shape[-2] for p in pieces[self.split[0]][count:]]
            outputs.append(outputs[0].new_empty((*outputs[0].shape[:-2], sum(rest), outputs[0].shape[-1])))
        return (torch.cat(outputs, dim=-2),)

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}"


def region_target(block: str) -> str:
    """The region module of `block`, which also names its call (and, suffixed ``_out_<i>``, the
    call's outputs): a block's nodes are named after it, so a node of one block can be matched
    to the same node of another (`memory/compose.py`)."""
    return "lorafa_region_" + block.replace(".", "_")


def mlp_target(block: str) -> str:
    """The region of `block`'s MLP alone (selective recomputation, mini-sequence chunks)."""
    return region_target(block) + "_mlp"


def has_regions(gm: fx.GraphModule) -> bool:
    """Whether `gm` calls a region (a block with a decision other than keep)."""
    return any(meta.RECOMPUTE in meta.lorafa_meta(n) for n in gm.graph.find_nodes(op="call_module"))


def outlined_layers(gm: fx.GraphModule) -> list[str]:
    """Paths of the layers outlined into called submodules (FSDP2 units), in call order."""
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and meta.LAYER in meta.lorafa_meta(n)]
