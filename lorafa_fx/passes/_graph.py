"""Small graph-editing helpers shared by the passes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

#: This project's single namespaced `node.meta` key.
META_KEY = "lorafa"

#: Meta keys a new node inherits from the node it stands for, so errors, profiles and
#: `nn_module_stack`-based matching still point at the user's module.
_INHERITED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "custom")


def new_node(
    graph: fx.Graph, origin: fx.Node, op: str, target, args: tuple, kwargs: dict | None = None
) -> fx.Node:
    """Create a node carrying `origin`'s module/stack meta (insertion point is the caller's)."""
    node = graph.create_node(op, target, args, kwargs or {})
    for key in _INHERITED_META:
        if key in origin.meta:
            node.meta[key] = origin.meta[key]
    return node


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
    base = f"{path}.{name}" if path else name
    target, i = base, 1
    while _exists(gm, target):
        target, i = f"{base}_{i}", i + 1
    gm.add_submodule(target, module)
    return target


def _exists(gm: fx.GraphModule, target: str) -> bool:
    parent, _, leaf = target.rpartition(".")
    try:
        return hasattr(gm.get_submodule(parent), leaf)
    except AttributeError:
        return False


def block_of(node: fx.Node) -> str:
    """The repeated block a node belongs to ("model.layers.3"), else its top module."""
    path, _ = owner(node)
    parts = path.split(".") if path else ["<root>"]
    # The first indexed segment is the layer ("model.layers.3"), even inside an MoE's experts.
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]
