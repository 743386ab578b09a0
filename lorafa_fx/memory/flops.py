"""The FLOP model: the FLOPs of a graph node's forward and of its backward, at the batch planned
for, counted as `torch.utils.flop_counter.FlopCounterMode` counts them (tests/test_flops.py
checks it on a real step of every zoo architecture)::

    matmul (linear, mm, addmm, bmm, baddbmm, matmul)   forward  2·m·n·k
                                                       backward 2·m·n·k per operand that needs a grad
    attention (SDPA)                                   forward  4·b·h·s_q·s_k·d     (QK^T and PV)
                                                       backward 10·b·h·s_q·s_k·d    (QK^T again, four products)
    experts (`ops/experts`: expert_linear)            forward  2·S·in·out (+ 2·S·r·out with an adapter's xa),
                                                       S = tokens x top_k: each routed row through one
                                                       expert (transformers' MoE is dropless: no capacity,
                                                       no padding); backward: each product per operand
                                                       that needs a grad
    experts' xa (expert_xa)                            forward  2·S·in·r; backward 2·S·in·r if x needs a grad
    fused linear cross-entropy (`ops/cross_entropy`)   forward  2·n·V·d (the logits); backward 2·n·V·d per
                                                       operand that needs a grad (formed in forward, chunk
                                                       by chunk, but counted here: it is backward's work)
    any other op                                       0 (elementwise work is bound by memory traffic:
                                                       the step-time model's achieved fraction covers it)

Causal attention is counted whole, as FlopCounterMode does. An operand needs a grad when it
depends on a trained parameter (`needs_grad`): frozen base weights get none, and the hidden
states before the first adapter need none either, so the first layer's backward is cheaper.
The planner prices recomputation with the forward count (a recomputed block runs its forward
again) and a step with both (`step_flops`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping

import sympy
import torch
import torch.fx as fx

from ..graph import attribute
from ..ops.attention import SDPAttention
from ..ops.bnb import QUANTIZED_LINEAR_OPS
from ..ops.cross_entropy import linear_cross_entropy
from ..ops.experts import expert_linear, expert_xa

aten = torch.ops.aten

#: Matmul ops and the positions of their two multiplied operands (bitsandbytes' quantised
#: linears multiply like aten.linear: x and the weight).
_MATMULS = {
    aten.linear.default: (0, 1), aten.mm.default: (0, 1), aten.matmul.default: (0, 1), aten.bmm.default: (0, 1),
    aten.addmm.default: (1, 2), aten.baddbmm.default: (1, 2), **QUANTIZED_LINEAR_OPS,
}


def node_flops(node: fx.Node, sizes: Mapping[sympy.Symbol, int] | None = None) -> int:
    """Forward FLOPs of one node (see the module docstring) at `sizes`."""
    return concrete(_symbolic(node, None), sizes)


def backward_flops(node: fx.Node, grads: frozenset[fx.Node], sizes: Mapping[sympy.Symbol, int] | None = None) -> int:
    """Backward FLOPs of one node at `sizes`; `grads`: the nodes whose outputs need a grad
    (`needs_grad`), which decides the operands backward differentiates."""
    if node not in grads:
        return 0
    return concrete(_symbolic(node, tuple(a in grads for a in node.all_input_nodes)), sizes)


def needs_grad(gm: fx.GraphModule) -> frozenset[fx.Node]:
    """The nodes of `gm` whose output needs a gradient in backward: those that depend on a
    parameter that requires grad through floating-point values."""
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = attribute(gm, node.target)
            trained = isinstance(value, torch.Tensor) and value.requires_grad
        else:
            trained = node.op in ("call_function", "call_module") and any(a in found for a in node.all_input_nodes)
        val = node.meta.get("val")
        if trained and (not isinstance(val, torch.Tensor) or val.is_floating_point()):
            found.add(node)
    return frozenset(found)


def step_flops(gm: fx.GraphModule, sizes: Mapping[sympy.Symbol, int] | None = None) -> tuple[int, int]:
    """(forward, backward) FLOPs of one training step of `gm` at `sizes`."""
    grads = needs_grad(gm)
    nodes = list(gm.graph.nodes)
    return sum(node_flops(n, sizes) for n in nodes), sum(backward_flops(n, grads, sizes) for n in nodes)


#: Each node's FLOPs as an expression of the symbolic sizes, per direction (None: forward;
#: else which inputs need a grad): the planner prices every candidate on the same graph's
#: nodes, and symbolic arithmetic is slow.
_SYMBOLIC: weakref.WeakKeyDictionary[fx.Node, dict] = weakref.WeakKeyDictionary()


def _symbolic(node: fx.Node, wanted: tuple[bool, ...] | None):
    cache = _SYMBOLIC.setdefault(node, {})
    if wanted not in cache:
        cache[wanted] = _flops(node, wanted)
    return cache[wanted]


def concrete(n, sizes: Mapping[sympy.Symbol, int] | None = None) -> int:
    """A size as an int: captured sizes are symbolic (dynamic batch/sequence); `sizes` binds
    their symbols (`simulate.symbol_sizes`: the batch planned for), else the captured example's
    sizes are used."""
    if not isinstance(n, torch.SymInt):
        return int(n)
    if sizes:
        value = _bound(n.node.expr, tuple(sizes.items()))
        if value is not None:
            return value
    return int(n.node.hint)


@functools.lru_cache(maxsize=4096)
def _bound(expr: sympy.Expr, bindings: tuple[tuple[sympy.Symbol, int], ...]) -> int | None:
    # A 7B graph has ~24k nodes but a few dozen distinct size expressions: substituting
    # each once keeps the planner's FLOP counts from dominating its run time.
    value = sympy.sympify(expr.xreplace(dict(bindings)))
    return int(value) if value.is_number else None


def _flops(node: fx.Node, wanted: tuple[bool, ...] | None):
    """Forward FLOPs (`wanted` None) or backward FLOPs, `wanted[i]`: input i needs a grad."""
    out = node.meta.get("val")
    if node.op not in ("call_function", "call_module") or not isinstance(out, torch.Tensor):
        return 0
    inputs = node.all_input_nodes
    operands = _MATMULS.get(node.target) if node.op == "call_function" else None
    if operands is not None:
        a, b = (node.args[i] for i in operands)
        inner = a.meta["val"].shape[-1] if isinstance(a, fx.Node) and "val" in a.meta else 1
        one = 2 * out.numel() * inner
        if wanted is None:
            return one
        return one * sum(isinstance(x, fx.Node) and wanted[inputs.index(x)] for x in (a, b))
    if node.target in (expert_linear, expert_xa):
        return _expert_flops(node, out, inputs, wanted)
    if node.op == "call_module" and isinstance(node.graph.owning_module.get_submodule(node.target), SDPAttention):
        q, k = (a.meta["val"] for a in node.args[:2])
        one = 2 * q.numel() * k.shape[-2]  # one of attention's products: b·h·s_q·s_k·d multiply-adds
        return 2 * one if wanted is None else 5 * one
    if node.target is linear_cross_entropy:
        h, weight = node.args[:2]
        logits = 2 * h.meta["val"].numel() * weight.meta["val"].shape[0]
        return logits if wanted is None else logits * sum(wanted[inputs.index(x)] for x in (h, weight))
    return 0


def _expert_flops(node: fx.Node, out, inputs: list[fx.Node], wanted: tuple[bool, ...] | None):
    """`expert_xa` (x A_e^T) or `expert_linear` (x W_e, + xa B_e^T): the products and, with
    `wanted`, each product once per operand that needs a grad."""
    x = node.args[0]
    products = [(2 * out.numel() * x.meta["val"].shape[-1], (x, node.args[1]))]
    if node.target is expert_linear and len(node.args) > 3 and isinstance(node.args[3], fx.Node):
        xa, lora_B = node.args[3], node.args[4]
        products.append((2 * out.numel() * xa.meta["val"].shape[-1], (xa, lora_B)))
    if node.target is expert_xa:
        products = [(products[0][0], (x, node.args[2]))]
    if wanted is None:
        return sum(flops for flops, _ in products)
    return sum(flops * sum(isinstance(a, fx.Node) and wanted[inputs.index(a)] for a in operands)
               for flops, operands in products)
