"""Pass: a chain of elementwise ops keeps its input for backward, not its intermediates.

Activations written as several elementwise ops, transformers' ``gelu_new``
(NewGELUActivation: GPT-2, T5 v1.1) and Bloom's ``bloom_gelu_forward``, are captured as
``pow``/``mul``/``add``/``tanh`` nodes, and autograd keeps several of their b·s·intermediate
tensors (``mul``'s operands, ``tanh``'s result). Eager Bloom keeps only the input: its
``GeLUFunction`` recomputes in backward, but torch.export inlines the Function's forward.

This pass replaces each such chain by a call of a `RecomputedPointwise` submodule: an
`autograd.Function` that keeps only the chain's input ``x`` and whose backward runs a graph
traced from autograd itself (``make_fx`` of the chain and ``torch.autograd.grad``). Forward
runs the captured ops; backward recomputes them and runs the engine's own derivative ops in
its order, so values and gradients are the graph's bit for bit (when ``x`` also feeds ops
outside the chain, its gradients are summed in another order: an ulp). The Function is what
`torch.compile` traces, so the compiled step keeps the same tensors.

Matched, in one pass over the graph: for each tensor ``x`` that may need a gradient, the
elementwise ops (``torch.Tag.pointwise``, not random) whose tensor inputs are ``x`` or each
other, their other arguments literals, with one result read elsewhere. Replaced only where
autograd keeps more bytes per element of it than ``x``'s, as measured once per distinct chain
on a small example under `saved_tensors_hooks` (``tanh(x)`` keeps its result: nothing to gain).
Under an autocast that retypes an op of the chain (CUDA runs ``pow`` in fp32), or for an input
dtype other than the captured one where a graph names a dtype (a cast), the module runs the
chain as captured.

Reads ``node.meta["val"]`` and ``["nn_module_stack"]``; each call inherits the chain's last
node's ``nn_module_stack``/``stack_trace`` and ``val``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph import add_submodule, owner, pass_result, replace_node
from ..ops.pointwise import RecomputedPointwise

#: The dispatch key of each device type's autocast: an op with a kernel there is retyped.
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "xpu": "AutocastXPU", "mps": "AutocastMPS"}


class LeanPointwise(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        built: dict[tuple, RecomputedPointwise | None] = {}  # one trace per distinct chain
        modified = False
        for x, body in _chains(graph, grad_nodes(gm)):
            key = _structure(x, body)
            if key not in built:
                built[key] = _build(x, body)
            if built[key] is None:
                continue
            end = body[-1]
            m = built[key]
            target = add_submodule(gm, owner(end)[0], "pointwise", RecomputedPointwise(m.chain, m.gradient, m.dtype, m.retyped_on))
            replace_node(end, "call_module", target, (x,))
            modified = True
        return pass_result(gm, modified, drop_unused=True)


def grad_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose result may need a gradient: those computed from a parameter (any may
    be trained) or a floating-point input, with a floating-point result."""
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        floating = isinstance(val, torch.Tensor) and val.is_floating_point() or isinstance(val, (tuple, list))
        if n.op == "get_attr":
            grad = n.target in params
        elif n.op == "placeholder":
            grad = floating
        else:
            grad = floating and any(a in out for a in n.all_input_nodes)
        if grad:
            out.add(n)
    return out


