"""The output projection and the cross-entropy loss a chunk of tokens at a time (no b·s·V tensor).

`linear_cross_entropy` is the fused linear-cross-entropy `passes/chunk_cross_entropy.py` puts in
place of ``cross_entropy(linear(h, W))`` (the scheme of Liger-Kernel's
``FusedLinearCrossEntropy``); `EvalLogits` gives the full logits in eval mode only. The formulas
are in the pass's docstring.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Smallest chunk of fp32 logits worth a GEMM call (bytes).
MIN_CHUNK_BYTES = 4 * 2**20


class EvalLogits(torch.nn.Module):
    """``linear(h, W, b).to(dtype)`` in eval mode; ``None`` in train mode (never materialised)."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if self.training:
            return None
        logits = F.linear(h, weight, bias)
        return logits if self.dtype is None else logits.to(self.dtype)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, *,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
    dtype: torch.dtype | None = None, chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight, bias).to(dtype).flatten(0, -2), target, ...)``, chunked.

    Never holds more than one chunk of logits; see the module docstring for the formulas.
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    return _LinearCrossEntropy.apply(
        h, weight, bias, target, ignore_index, label_smoothing, reduction, dtype, chunk_size, needs_grad
    )


def _chunk_rows(n: int, d: int, vocab: int, itemsize: int) -> int:
    return max(math.ceil(n * d / vocab), math.ceil(MIN_CHUNK_BYTES / (vocab * itemsize)), 1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index, label_smoothing, reduction, dtype, chunk_size, needs_grad):
        h2 = h.reshape(-1, h.shape[-1])
        target = target.reshape(-1)
        dtype = dtype or torch.promote_types(h.dtype, weight.dtype)
        n, vocab = h2.shape[0], weight.shape[0]
        rows = chunk_size or _chunk_rows(n, h2.shape[1], vocab, torch.finfo(dtype).bits // 8)
        valid = target != ignore_index
        denom = valid.sum().to(dtype) if reduction == "mean" else torch.ones((), dtype=dtype, device=h.device)
        want_h, want_w, want_b = (needs_grad and t is not None and t.requires_grad for t in (h, weight, bias))
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.empty_like(h2) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else None
        total = torch.zeros((), dtype=dtype, device=h.device)
        for start in range(0, n, rows):
            hc, tc, vc = h2[start:start + rows], target[start:start + rows], valid[start:start + rows]
            logits = F.linear(hc, weight, bias).to(dtype)
            safe = torch.where(vc, tc, 0).unsqueeze(1)
            row_loss = -logits.gather(1, safe).squeeze(1)
            if label_smoothing:
                row_loss = (1 - label_smoothing) * row_loss - label_smoothing * logits.mean(dim=-1)
            # log-sum-exp with the exponentials kept, in place: they become the softmax below
            top = logits.amax(dim=-1, keepdim=True)
            g = logits.sub_(top).exp_()
            norm = g.sum(dim=-1)
            row_loss += norm.log() + top.squeeze(1)
            total += torch.where(vc, row_loss, 0).sum()
            if not (want_h or want_w or want_b):
                continue
            g.div_(norm.unsqueeze(1))
            g.scatter_add_(1, safe, torch.full_like(safe, label_smoothing - 1, dtype=g.dtype))
            if label_smoothing:
                g.sub_(label_smoothing / vocab)
            g.mul_((vc.to(g.dtype) / denom).unsqueeze(1))
            g = g.to(weight.dtype)
            if want_h:
                torch.mm(g, weight, out=grad_h[start:start + rows])
            if want_w:
                grad_w.addmm_(g.t().to(acc), hc.to(acc))
            if want_b:
                grad_b += g.sum(0, dtype=acc)
        ctx.h_shape = h.shape
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.wants = (want_h, want_w, want_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / denom

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        want_h, want_w, want_b = ctx.wants
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_h = next(saved).mul(grad_loss).to(h_dtype).view(ctx.h_shape) if want_h else None
        grad_w = next(saved).mul(grad_loss).to(w_dtype) if want_w else None
        grad_b = next(saved).mul(grad_loss).to(b_dtype) if want_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None
