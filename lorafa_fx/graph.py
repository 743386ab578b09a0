"""Small graph-editing helpers shared by the passes."""

from __future__ import annotations

import copy
import functools
import operator
import warnings
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.fx.passes.infra.pass_base import PassResult

from .units import block_of_path

#: Meta keys a new node inherits from the node it stands for, so errors, profiles and
#: `nn_module_stack`-based matching still point at the user's module.
_INHERITED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "custom")


def graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of `gm`'s graph and the same parameters and submodules."""
    with warnings.catch_warnings():  # torch's own pytree specs warn when deep-copied
        warnings.simplefilter("ignore", FutureWarning)
        return graph_module(gm, copy.deepcopy(gm.graph))


def graph_module(root: torch.nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule of `graph` whose Python code is generated when first called or printed
    (torch's `_LazyGraphModule`, as dynamo makes them): the planner makes many graphs it only
    interprets, and generating a 32-layer model's code costs a tenth of a second each time."""
    return _LazyGraphModule(root, graph)


def generate_code(gm: fx.GraphModule) -> None:
    """Generate the Python code `graph_module` deferred, for a graph handed to users: they read
    its forward's signature (HF Trainer keeps the batch columns forward names)."""
    _LazyGraphModule.force_recompile(gm)


def set_attributes(gm: fx.GraphModule, **attributes: object) -> None:
    """Set plain attributes on `gm` that survive ``copy.deepcopy(gm)``: GraphModule's deepcopy
    rebuilds the module and keeps only what ``gm.meta["_user_preserved_attributes"]`` names
    (users deep-copy models for EMA weights and reference models)."""
    preserved = gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})
    for name, value in attributes.items():
        setattr(gm, name, value)
        preserved[name] = value


def new_node(
    graph: fx.Graph, origin: fx.Node, op: str, target, args: tuple, kwargs: dict | None = None
) -> fx.Node:
    """Create a node carrying `origin`'s module/stack meta (insertion point is the caller's)."""
    node = graph.create_node(op, target, args, kwargs or {})
    for key in _INHERITED_META:
        if key in origin.meta:
            node.meta[key] = origin.meta[key]
    return node


def replace_matches(
    gm: fx.GraphModule, anchor: Callable, match: Callable[[fx.Node], tuple[fx.Node, tuple] | None], fn: Callable
) -> PassResult:
    """Each ``call_function(anchor)`` node that `match` accepts, as (the last node of the matched
    pattern, `fn`'s arguments): that last node is replaced by ``fn(*arguments)`` (its module meta
    and ``val``), and the nodes left unused are dropped."""
    graph = gm.graph
    modified = False
    for node in list(graph.find_nodes(op="call_function", target=anchor)):
        found = match(node)
        if found is None:
            continue
        end, args = found
        replace_node(end, "call_function", fn, args)
        modified = True
    return pass_result(gm, modified, drop_unused=True)


def replace_node(end: fx.Node, op: str, target, args: tuple) -> fx.Node:
    """A node ``op(target, args)`` in place of `end` (before it, with its module meta and
    ``val``), read by all of `end`'s users; `end` is left unused."""
    with end.graph.inserting_before(end):
        call = new_node(end.graph, end, op, target, args)
    call.meta["val"] = end.meta.get("val")
    end.replace_all_uses_with(call)
    return call


