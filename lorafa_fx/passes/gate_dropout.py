"""Pass: make every captured dropout follow the module's train/eval mode.

Capture runs in train mode, so export writes each dropout as the functional op
``aten.dropout(x, p, train=True)`` with the mode baked in. This pass swaps each one for a
call to an `nn.Dropout(p)` submodule registered under the module the op was traced in,
so ``gm.train()``/``gm.eval()`` switch dropout on and off like on the original model.
Attention's own dropout (SDPA's ``dropout_p``) is gated by `simplify_attention`.

Reads ``node.meta["nn_module_stack"]``; the new call_module nodes inherit it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph import add_submodule, new_node, owner, pass_result


class GateDropout(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.dropout.default)):
            x, p, train = node.args
            if not train:
                continue
            path, cls = owner(node)
            # HF's own nn.Dropout modules keep their path; functional dropout gets a new name.
            parent, name = path.rpartition(".")[::2] if cls.endswith("Dropout") else (path, "dropout")
            target = add_submodule(gm, parent, name, torch.nn.Dropout(p))
            with gm.graph.inserting_before(node):
                gated = new_node(gm.graph, node, "call_module", target, (x,))
            gated.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(gated)
            gm.graph.erase_node(node)
            modified = True
        return pass_result(gm, modified)
