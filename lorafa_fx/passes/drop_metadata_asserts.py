"""Pass: drop export's tensor-metadata assertions.

Non-strict export follows every ``Tensor.to(...)`` of the model's code with
``aten._assert_tensor_metadata(x, dtype=..., device=...)``, which pins the dtype and device
the example batch and the weights had at capture. The eager model checks nothing of the sort,
so these asserts are what made the captured module fail (``Tensor dtype mismatch! Expected:
Float, Got: c10::BFloat16``) under ``torch.autocast`` (an autocast linear returns bf16 where
capture saw fp32), after ``gm.to(torch.bfloat16)`` and after ``gm.to("cuda")``. The asserts
compute nothing: every one is removed.

Reads nothing from ``node.meta``; writes nothing.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph import pass_result


class DropMetadataAsserts(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        asserts = list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten._assert_tensor_metadata.default))
        for node in asserts:
            gm.graph.erase_node(node)
        return pass_result(gm, bool(asserts))
