"""The FLOP model: forward FLOPs of a graph node, at the batch planned for.

    matmul (linear, mm, addmm)   2·m·n·k
    attention (SDPA)             4·b·h·s_q·s_k·d   (QK^T and PV)
    experts (expert_linear)      2·S·in·out (+ 2·S·r·out with an adapter's xa), S = tokens x top_k:
                                 each routed row through one expert, the experts no token chose
                                 cost nothing (transformers' MoE is dropless: no capacity, no
                                 padding); expert_xa 2·S·in·r
    any other op                 one per output element

The planner prices recomputation with it (a recomputed block costs its forward again) and
counts a step as forward + backward = 2 x forward (frozen weights: no weight gradients).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping

import sympy
import torch
import torch.fx as fx

from ..ops.attention import SDPAttention
from ..ops.experts import expert_linear, expert_xa

aten = torch.ops.aten

_MATMULS = (aten.linear.default, aten.mm.default, aten.addmm.default)


def node_flops(node: fx.Node, sizes: Mapping[sympy.Symbol, int] | None = None) -> int:
    """Forward FLOPs of one node (see the module docstring) at `sizes`."""
    if node not in _SYMBOLIC:
        _SYMBOLIC[node] = _symbolic_flops(node)
    return concrete(_SYMBOLIC[node], sizes)


#: Each node's FLOPs as an expression of the symbolic sizes: the planner prices every candidate
#: on the same graph's nodes, and symbolic arithmetic is slow.
_SYMBOLIC: weakref.WeakKeyDictionary[fx.Node, object] = weakref.WeakKeyDictionary()


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


def _symbolic_flops(node: fx.Node):
    out = node.meta.get("val")
    if node.op not in ("call_function", "call_module") or not isinstance(out, torch.Tensor):
        return 0
    if node.target in _MATMULS or node.target in (expert_linear, expert_xa):
        x = node.args[1] if node.target == aten.addmm.default else node.args[0]
        flops = 2 * out.numel() * _inner(x)
        if node.target is expert_linear and len(node.args) > 3:  # + xa B_e^T
            flops += 2 * out.numel() * _inner(node.args[3])
        return flops
    if node.op == "call_module" and isinstance(node.graph.owning_module.get_submodule(node.target), SDPAttention):
        q, k = (a.meta["val"] for a in node.args[:2])
        return 4 * q.numel() * int(k.shape[-2])
    return out.numel()


def _inner(x: object) -> int:
    """The contraction size of a matmul whose left operand is `x`."""
    return int(x.meta["val"].shape[-1]) if isinstance(x, fx.Node) and "val" in x.meta else 1
