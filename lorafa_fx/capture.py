"""Stage 1, capture: a Hugging Face model becomes an ATen-level `torch.fx.GraphModule`.

`torch.export.export(strict=False)` traces the model's real Python code with fake
tensors; batch and sequence dims are `Dim.AUTO`, so export applies its own suggested fixes
(equal dims, lower bounds such as ``s >= 3``) and one capture serves other shapes. The
sequence dim is bounded by the model's position limit (``max_position_embeddings``).

The model is captured in train mode so dropout ops exist in the graph (`gate_dropout`
makes them follow ``gm.training``), and with the KV cache off (a training step never
needs it, and export cannot return a `DynamicCache`). Parameters are shared with the
model, never copied.

Capture runs with autocast switched off, so the graph is the model's full-precision graph
whichever context `transform` is called in; autocast, like for the eager model, applies when
the module runs (`passes/drop_metadata_asserts.py` and `passes/follow_param_dtype.py` let
it). Example inputs the model does not take, ``use_cache=True`` and ``return_dict=False`` are
refused before export runs (`ExampleInputsError`); a batch outside the captured shapes
(a sequence longer than the position limit) raises `InputShapeError` when the module is
called; a dim the model's code narrows during capture gives a warning.

A sequence classifier whose ``config.problem_type`` is None is captured with the problem type
transformers' own loss (``ForSequenceClassificationLoss``) infers from the example labels:
integer labels of one per row and several classes are ``"single_label_classification"``
(cross-entropy, labels of -100 ignored). DeBERTa's loss reaches the same cross-entropy through
a branch on the label values (``(labels >= 0).nonzero()``, then ``if ... .size(0) > 0``), which
export cannot capture; with the type fixed it takes the traceable branch. The two differ only
for negative labels other than -100 (DeBERTa's eager loss skips them; cross-entropy refuses
them) and for a batch with no label >= 0 (eager 0, captured NaN). The config is restored after
capture.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
import traceback
import typing
import warnings
from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn
from torch.export import Dim

from .errors import CaptureError, ExampleInputsError, InputShapeError

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
    _check_example_inputs(model, kwargs)
    dynamic_shapes = {name: _dynamic_dims(model, t) for name, t in kwargs.items()}
    with _capture_mode(model), _problem_type_of(model, kwargs.get("labels")):
        try:
            program = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:
            raise CaptureError(_capture_failure(model, e)) from e
    gm = program.module()
    # ExportedProgram.module() forbids train()/eval() on the instance; our gate_dropout pass
    # gives them their meaning, so restore nn.Module's methods.
    del gm.train, gm.eval
    for call in gm.graph.find_nodes(op="call_module", target="_guards_fn"):
        names = [a.target if isinstance(a, torch.fx.Node) else None for a in call.args]
        gm._guards_fn = _ExplainedGuards(gm._guards_fn, model, names)
    _warn_on_narrowed_dims(gm, dynamic_shapes, position_limit(model))
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
        dims[1] = Dim.AUTO(min=1, max=position_limit(model))
    return dims


def position_limit(model: nn.Module | object) -> int | None:
    """The longest sequence `model` (or its config) takes: the bound capture puts on dim 1."""
    config = getattr(model, "config", model)
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
    device_types = {"cpu", "cuda"} | {p.device.type for p in model.parameters()}
    try:
        for k in use_cache:
            configs[k].use_cache = False
        model.train()
        with contextlib.ExitStack() as stack:
            # Under autocast export would record the casts it makes and the dtypes they give:
            # the module would then fail outside autocast. Autocast applies at run time instead.
            for device_type in sorted(device_types):
                if device_type != "meta" and torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            yield
    finally:
        for k, value in use_cache.items():
            configs[k].use_cache = value
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def _problem_type_of(model: nn.Module, labels: object) -> Iterator[None]:
    """``config.problem_type`` fixed to what `labels` make it (see the module docstring)."""
    config = getattr(model, "config", None)
    single_label = (
        getattr(config, "problem_type", "") is None and getattr(config, "num_labels", 0) > 1
        and isinstance(labels, torch.Tensor) and labels.dim() == 1 and not labels.is_floating_point()
    )
    if not single_label:
        yield
        return
    config.problem_type = "single_label_classification"
    try:
        yield
    finally:
        config.problem_type = None


#: Example inputs refused whatever the model: (key, the refused value's test, why, what to pass).
_REFUSED_FLAGS = (
    ("use_cache", bool,
     "a training graph returns no KV cache (and torch.export cannot return a DynamicCache)",
     "remove 'use_cache' from example_inputs (capture runs with use_cache=False); to generate, call "
     "gm.generate(...) on the transformed module (the model's generate, KV cache included, with the adapters)"),
    ("return_dict", lambda v: not v,
     "the transformed module returns the model's ModelOutput, from which Trainer and accelerate read .loss",
     "remove 'return_dict' from example_inputs, and call out.to_tuple() on the output where a tuple is wanted"),
)


def _check_example_inputs(model: nn.Module, kwargs: Mapping[str, object]) -> None:
    """Refuse example keys capture cannot take, before export fails on them less clearly."""
    for key, refused, why, fix in _REFUSED_FLAGS:
        if key in kwargs and refused(kwargs[key]):
            raise ExampleInputsError(f"example_inputs[{key!r}] = {kwargs[key]!r} cannot be captured: {why}. Fix: {fix}.")
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no Python signature: let export judge
        return
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unnamed = [k for k in kwargs if k not in named]
    if not unnamed:
        return
    var = next((p for p in params if p.kind == p.VAR_KEYWORD), None)
    # transformers types **kwargs as Unpack[TransformersKwargs]: its keys are all it takes.
    typed = typing.get_args(var.annotation) if var is not None else ()
    accepted = getattr(typed[0], "__annotations__", None) if typed else None
    keys = ", ".join(map(repr, unnamed))
    if var is None or (accepted is not None and not set(unnamed) <= set(accepted)):
        why = f"which {type(model).__name__}.forward does not take. It takes: {', '.join(named)}"
    else:
        why = (f"which {type(model).__name__}.forward takes only through **{var.name}, and torch.export cannot "
               f"capture those (only named parameters: {', '.join(named)})")
    raise ExampleInputsError(
        f"example_inputs has {keys}, {why}. Remove {keys} from the batch (Trainer drops the columns forward does "
        "not take itself, with remove_unused_columns=True)."
    )


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


def _warn_on_narrowed_dims(gm: torch.fx.GraphModule, dims: Mapping[str, object], limit: int | None) -> None:
    """Warn where export kept a dim narrower than asked: fixed to one size, or bounded by the
    model's code (``assert x.shape[1] <= 64``, an index that needs ``s >= 3``)."""
    placeholders = {n.target: n for n in gm.graph.find_nodes(op="placeholder")}
    ranges = getattr(gm, "range_constraints", None) or {}
    for name, asked in dims.items():
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(val, torch.Tensor) or not asked:
            continue
        fixed = [d for d in asked if isinstance(val.shape[d], int)]
        if fixed:
            warnings.warn(
                f"The model's code fixed dims {fixed} of input {name!r} to {[val.shape[d] for d in fixed]} "
                "during capture; the transformed module only accepts batches of that shape. Capture with "
                "the shape you will train with.",
                stacklevel=3,
            )
        for d in asked:
            size = val.shape[d]
            vr = ranges.get(size.node.expr) if isinstance(size, torch.SymInt) else None
            if vr is None:
                continue
            lower, upper = _int_bound(vr.lower), _int_bound(vr.upper)
            asked_upper = limit if d == 1 else None
            # Export reports every dynamic dim as >= 2 (sizes 0 and 1 are specialised apart).
            if lower > 2 or (upper is not None and (asked_upper is None or upper < asked_upper)):
                span = f"{lower}..{upper if upper is not None else 'any'}"
                warnings.warn(
                    f"The model's code bounds dim {d} of input {name!r} to sizes {span} during capture "
                    f"(capture asked for 1..{asked_upper if asked_upper is not None else 'any'}); the transformed "
                    "module rejects batches outside that range with InputShapeError.",
                    stacklevel=3,
                )