def same_shape(a: fx.Node, b: fx.Node) -> bool:
    """Whether `a`'s output has `b`'s shape (sizes may be symbolic: compared without guards)."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dim() == vb.dim()):
        return False
    return all(statically_known_true(sa == sb) for sa, sb in zip(va.shape, vb.shape))


def set_fake_val(node: fx.Node, fn: Callable, gm: fx.GraphModule) -> None:
    """Fill `meta["val"]` by running `fn` on the fake values of `node`'s inputs.

    Later stages (the cost model) read shapes and dtypes from `meta["val"]`; computing it
    under the capture's own FakeTensorMode keeps its symbolic batch/sequence sizes.
    """
    vals = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    mode = detect_fake_mode(list(torch.utils._pytree.tree_leaves(vals)))
    if mode is None:
        return
    args, kwargs = vals
    with mode:
        node.meta["val"] = fn(*args, **kwargs)


def get_attr(gm: fx.GraphModule, origin: fx.Node, target: str) -> fx.Node:
    node = new_node(gm.graph, origin, "get_attr", target, ())
    # The inputs carry the capture's fake mode; scanning every node per call made adapting a
    # 7B graph (448 get_attr) take seconds.
    mode = detect_fake_mode([v for n in gm.graph.find_nodes(op="placeholder") if isinstance(v := n.meta.get("val"), torch.Tensor)])
    if mode is not None:
        node.meta["val"] = mode.from_tensor(gm.get_parameter(target), static_shapes=True)
    return node


def owner(node: fx.Node) -> tuple[str, str]:
    """(path, qualified class name) of the innermost module `node` was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    path, cls = next(reversed(stack.values())) if stack else ("", "")
    return path, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def add_submodule(gm: fx.GraphModule, path: str, name: str, module: torch.nn.Module) -> str:
    """Register `module` as `path.name` (suffixed `_1`, `_2`.. if taken); return its target."""
    target = free_target(gm, path, name)
    gm.add_submodule(target, module)
    return target


def free_target(module: torch.nn.Module, path: str, name: str) -> str:
    """`path.name`, suffixed `_1`, `_2`.. until nothing of `module` has that name."""
    base = f"{path}.{name}" if path else name
    target, i = base, 1
    while has_target(module, target):
        target, i = f"{base}_{i}", i + 1
    return target


def attribute(module: torch.nn.Module, target: str) -> object:
    """What `module` holds at dotted `target` (a ``get_attr`` node's: a parameter, buffer or
    submodule)."""
    return functools.reduce(getattr, target.split("."), module)


def has_target(module: torch.nn.Module, target: str) -> bool:
    """Whether `module` has an attribute (submodule, parameter, buffer) at dotted `target`."""
    parent, _, leaf = target.rpartition(".")
    try:
        return hasattr(module.get_submodule(parent), leaf)
    except AttributeError:
        return False


def boundary(body: list[fx.Node], owned: frozenset[fx.Node] = frozenset()) -> tuple[list[fx.Node], list[fx.Node]]:
    """(inputs, outputs) of the node range `body`: the nodes outside it (but not in `owned`)
    it reads, and its nodes read outside it, each in graph order."""
    inside = set(body)
    inputs = list(dict.fromkeys(a for n in body for a in n.all_input_nodes if a not in inside and a not in owned))
    outputs = [n for n in body if any(u not in inside for u in n.users)]
    return inputs, outputs


def extract_graph(
    body: list[fx.Node],
    inputs: list[fx.Node],
    outputs: list[fx.Node],
    attrs: Mapping[fx.Node, str] = {},
    retarget: Callable[[fx.Node], str] | None = None,
) -> fx.Graph:
    """A graph that computes `outputs` (as a tuple) from placeholders for `inputs`: a copy of
    `body` whose reads of an `attrs` node become ``get_attr(attrs[node])``, and whose
    ``call_module`` targets `retarget` renames (the new graph's owner module differs)."""
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n, target in attrs.items():
        env[n] = sub.get_attr(target)
        env[n].meta = dict(n.meta)
    for n in body:
        env[n] = sub.node_copy(n, lambda a: env[a])
        if n.op == "call_module" and retarget is not None:
            env[n].target = retarget(n)
    sub.output(tuple(env[o] for o in outputs))
    return sub


def call_in_place_of(
    graph: fx.Graph, body: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node], target: str, meta: dict
) -> fx.Node:
    """Replace the nodes `body` by ``call_module(target, inputs)`` returning the tuple of
    `outputs` (each use rewired to a ``getitem`` named ``<call>_out_<i>``, carrying the output's
    meta); `meta` goes on the call."""
    with graph.inserting_before(body[0]):
        call = graph.call_module(target, tuple(inputs))
        call.meta.update(meta)
        results = [
            graph.create_node("call_function", operator.getitem, (call, i), name=f"{call.name}_out_{i}")
            for i in range(len(outputs))
        ]
    for old, new in zip(outputs, results):
        new.meta = dict(old.meta)
        old.replace_all_uses_with(new)
    for n in reversed(body):
        graph.erase_node(n)
    return call


