"""``act(gate) * up`` keeping only ``gate`` and ``up`` for backward (SwiGLU, GeGLU).

`gated_activation` is what `passes/lean_gated_mlp.py` puts in place of a gated MLP's product:
backward recomputes ``act(gate)`` (one elementwise op) and runs autograd's own ops
(``silu_backward``/``gelu_backward``), so values and gradients are the original graph's, bit for bit;
a chunk of rows at a time (`rows.row_chunks`), so its temporaries stay small.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .rows import row_chunks

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
        if not any(ctx.needs_input_grad[:2]):
            return None, None, None, None
        wanted = ctx.needs_input_grad[:2]
        dtypes = tuple(t.dtype for t, w in zip((gate, up), wanted) if w)
        width = max(torch.finfo(d).bits // 8 for d in (gate.dtype, up.dtype, grad.dtype))
        grads = iter(row_chunks(functools.partial(_grads, config=(*ctx.config, wanted)), (gate, up, grad), dtypes,
                                gate.shape, 2 * gate.shape[-1] * width))
        return *(next(grads) if w else None for w in wanted), None, None


def _grads(gate, up, grad, config) -> tuple[torch.Tensor, ...]:
    """Rows of the wanted gradients of gate and up: autograd's formulas for mul and the
    activation; `.to` is what the engine does to a gradient of another dtype (mixed operands)."""
    act, approximate, wanted = config
    grads = []
    if wanted[0]:
        grad_act = (grad * up).to(gate.dtype)
        if act == "silu":
            grads.append(aten.silu_backward.default(grad_act, gate))
        else:
            grads.append(aten.gelu_backward.default(grad_act, gate, approximate=approximate))
    if wanted[1]:
        grads.append((grad * _activation(gate, act, approximate)).to(up.dtype))
    return tuple(grads)


def _activation(gate: torch.Tensor, act: str, approximate: str) -> torch.Tensor:
    return F.silu(gate) if act == "silu" else F.gelu(gate, approximate=approximate)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, act: str, approximate: str = "none") -> torch.Tensor:
    """``act(gate) * up`` (`act`: ``"silu"`` or ``"gelu"`` with `approximate`), keeping only
    `gate` and `up` for backward."""
    return _GatedActivation.apply(gate, up, act, approximate)
