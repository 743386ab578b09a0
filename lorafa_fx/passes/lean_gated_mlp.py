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
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ._graph import replace_matches
from .lean_norms import same_shape

aten = torch.ops.aten

#: Activation op -> the name `gated_activation` takes.
_ACTIVATIONS = {aten.silu.default: "silu", aten.gelu.default: "gelu"}


class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act, approximate):
        ctx.save_for_backward(gate, up)
        ctx.config = (act, approximate)
        return _activation(gate, act, approximate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        act, approximate = ctx.config
        # autograd's formulas for mul and the activation; `.to` is what the engine does to a
        # gradient of another dtype (mixed operands).
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_act = (grad * up).to(gate.dtype)
            if act == "silu":
                grad_gate = aten.silu_backward.default(grad_act, gate)
            else:
                grad_gate = aten.gelu_backward.default(grad_act, gate, approximate=approximate)
        if ctx.needs_input_grad[1]:
            grad_up = (grad * _activation(gate, act, approximate)).to(up.dtype)
        return grad_gate, grad_up, None, None


def _activation(gate: torch.Tensor, act: str, approximate: str) -> torch.Tensor:
    return F.silu(gate) if act == "silu" else F.gelu(gate, approximate=approximate)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, act: str, approximate: str = "none") -> torch.Tensor:
    """``act(gate) * up`` (`act`: ``"silu"`` or ``"gelu"`` with `approximate`), keeping only
    `gate` and `up` for backward."""
    return _GatedActivation.apply(gate, up, act, approximate)


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

