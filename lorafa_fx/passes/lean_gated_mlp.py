"""Pass: gated MLPs keep gate and up, not also the activation's output.

A gated MLP (SwiGLU: Llama, Qwen2, Mistral; GeGLU: Gemma) computes
``down(act(gate) * up)``, captured as ``mul(silu(gate), up)`` (or ``gelu(gate, approximate=
...)``). Autograd keeps three b·s·intermediate tensors: ``gate`` (for the activation's
backward), ``act(gate)`` and ``up`` (for the product's). LoRA-FA's frozen ``down`` keeps
nothing of its input.

This pass replaces each product by one call of `gated_activation`, an `autograd.Function`
that keeps ``gate`` and ``up`` only and recomputes ``act(gate)`` in backward (one elementwise
op); forward and backward run autograd's own ops (``silu_backward``/``gelu_backward``), so
values and gradients are the original graph's, bit for bit. The Function is what
`torch.compile` traces, so the compiled step keeps the same tensors.

Matched: ``mul.Tensor(act, up)`` (either order) where ``act`` is ``silu`` or ``gelu`` read by
this product only, and the product has the shape of both operands (no broadcasting). Not
matched: an activation written as several ops, as transformers' ``gelu_new``
(NewGELUActivation: T5 v1.1's gated-gelu MLP; GPT-2's MLP is not gated).

Reads ``node.meta["val"]``; each call inherits the product's ``nn_module_stack``/
``stack_trace`` and ``val``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph import replace_matches, same_shape
from ..ops.gated_activation import gated_activation

aten = torch.ops.aten

#: Activation op -> the name `gated_activation` takes.
_ACTIVATIONS = {aten.silu.default: "silu", aten.gelu.default: "gelu"}


class LeanGatedMLP(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        return replace_matches(gm, aten.mul.Tensor, _match, gated_activation)


def _match(mul: fx.Node) -> tuple[fx.Node, tuple] | None:
    """(`mul`, `gated_activation`'s arguments) if `mul` is ``act(gate) * up``, else None."""
    if len(mul.args) != 2 or mul.kwargs or not all(isinstance(a, fx.Node) for a in mul.args):
        return None
    for act, up in (mul.args, mul.args[::-1]):
        if act.op == "call_function" and act.target in _ACTIVATIONS and len(act.users) == 1 and len(act.args) == 1:
            approximate = act.kwargs.get("approximate", "none")
            if set(act.kwargs) <= {"approximate"} and same_shape(mul, act) and same_shape(mul, up):
                return mul, (act.args[0], up, _ACTIVATIONS[act.target], approximate)
    return None

