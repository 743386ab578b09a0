"""Pass: device constants follow the batch (or a weight) at run time.

Export writes the device each op ran on at capture as a literal: ``arange(n, device=cpu)``
for position ids and masks, ``to(x, device=cpu, ...)`` for ``labels.to(logits.device)``,
``zeros(..., device=cpu)`` for T5's position bias (a tiny Llama's graph has 28). The eager
model computes these devices from its tensors (``inputs_embeds.device``), so it runs wherever
it is moved; with the literals, a module captured on CPU and moved with ``gm.to("cuda")``
would build its masks and positions on the CPU.

Each ``torch.device`` argument becomes a node ``device_of(t)`` inserted before its user, with
``t`` a tensor that had that device at capture: the first input (placeholder) on it,
else the parameter or buffer closest to the user in the module tree (so an outlined layer
reads only its own weights). A literal no tensor had at capture (code that places something
on another device on purpose) is kept.

Reads ``node.meta["val"]`` of placeholders and ``nn_module_stack``; the new nodes inherit
the user's ``nn_module_stack``/``stack_trace`` and carry the device as ``meta["val"]``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph import new_node, owner, pass_result


def device_of(t: torch.Tensor) -> torch.device:
    return t.device


class FollowInputDevice(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        inputs: dict[torch.device, fx.Node] = {}
        for p in graph.find_nodes(op="placeholder"):
            val = p.meta.get("val")
            if isinstance(val, torch.Tensor):
                inputs.setdefault(val.device, p)
        weights = [(n, t.device) for n in graph.find_nodes(op="get_attr")
                   if isinstance(t := graph_attr(gm, n.target), torch.Tensor)]
        modified = False
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            for key, device in _device_args(node):
                anchor = inputs.get(device) or closest_weight(node, [n for n, d in weights if d == device])
                if anchor is None:
                    continue
                with graph.inserting_before(node):
                    dev = new_node(graph, node, "call_function", device_of, (anchor,))
                dev.meta["val"] = device
                if isinstance(key, int):
                    node.update_arg(key, dev)
                else:
                    node.update_kwarg(key, dev)
                modified = True
        return pass_result(gm, modified)


def _device_args(node: fx.Node) -> list[tuple[int | str, torch.device]]:
    found = [(i, a) for i, a in enumerate(node.args) if isinstance(a, torch.device)]
    return found + [(k, v) for k, v in node.kwargs.items() if isinstance(v, torch.device)]


def graph_attr(gm: fx.GraphModule, target: str) -> object:
    """What a ``get_attr`` node with `target` reads (a parameter, buffer or constant)."""
    module, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(module), name, None)


def closest_weight(node: fx.Node, candidates: list[fx.Node]) -> fx.Node | None:
    """The ``get_attr`` among `candidates` sharing the longest module path with `node`
    (the first in graph order on a tie), or None if there is none."""
    path = owner(node)[0].split(".")

    def shared(candidate: fx.Node) -> int:
        n = 0
        for a, b in zip(path, candidate.target.split(".")[:-1]):
            if a != b:
                break
            n += 1
        return n

    return max(candidates, key=shared, default=None)
