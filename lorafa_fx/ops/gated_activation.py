"""``act(gate) * up`` keeping only ``gate`` and ``up`` for backward (SwiGLU, GeGLU).

`gated_activation` is what `passes/lean_gated_mlp.py` puts in place of a gated MLP's product:
backward recomputes ``act(gate)`` (one elementwise op) and runs autograd's own ops
(``silu_backward``/``gelu_backward``), so values and gradients are the original graph's, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten


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