def block_ranges(
    graph: fx.Graph, block_of_node: Callable[[fx.Node], str | None] | None = None
) -> dict[str, list[fx.Node]]:
    """For each repeated block (`block_of_node`: a node's block or None; default
    `repeated_block`), the contiguous node range from its first to its last node."""
    block_of_node = block_of_node or repeated_block
    nodes = list(graph.nodes)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        block = block_of_node(node)
        if block is not None:
            first.setdefault(block, i)
            last[block] = i
    return {b: nodes[first[b] : last[b] + 1] for b in first}


def repeated_block(node: fx.Node) -> str | None:
    """The repeated block ("model.layers.3") an op node runs in, or None."""
    if node.op not in ("call_function", "call_module"):
        return None
    block = block_of(node)
    return block if block.rsplit(".", 1)[-1].isdigit() else None


def block_of(node: fx.Node) -> str:
    """The repeated block a node belongs to ("model.layers.3"), else its top module."""
    return block_of_path(owner(node)[0])


def is_size(node: fx.Node) -> bool:
    """Whether `node` computes a symbolic size (``mul(2, sym_size)``), not a tensor. Export
    computes each size expression once: the first block that needs one holds its node, and the
    blocks after it read that node."""
    return node.op == "call_function" and isinstance(node.meta.get("val"), torch.SymInt)


def block_structure(block: str, nodes: list[fx.Node]) -> tuple:
    """What makes two blocks the same graph: ops, targets (the block's path made relative),
    the wiring inside the block, constants, and every output's shape and dtype. Sizes
    (`is_size`) count by their expression, wherever they are computed."""
    nodes = [n for n in nodes if not is_size(n)]
    index = {n: i for i, n in enumerate(nodes)}

    def arg(a: fx.Node) -> str:
        if is_size(a):
            return f"%size({a.meta['val']})"
        return f"%{index[a]}" if a in index else "%in"

    def target(n: fx.Node) -> object:
        if n.op in ("get_attr", "call_module"):
            return n.target.removeprefix(block)
        return n.target

    def val(n: fx.Node) -> str:
        v = n.meta.get("val")
        return f"{tuple(v.shape)}:{v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__

    return tuple((n.op, target(n), repr(fx.node.map_arg((n.args, n.kwargs), arg)), val(n)) for n in nodes)


def pass_result(gm: fx.GraphModule, modified: bool, *, drop_unused: bool = False) -> PassResult:
    """A pass's `PassResult`: a modified graph is linted (its unused nodes dropped first with
    `drop_unused`) and its code regenerated."""
    if modified:
        if drop_unused:
            gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)



class MLPSpans(NamedTuple):
    """The node ranges of a block's MLP (`mlp_spans`), each with the norm right before it (its
    ``get_attr`` nodes included); None where a range does not qualify."""

    selective: list[fx.Node] | None  # up to its last linear's input: recomputing it saves what is kept inside
    whole: list[fx.Node] | None  # to its output, token-wise and without random ops: it may run in chunks
    split: tuple[int, ...] = ()  # of `whole`'s inputs (`boundary` order), those split into chunks of tokens
    # Nothing in the block reads `whole`'s output but residual adds that end it (their backward
    # reads no input): a recomputation of the block may leave that output unwritten.
    output_unread: bool = False
    selective_split: tuple[int, ...] = ()  # of `selective`'s inputs, those split into chunks of tokens
    # The block's nodes after `selective`: its last linear with its adapter and the residual adds
    # (None: anything else, or `whole` does not qualify). They keep only the adapter's x·A
    # (LoRA-FA's frozen A and W save no input), so a recomputed block may leave them out.
    tail: list[fx.Node] | None = None


