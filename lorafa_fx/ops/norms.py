"""RMSNorm that keeps its input in its own dtype for backward, not the fp32 copy autograd keeps.

`rms_norm` is what `passes/lean_norms.py` puts in place of a captured RMSNorm chain: its forward
runs the chain's ops in the same order (the same output, bit for bit), and it keeps only ``x``, the
per-row rstd and the scale; backward recomputes ``xf * rstd`` and applies autograd's own
derivative formulas in reverse, a chunk of rows at a time (`rows.row_chunks`: its fp32
temporaries stay small; the same bits). `torch.compile` traces the Function, so a compiled step
keeps the same tensors.
"""

from __future__ import annotations

import functools

import torch

from .rows import row_chunks


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
        grad_scale = None
        if scale is not None and ctx.needs_input_grad[1]:
            # The scale's gradient sums over every row: computed whole, in autograd's order.
            normed = (x if times_input else x if upcast is None else x.to(upcast)) * rstd
            normed = normed if cast_a is None else normed.to(cast_a)
            grad_scale = (grad.to(scaled_dtype) * normed).sum_to_size(scale.shape).to(scale.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_scale, None, None, None, None, None
        width = max(torch.finfo(d).bits // 8 for d in (x.dtype, normed_dtype, scaled_dtype))
        (grad_x,) = row_chunks(functools.partial(_grad_x, config=ctx.config), (x, rstd, scale, grad), (x.dtype,),
                               x.shape, x.shape[-1] * width)
        return grad_x, grad_scale, None, None, None, None, None


def _grad_x(x, rstd, scale, grad, config) -> tuple[torch.Tensor]:
    """Rows of x's gradient: autograd's formula for each op of the forward, in reverse
    (tools/autograd/derivatives.yaml); `.to` and `sum_to_size` are what the engine does to a
    gradient of another dtype or shape."""
    upcast, cast_a, times_input, normed_dtype, scaled_dtype = config
    xf = x if upcast is None else x.to(upcast)
    factor = x if times_input else xf
    g = grad.to(scaled_dtype)
    if scale is not None:
        g = (g * scale).to(normed_dtype if cast_a is None else cast_a)
    g = g.to(normed_dtype)
    grad_rstd = (g * factor).sum_to_size(rstd.shape)
    grad_mean = -0.5 * grad_rstd * rstd.pow(3)
    grad_pow = grad_mean.expand(xf.shape) / xf.shape[-1]
    grad_squared = grad_pow * (2.0 * xf.pow(1.0))
    if times_input:  # two gradients of x, each cast to x's dtype, then summed (the engine's order)
        return ((g * rstd).to(x.dtype) + grad_squared.to(x.dtype),)
    return ((g * rstd + grad_squared).to(x.dtype),)


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