def _int_bound(value: object) -> int | None:
    """A `ValueRanges` end as an int; None for infinity."""
    return None if math.isinf(float(value)) else int(value)


_GUARD = re.compile(r"Guard failed: (?P<expr>.+)")
_SIZE_BOUND = re.compile(r"^(?P<name>\w+)\.size\(\)\[(?P<dim>\d+)\] (?P<op><=|>=|==) (?P<bound>\d+)$")


class _ExplainedGuards(nn.Module):
    """Export's input checks (the graph's ``_guards_fn``), their failure an `InputShapeError`
    naming the input, the dim, the size given, the bound, and how to capture for it."""

    _is_impure = True  # a call with no users: graph clean-ups must keep it

    def __init__(self, guards: nn.Module, model: nn.Module, names: list[str | None]) -> None:
        super().__init__()
        self.guards, self.names = guards, names
        self.limit = position_limit(model)
        config = getattr(model, "config", None)
        # the config field `position_limit` read the sequence bound from
        self.limit_field = next((f for f in _POSITION_LIMIT_FIELDS
                                 if self.limit is not None and getattr(config, f, None) == self.limit), None)

    def forward(self, *args):
        if torch.compiler.is_compiling():  # traced: export's checks become the compiled code's guards
            return self.guards(*args)
        try:
            return self.guards(*args)
        except AssertionError as e:
            raise InputShapeError(self._explain(str(e), args)) from None

    def _explain(self, failure: str, args: tuple) -> str:
        """Export's "Guard failed: input_ids.size()[1] <= 128" with the call's actual sizes."""
        match = _GUARD.search(failure)
        expr = match["expr"] if match else failure
        bound = _SIZE_BOUND.match(expr)
        shapes = ", ".join(f"{a.shape}" for a in args if isinstance(a, torch.Tensor))
        if bound is None:
            return (f"the batch does not fit the shapes this module was captured for: {expr} does not hold "
                    f"(input shapes: {shapes}). Capture with example_inputs shaped like the training batches.")
        name, dim, op, limit = bound["name"], int(bound["dim"]), bound["op"], int(bound["bound"])
        given = self._size(name, dim, args)
        head = f"input {name!r} has size {given} in dim {dim}"
        if op == "<=" and dim == 1 and limit == self.limit and self.limit_field is not None:
            return (f"{head}, longer than the {limit} this module was captured for: the model's position limit "
                    f"(config.{self.limit_field} = {limit}). Split the batch into sequences of at most {limit}, or "
                    f"capture for longer ones: load the model with a config whose {self.limit_field} is at least "
                    f"{given} (a long-context variant, or config.{self.limit_field} = {given} for rotary "
                    "position embeddings) and transform it again.")
        wanted = {"<=": f"at most {limit}", ">=": f"at least {limit}", "==": f"exactly {limit}"}[op]
        return (f"{head}; this module was captured for {wanted} there ({expr}), a limit the model's code set "
                "during capture. Pass batches within it, or capture with example_inputs of the shape you train with.")

    def _size(self, name: str, dim: int, args: tuple) -> int | str:
        t = args[self.names.index(name)] if name in self.names else None
        return t.shape[dim] if isinstance(t, torch.Tensor) and t.dim() > dim else "?"
