"""The bitsandbytes matmuls as the captured graph calls them (`bnb_layers.traceable` puts them in
the layers' forwards during capture; see its docstring for why bnb's own calls cannot be captured).

- ``lorafa_fx::matmul_4bit(x, weight, absmax, shape, blocksize, quant_type, bias, absmax_8bit,
  absmax_code, absmax_offset)``: bnb's own ``gemm_4bit`` kernel (NF4/FP4, with or without double
  quantisation), and bnb's backward ``grad_x = grad_y · dequant(W)``;
- ``lorafa_fx::matmul_8bit(x, weight, scb, bias)``: ``x (CB · SCB/127)^T + b``, bnb's training
  path (``MatMul8bitFp``), with its backward.

Both rebuild the dequantised weight in backward instead of saving it, as bnb does. They call
``torch.ops.bitsandbytes`` only when they run, so defining them imports nothing of bitsandbytes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


@torch.library.custom_op("lorafa_fx::matmul_4bit", mutates_args=())
def matmul_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor,
    shape: list[int],
    blocksize: int,
    quant_type: str,
    bias: Optional[torch.Tensor],
    absmax_8bit: Optional[torch.Tensor],
    absmax_code: Optional[torch.Tensor],
    absmax_offset: Optional[torch.Tensor],
) -> torch.Tensor:
    """``x W^T + b`` for a bnb 4-bit ``W`` (``shape = (out, in)``), with bnb's ``gemm_4bit``."""
    return torch.ops.bitsandbytes.gemm_4bit.default(
        x, weight.view(-1, 1), shape, absmax, blocksize, quant_type,
        bias=bias, absmax_8bit=absmax_8bit, absmax_code=absmax_code, absmax_offset=absmax_offset,
    )


@matmul_4bit.register_fake
def _(x, weight, absmax, shape, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _dequantize_4bit(weight, absmax, shape, blocksize, quant_type, absmax_8bit, absmax_code, absmax_offset, dtype):
    # Double quantisation: the 4-bit blocks' absmax are themselves 8-bit, blockwise (bnb: 256).
    if absmax_8bit is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            absmax_8bit, absmax, absmax_code, 256, torch.float32) + absmax_offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax, blocksize, quant_type, shape, dtype)


def _setup_4bit(ctx, inputs, output):
    x, weight, absmax, shape, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset = inputs
    ctx.save_for_backward(weight, absmax, absmax_8bit, absmax_code, absmax_offset)
    ctx.meta = (shape, blocksize, quant_type)


def _backward_4bit(ctx, grad):
    weight, absmax, absmax_8bit, absmax_code, absmax_offset = ctx.saved_tensors
    shape, blocksize, quant_type = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = _dequantize_4bit(weight, absmax, shape, blocksize, quant_type, absmax_8bit, absmax_code,
                             absmax_offset, grad.dtype)
        grad_x = grad @ w
    if ctx.needs_input_grad[6]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, grad_bias, None, None, None


matmul_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)


@torch.library.custom_op("lorafa_fx::matmul_8bit", mutates_args=())
def matmul_8bit(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x W^T + b`` with ``W = weight · scb / 127`` (bnb's int8 rows and their absmax, ``MatMul8bitFp``)."""
    return F.linear(x, _dequantize_8bit(weight, scb, x.dtype), bias)


@matmul_8bit.register_fake
def _(x, weight, scb, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _dequantize_8bit(weight: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


def _setup_8bit(ctx, inputs, output):
    x, weight, scb, bias = inputs
    ctx.save_for_backward(weight, scb)
    ctx.x_dtype = x.dtype


def _backward_8bit(ctx, grad):
    weight, scb = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad.to(ctx.x_dtype) @ _dequantize_8bit(weight, scb, ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, grad_bias


matmul_8bit.register_autograd(_backward_8bit, setup_context=_setup_8bit)


#: Quantised linear ops and the index of their input and weight operands (as `LINEAR_OPS`).
QUANTIZED_LINEAR_OPS = {torch.ops.lorafa_fx.matmul_4bit.default: (0, 1), torch.ops.lorafa_fx.matmul_8bit.default: (0, 1)}