def _elementwise(node: fx.Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    tags = node.target.tags
    return (
        torch.Tag.pointwise in tags and torch.Tag.nondeterministic_seeded not in tags
        and isinstance(node.meta.get("val"), torch.Tensor)
        and all(isinstance(a.meta.get("val"), torch.Tensor) for a in node.all_input_nodes)
    )


def _chains(graph: fx.Graph, grad: set[fx.Node]) -> Iterator[tuple[fx.Node, list[fx.Node]]]:
    """(x, the chain's nodes in graph order, its result last) for each candidate chain."""
    source: dict[fx.Node, fx.Node] = {}  # elementwise node -> the one tensor it is computed from
    for n in graph.nodes:
        if _elementwise(n):
            inputs = {source.get(a, a) for a in n.all_input_nodes}
            if len(inputs) == 1:
                source[n] = inputs.pop()
    members: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for n, x in source.items():
        members[x].append(n)
    for x, nodes in members.items():
        if x in grad and x.meta["val"].dim() > 0 and len(nodes) > 1:
            yield from _split(x, nodes)


def _split(x: fx.Node, nodes: list[fx.Node]) -> Iterator[tuple[fx.Node, list[fx.Node]]]:
    """The chains among `nodes` (all computed from `x`) with one result read elsewhere: each
    result's ancestors among `nodes`, if none of them is read outside the chain."""
    inside = set(nodes)
    order = {n: i for i, n in enumerate(nodes)}
    for end in (n for n in nodes if any(u not in inside for u in n.users)):
        body, stack = {end}, [end]
        while stack:
            for a in stack.pop().all_input_nodes:
                if a in inside and a not in body:
                    body.add(a)
                    stack.append(a)
        if len(body) > 1 and all(u in body for n in body if n is not end for u in n.users):
            yield x, sorted(body, key=order.__getitem__)


def _structure(x: fx.Node, body: list[fx.Node]) -> tuple:
    """What makes two chains the same: x's dtype and rank, each op and its wiring."""
    index = {n: i for i, n in enumerate(body)}
    index[x] = -1
    ops = tuple((n.target, repr(fx.node.map_arg((n.args, n.kwargs), index.__getitem__))) for n in body)
    return x.meta["val"].dtype, x.meta["val"].dim(), ops


def _build(x: fx.Node, body: list[fx.Node]) -> RecomputedPointwise | None:
    """The module standing for `body`, if autograd keeps more of the chain than `x`."""
    val = x.meta["val"]
    chain = _extract(x, body)
    example = torch.randn((3,) * val.dim(), dtype=val.dtype)
    if _saved_per_element(chain, example) <= val.element_size():
        return None
    grad = torch.randn((3,) * body[-1].meta["val"].dim(), dtype=body[-1].meta["val"].dtype)
    gradient = _trace_gradient(chain, example, grad)
    # Without a dtype in either graph the ops are the same for any input dtype (a bf16 input
    # under autocast), as the engine runs them.
    dtype = val.dtype if any(map(_mentions_dtype, (chain, gradient))) else None
    retyped_on = frozenset(
        device for device, key in _AUTOCAST_KEYS.items()
        if any(torch._C._dispatch_has_kernel_for_dispatch_key(n.target.name(), key) for n in body)
    )
    return RecomputedPointwise(chain, gradient, dtype, retyped_on)


def _mentions_dtype(gm: fx.GraphModule) -> bool:
    return any(
        isinstance(a, torch.dtype) for n in gm.graph.nodes for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs))
    )


def _extract(x: fx.Node, body: list[fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    env = {x: graph.placeholder("x")}
    for n in body:
        env[n] = graph.node_copy(n, env.__getitem__)
        env[n].meta = {}  # the capture's fake values would be copied with every deepcopy
    graph.output(env[body[-1]])
    return fx.GraphModule(torch.nn.Module(), graph)


def _saved_per_element(chain: fx.GraphModule, x: torch.Tensor) -> int:
    """Bytes per element of `x` that autograd keeps of ``chain(x)``: the tensors it saves
    as large as `x` (a 0-dim tensor, a scalar operand, does not grow with the input)."""
    x = x.detach().requires_grad_()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == x.numel():
            saved[t.untyped_storage().data_ptr()] = t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chain(x)
    return sum(saved.values())


def _trace_gradient(chain: fx.GraphModule, x: torch.Tensor, grad: torch.Tensor) -> fx.GraphModule:
    """``gradient(x, grad)``: the chain's forward and autograd's backward ops, traced."""

    def gradient(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            return torch.autograd.grad(chain(x), x, grad)[0]

    traced = make_fx(gradient, tracing_mode="symbolic")(x, grad)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced
