"""Pass: realise the planner's per-block decisions (`choices.Decision`) on the graph.

Each planned block (a repeated layer such as ``model.layers.3``: the contiguous range of nodes
its ``nn_module_stack`` places in it) is outlined into a parameter-free sub-GraphModule and
called through a wrapper of `ops/`: `ops.regions.Recompute` (``Decision.RECOMPUTE``: the block
keeps only its inputs, backward reruns its forward) or `ops.offload.Offload`
(``Decision.OFFLOAD``: its saved tensors wait in host memory between forward and backward, a
CUDA step's lever) or `ops.offload.OffloadedCheckpoint` (``Decision.OFFLOAD_CHECKPOINT``: both,
the block recomputed from an input that waits in host memory). ``Decision.KEEP`` leaves the
block as it is. A recomputed block's tail (`graph.MLPSpans.tail`: its last linear, whose
LoRA-FA adapter keeps only x·A, and the residual add) stays out of its region: nothing reruns it.

Three decisions outline the block's MLP (`graph.mlp_spans`: from the norm before it) into a
region of its own first, named `ops.regions.mlp_target`: ``Decision.SELECTIVE`` recomputes it up
to its last linear (`Recompute`; SwiGLU's gate and up are what it frees, the rest of the block
is kept), ``Decision.OFFLOAD_MLP`` offloads what that span keeps (`Offload`: the norm's input,
gate and up; a card's host link hides them behind a block's compute where it would not hide the
whole block's); ``Decision.MINI_SEQUENCE`` and ``OFFLOAD_MINI_SEQUENCE`` run the whole MLP in
`ops.regions.MiniSequence` chunks of tokens inside a block recomputed as ``RECOMPUTE`` or
``OFFLOAD_CHECKPOINT`` would, so the block's recomputation never holds its MLP's
b·s·intermediate tensors whole (with a tail, the chunks stop before it and each chunk runs
it on its own tokens; the floor's decisions: an ``OFFLOAD_MINI_SEQUENCE`` block's
input is not prefetched either, `Offload`'s ``prefetched``). ``Decision.OFFLOAD_SELECTIVE``
offloads the block (`Offload`) with its MLP's selective span in `MiniSequence` chunks: that span
keeps only its input (the norm's) and the outputs of its frozen linears after the first
(`graph.kept_linears`: SwiGLU's up matmul), offloaded with the rest, and backward recomputes the
gate a chunk at a time (`_rerun`: a copy of the span reading the kept outputs), so the link
carries the block's bytes less that span's but up's output (a card whose link cannot hide a
whole block's copies trades the gate matmul for them: half the span's recomputation for about
a forward's worth of copies). torch's own selective
(op-level) policy is not used: it keeps every matmul output, more than autograd keeps around
frozen linears (a frozen linear saves nothing), and raised the peak on the test Llama (3.7 vs
2.7 MB).

Parameters stay where they were (``get_attr`` in the outer graph, passed in), so names,
``state_dict`` and the optimizer are unchanged.

Reads ``node.meta["nn_module_stack"]``. Writes ``meta.RECOMPUTE`` (the block's `Decision`) and
``meta.BLOCK`` (the block's path) on the call of each region (an MLP's region too).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import meta
from ..choices import Decision
from ..errors import ConfigError
from ..graph import block_ranges, boundary, call_in_place_of, extract_graph, kept_linears, mlp_spans, pass_result
from ..ops.attention import attention_call
from ..ops.offload import Offload, OffloadedCheckpoint, Offloader, PrefetchPoint
from ..ops.regions import MINI_SEQUENCE_CHUNKS, MiniSequence, Recompute, known_linear, mlp_target, region_target


class RecomputeRegions(PassBase):
    """`decisions`: ``{block path: Decision}`` (a block not named is kept)."""

    def __init__(self, decisions: Mapping[str, Decision]) -> None:
        super().__init__()
        bad = {b: d for b, d in decisions.items() if not isinstance(d, Decision)}
        if bad:
            raise ConfigError(f"block decisions {bad} are not lorafa_fx.choices.Decision members ({list(Decision)}).")
        self.decisions = decisions

    def call(self, gm: fx.GraphModule) -> PassResult:
        offloader, offloaded = Offloader(), 0
        modified = False
        for block in block_ranges(gm.graph):  # in graph order: an offloaded region's position is its order in forward
            mode = self.decisions.get(block, Decision.KEEP)
            if mode is Decision.KEEP:
                continue
            spans = mlp_spans(block_ranges(gm.graph)[block])
            # A recomputed block never reruns its tail (`graph.MLPSpans.tail`: it keeps only x·A):
            # a whole block's region leaves it out, a chunked MLP runs it a chunk at a time.
            tail = spans.tail if mode in _RECOMPUTED else None
            if mode in _IN_MLP:
                kept = []
                span = spans.whole if mode in _CHUNKED and not tail else spans.selective
                if span is None or (mode is Decision.OFFLOAD_SELECTIVE and not spans.selective_split):
                    raise ConfigError(f"{block} has no MLP that {mode} applies to; decide {Decision.RECOMPUTE} for it.")
                rest = spans.whole[len(spans.selective):] if mode in _CHUNKED and tail else []
                if mode is Decision.SELECTIVE:
                    wrap = Recompute
                elif mode is Decision.OFFLOAD_MLP:
                    wrap, offloaded = functools.partial(Offload, offloader=offloader, position=offloaded), offloaded + 1
                elif mode is Decision.OFFLOAD_SELECTIVE:
                    wrap = functools.partial(MiniSequence, chunks=MINI_SEQUENCE_CHUNKS, split=spans.selective_split)
                    kept = kept_linears(span)
                else:
                    wrap = functools.partial(MiniSequence, chunks=MINI_SEQUENCE_CHUNKS,
                                             split=spans.selective_split if rest else spans.split,
                                             rerun_skips=spans.output_unread)
                _outline(gm, span, mlp_target(block), block, mode, wrap, rest, kept)
            if mode not in (Decision.SELECTIVE, Decision.OFFLOAD_MLP):
                if mode in (Decision.RECOMPUTE, Decision.MINI_SEQUENCE):
                    wrap = Recompute
                else:
                    kind = Offload if mode in (Decision.OFFLOAD, Decision.OFFLOAD_SELECTIVE) else OffloadedCheckpoint
                    wrap = functools.partial(kind, offloader=offloader, position=offloaded,
                                             prefetched=mode is not Decision.OFFLOAD_MINI_SEQUENCE)
                    if mode is Decision.OFFLOAD_MINI_SEQUENCE:
                        _prefetch_point(gm, block, offloader, offloaded)
                    offloaded += 1
                cut = set(tail or ()) if mode not in _CHUNKED else set()
                _outline(gm, [n for n in block_ranges(gm.graph)[block] if n not in cut], region_target(block), block,
                         mode, wrap)
            modified = True
        offloader.count = offloaded  # after the last, a forward waits for every copy (`ops.offload`)
        return pass_result(gm, modified)


#: The decisions that outline a block's MLP (`graph.mlp_spans`) into a region of its own.
_CHUNKED = (Decision.MINI_SEQUENCE, Decision.OFFLOAD_MINI_SEQUENCE)
_IN_MLP = (Decision.SELECTIVE, Decision.OFFLOAD_MLP, Decision.OFFLOAD_SELECTIVE, *_CHUNKED)
#: The decisions that recompute the whole block.
_RECOMPUTED = (Decision.RECOMPUTE, Decision.OFFLOAD_CHECKPOINT, *_CHUNKED)


def _prefetch_point(gm: fx.GraphModule, block: str, offloader: Offloader, position: int) -> None:
    """A `PrefetchPoint` on `block`'s attention query (none without an attention call): its
    backward fetches the offloaded region before this one, past the block's peak."""
    attention = attention_call(block_ranges(gm.graph)[block])
    if attention is None or not isinstance(query := attention.args[0], fx.Node):
        return
    target = region_target(block) + "_prefetch"
    gm.add_submodule(target, PrefetchPoint(offloader, position))
    with gm.graph.inserting_before(attention):
        point = gm.graph.call_module(target, (query,))
    point.meta.update(nn_module_stack=attention.meta["nn_module_stack"], val=query.meta["val"])
    attention.update_arg(0, point)


