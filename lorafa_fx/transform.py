"""`transform`: the pipeline, from a Hugging Face model to a LoRA-FA GraphModule.

capture (`capture.py`) -> gate_dropout -> simplify_attention -> rewrite_lora_fa ->
annotate_saved_tensors -> estimate_memory (the cost model) -> emit (this file: freeze,
attach the adapter table and the `MemoryPlan`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import capture
from .config import LoraFAConfig
from .errors import AlreadyTransformedError
from .passes.annotate_saved_tensors import AnnotateSavedTensors
from .passes.estimate_memory import EstimateMemory
from .passes.gate_dropout import GateDropout
from .passes.rewrite_lora_fa import RewriteLoraFA, linear_nodes
from .passes.simplify_attention import SimplifyAttention
from .plan import MemoryPlan
from .targets import Adapter, select_adapters, select_modules_to_save


def transform(
    model: nn.Module,
    budget: int | str | None = None,
    *,
    example_inputs: Mapping[str, torch.Tensor],
    config: LoraFAConfig | None = None,
) -> fx.GraphModule:
    """Capture `model` and return a GraphModule that trains it with LoRA-FA.

    Args:
        model: a Hugging Face (or any `torch.export`-able) model. Its base weights are shared
            with the result, not copied, and frozen in place (as PEFT does).
        budget: memory budget of a training step; budget planning is not implemented yet,
            so only ``None`` is accepted.
        example_inputs: one keyword batch, as passed to ``model(**batch)``. Batch and sequence
            dims are captured as dynamic, so other shapes work too.
        config: what to adapt; defaults to ``LoraFAConfig()`` (all linears, r=8).

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
    if budget is not None:
        raise NotImplementedError("budget planning is not implemented yet; pass budget=None.")
    if not isinstance(example_inputs, Mapping):
        raise TypeError(
            f"example_inputs must be the keyword batch for model(**batch) (a dict such as "
            f"{{'input_ids': ..., 'labels': ...}}), got {type(example_inputs).__name__}."
        )
    gm = build(model, example_inputs, config or LoraFAConfig())
    gm.lorafa_plan = plan_step(gm, example_inputs)
    gm.train(model.training)
    return gm


def build(model: nn.Module, example_inputs: Mapping[str, torch.Tensor], config: LoraFAConfig) -> fx.GraphModule:
    """Capture `model` and run the rewrite passes; `transform` without the memory plan."""
    adapters = select_adapters(model, config)
    saved_modules = select_modules_to_save(model, config)
    gm = capture(model, example_inputs)
    adapters = _drop_unused(adapters, linear_nodes(gm))
    causal = frozenset(path for path, m in model.named_modules() if getattr(m, "is_causal", False) is True)
    for p in (GateDropout(), SimplifyAttention(causal), RewriteLoraFA(adapters, config), AnnotateSavedTensors()):
        gm = p(gm).graph_module
    _set_trainable(gm, adapters, saved_modules)
    gm.lorafa_config = config
    gm.lorafa_adapters = tuple(adapters)
    return gm


def plan_step(gm: fx.GraphModule, batch: Mapping[str, object], budget_bytes: int | None = None) -> MemoryPlan:
    """Run the cost model on `gm` for a training step (train mode) at `batch`'s shapes."""
    training = gm.training
    gm.train()
    try:
        cost = EstimateMemory(batch)
        cost(gm)
    finally:
        gm.train(training)
    return MemoryPlan.from_estimate(gm, cost.estimate, batch, budget_bytes)


def _drop_unused(adapters: list[Adapter], linears: Mapping[str, list[fx.Node]]) -> list[Adapter]:
    unused = [a.path for a in adapters if a.path not in linears]
    if unused:
        warnings.warn(
            f"{len(unused)} targeted modules are not called in the model's forward and get no adapter: "
            f"{', '.join(unused)}.",
            stacklevel=3,
        )
    return [a for a in adapters if a.path in linears]


def _set_trainable(gm: fx.GraphModule, adapters: list[Adapter], saved_modules: list[str]) -> None:
    for p in gm.parameters():
        p.requires_grad_(False)
    for a in adapters:
        gm.get_parameter(f"{a.path}.lora_B.weight").requires_grad_(True)
    # modules_to_save train a copy, as PEFT's ModulesToSaveWrapper does, so the user's model
    # keeps its original head.
    for path in saved_modules:
        module = gm.get_submodule(path)
        for name, p in list(module.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, nn.Parameter(p.detach().clone()))
