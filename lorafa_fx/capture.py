"""Stage 1, capture: a Hugging Face model becomes an ATen-level `torch.fx.GraphModule`.

`torch.export.export(strict=False)` traces the model's real Python code with fake
tensors; batch and sequence dims are `Dim.AUTO`, so export applies its own suggested fixes
(equal dims, lower bounds such as ``s >= 3``) and one capture serves other shapes. The
sequence dim is bounded by the model's position limit (``max_position_embeddings``).

The model is captured in train mode so dropout ops exist in the graph (`gate_dropout`
makes them follow ``gm.training``), and with the KV cache off (a training step never
needs it, and export cannot return a `DynamicCache`). Parameters are shared with the
model, never copied.
"""

from __future__ import annotations

import contextlib
import os
import traceback
import warnings
from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn
from torch.export import Dim

from .errors import CaptureError

_POSITION_LIMIT_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len")


def capture(model: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> torch.fx.GraphModule:
    """Export `model` called as ``model(**example_inputs)``; return the unlifted GraphModule.

    The GraphModule takes the same keyword batch and returns the model's output type (HF
    `ModelOutput`s are pytree nodes). Its ``train()``/``eval()`` work like any module's.
    """
    # A sliced example (labels[:, :7]) has strides export would make symbolic; the model's own
    # .view() calls then cannot be traced. Real batches come contiguous from collators.
    # Contiguous copies also let a batch of one be captured as two (see `_capturable`).
    kwargs = {k: _capturable(v) for k, v in example_inputs.items()}
    dynamic_shapes = {name: _dynamic_dims(model, t) for name, t in kwargs.items()}
    with _capture_mode(model):
        try:
            program = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:
            raise CaptureError(_capture_failure(model, e)) from e
    gm = program.module()
    # ExportedProgram.module() forbids train()/eval() on the instance; our gate_dropout pass
    # gives them their meaning, so restore nn.Module's methods.
    del gm.train, gm.eval
    _warn_on_specialised_dims(gm, dynamic_shapes)
    return gm


def _capturable(t: object) -> object:
    """The example as export needs it: contiguous, and no dynamic dim of size 1.

    Export specialises a size-1 dim to the constant 1 ("0/1 specialization"), so a batch of
    one would give a module that only takes batches of one. The example is repeated to size
    2 along such dims instead: the graph is the same for every size >= 1.
    """
    if not isinstance(t, torch.Tensor):
        return t
    for dim in range(min(t.dim(), 2)):
        if t.shape[dim] == 1:
            t = torch.cat([t, t], dim=dim)
    return t.contiguous()


def _dynamic_dims(model: nn.Module, t: object) -> dict[int, object] | None:
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    dims: dict[int, object] = {0: Dim.AUTO(min=1)}
    if t.dim() >= 2:
        dims[1] = Dim.AUTO(min=1, max=_position_limit(model))
    return dims


def _position_limit(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in _POSITION_LIMIT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


@contextlib.contextmanager
def _capture_mode(model: nn.Module) -> Iterator[None]:
    # Encoder-decoder stacks hold copies of the config (T5's decoder), so every one is switched.
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    use_cache = {k: c.use_cache for k, c in configs.items() if getattr(c, "use_cache", None) is not None}
    modes = {m: m.training for m in model.modules()}
    try:
        for k in use_cache:
            configs[k].use_cache = False
        model.train()
        yield
    finally:
        for k, value in use_cache.items():
            configs[k].use_cache = value
        for m, training in modes.items():
            m.training = training


def _capture_failure(model: nn.Module, e: Exception) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    user = [f for f in frames if not f.filename.startswith(torch_dir)]
    where = f"{user[-1].filename}:{user[-1].lineno} in {user[-1].name}: {user[-1].line}" if user else "inside torch"
    first_line = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return (
        f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {first_line}\n"
        f"  last model-side frame: {where}\n"
        "Try: pass example_inputs with the exact keyword names model.forward takes (labels included "
        "if the loss should be part of the graph); load the model with attn_implementation='sdpa' or "
        "'eager'; check the same call works with torch.export.export(model, (), batch, strict=False)."
    )


def _warn_on_specialised_dims(gm: torch.fx.GraphModule, dynamic_shapes: dict) -> None:
    placeholders = {n.target: n for n in gm.graph.find_nodes(op="placeholder")}
    for name, dims in dynamic_shapes.items():
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(val, torch.Tensor) or not dims:
            continue
        fixed = [d for d in dims if isinstance(val.shape[d], int)]
        if fixed:
            warnings.warn(
                f"The model's code fixed dims {fixed} of input {name!r} to {[val.shape[d] for d in fixed]} "
                "during capture; the transformed module only accepts batches of that shape. Capture with "
                "the shape you will train with.",
                stacklevel=3,
            )
