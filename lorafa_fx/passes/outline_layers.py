"""Pass: make each repeated layer a called submodule that owns its parameters.

The emitted graph is flat: parameters are ``get_attr`` nodes and a decoder layer's forward is
never called. Per-layer data parallelism (`torch.distributed.fsdp.fully_shard`) works through
module forward hooks, so it needs each layer to be *called* and to *own* its parameters. This
pass moves the contiguous node range of each repeated block (``model.layers.3``) into a
sub-GraphModule installed at the block's own path, and replaces the range by
``call_module("model.layers.3", inputs)`` + ``getitem`` per output:

* the layer's ``get_attr`` nodes (base weights, ``lora_A``, ``lora_B``, norms) move inside
  with targets relative to the layer, so parameter names, ``state_dict`` keys and
  ``requires_grad`` are unchanged (``model.layers.3.self_attn.q_proj.lora_B.weight``);
* a block that `recompute_regions` already outlined (a ``lorafa_region_i`` call) moves inside
  the layer too, so activation checkpointing runs *inside* the called layer, the nesting
  FSDP expects (its hooks stay outside the checkpointed region).

A parameter of a layer read outside that layer cannot be sharded per layer: `OutlineError`.

Reads ``node.meta["nn_module_stack"]`` and ``["lorafa"]["block"]`` (region calls). Writes
``node.meta["lorafa"]["layer"]`` on each layer call.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import OutlineError
from ._graph import META_KEY, call_in_place_of, has_target, repeated_block
from .recompute_regions import block_ranges


class OutlineLayers(PassBase):
    """Outline every repeated block of `gm` (``model.layers.<i>``) into a called GraphModule."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        ranges = layer_ranges(gm.graph)
        for block, span in ranges.items():
            _outline_layer(gm, block, span)
        if ranges:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(ranges))


def outlined_layers(gm: fx.GraphModule) -> list[str]:
    """Paths of the layers `OutlineLayers` made into called submodules, in call order."""
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and "layer" in n.meta.get(META_KEY, {})]


def _layer_of(node: fx.Node) -> str | None:
    meta = node.meta.get(META_KEY, {})
    if node.op == "call_module" and "block" in meta:  # a recompute region
        return meta["block"]
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if isinstance(src, fx.Node) and "block" in src.meta.get(META_KEY, {}):
            return src.meta[META_KEY]["block"]
    return repeated_block(node)


def layer_ranges(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """For each repeated block, its nodes from first to last (``get_attr`` nodes excluded)."""
    spans = {b: [n for n in span if n.op != "get_attr"] for b, span in block_ranges(graph, _layer_of).items()}
    for b, span in spans.items():
        others = {layer for n in span if (layer := _layer_of(n)) not in (None, b)}
        if others:
            raise OutlineError(
                f"{b}'s nodes interleave with {sorted(others)}'s: layers must run one after the other "
                "to be outlined (shard this model with sharding='none', i.e. DDP, instead)."
            )
    return spans


def _outline_layer(gm: fx.GraphModule, block: str, body: list[fx.Node]) -> None:
    graph = gm.graph
    prefix = block + "."
    inside = set(body)
    # The layer's own parameters and buffers come in by get_attr; they move inside.
    owned = [n for n in graph.nodes if n.op == "get_attr" and n.target.startswith(prefix)]
    leaking = [n.target for n in owned if any(u not in inside for u in n.users)]
    if leaking:
        raise OutlineError(
            f"{', '.join(leaking)} is read outside {block}; a layer's parameters must be used only by that "
            "layer to be sharded per layer. Use sharding='none' (DDP) for this model."
        )
    owned = [n for n in owned if n.users]
    inputs = list(dict.fromkeys(a for n in body for a in n.all_input_nodes if a not in inside and a not in owned))
    outputs = [n for n in body if any(u not in inside for u in n.users)]

    holder = gm.get_submodule(block)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in owned:
        env[n] = sub.get_attr(n.target[len(prefix):])
        env[n].meta = dict(n.meta)
    moved: list[str] = []
    for n in body:
        if n.op == "call_module" and not n.target.startswith(prefix):
            # A recompute region (parameter-free) defined at the root: it moves into the layer.
            leaf = n.target.replace(".", "_")
            holder.add_module(leaf, gm.get_submodule(n.target))
            moved.append(n.target)
            env[n] = sub.node_copy(n, lambda a: env[a])
            env[n].target = leaf
        elif n.op == "call_module":
            env[n] = sub.node_copy(n, lambda a: env[a])
            env[n].target = n.target[len(prefix):]
        else:
            env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs))
    layer = fx.GraphModule(holder, sub, class_name="OutlinedLayer")
    # Parameters and buffers the graph does not read still belong to the layer (state_dict).
    for name, p in holder.named_parameters():
        if not has_target(layer, name):
            _set(layer, name, p)
    for name, b in holder.named_buffers():
        if not has_target(layer, name):
            _set(layer, name, b, buffer=True)
    layer.train(holder.training)

    call_in_place_of(graph, body, inputs, outputs, block, {
        "nn_module_stack": {block: (block, type(layer).__qualname__)}, META_KEY: {"layer": block},
    })
    for n in owned:
        graph.erase_node(n)
    parent, _, leaf = block.rpartition(".")
    setattr(gm.get_submodule(parent), leaf, layer)
    for target in moved:
        owner_path, _, name = target.rpartition(".")
        delattr(gm.get_submodule(owner_path), name)


def _set(module: torch.nn.Module, name: str, value: torch.Tensor, buffer: bool = False) -> None:
    parts = name.split(".")
    for part in parts[:-1]:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if buffer:
        module.register_buffer(parts[-1], value)
    else:
        setattr(module, parts[-1], value)
