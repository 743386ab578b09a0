"""Pass: realise the planner's recomputation decisions, identically in eager and compiled mode.

Each planned block (a repeated layer such as ``model.layers.3``: the contiguous range of nodes
its ``nn_module_stack`` places in it) is outlined into a parameter-free sub-GraphModule and
called through `_Recompute`, which runs it under ``torch.utils.checkpoint(use_reentrant=False)``:

* ``"full"``: the block keeps only its inputs; backward reruns its whole forward.
* ``"selective"``: torch's selective checkpointing (`create_selective_checkpoint_contexts`)
  keeps the outputs of matmuls and attention (`SAVED_OPS`, so ``xa`` too) and recomputes the
  cheap ops between them (norms, activations, rotary, dropout).

Parameters stay where they were (``get_attr`` in the outer graph, passed in), so names,
``state_dict`` and the optimizer are unchanged. Checkpointing restores the RNG state before
recomputing, so dropout draws the same masks. The same `torch.utils.checkpoint` call is what
`torch.compile` traces (as its activation-checkpoint higher-order op), and the selective
policy's ``cache_hash`` keys AOTAutograd's cache, so a cached artifact always matches the plan.

Reads ``node.meta["nn_module_stack"]``. Writes ``node.meta["lorafa"]["recompute"]`` on the
call of each region.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ._graph import META_KEY, call_in_place_of, repeated_block

aten = torch.ops.aten

#: Ops whose outputs "selective" keeps: the expensive ones to recompute.
SAVED_OPS = frozenset({
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
})

RECOMPUTE_CHOICES = ("none", "selective", "full")


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_matmuls)


# AOTAutograd's cache cannot hash a Python callable; this names the policy instead.
_selective_context.cache_hash = "lorafa_fx.keep_matmuls.v1"


class _Recompute(torch.nn.Module):
    """Calls `region` under activation checkpointing (``mode``: "full" or "selective")."""

    def __init__(self, region: fx.GraphModule, mode: str) -> None:
        super().__init__()
        self.region, self.mode = region, mode

    def forward(self, *args):
        context = {"context_fn": _selective_context} if self.mode == "selective" else {}
        return checkpoint(self.region, *args, use_reentrant=False, **context)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class RecomputeRegions(PassBase):
    """`decisions`: ``{block path: "none" | "selective" | "full"}``."""

    def __init__(self, decisions: Mapping[str, str]) -> None:
        super().__init__()
        bad = {b: d for b, d in decisions.items() if d not in RECOMPUTE_CHOICES}
        if bad:
            raise ValueError(f"unknown recompute decisions {bad}; use one of {RECOMPUTE_CHOICES}")
        self.decisions = decisions

    def call(self, gm: fx.GraphModule) -> PassResult:
        ranges = block_ranges(gm.graph)
        modified = False
        for i, (block, mode) in enumerate(self.decisions.items()):
            if mode == "none" or block not in ranges:
                continue
            _outline(gm, ranges[block], f"lorafa_region_{i}", mode, block)
            modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


def block_ranges(
    graph: fx.Graph, block_of_node: Callable[[fx.Node], str | None] = repeated_block
) -> dict[str, list[fx.Node]]:
    """For each repeated block (`block_of_node`: a node's block, or None), the contiguous node
    range from its first to its last node."""
    nodes = list(graph.nodes)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        block = block_of_node(node)
        if block is not None:
            first.setdefault(block, i)
            last[block] = i
    return {b: nodes[first[b] : last[b] + 1] for b in first}


def _outline(gm: fx.GraphModule, span: list[fx.Node], name: str, mode: str, block: str) -> None:
    graph = gm.graph
    # get_attr nodes (the adapters' lora_A/lora_B) move in front of the span: parameters stay
    # owned by the outer module and enter the region as inputs.
    for node in [n for n in span if n.op == "get_attr"]:
        span[0].prepend(node)
    body = [n for n in span if n.op != "get_attr"]
    inside = set(body)
    inputs = list(dict.fromkeys(a for n in body for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in body if any(u not in inside for u in n.users)]

    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = dict(a.meta)
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
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs))
    gm.add_submodule(name, _Recompute(fx.GraphModule(modules, sub), mode))

    call_in_place_of(graph, body, inputs, outputs, name, {META_KEY: {"recompute": mode, "block": block}})
