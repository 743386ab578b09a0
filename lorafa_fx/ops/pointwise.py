"""A chain of elementwise ops that keeps only its input for backward and recomputes the rest.

`RecomputedPointwise` is what `passes/lean_pointwise.py` calls in place of a chain such as
``gelu_new``: an `autograd.Function` whose backward runs a gradient graph traced from autograd
itself, so values and gradients are the captured graph's bit for bit.
"""

from __future__ import annotations

import torch
import torch.fx as fx


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.save_for_backward(x)
        ctx.module = module
        return module.chain(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.module.gradient(x, grad), None


class RecomputedPointwise(torch.nn.Module):
    """``chain(x)`` keeping only `x` for backward, where ``gradient(x, grad)`` (traced for
    inputs of `dtype`; None: for any) recomputes it; `retyped_on`: the device types whose
    autocast retypes an op of the chain."""

    def __init__(
        self, chain: fx.GraphModule, gradient: fx.GraphModule, dtype: torch.dtype | None, retyped_on: frozenset[str]
    ) -> None:
        super().__init__()
        self.chain, self.gradient, self.dtype, self.retyped_on = chain, gradient, dtype, retyped_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if self.dtype not in (None, x.dtype) or (device in self.retyped_on and torch.is_autocast_enabled(device)):
            return self.chain(x)
        return _Recompute.apply(x, self)
