"""Attention as the rewritten graph calls it: `SDPAttention` (dropout follows ``training``),
`elide_mask` (a mask that adds nothing over causal attention is dropped at run time, so SDPA
takes its fused path) and `position_bias_mask` (T5's position bias under such a mask, at the
bias's own size). `passes/simplify_attention.py` puts them in the graph.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake


class SDPAttention(torch.nn.Module):
    """``F.scaled_dot_product_attention`` with its dropout following ``self.training``."""

    def __init__(self, dropout_p: float, scale: float | None, enable_gqa: bool) -> None:
        super().__init__()
        self.dropout_p, self.scale, self.enable_gqa = dropout_p, scale, enable_gqa

    def forward(self, q, k, v, attn_mask=None, is_causal: bool = False):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal, scale=self.scale, enable_gqa=self.enable_gqa,
        )

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}, scale={self.scale}, enable_gqa={self.enable_gqa}"


def attention_call(nodes: list[fx.Node]) -> fx.Node | None:
    """The first `SDPAttention` call among a block's `nodes` (None: none)."""
    return next((n for n in nodes if n.op == "call_module"
                 and isinstance(n.graph.owning_module.get_submodule(n.target), SDPAttention)), None)


_ASSUME_UNPADDED = contextvars.ContextVar("lorafa_assume_unpadded", default=False)


@contextlib.contextmanager
def assume_unpadded() -> Iterator[None]:
    """Let `elide_mask` drop masks of fake tensors, as it would for an unpadded real batch."""
    token = _ASSUME_UNPADDED.set(True)
    try:
        yield
    finally:
        _ASSUME_UNPADDED.reset(token)


def elide_mask(mask: torch.Tensor, is_causal: bool, causal_module: bool) -> tuple[torch.Tensor | None, bool]:
    """(None, causal) when `mask` adds nothing over ``is_causal``; else (mask, is_causal)."""
    if is_causal or torch.compiler.is_compiling():
        return mask, is_causal
    if is_fake(mask):
        square = mask.shape[-2] == mask.shape[-1]
        if _ASSUME_UNPADDED.get() and (square or not causal_module):
            return None, causal_module
        return mask, is_causal
    if mask.dtype == torch.bool:
        if bool(mask.all()):
            return None, False
        q_len, kv_len = mask.shape[-2:]
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril_()
        if q_len == kv_len and torch.equal(mask, causal.expand_as(mask)):
            return None, True
    elif not bool(mask.any()):  # additive float mask of zeros
        return None, False
    return mask, is_causal


def position_bias_mask(mask: torch.Tensor | None, causal: bool, bias: torch.Tensor, fill: float | torch.Tensor
                       ) -> torch.Tensor:
    """transformers' ``create_position_bias_mask`` (``torch.where(mask, bias, fill)``) after
    `elide_mask` dropped `mask`: the bias itself, or the bias over a (q, k) causal mask, both of
    the bias's size ``(1, h, q, k)`` as eager transformers builds them; not broadcast to the
    batch's ``(b, h, q, k)``, which SDPA's fused kernels would keep for backward."""
    if mask is None and not causal:
        return bias
    if mask is None:
        q_len, kv_len = bias.shape[-2:]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=bias.device).tril_()
    return torch.where(mask, bias, fill)
