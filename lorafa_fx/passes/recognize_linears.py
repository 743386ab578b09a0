"""Pass: a linear layer written as a matmul with its transposed weight becomes ``aten.linear``.

Some models compute their linear layers by hand: Falcon's ``FalconLinear`` (an ``nn.Linear``
subclass) runs ``x @ self.weight.T`` and adds its bias after, so the graph holds
``matmul(x, numpy_T(weight))`` where other models hold ``linear(x, weight, bias)``, and
`rewrite_lora_fa`, which adapts linear nodes, would find nothing to adapt. This pass writes the
linear those ops compute: ``linear(x, W)``, and ``linear(x, W, b)`` where the product's one use
adds the same module's bias (the order PEFT's wrapper computes in: the base layer's output,
bias included, then the adapter's).

Matched: ``matmul(x, T(W))`` with ``T`` a transpose of the two dims of a 2-D ``*.weight``
parameter (``numpy_T``, ``t``, ``transpose(0, 1)``, ``permute([1, 0])``).

Reads ``node.meta["val"]``; each linear inherits the replaced node's ``nn_module_stack`` and
``val``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph import replace_matches

aten = torch.ops.aten


class RecognizeLinears(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        return replace_matches(gm, aten.matmul.default, _match, aten.linear.default)


def _match(matmul: fx.Node) -> tuple[fx.Node, tuple] | None:
    x, transposed = matmul.args
    weight = _transposed_weight(transposed)
    if weight is None:
        return None
    module = weight.target.removesuffix(".weight")
    (user,) = matmul.users if len(matmul.users) == 1 else (None,)
    if user is not None and user.target == aten.add.Tensor and len(user.args) == 2 and user.args[0] is matmul:
        bias = user.args[1]
        if isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{module}.bias":
            return user, (x, weight, bias)
    return matmul, (x, weight)


def _transposed_weight(node: object) -> fx.Node | None:
    """The 2-D ``*.weight`` parameter that `node` transposes, if it does."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    swaps = (
        node.target in (aten.numpy_T.default, aten.t.default)
        or node.target == aten.transpose.int and sorted(d % 2 for d in node.args[1:]) == [0, 1]
        or node.target == aten.permute.default and list(node.args[1]) in ([1, 0], [-1, -2])
    )
    weight = node.args[0]
    if not (swaps and isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight")):
        return None
    val = weight.meta.get("val")
    return weight if isinstance(val, torch.Tensor) and val.dim() == 2 else None
