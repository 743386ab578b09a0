"""The public entry points: `transform` (a model to a LoRA-FA GraphModule that trains),
`estimate` (the memory plan of a model, possibly too big for this machine, from its config; at
one shape or a sweep of shapes) and `largest_batch_size` (the largest batch a budget takes).

Each takes what to adapt as a `LoraFAConfig` and how to plan as a `PlanConfig` (``budget=`` is
the shorthand for ``plan=PlanConfig(budget=...)``), resolves the plan against the model
(``budget="auto"`` read on a device: `plan_config.resolve`) and hands over to the pipeline
(`pipeline.py`), which does the same for one process and for one rank. A sweep or a search
captures once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import overload

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig

from .capture import position_limit
from .captured_model import CapturedModel, Progress
from .checks import check_estimate_arguments, check_example_inputs
from .config import LoraFAConfig
from .errors import AlreadyTransformedError, ConfigError, InfeasibleBudgetError
from .memory.report import MemoryPlan
from .pipeline import emit, plan_and_emit
from .plan_config import PlanConfig, PlanSettings, resolve, with_budget
from .presets import PRESETS, load_config
from .shallow import shallow_config
from .state import state_of

#: Makes the batch of a shape, ``(batch_size, seq_len)``, in the captured model's mode.
BatchMaker = Callable[[int, int], dict[str, torch.Tensor]]
ModelOrConfig = nn.Module | PretrainedConfig | str | os.PathLike


def transform(
    model: nn.Module,
    budget: int | str | None = None,
    *,
    example_inputs: Mapping[str, torch.Tensor],
    config: LoraFAConfig | None = None,
    plan: PlanConfig | None = None,
) -> fx.GraphModule:
    """Capture `model` and return a GraphModule that trains it with LoRA-FA.

    Args:
        model: a Hugging Face (or any `torch.export`-able) model. Its base weights are shared
            with the result, not copied, and frozen in place (as PEFT does).
        budget: shorthand for ``plan=PlanConfig(budget=budget)``: the memory budget of one
            training step (AdamW) at the example batch's shape (bytes, ``"40GB"``, ``"auto"``).
        example_inputs: one keyword batch, as passed to ``model(**batch)``. Batch and sequence
            dims are captured as dynamic, so other shapes work too.
        config: what to adapt; defaults to ``LoraFAConfig()`` (all linears, r=8).
        plan: how to plan the step (`PlanConfig`: budget, device, mixed precision, data
            parallelism, offload); default ``PlanConfig()``: no budget, one process, the
            autocast in force. With ``world_size``, `example_inputs` is one rank's batch; train
            the result with ``lorafa_fx.distributed.prepare(gm)`` inside the job (``torchrun``).
            Under a budget that cannot be met: `InfeasibleBudgetError` (with ``min_budget_bytes``).

    Returns:
        a `torch.fx.GraphModule` called like the model (``gm(**batch)`` returns the model's
        output type): the captured call runs the planned graph, any other call the model takes
        (no labels, other inputs, ``no_grad``) runs the model's modules with the adapters, and
        ``gm.generate`` is the model's ``generate``. Trainable parameters: every ``lora_B`` and
        the ``modules_to_save``.
        ``gm.lorafa.adapters`` lists the adapters (module path, rank, scaling);
        ``gm.lorafa_plan`` is the `MemoryPlan` of a training step at the example batch's shape
        (AdamW; print it).
    """
    if state_of(model) is not None:
        raise AlreadyTransformedError(
            "This module was already transformed by lorafa_fx.transform; transform the original "
            "model instead (its weights are shared with the result)."
        )
    settings = resolve(with_budget(plan, budget), model)
    if not isinstance(example_inputs, Mapping):
        raise TypeError(
            f"example_inputs must be the keyword batch for model(**batch) (a dict such as "
            f"{{'input_ids': ..., 'labels': ...}}), got {type(example_inputs).__name__}."
        )
    check_example_inputs(model, example_inputs)
    return emit(CapturedModel(model, example_inputs, config or LoraFAConfig()), model, example_inputs, settings)


@overload
def estimate(
    model_or_config: ModelOrConfig, *, batch_size: int, seq_len: int, budget: int | str | None = None,
    config: LoraFAConfig | None = None, plan: PlanConfig | None = None, dtype: torch.dtype = torch.bfloat16,
    progress: Progress | None = None,
) -> MemoryPlan: ...


@overload
def estimate(
    model_or_config: ModelOrConfig, *, batch_size: int | Sequence[int], seq_len: int | Sequence[int],
    budget: int | str | None = None, config: LoraFAConfig | None = None, plan: PlanConfig | None = None,
    dtype: torch.dtype = torch.bfloat16, progress: Progress | None = None,
) -> list[MemoryPlan]: ...


def estimate(
    model_or_config: ModelOrConfig,
    *,
    batch_size: int | Sequence[int],
    seq_len: int | Sequence[int],
    budget: int | str | None = None,
    config: LoraFAConfig | None = None,
    plan: PlanConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    progress: Progress | None = None,
) -> MemoryPlan | list[MemoryPlan]:
    """Predict the memory of one LoRA-FA training step (AdamW) at ``(batch_size, seq_len)``,
    or at every shape of a sweep.

    A config is built into a model under `FakeTensorMode` (parameters have shapes and dtypes,
    no storage), captured and rewritten by the same pipeline as `transform`, and the cost model
    simulates one training step: a 7B config plans in about ten seconds on two CPU cores
    without allocating its weights. (`accelerate.init_empty_weights` is not used: HF Llama's
    masking code calls ``.item()`` during forward, which meta tensors refuse.)

    Args:
        model_or_config: a `transformers` config (the model is built with fake weights in
            `dtype`), a preset name ("llama-2-7b", see `lorafa_fx.presets`) or a config.json
            path (the same), or a model (its own weights and dtype are used).
        batch_size, seq_len: the training batch shape; labels are the input ids (causal LM)
            or a target sequence of ``seq_len`` (encoder-decoder). Lists sweep every
            combination (batch-major); the model is captured once, at the largest shape.
        budget: shorthand for ``plan=PlanConfig(budget=budget)``.
        config: the LoRA-FA config (default ``LoraFAConfig()``).
        plan: how to plan the step (`PlanConfig`), as for `transform`; with ``world_size``,
            `batch_size` and the budget are one rank's. ``device`` may name a card to plan for
            from here ("a100", "h100", "h200"): the plan then predicts the step's time on it.
        dtype: the weights' dtype when `model_or_config` is a config (``mixed_precision="bf16"``
            with fp32 weights is the usual mixed-precision setup).
        progress: called with a short line per stage (building, capturing, simulating or
            planning; in a sweep prefixed with the shape), e.g. to show a status line.

    Returns:
        the `MemoryPlan` of the shape when `batch_size` and `seq_len` are ints (a budget that
        cannot be met raises `InfeasibleBudgetError`); else one per shape, in sweep order,
        where a shape that cannot meet the budget gets its plan at the smallest budget that
        can be met and ``plan.fits`` False (so one such shape does not end the sweep).
    """
    model_or_config = _model_or_config(model_or_config)
    check_estimate_arguments(model_or_config, dtype, progress)
    batch_sizes, seq_lens = _sizes("batch_size", batch_size), _sizes("seq_len", seq_len)
    _check_seq_len(model_or_config, max(seq_lens))
    settings = _resolve(with_budget(plan, budget), model_or_config)
    progress = progress or _quiet
    captured, batch_of = _captured(
        model_or_config, max(batch_sizes), max(seq_lens), config or LoraFAConfig(), dtype, progress
    )
    if isinstance(batch_size, int) and isinstance(seq_len, int):
        return plan_and_emit(captured, batch_of(batch_size, seq_len), settings, progress).lorafa_plan
    shapes = list(itertools.product(batch_sizes, seq_lens))
    return [
        _sweep_row(captured, batch_of(b, s), settings, _prefixed(progress, f"batch {b} x seq {s} ({i} of {len(shapes)})"))
        for i, (b, s) in enumerate(shapes, 1)
    ]


def largest_batch_size(
    model_or_config: ModelOrConfig,
    *,
    seq_len: int,
    budget: int | str | None = None,
    config: LoraFAConfig | None = None,
    plan: PlanConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    progress: Progress | None = None,
) -> tuple[int, MemoryPlan]:
    """The largest batch size whose training step fits `budget` at `seq_len`, and its plan.

    A batch fits when the planner meets the budget for it (recomputing blocks, chunking the
    loss or lowering ranks as `config` allows, as `estimate` with a budget does). The search
    doubles the batch from 1 until one does not fit, then bisects between the last two, every
    probe a plan of the one capture. Arguments as for `estimate`; a budget is required.
    Raises `InfeasibleBudgetError` when even a batch of 1 does not fit.
    """
    plan = with_budget(plan, budget)
    if plan.budget is None:
        raise ConfigError(
            "largest_batch_size needs a budget: pass budget='40GB' (or bytes), or budget='auto' for the "
            "device's free memory."
        )
    model_or_config = _model_or_config(model_or_config)
    check_estimate_arguments(model_or_config, dtype, progress)
    _sizes("seq_len", seq_len, sweep=False)
    _check_seq_len(model_or_config, seq_len)
    settings = _resolve(plan, model_or_config)
    progress = progress or _quiet
    captured, batch_of = _captured(model_or_config, 1, seq_len, config or LoraFAConfig(), dtype, progress)
    plans: dict[int, MemoryPlan] = {}

    def plan_at(b: int) -> MemoryPlan:
        step = _prefixed(progress, f"batch {b} x seq {seq_len}")
        return plan_and_emit(captured, batch_of(b, seq_len), settings, step).lorafa_plan

    def fits(b: int) -> bool:
        try:
            plans[b] = plan_at(b)
        except InfeasibleBudgetError:
            return False
        return True

    try:
        plans[1] = plan_at(1)
    except InfeasibleBudgetError as e:
        raise InfeasibleBudgetError(
            e.min_budget_bytes, e.what_takes_memory, e.budget_bytes, shape=f"batch_size=1 at seq_len={seq_len}",
            fix="lower seq_len or the rank",
        ) from None
    hi = 2
    while fits(hi):
        hi *= 2
    lo = hi // 2  # lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, plans[lo]


def _model_or_config(model_or_config: object) -> nn.Module | PretrainedConfig:
    if isinstance(model_or_config, (str, os.PathLike)):
        model_or_config = load_config(str(model_or_config))
    if not isinstance(model_or_config, (PretrainedConfig, nn.Module)):
        raise ConfigError(
            f"model_or_config={type(model_or_config).__name__} is neither a transformers config, a model, a preset "
            f"name ({', '.join(PRESETS)}) nor a config.json path; for a dict, pass "
            "transformers.AutoConfig.for_model(**d)."
        )
    return model_or_config


def _sizes(name: str, value: object, sweep: bool = True) -> list[int]:
    """`value`, a positive int (or with `sweep`, a non-empty list of them), as a list."""
    values = list(value) if sweep and isinstance(value, (list, tuple, range)) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ConfigError(f"{name}={value!r} must be a positive int{', or a list of them to sweep' if sweep else ''}.")
    return values


def _check_seq_len(model_or_config: nn.Module | PretrainedConfig, seq_len: int) -> None:
    limit = position_limit(model_or_config)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"seq_len={seq_len} is above the model's position limit {limit} (max_position_embeddings): pass "
            f"seq_len <= {limit}, or a config with a larger max_position_embeddings."
        )


def _resolve(plan: PlanConfig, model_or_config: nn.Module | PretrainedConfig) -> PlanSettings:
    return resolve(plan, model_or_config if isinstance(model_or_config, nn.Module) else None)


def _captured(
    model_or_config: nn.Module | PretrainedConfig,
    batch_size: int,
    seq_len: int,
    config: LoraFAConfig,
    dtype: torch.dtype,
    progress: Progress,
) -> tuple[CapturedModel, BatchMaker]:
    """`model_or_config` captured at ``(batch_size, seq_len)`` and adapted (`CapturedModel`: its batch
    and sequence dims are dynamic, so it is planned at any shape), with the maker of the batches
    it is planned at."""
    if isinstance(model_or_config, PretrainedConfig):
        progress("building the model with fake weights")
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        shallow = shallow_config(model_or_config)
        with mode:
            model = model_from_config(model_or_config, dtype)
            shallow = model_from_config(shallow, dtype) if shallow is not None else None

        def batch_of(b: int, s: int) -> dict[str, torch.Tensor]:
            with mode:  # fake like the weights, in their mode: capture and the cost model mix them
                return token_batch(b, s)
    else:
        model, shallow = model_or_config, None
        batch_of = functools.partial(token_batch, device=next(model.parameters()).device)
    return CapturedModel(model, batch_of(batch_size, seq_len), config, progress, shallow), batch_of


def _sweep_row(
    captured: CapturedModel, batch: Mapping[str, object], settings: PlanSettings, progress: Progress
) -> MemoryPlan:
    try:
        return plan_and_emit(captured, batch, settings, progress).lorafa_plan
    except InfeasibleBudgetError as e:
        with warnings.catch_warnings():
            # This plan does not fit anyway: its chunked loss is no advice to the user.
            warnings.simplefilter("ignore")
            smallest = plan_and_emit(captured, batch, dataclasses.replace(settings, budget_bytes=e.min_budget_bytes), progress)
        return dataclasses.replace(smallest.lorafa_plan, budget_bytes=settings.budget_bytes)


def _prefixed(progress: Progress, prefix: str) -> Progress:
    return lambda stage: progress(f"{prefix}: {stage}")


def _quiet(stage: str) -> None:
    return None


def model_from_config(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The causal LM (or encoder-decoder) `config` describes, in `dtype`, built in the
    caller's mode (under `FakeTensorMode`: fake weights)."""
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return cls.from_config(config, dtype=dtype)


def token_batch(batch_size: int, seq_len: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The batch `estimate` plans for: zero ids, an all-ones mask, labels = ids."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
