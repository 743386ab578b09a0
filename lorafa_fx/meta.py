"""The `node.meta` contract: every key lorafa_fx writes on a graph node, and which stage
writes and reads it. The one place these keys are spelled; everything else imports them.

lorafa_fx keeps its annotations under one namespaced key, ``node.meta["lorafa"]`` (`KEY`), a
`LoraFAMeta` dict. Besides it, stages use torch's own keys where torch reads them:
``"val"`` (a fake tensor: shape, dtype), ``"nn_module_stack"`` (the module a node was traced in)
and ``"recompute"`` (a `torch.utils.checkpoint.CheckpointPolicy`, read by AOTAutograd's
partitioner).

The pass contract (stage: reads -> writes; keys inside ``meta["lorafa"]`` are bare names):

====================================  ==========================================  =========================================
stage                                 reads                                       writes
====================================  ==========================================  =========================================
passes.drop_metadata_asserts          (nothing)                                   (nothing)
passes.follow_input_device            val (placeholders), nn_module_stack         new nodes inherit nn_module_stack; val
passes.follow_param_dtype             val, nn_module_stack                        new nodes inherit nn_module_stack; val
passes.drop_full_slices               (nothing)                                   (nothing)
passes.recognize_linears              val                                         new nodes inherit nn_module_stack, val
passes.gate_dropout                   nn_module_stack                             new nodes inherit nn_module_stack
passes.simplify_attention             nn_module_stack, val                        new nodes inherit nn_module_stack, val
passes.lean_norms                     nn_module_stack, val                        new nodes inherit nn_module_stack, val
passes.lean_gated_mlp                 val                                         new nodes inherit nn_module_stack, val
passes.lean_pointwise                 val, nn_module_stack                        new nodes inherit nn_module_stack, val
passes.compact_saved_views            val                                         new nodes inherit nn_module_stack, val
passes.lean_experts                   val                                         new nodes inherit nn_module_stack, val
passes.rewrite_lora_fa                val                                         ADAPTER, ROLE (every node it adds), val
passes.annotate_saved_tensors         ROLE                                        torch's "recompute" = MUST_SAVE on xa
passes.chunk_cross_entropy            val                                         ROLE (chunked_ce, eval_logits)
passes.expand_layers                  nn_module_stack, ADAPTER, val               both, moved to each copy's path
passes.recompute_regions              nn_module_stack, val                        RECOMPUTE (a Decision), BLOCK (region calls)
passes.outline_layers                 nn_module_stack, BLOCK (region calls)       LAYER (on each layer call)
memory.cost_model / sharded           val, nn_module_stack, LAYER                 (nothing; returns a StepEstimate)
memory.compose                        val, nn_module_stack, BLOCK, LAYER          (nothing; composes StepEstimates)
memory.mix / planner                  val, nn_module_stack                        (nothing; returns the decisions)
pipeline (emit)                       the estimate                                SAVED_BYTES (`annotate_saved_bytes`)
memory.report                         ROLE, ADAPTER, SAVED_BYTES, LAYER           (nothing; builds the MemoryPlan)
====================================  ==========================================  =========================================

`tests/test_meta.py` runs the pipeline and pins this table.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, TypedDict

import torch.fx as fx

from .choices import Decision

#: This project's single namespaced `node.meta` key.
KEY = "lorafa"

ADAPTER = "adapter"
ROLE = "role"
SAVED_BYTES = "saved_bytes"
RECOMPUTE = "recompute"
BLOCK = "block"
LAYER = "layer"

#: What a node is in the paper's terms (rewrite_lora_fa), or in the chunked loss.
Role = Literal["lora_A", "lora_B", "dropout", "down", "xa", "xab", "out", "chunked_ce", "eval_logits"]
ADAPTER_ROLES: tuple[Role, ...] = ("lora_A", "lora_B", "dropout", "down", "xa", "xab", "out")


class LoraFAMeta(TypedDict, total=False):
    adapter: str  # module path of the adapted linear ("model.layers.0.self_attn.q_proj")
    role: Role
    saved_bytes: int  # bytes of the node's output autograd keeps for backward (cost model)
    recompute: Decision  # on a region's call: what the block does with its saved tensors (not KEEP)
    block: str  # the repeated block a region stands for or lies in (its MLP's region) ("model.layers.3")
    layer: str  # on the call of an outlined layer (FSDP2 unit): the layer's path


def lorafa_meta(node: fx.Node) -> LoraFAMeta:
    """`node`'s annotations (empty if it has none); read-only view, use `annotate` to write."""
    return node.meta.get(KEY, {})


def annotate(node: fx.Node, **values: object) -> None:
    """Add `values` to `node`'s annotations (keys: the names of `LoraFAMeta`'s fields)."""
    unknown = set(values) - set(LoraFAMeta.__annotations__)
    if unknown:
        raise KeyError(f"not a lorafa node.meta key: {sorted(unknown)}; the schema is lorafa_fx.meta.LoraFAMeta")
    # A new dict, never an update: fx copies a graph's node.meta shallowly (`graph_copy`, deepcopy),
    # so the old dict may be another graph's annotations too.
    node.meta[KEY] = {**node.meta.get(KEY, {}), **values}


def all_graph_nodes(gm: fx.GraphModule) -> Iterator[fx.Node]:
    """Nodes of `gm`'s graph and of every GraphModule below it (outlined layers, recompute
    regions), the graphs a stage must read to see the whole step."""
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            yield from module.graph.nodes