def mlp_spans(nodes: list[fx.Node]) -> MLPSpans:
    """The MLP of a block (`nodes`: its range): the module holding the block's last linear (the
    last node reading a 2-D weight other than an adapter's: ``mlp.down_proj``, GPT-2's
    ``mlp.c_proj``), with a norm computed right before it (a module whose class name ends in
    ``Norm``), so a range's input is the norm's input. Each range must have one output, its
    last node; the whole MLP qualifies for chunks when it draws no random numbers (dropout)
    and some of its inputs have its output's token dims."""
    linears = [n for n in nodes if any(_is_linear_weight(a) for a in n.args)]
    last = linears[-1] if linears else None
    path = owner(last)[0].rpartition(".")[0] if last is not None else ""
    inside = [i for i, n in enumerate(nodes) if path and (owner(n)[0] == path or owner(n)[0].startswith(path + "."))]
    x = next((a for a in last.args if isinstance(a, fx.Node) and a.op != "get_attr"), None) if last else None
    index = {n: i for i, n in enumerate(nodes)}
    if not inside or x not in index:
        return MLPSpans(None, None)
    start = inside[0]
    while start > 0 and nodes[start - 1].op != "get_attr" and owner(nodes[start - 1])[1].endswith("Norm"):
        start -= 1
    selective, whole = (_one_output(nodes[start:end + 1]) for end in (index[x], inside[-1]))
    split = _token_inputs(whole) if whole is not None else ()
    unread = bool(split) and _output_unread(whole, nodes)
    tail = nodes[index[x] + 1:] if unread and selective is not None else None
    mlp = set(whole or ())
    if tail is not None and not all(n in mlp or n.op == "get_attr" or whole[-1] in n.args for n in tail):
        tail = None
    return MLPSpans(selective, whole if split else None, split, unread,
                    _token_inputs(selective) if selective is not None else (), tail)


def kept_linears(span: list[fx.Node]) -> list[fx.Node]:
    """Of a selective MLP span (`MLPSpans.selective`), its frozen linears (``aten.linear`` with
    a frozen weight and bias) after the first: SwiGLU's ``up_proj`` (``gate_proj`` is the first).
    An offloaded block recomputing that span keeps their outputs for backward rather than
    recomputing them (`Decision.OFFLOAD_SELECTIVE`); none where the span calls a module (the
    region's copy that backward runs would hold it a second time)."""
    if any(n.op == "call_module" for n in span):
        return []
    linears = [n for n in span if n.op == "call_function" and n.target is torch.ops.aten.linear.default
               and _is_linear_weight(n.args[1]) and all(_frozen(a) for a in n.args[1:3] if a is not None)]
    return linears[1:]


def _frozen(node: object) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    value = attribute(node.graph.owning_module, node.target)
    return isinstance(value, torch.Tensor) and not value.requires_grad


def _output_unread(span: list[fx.Node], nodes: list[fx.Node]) -> bool:
    inside = set(nodes)
    adds = (operator.add, torch.add, torch.ops.aten.add.Tensor)
    return all(u.op == "call_function" and u.target in adds and not inside & set(u.users)
               for u in [n for n in span if n.op != "get_attr"][-1].users if u in inside)


def _one_output(span: list[fx.Node]) -> list[fx.Node] | None:
    body = [n for n in span if n.op != "get_attr"]
    return span if body and boundary(body)[1] == [body[-1]] else None


def _token_inputs(span: list[fx.Node]) -> tuple[int, ...]:
    """Positions of the inputs of `span` to split by tokens; () if it draws random numbers."""
    body = [n for n in span if n.op != "get_attr"]
    for n in body:
        module = n.graph.owning_module.get_submodule(n.target) if n.op == "call_module" else None
        if (isinstance(module, torch.nn.Dropout) and module.p > 0) or getattr(n.target, "is_nondeterministic", False) \
                or "dropout" in str(n.target):
            return ()
    out = body[-1].meta.get("val")
    inputs = boundary(body)[0]
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return ()
    return tuple(
        i for i, a in enumerate(inputs)
        if a.op != "get_attr" and isinstance(v := a.meta.get("val"), torch.Tensor) and v.dim() == out.dim()
        and all(statically_known_true(p == q) for p, q in zip(v.shape[:-1], out.shape[:-1]))
    )


def _is_linear_weight(node: object) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    val, target = node.meta.get("val"), node.target
    return isinstance(val, torch.Tensor) and val.dim() == 2 and target.endswith(".weight") and ".lora_" not in target
