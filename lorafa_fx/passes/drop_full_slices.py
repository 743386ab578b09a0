"""Pass: drop the slices that keep a whole dim (``x[:, 0:]``), as eager indexing does.

Eager PyTorch returns ``x`` itself for a slice that keeps a whole dim; under export the
slice is recorded (``aten.slice(x, dim, 0, 2**63 - 1)``, e.g. transformers'
``hidden_states[:, slice(-0, None), :]`` before the LM head). Left in the graph, each one
costs its backward a zero-filled tensor of ``x``'s size and a copy (``slice_backward``)
that the eager model does not pay. Every use of such a slice is replaced by ``x``: the
same data, shape and strides.

Reads nothing from ``node.meta``; writes nothing.
"""

from __future__ import annotations

import sys

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph import pass_result


def is_full_slice(node: object) -> bool:
    """Whether `node` is ``aten.slice(x, dim, 0, end >= 2**63 - 1, 1)``: all of ``x``."""
    if not (isinstance(node, fx.Node) and node.target == torch.ops.aten.slice.Tensor):
        return False
    args = {**dict(zip(("dim", "start", "end", "step"), node.args[1:])), **node.kwargs}
    start, end, step = args.get("start"), args.get("end"), args.get("step", 1)
    to_the_end = end is None or isinstance(end, int) and end >= sys.maxsize
    return start in (0, None) and to_the_end and step == 1


class DropFullSlices(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        slices = [n for n in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.slice.Tensor)
                  if is_full_slice(n)]
        for node in slices:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        return pass_result(gm, bool(slices))