def _outline(gm: fx.GraphModule, span: list[fx.Node], name: str, block: str, mode: Decision, wrap,
             tail: list[fx.Node] = (), kept: list[fx.Node] = ()) -> None:
    """Outline `span` into a region called through `wrap`; with `tail` (the nodes after it, which
    read its one output), `wrap` gets the tail's own region and, for each of the tail's inputs,
    its position among the call's (-1: the span's output); with `kept` (frozen linears of the
    span), the region returns their outputs after its own and `wrap` gets the copy that
    backward reruns (`_rerun`)."""
    # get_attr nodes (the adapters' lora_A/lora_B) move in front of the span: parameters stay
    # owned by the outer module and enter the region as inputs.
    for node in [n for n in (*span, *tail) if n.op == "get_attr"]:
        span[0].prepend(node)
    body, rest = ([n for n in nodes if n.op != "get_attr"] for nodes in (span, tail))
    inputs, outputs = boundary(body + rest)
    body_inputs, body_outputs = boundary(body)
    region = _region(gm, body, body_inputs, [*body_outputs, *kept])
    if kept:
        wrap = functools.partial(wrap, rerun=_rerun(region, len(kept)))
    if rest:
        tail_inputs, tail_outputs = boundary(rest)
        wrap = functools.partial(wrap, tail=_region(gm, rest, tail_inputs, tail_outputs),
                                 tail_args=tuple(inputs.index(a) if a in inputs else -1 for a in tail_inputs))
    gm.add_submodule(name, wrap(region))
    call = call_in_place_of(gm.graph, body + rest, inputs, outputs, name, {})
    meta.annotate(call, recompute=mode, block=block)


def _rerun(region: fx.GraphModule, kept: int) -> fx.GraphModule:
    """`region`, whose last `kept` outputs are frozen linears' outputs, as backward reruns it:
    each of those linears reads its output from an input after the region's own
    (`ops.regions.known_linear`: no matmul, its input gradient still taken); it returns its
    first output only."""
    graph = copy.deepcopy(region.graph)
    output = graph.output_node()
    first, *linears = output.args[0]
    last = graph.find_nodes(op="placeholder")[-1]
    for linear in linears:
        with graph.inserting_after(last):
            last = graph.placeholder(linear.name + "_kept")
        last.meta = dict(linear.meta)
        with graph.inserting_before(linear):
            known = graph.call_function(known_linear, (linear.args[0], linear.args[1], last))
        known.meta = dict(linear.meta)
        linear.replace_all_uses_with(known)
        graph.erase_node(linear)
    output.args = ((first,),)
    graph.lint()
    return fx.GraphModule(region, graph)


def _region(gm: fx.GraphModule, body: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.GraphModule:
    """`body` as a GraphModule of its own, holding the modules it calls under their paths."""
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
    return fx.GraphModule(modules, extract_graph(body, inputs, outputs))
