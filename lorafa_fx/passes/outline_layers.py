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
* a block that `recompute_regions` already outlined (a ``lorafa_region_*`` call) moves inside
  the layer too, so activation checkpointing runs *inside* the called layer, the nesting
  FSDP expects (its hooks stay outside the checkpointed region).

A parameter of a layer read outside that layer cannot be sharded per layer: `OutlineError`.

Reads ``node.meta["nn_module_stack"]`` and ``meta.BLOCK`` (region calls). Writes ``meta.LAYER``
(the layer's path) on each layer call.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import meta
from ..errors import OutlineError
from ..graph import block_ranges, boundary, call_in_place_of, extract_graph, has_target, pass_result, repeated_block


class OutlineLayers(PassBase):
    """Outline every repeated block of `gm` (``model.layers.<i>``) into a called GraphModule."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        ranges = layer_ranges(gm.graph)
        for block, span in ranges.items():
            _outline_layer(gm, block, span)
        return pass_result(gm, bool(ranges), drop_unused=True)


def _layer_of(node: fx.Node) -> str | None:
    if node.op == "call_module" and meta.BLOCK in meta.lorafa_meta(node):  # a recompute region
        return meta.lorafa_meta(node)[meta.BLOCK]
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if isinstance(src, fx.Node) and meta.BLOCK in meta.lorafa_meta(src):
            return meta.lorafa_meta(src)[meta.BLOCK]
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
    inputs, outputs = boundary(body, frozenset(owned))

    holder = gm.get_submodule(block)
    # A recompute region (parameter-free) is defined at the root: it moves into the layer.
    moved = [n.target for n in body if n.op == "call_module" and not n.target.startswith(prefix)]
    for target in moved:
        holder.add_module(target.replace(".", "_"), gm.get_submodule(target))

    def retarget(n: fx.Node) -> str:
        return n.target[len(prefix):] if n.target.startswith(prefix) else n.target.replace(".", "_")

    sub = extract_graph(body, inputs, outputs, {n: n.target[len(prefix):] for n in owned}, retarget)
    layer = fx.GraphModule(holder, sub, class_name="OutlinedLayer")
    # Parameters and buffers the graph does not read still belong to the layer (state_dict).
    for name, p in holder.named_parameters():
        if not has_target(layer, name):
            _set(layer, name, p)
    for name, b in holder.named_buffers():
        if not has_target(layer, name):
            _set(layer, name, b, buffer=True)
    layer.train(holder.training)

    call = call_in_place_of(graph, body, inputs, outputs, block, {
        "nn_module_stack": {block: (block, type(layer).__qualname__)},
    })
    meta.annotate(call, layer=block)
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
