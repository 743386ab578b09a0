"""A mixture-of-experts projection as grouped matmuls, keeping nothing of its input when the
experts are frozen, and only ``x·A_e`` with a LoRA-FA adapter.

transformers 5 runs an MoE block's experts (Mixtral, Qwen2/3-MoE, OLMoE, ...) as
``grouped_mm_experts_forward``: the routed rows (one per token and chosen expert, ``S =
tokens x top_k``) are sorted by expert, and each fused projection is one grouped matmul
``x (S, in) @ w (E, in, out)`` where rows ``offs[e-1]:offs[e]`` go through expert ``e``. Its
op saves ``x`` and ``w`` for backward (``transformers::grouped_mm_fallback``, or autograd's
``_grouped_mm``), although a frozen ``w`` needs no gradient. `expert_linear` is the same
product keeping nothing of ``x`` when ``w`` is frozen, and with an adapter the paper's eq. (1)
per expert, as two calls (so ``xa`` is a node of the graph, as for a linear's adapter)::

    xa  = expert_xa(x, offs, lora_A, scaling)        xa_s = scaling * x_s A_e^T  (row s routed to e)
    y   = expert_linear(x, w, offs, xa, lora_B)      y_s  = x_s w_e + xa_s B_e^T

in PEFT's layout for a 3-D parameter (``ParamWrapper``, the expert count folded into the rank):
``lora_A`` is ``(E·r, in)`` with ``A_e = lora_A.view(E, r, in)[e]``, ``lora_B`` is ``(out, E·r)``
with ``B_e = lora_B.view(out, r, E)[:, :, e]``. Only ``xa`` (S x r values) is kept, for
``grad_B_e = grad_e^T xa_e``; ``A`` and ``w`` are frozen.

The matmuls are two custom ops (opaque to `torch.compile`, with fake kernels for the cost model):
`grouped_mm` (``(S, K) x (E, K, N) -> (S, N)``) and `grouped_mm_t` (``x_e^T g_e`` per group, a
weight's gradient, ``-> (E, K, N)``). Each runs torch's grouped-matmul kernel
(``torch.nn.functional.grouped_mm``) where it takes the operands (CPU; CUDA in bfloat16 from
sm80; strides and addresses 16-byte aligned) and otherwise transformers' fallback semantics:
one ``mm`` per expert over its rows, in the operands' dtype (autocast does not retype them, as
it does not retype transformers' op). Rows past ``offs[-1]`` (expert parallelism's sentinels)
are zeros.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

#: torch's grouped-matmul kernel wants each matrix's leading stride 16-byte aligned.
_ALIGNMENT = 16


@torch.library.custom_op("lorafa_fx::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of `x` ``(S, K)`` times ``w[e]`` (``w``: ``(E, K, N)``)."""
    with _no_autocast(x):
        if _kernel_takes(x, w):
            return F.grouped_mm(x, w, offs=offs)
        out = x.new_zeros(x.shape[0], w.shape[2])
        for e, (start, end) in enumerate(_groups(offs)):
            torch.mm(x[start:end], w[e], out=out[start:end])
        return out


@grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("lorafa_fx::grouped_mm_t", mutates_args=())
def grouped_mm_t(x: torch.Tensor, g: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x_e^T g_e`` for each group of rows (`x` ``(S, K)``, `g` ``(S, N)``): ``(E, K, N)``,
    zeros for an expert no row went to."""
    with _no_autocast(x):
        if _kernel_takes(x.t(), g):
            return F.grouped_mm(x.t(), g, offs=offs)
        out = x.new_zeros(offs.shape[0], x.shape[1], g.shape[1])
        for e, (start, end) in enumerate(_groups(offs)):
            torch.mm(x[start:end].t(), g[start:end], out=out[e])
        return out


@grouped_mm_t.register_fake
def _(x, g, offs):
    return x.new_empty(offs.shape[0], x.shape[1], g.shape[1])


def _groups(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()  # one device sync, as transformers' fallback
    return list(zip([0, *ends[:-1]], ends))


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    if x.device.type in ("cpu", "cuda"):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _kernel_takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape[0] == 0 or a.dtype != b.dtype:
        return False
    if a.device.type == "cuda":
        if a.dtype != torch.bfloat16 or torch.cuda.get_device_capability(a.device) < (8, 0):
            return False
    elif a.device.type != "cpu":
        return False
    return _aligned(a) and _aligned(b)


def _aligned(t: torch.Tensor) -> bool:
    if t.data_ptr() % _ALIGNMENT:
        return False
    step = _ALIGNMENT // t.element_size()
    rows, cols = t.stride()[-2:]
    return (cols == 1 and rows % step == 0) or (rows == 1 and cols % step == 0)


def _lora_A_groups(lora_A: torch.Tensor, experts: int) -> torch.Tensor:
    """``(E, in, r)``: ``A_e^T`` per expert."""
    return lora_A.view(experts, -1, lora_A.shape[-1]).transpose(-2, -1)


def _lora_B_groups(lora_B: torch.Tensor, experts: int, transposed: bool = True) -> torch.Tensor:
    """``(E, r, out)``: ``B_e^T`` per expert, or ``(E, out, r)``: ``B_e`` (a contiguous copy:
    PEFT's layout puts the expert last)."""
    per_expert = lora_B.view(lora_B.shape[0], -1, experts)
    return (per_expert.permute(2, 1, 0) if transposed else per_expert.permute(2, 0, 1)).contiguous()


class _ExpertXA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offs, lora_A, scaling):
        ctx.save_for_backward(offs, lora_A)  # A is frozen: x's gradient needs nothing of x
        ctx.scaling = scaling
        xa = grouped_mm(x, _lora_A_groups(lora_A, offs.shape[0]), offs)
        return xa * scaling if scaling != 1 else xa

    @staticmethod
    def backward(ctx, grad):
        offs, lora_A = ctx.saved_tensors
        if ctx.scaling != 1:
            grad = grad * ctx.scaling
        return grouped_mm(grad, _lora_A_groups(lora_A, offs.shape[0]).transpose(-2, -1), offs), None, None, None


class _ExpertLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs, xa, lora_B):
        y = grouped_mm(x, w, offs)
        if xa is not None:
            y = y + grouped_mm(xa, _lora_B_groups(lora_B, offs.shape[0]), offs)
        # x only for a trained w's gradient, xa only for B's.
        needs = ctx.needs_input_grad
        ctx.save_for_backward(x if needs[1] else None, xa if needs[4] else None, w, offs, lora_B)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, xa, w, offs, lora_B = ctx.saved_tensors
        grad_x = grad_w = grad_xa = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm(grad, w.transpose(-2, -1), offs)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_mm_t(x, grad, offs)
        if ctx.needs_input_grad[3]:
            # B_e copied anew, not forward's B_e^T transposed: compile's CSE would merge the two
            # copies and keep forward's for backward (E·r·out values per adapter).
            grad_xa = grouped_mm(grad, _lora_B_groups(lora_B, offs.shape[0], transposed=False), offs)
        if ctx.needs_input_grad[4]:
            # (E, r, out) per expert back to PEFT's (out, r·E), the expert last
            grad_B = grouped_mm_t(xa, grad, offs).permute(2, 1, 0).reshape(lora_B.shape)
        return grad_x, grad_w, None, grad_xa, grad_B


def expert_xa(x: torch.Tensor, offs: torch.Tensor, lora_A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """``scaling * x A_e^T`` for the rows routed to each expert ``e`` (`lora_A` ``(E·r, in)``,
    frozen): ``(S, r)``, keeping nothing for backward."""
    return _ExpertXA.apply(x.to(lora_A.dtype), offs, lora_A, scaling)


def expert_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    xa: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ w[e]`` for the rows routed to each expert ``e`` (`w` ``(E, in, out)``, `offs` the
    cumulative row counts), plus ``xa B_e^T`` when `xa` (`expert_xa`) and `lora_B` (``(out,
    E·r)``) are given, in `w`'s dtype (`x` is cast to it, as transformers does). Keeps `xa` for
    B's gradient, and `x` only if `w` requires grad."""
    return _ExpertLinear.apply(x.to(w.dtype), w, offs, xa, lora_B)
