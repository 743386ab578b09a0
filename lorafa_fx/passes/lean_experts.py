"""Pass: frozen experts keep nothing of their routed input for backward.

transformers 5 runs an MoE block's experts as grouped matmuls over the routed rows (tokens x
top_k, sorted by expert; `ops/experts.py`). Capture records each projection as
``transformers.grouped_mm_fallback(x, w, offs)`` (weights in float32/float16: torch's kernel
does not trace for them) or ``aten._grouped_mm(x, w, offs)`` (bfloat16), where ``w`` is the
experts' 3-D parameter, transposed (``transpose(get_attr(p), -2, -1)``) unless the model stores
it as ``(E, in, out)``. Both ops keep ``x`` for a weight gradient that a frozen expert never
needs: the routed input of every projection, ``tokens x top_k x in`` values.

Each such op becomes ``ops.experts.expert_linear(x, w, offs)``: the same product (the same
matmuls where torch's kernel applies, else transformers' per-expert fallback), keeping ``x``
only if ``w`` requires grad. `rewrite_lora_fa` adds the adapters of `targets`' expert
parameters to these calls.

Reads ``node.meta["val"]``; each call inherits the op's ``nn_module_stack``/``stack_trace`` and ``val``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph import pass_result, replace_node
from ..ops.experts import expert_linear

aten = torch.ops.aten

#: transformers' grouped expert matmuls as captured: ``op(x, w, offs)``.
GROUPED_MM_OPS = (torch.ops.transformers.grouped_mm_fallback.default, aten._grouped_mm.default)


class LeanExperts(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.target in GROUPED_MM_OPS and expert_weight(node) is not None:
                replace_node(node, "call_function", expert_linear, expert_operands(node))
                modified = True
        return pass_result(gm, modified, drop_unused=True)


def expert_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(x, w, offs)`` of an experts' matmul without an adapter: a `GROUPED_MM_OPS` op with no
    bias or output dtype, or `expert_linear`; else None."""
    if node.op != "call_function" or (node.target not in GROUPED_MM_OPS and node.target is not expert_linear):
        return None
    names = ("x", "w", "offs")
    operands = {**dict(zip(names, node.args)), **{k: v for k, v in node.kwargs.items() if k in names}}
    rest = [*node.args[3:], *(v for k, v in node.kwargs.items() if k not in names)]
    if len(operands) != 3 or any(v is not None for v in rest):  # a bias, an output dtype, an adapter
        return None
    return operands["x"], operands["w"], operands["offs"]


def expert_weight(node: fx.Node) -> str | None:
    """The 3-D parameter an experts' matmul (`expert_operands`) multiplies its rows with, or None
    if it has no such operand (or is not one)."""
    operands = expert_operands(node)
    if operands is None:
        return None
    w = operands[1]
    if isinstance(w, fx.Node) and w.op == "call_function" and w.target == aten.transpose.int:
        if sorted(d % 3 for d in w.args[1:]) != [1, 2]:
            return None
        w = w.args[0]
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    val = w.meta.get("val")
    return w.target if isinstance(val, torch.Tensor) and val.dim() == 3 else None
