"""The public entry points: `transform` (a model to a LoRA-FA GraphModule that trains) and
`estimate` (the memory plan of a model, possibly too big for this machine, from its config).

Both check their arguments, gather the planning settings into one `PlanSettings`, and hand
over to the pipeline (`pipeline.py`), which does the same for one process and for one rank.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig

from .capture import position_limit
from .config import LoraFAConfig, PlanSettings
from .errors import AlreadyTransformedError, ConfigError
from .hf_compat import attach_hf_attributes
from .memory.report import MemoryPlan
from .pipeline import Adaptable, plan_and_emit
from .presets import PRESETS, load_config


def transform(
    model: nn.Module,
    budget: int | str | None = None,
    *,
    example_inputs: Mapping[str, torch.Tensor],
    config: LoraFAConfig | None = None,
    world_size: int | None = None,
    sharding: str = "full",
    mixed_precision: str | None = None,
) -> fx.GraphModule:
    """Capture `model` and return a GraphModule that trains it with LoRA-FA.

    Args:
        model: a Hugging Face (or any `torch.export`-able) model. Its base weights are shared
            with the result, not copied, and frozen in place (as PEFT does).
        budget: memory budget of one training step (AdamW) at the example batch's shape: bytes
            as an int, or a string with accelerate's units ("40GB" = 40e9, "40GiB" = 40*2^30).
            The planner recomputes the fewest blocks in backward that make the predicted peak
            fit (first lowering ranks and chunking the loss where ``config`` allows it);
            `InfeasibleBudgetError` (with ``min_budget_bytes``) if nothing does.
        example_inputs: one keyword batch, as passed to ``model(**batch)``. Batch and sequence
            dims are captured as dynamic, so other shapes work too.
        config: what to adapt; defaults to ``LoraFAConfig()`` (all linears, r=8).
        world_size: plan one rank of a data-parallel job of this many processes
            (`example_inputs` is then one rank's batch); train the result with
            ``lorafa_fx.distributed.prepare(gm)`` inside the job (``torchrun``).
        sharding: with `world_size`: ``"full"`` (FSDP2, every parameter sharded 1/world_size,
            each decoder layer emitted as a called submodule owning its parameters) or
            ``"none"`` (DDP, replicated).
        mixed_precision: the precision training will run in, accelerate's names: ``"bf16"``,
            ``"fp16"`` (forward under autocast, as ``Trainer(bf16=True)`` and
            ``Accelerator(mixed_precision=...)`` run it) or ``"no"``. Default: the autocast in
            force when `transform` is called, else ``"no"``. The plan simulates the step so.
            The module itself follows whatever autocast it runs under.

    Returns:
        a `torch.fx.GraphModule` called like the model (``gm(**batch)`` returns the model's
        output type). Trainable parameters: every ``lora_B`` and the ``modules_to_save``.
        ``gm.lorafa_adapters`` lists the adapters (module path, rank, scaling);
        ``gm.lorafa_plan`` is the `MemoryPlan` of a training step at the example batch's shape
        (AdamW; print it).
    """
    if hasattr(model, "lorafa_adapters"):
        raise AlreadyTransformedError(
            "This module was already transformed by lorafa_fx.transform; transform the original "
            "model instead (its weights are shared with the result)."
        )
    settings = PlanSettings.from_arguments(budget, world_size, sharding, mixed_precision)
    if not isinstance(example_inputs, Mapping):
        raise TypeError(
            f"example_inputs must be the keyword batch for model(**batch) (a dict such as "
            f"{{'input_ids': ..., 'labels': ...}}), got {type(example_inputs).__name__}."
        )
    gm = plan_and_emit(Adaptable(model, example_inputs, config or LoraFAConfig()), example_inputs, settings)
    gm.train(model.training)
    attach_hf_attributes(gm, model)
    return gm


def estimate(
    model_or_config: nn.Module | PretrainedConfig,
    *,
    batch_size: int,
    seq_len: int,
    config: LoraFAConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    budget: int | str | None = None,
    world_size: int | None = None,
    sharding: str = "full",
    mixed_precision: str | None = None,
) -> MemoryPlan:
    """Predict the memory of one LoRA-FA training step (AdamW) at ``(batch_size, seq_len)``.

    A config is built into a model under `FakeTensorMode` (parameters have shapes and dtypes,
    no storage), captured and rewritten by the same pipeline as `transform`, and the cost model
    simulates one training step: a 7B config plans in well under a minute on two CPU cores
    without allocating its weights. (`accelerate.init_empty_weights` is not used: HF Llama's
    masking code calls ``.item()`` during forward, which meta tensors refuse.)

    Args:
        model_or_config: a `transformers` config (the model is built with fake weights in
            `dtype`), a preset name ("llama-2-7b", see `lorafa_fx.presets`) or a config.json
            path (the same), or a model (its own weights and dtype are used).
        batch_size, seq_len: the training batch shape; labels are the input ids (causal LM)
            or a target sequence of ``seq_len`` (encoder-decoder).
        config: the LoRA-FA config (default ``LoraFAConfig()``).
        budget: plan recomputation under this budget, as `transform` does.
        world_size, sharding: plan one rank of a data-parallel job, as `transform` does
            (``batch_size`` is then per rank; `budget` is per rank).
        mixed_precision: as for `transform`; with a config, `dtype` is the weights' dtype and
            ``"bf16"``/``"fp16"`` the autocast of the step (fp32 weights + "bf16" is the usual
            mixed-precision setup).
    """
    settings = PlanSettings.from_arguments(budget, world_size, sharding, mixed_precision)
    if isinstance(model_or_config, (str, os.PathLike)):
        model_or_config = load_config(str(model_or_config))
    if not isinstance(model_or_config, (PretrainedConfig, nn.Module)):
        raise ConfigError(
            f"model_or_config={type(model_or_config).__name__} is neither a transformers config, a model, a preset "
            f"name ({', '.join(PRESETS)}) nor a config.json path; for a dict, pass "
            "transformers.AutoConfig.for_model(**d)."
        )
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive int.")
    limit = position_limit(model_or_config)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"seq_len={seq_len} is above the model's position limit {limit} (max_position_embeddings): pass "
            f"seq_len <= {limit}, or a config with a larger max_position_embeddings."
        )
    if isinstance(model_or_config, PretrainedConfig):
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = model_from_config(model_or_config, dtype)
            batch = token_batch(batch_size, seq_len)
    else:
        model = model_or_config
        batch = token_batch(batch_size, seq_len, next(model.parameters()).device)
    # Dynamic dims: capturing at the target shape serves it, and the step is simulated once.
    return plan_and_emit(Adaptable(model, batch, config or LoraFAConfig()), batch, settings).lorafa_plan


def model_from_config(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The causal LM (or encoder-decoder) `config` describes, in `dtype`, built in the
    caller's mode (under `FakeTensorMode`: fake weights)."""
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return cls.from_config(config, dtype=dtype)


def token_batch(batch_size: int, seq_len: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The batch `estimate` plans for: zero ids, an all-ones mask, labels = ids."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
