"""`estimate`: the memory plan of a model too big for this machine, from its config alone.

The model is built under `FakeTensorMode` (parameters have shapes and dtypes, no storage),
captured and rewritten by the same pipeline as `transform`, and the cost model simulates one
training step at ``(batch_size, seq_len)``. A 7B config plans in well under a minute on two
CPU cores without allocating its weights.

`accelerate.init_empty_weights` (meta tensors) is not used: HF Llama's masking code calls
``.item()`` during forward, which meta tensors refuse and fake tensors allow.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig

from .config import LoraFAConfig
from .plan import MemoryPlan
from .transform import Captured, parse_budget, plan_and_realise


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
) -> MemoryPlan:
    """Predict the memory of one LoRA-FA training step (AdamW) at ``(batch_size, seq_len)``.

    Args:
        model_or_config: a `transformers` config (the model is built with fake weights in
            `dtype`) or a model (its own weights and dtype are used).
        batch_size, seq_len: the training batch shape; labels are the input ids (causal LM)
            or a target sequence of ``seq_len`` (encoder-decoder).
        config: the LoRA-FA config (default ``LoraFAConfig()``).
        budget: plan recomputation under this budget, as `transform` does.
        world_size, sharding: plan one rank of a data-parallel job, as `transform` does
            (``batch_size`` is then per rank; `budget` is per rank).
    """
    if isinstance(model_or_config, PretrainedConfig):
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = _model_class(model_or_config).from_config(model_or_config, dtype=dtype)
            batch = _batch(batch_size, seq_len)
    else:
        model = model_or_config
        batch = _batch(batch_size, seq_len, next(model.parameters()).device)
    # Dynamic dims: capturing at the target shape serves it, and the step is simulated once.
    variants = Captured(model, batch, config or LoraFAConfig())
    if world_size is not None:
        from .distributed import plan_and_realise_distributed

        return plan_and_realise_distributed(variants, batch, parse_budget(budget), world_size, sharding).lorafa_plan
    return plan_and_realise(variants, batch, parse_budget(budget)).lorafa_plan


def _model_class(config: PretrainedConfig) -> type:
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _batch(batch_size: int, seq_len: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
