"""RMSNorm that keeps its input in its own dtype for backward, not the fp32 copy autograd keeps.

`rms_norm` is what `passes/lean_norms.py` puts in place of a captured RMSNorm chain: its forward
runs the chain's ops in the same order (the same output, bit for bit), and it keeps only ``x``, the
per-row rstd and the scale; backward recomputes ``xf * rstd`` and applies autograd's own
derivative formulas in reverse. `torch.compile` traces the Function, so a compiled step keeps the
same tensors.
"""

from __future__ import annotations

import torch


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, eps, upcast, cast_a, cast_b, times_input):
        xf = x if upcast is None else x.to(upcast)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (x if times_input else xf) * rstd
        y = normed if cast_a is None else normed.to(cast_a)
        y = y if scale is None else y * scale
        ctx.save_for_backward(x, rstd, scale)
        ctx.config = (upcast, cast_a, times_input, normed.dtype, y.dtype)
        return y if cast_b is None else y.to(cast_b)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, scale = ctx.saved_tensors
        upcast, cast_a, times_input, normed_dtype, scaled_dtype = ctx.config
        xf = x if upcast is None else x.to(upcast)
        factor = x if times_input else xf
        # Each step is autograd's formula for the op it undoes (tools/autograd/derivatives.yaml);
        # `.to` and `sum_to_size` are what the engine does to a gradient of another dtype or shape.
        g, grad_scale = grad.to(scaled_dtype), None
        if scale is not None:
            normed = factor * rstd
            normed = normed if cast_a is None else normed.to(cast_a)
            if ctx.needs_input_grad[1]:
                grad_scale = (g * normed).sum_to_size(scale.shape).to(scale.dtype)
            g = (g * scale).to(normed.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_scale, None, None, None, None, None
        g = g.to(normed_dtype)
        grad_rstd = (g * factor).sum_to_size(rstd.shape)
        grad_mean = -0.5 * grad_rstd * rstd.pow(3)
        grad_pow = grad_mean.expand(xf.shape) / xf.shape[-1]
        grad_squared = grad_pow * (2.0 * xf.pow(1.0))
        if times_input:  # two gradients of x, each cast to x's dtype, then summed (the engine's order)
            grad_x = (g * rstd).to(x.dtype) + grad_squared.to(x.dtype)
        else:
            grad_x = (g * rstd + grad_squared).to(x.dtype)
        return grad_x, grad_scale, None, None, None, None, None


def rms_norm(
    x: torch.Tensor, scale: torch.Tensor | None, eps: float, upcast: torch.dtype | None,
    cast_a: torch.dtype | None, cast_b: torch.dtype | torch.Tensor | None, times_input: bool = False,
) -> torch.Tensor:
    """``((xf * rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(cast_a) * scale).to(cast_b)``
    with ``xf = x.to(upcast)``, each of `upcast`, `cast_a`, `scale`, `cast_b` skipped when None
    (`cast_b` a tensor: ``type_as`` it); `times_input`: ``x`` itself, not ``xf``, times the rstd
    (T5LayerNorm). Keeps `x`, the per-row rstd and `scale` for backward."""
    if isinstance(cast_b, torch.Tensor):
        cast_b = cast_b.dtype
    return _RMSNorm.apply(x, scale, eps, upcast, cast_a, cast_b, times_input)
