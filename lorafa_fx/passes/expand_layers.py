"""Pass: grow a shallow model's graph to its full depth by repeating its last layer.

`torch.export` of a 7B model takes longer than planning it: capture time grows with depth,
and every layer of a transformer is the same graph. `estimate()` therefore captures (and
adapts) the model built from its config with two layers, and this pass makes the graph the
deep model's: for each stack of repeated blocks (``model.layers``) it appends copies of the
stack's last block until the stack has ``depths[stack]`` blocks. A copy reads the previous
block's outputs where the last block read its predecessor's, and what read the last block's
outputs (the final norm) reads the last copy's. Each copy gets its own parameters (fresh
tensors of the same shapes, dtypes, ``requires_grad`` and mode: fake for a model built under
`FakeTensorMode`) at its own path (``model.layers.17.self_attn.q_proj.weight``), and its nodes
the module path of the block they stand for, so every later stage sees the graph it would
have captured from the deep model. The pipeline checks that the deep model's layers match
the shallow one's before it relies on this (`shallow.repeated_stacks`).

Reads ``node.meta["nn_module_stack"]`` and ``meta.ADAPTER``; writes both on the copies, with
the copy's path (other meta, ``val`` included, is shared with the copied node).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import meta
from ..graph import block_ranges, block_structure, is_size, pass_result


class ExpandLayers(PassBase):
    """`depths`: ``{stack path: number of blocks}`` (``{"model.layers": 32}``)."""

    def __init__(self, depths: Mapping[str, int]) -> None:
        super().__init__()
        self.depths = depths

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for stack, depth in self.depths.items():
            blocks = stack_blocks(gm.graph, stack)
            for i in range(len(blocks), depth):
                _append_copy(gm, stack, blocks, i)
                modified = True
        return pass_result(gm, modified)


def stack_blocks(graph: fx.Graph, stack: str) -> list[list[fx.Node]]:
    """The node ranges of `stack`'s blocks, in order."""
    ranges = block_ranges(graph)
    return [nodes for block, nodes in ranges.items() if block.rpartition(".")[0] == stack]


def repeats_cleanly(graph: fx.Graph, stack: str) -> bool:
    """Whether the last two blocks of `stack` are the same graph (up to their paths), the
    condition for copying the last one."""
    blocks = stack_blocks(graph, stack)
    if len(blocks) < 2:
        return False
    (prev, last), paths = blocks[-2:], [f"{stack}.{len(blocks) - 2}", f"{stack}.{len(blocks) - 1}"]
    return block_structure(paths[0], prev) == block_structure(paths[1], last)


def _append_copy(gm: fx.GraphModule, stack: str, blocks: list[list[fx.Node]], index: int) -> None:
    """Append block `index` of `stack`, a copy of the stack's last block, to `blocks`."""
    graph = gm.graph
    prev, last = blocks[-2], blocks[-1]
    source, path = f"{stack}.{len(blocks) - 1}", f"{stack}.{index}"
    gm.add_submodule(path, _fresh_copy(gm.get_submodule(source)))
    # Sizes (`is_size`) are the same in every block: the copy reads those the last block reads.
    last_body = [n for n in last if not is_size(n)]
    inside, position = set(last), {n: i for i, n in enumerate(n for n in prev if not is_size(n))}
    readers = {n: [u for u in n.users if u not in inside] for n in last}
    env: dict[fx.Node, fx.Node] = {}
    params: dict[str, fx.Node] = {}

    def remap(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if a in position:  # the predecessor's output: the last block's, for the copy
            return last_body[position[a]]
        if a.op == "get_attr" and _under(a.target, source):
            if a.target not in params:  # next to the read it copies, outside the block as that one is
                with graph.inserting_after(a):
                    params[a.target] = graph.get_attr(_moved(a.target, source, path))
                params[a.target].meta = dict(a.meta)
            return params[a.target]
        return a

    with graph.inserting_before(last[-1].next):
        for n in last:
            env[n] = graph.node_copy(n, remap)
            _move_meta(env[n], source, path)
            if n.op in ("get_attr", "call_module") and _under(n.target, source):
                env[n].target = _moved(n.target, source, path)
    for n, users in readers.items():
        for u in users:
            u.replace_input_with(n, env[n])
    blocks.append([env[n] for n in last])


def _under(target: str, path: str) -> bool:
    return target == path or target.startswith(path + ".")


def _moved(target: str, source: str, path: str) -> str:
    return path + target[len(source):]


def _move_meta(node: fx.Node, source: str, path: str) -> None:
    stack = node.meta.get("nn_module_stack")
    if stack:
        node.meta["nn_module_stack"] = {
            k: (_moved(p, source, path) if _under(p, source) else p, cls) for k, (p, cls) in stack.items()
        }
    info = meta.lorafa_meta(node)
    if meta.ADAPTER in info:
        node.meta[meta.KEY] = {**info, meta.ADAPTER: _moved(info[meta.ADAPTER], source, path)}


def _fresh_copy(module: torch.nn.Module) -> torch.nn.Module:
    """`module`'s structure with new tensors like its own (no values copied: fake stays fake)."""
    twin = copy.copy(module)
    twin._parameters = {
        k: None if p is None else torch.nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad)
        for k, p in module._parameters.items()
    }
    twin._buffers = {k: None if b is None else torch.empty_like(b) for k, b in module._buffers.items()}
    twin._modules = {k: None if m is None else _fresh_copy(m) for k, m in module._modules.items()}
    return twin
