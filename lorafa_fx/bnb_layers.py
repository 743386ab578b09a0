"""bitsandbytes base layers (QLoRA-FA): what capture needs to trace `Linear4bit` / `Linear8bitLt`.

`torch.export` cannot capture bitsandbytes' layers as they are:

1. Export swaps every parameter for a FakeTensor, so inside ``Linear4bit.forward`` the weight
   is no longer a ``Params4bit``: its ``quant_state`` is gone and bnb's attempt to re-wrap it
   raises ``RuntimeError: Creating a new Tensor subclass Params4bit but the raw Tensor object
   is already associated to a python object of type FakeTensor``.
2. bnb's matmuls are `torch.autograd.Function`s (``MatMul4Bit``, ``MatMul8bitFp``); export
   inlines their forward and drops their backward, and the op left in the graph
   (``bitsandbytes::gemm_4bit``) has no autograd formula, so no gradient would reach ``x``
   and the adapters below the layer would not train.

`traceable(model)` therefore gives each bnb layer, for the time of the capture only, a forward
that calls one op of `ops/bnb.py` instead:

- ``lorafa_fx::matmul_4bit(x, weight, absmax, shape, blocksize, quant_type, bias,
  absmax_8bit, absmax_code, absmax_offset)``: bnb's own ``gemm_4bit`` kernel (NF4/FP4, with or
  without double quantisation), and bnb's backward ``grad_x = grad_y · dequant(W)``;
- ``lorafa_fx::matmul_8bit(x, weight, scb, bias)``: ``x (CB · SCB/127)^T + b``, bnb's training
  path (``MatMul8bitFp``), with its backward.

Both rebuild the dequantised weight in backward instead of saving it, as bnb does, so a step
keeps no full-precision copy of the base weights. In the graph, ``x`` is operand 0 and the
quantised weight (a ``get_attr`` of ``{path}.weight``) operand 1, as for ``aten.linear``: the
rewrite adds the adapter to the op's output, in the layer's compute dtype. The quantisation
statistics (absmax, code, offset, SCB) are not parameters; they become non-persistent buffers
of ``gm`` (``{path}.quant_absmax``, ``{path}.quant_scb``, ...), sharing the model's tensors.

The 8-bit op always computes like bnb in training mode (dequantised weight times ``x``);
bnb's int8-activation inference path (``MatMul8bitLt``) is not used by the captured graph.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
import torch.nn as nn

from .errors import CaptureError
from .ops import bnb as _ops  # noqa: F401  (registers the ops the traceable forwards call)

_NONE = object()


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """While open, every bnb ``Linear4bit`` / ``Linear8bitLt`` of `model` runs a forward export can trace.

    Each such layer gets an instance ``forward`` calling this file's op, and its quantisation
    statistics as non-persistent buffers (``quant_absmax``, ``quant_scb``, ...), so the captured
    graph reads them with ``get_attr`` like any buffer (they move with ``gm.to()`` and passes
    that fake the module's state see them). Both are removed from `model` on exit; `gm` keeps the
    buffers, sharing their tensors. A no-op for models without bitsandbytes layers
    (bitsandbytes is not imported here).
    """
    bnb = sys.modules.get("bitsandbytes")
    patched = []  # (module, the forward its instance had: accelerate's hooks set one, buffer names)
    try:
        if bnb is not None:
            for path, module in model.named_modules():
                if getattr(module.__dict__.get("forward"), "lorafa_traceable", False):
                    continue  # an enclosing `traceable` already did it
                if isinstance(module, bnb.nn.Linear4bit):
                    forward, buffers = _forward_4bit(path, module)
                elif isinstance(module, bnb.nn.Linear8bitLt):
                    forward, buffers = _forward_8bit(path, module)
                else:
                    continue
                patched.append((module, module.__dict__.get("forward", _NONE), list(buffers)))
                for name, t in buffers.items():
                    module.register_buffer(name, t, persistent=False)
                forward.lorafa_traceable, forward.lorafa_buffers = True, tuple(buffers)
                module.forward = forward
        yield
    finally:
        for module, forward, buffers in reversed(patched):
            for name in buffers:
                delattr(module, name)
            if forward is _NONE:
                del module.forward
            else:
                module.forward = forward


def runs_shared_weights(model: nn.Module) -> None:
    """Let `model`, a copy of a transformed model's module objects sharing its tensors (`calls.py`),
    run bnb's own forwards without changing them: its bnb layers get their own forward back where
    the copy was made while `traceable` was open (that forward calls the original layer), and a
    ``Linear4bit`` never repacks its weight for CPU inference (bnb does it in place on an eval-mode
    no-grad call on a CPU with AVX512-BF16; the captured graph's matmul reads the trainable layout)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return
    for module in model.modules():
        forward = vars(module).get("forward")
        if getattr(forward, "lorafa_traceable", False):
            del module.forward
            for name in forward.lorafa_buffers:
                delattr(module, name)
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _forward_4bit(path: str, module: nn.Module):
    qs = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
    if qs is None:
        raise CaptureError(
            f"{path} is a bitsandbytes Linear4bit whose weight is not quantised yet; move the model to "
            "its device (model.to('cpu') / .cuda()) or load it with BitsAndBytesConfig before transform."
        )
    if getattr(qs, "packing_format_for_cpu", False):
        raise CaptureError(
            f"{path}: bitsandbytes repacked this Linear4bit's weight for CPU inference (an eval-mode, no-grad "
            "call on a CPU with AVX512-BF16); the packed layout cannot be trained. Transform the model "
            "before running it in eval mode, or reload it."
        )
    if qs.nested and qs.state2.blocksize != 256:
        raise CaptureError(
            f"{path}: double-quantised absmax with blocksize {qs.state2.blocksize}; bitsandbytes' 4-bit "
            "matmul (and this capture) supports 256 only, the blocksize BitsAndBytesConfig uses."
        )
    if qs.nested:
        buffers = {"quant_absmax": qs.state2.absmax, "quant_absmax_8bit": qs.absmax,
                   "quant_absmax_code": qs.state2.code, "quant_absmax_offset": qs.offset}
    else:
        buffers = {"quant_absmax": qs.absmax}
    shape = [int(s) for s in qs.shape]

    def forward(x: torch.Tensor) -> torch.Tensor:
        # bnb's Linear4bit.forward: compute in compute_dtype (the input's if unset), return in x's dtype.
        compute_dtype = module.compute_dtype if module.compute_dtype is not None else x.dtype
        bias = None if module.bias is None else module.bias.to(compute_dtype)
        nested = [getattr(module, n, None) for n in ("quant_absmax_8bit", "quant_absmax_code", "quant_absmax_offset")]
        out = torch.ops.lorafa_fx.matmul_4bit(
            x.to(compute_dtype), module.weight, module.quant_absmax, shape, qs.blocksize, qs.quant_type, bias, *nested)
        return out.to(x.dtype)

    return forward, buffers


def _forward_8bit(path: str, module: nn.Module):
    if module.state.has_fp16_weights:
        raise CaptureError(
            f"{path} is a bitsandbytes Linear8bitLt with has_fp16_weights=True (8-bit training of the "
            "weight itself); LoRA-FA keeps base weights frozen: load with has_fp16_weights=False "
            "(BitsAndBytesConfig(load_in_8bit=True) does)."
        )
    scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
    if scb is None:
        raise CaptureError(
            f"{path} is a bitsandbytes Linear8bitLt whose weight is not quantised yet; move the model to "
            "its device or load it with BitsAndBytesConfig(load_in_8bit=True) before transform."
        )

    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return torch.ops.lorafa_fx.matmul_8bit(x, module.weight, module.quant_scb, bias)

    return forward, {"quant_scb": scb}
