"""Fold a trained adapter into the base model: ``W + scaling * B A``, like PEFT's
``merge_and_unload``; the result is a plain Hugging Face model."""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .errors import LoraFAError
from .peft_files import check_transformed, saved_module_params
from .targets import Adapter, tied_weights


@torch.no_grad()
def merge(gm: fx.GraphModule, model: nn.Module) -> nn.Module:
    """Fold `gm`'s adapters into `model`'s weights; return `model`, a plain Hugging Face model.

    Each adapted weight becomes ``W + scaling * B @ A`` (transposed for GPT-2's ``Conv1D``,
    which stores ``W`` as ``(in, out)``; per expert ``W_e + scaling * B_e @ A_e`` for an MoE's
    experts), computed in float32 and cast to ``W``'s dtype;
    ``modules_to_save`` parameters are copied from `gm`. `model` has no ``lora_`` parameters
    and works with ``save_pretrained`` and ``generate``.

    An adapted weight tied to another module's (``lm_head`` and the input embedding under
    ``tie_word_embeddings``) is untied first: the adapted module gets its own copy, the other
    keeps the base weight, ``model.config.tie_word_embeddings`` becomes False, and a warning
    says so. (PEFT adds the delta into the shared weight, changing the embedding too.)

    `model` is changed in place, as PEFT's ``merge_and_unload`` does (no second copy of the
    weights is made). Usually it is the model `gm` was made from, whose weights `gm` shares:
    then every ``lora_B`` of `gm` is zeroed as well, so `gm` keeps computing what the merged
    model computes (instead of adding its adapter twice) and could train on from the merged
    weights. Call `save_adapter` before `merge` to keep the adapter. `model` may also be another
    instance of the architecture, e.g. a float copy of a model `gm` trained quantised; `gm` is
    then left unchanged.
    """
    check_transformed(gm)
    problems, shared = [], []
    for a in gm.lorafa.adapters:
        name = a.path if a.parameter is None else a.weight
        try:
            module = model.get_submodule(a.module)
            w = model.get_parameter(a.weight)
        except AttributeError:
            problems.append(f"{name}: no such {'module' if a.parameter is None else 'parameter'} in "
                            f"{type(model).__name__}")
            continue
        expected = _shape(a, module)
        if not w.dtype.is_floating_point or tuple(w.shape) != expected:
            problems.append(
                f"{name}: weight {tuple(w.shape)} {w.dtype}, expected a float weight of shape {expected} "
                "(a quantised weight cannot hold the merged sum: merge into a float copy of the base model)"
            )
    if problems:
        raise LoraFAError("merge: cannot merge into this model:\n  " + "\n  ".join(problems))

    untied = tied_weights(model, [a.module for a in gm.lorafa.adapters if a.parameter is None])
    for path in untied:
        module = model.get_submodule(path)
        module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=module.weight.requires_grad)
    if untied and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # or from_pretrained would tie the saved model again
    for a in gm.lorafa.adapters:
        module, w = model.get_submodule(a.module), model.get_parameter(a.weight)
        lora_A = gm.get_parameter(f"{a.path}.lora_A.weight").float()
        lora_B = gm.get_parameter(f"{a.path}.lora_B.weight").float()
        w.add_(adapter_delta(a, module, lora_A, lora_B).to(device=w.device, dtype=w.dtype))
        if _shares(gm, a.weight, w):
            shared.append(gm.get_parameter(f"{a.path}.lora_B.weight"))
    for name, p in saved_module_params(gm).items():
        target = model.get_parameter(name)
        if target is not p:
            target.copy_(p)
    for lora_B in shared:
        lora_B.zero_()
    if untied:
        warnings.warn(
            "merge untied " + ", ".join(f"{path} from {others[0]}" for path, others in untied.items())
            + ": each adapted weight that was tied now has its own copy with the adapter added (the modules tied to "
            "it keep the base weight), so the merged model computes what the trained module does; "
            "config.tie_word_embeddings is now False. The saved model holds both weights.",
            stacklevel=2,
        )
    return model


def adapter_delta(a: Adapter, module: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """``scaling * B @ A`` in the layout of `module`'s adapted weight: per expert e
    ``scaling * B_e @ A_e`` with ``A_e = lora_A.view(E, r, in)[e]`` and
    ``B_e = lora_B.view(out, r, E)[:, :, e]`` (PEFT's ParamWrapper layout; E = 1 for a linear),
    transposed where the weight is stored ``(in, out)``."""
    experts = a.num_experts
    lora_A = lora_A.view(experts, a.r, a.in_features)
    lora_B = lora_B.view(a.out_features, a.r, experts).permute(2, 0, 1)
    delta = (lora_B @ lora_A) * a.scaling
    if _stored_in_out(a, module):
        delta = delta.transpose(-2, -1)
    return delta.reshape(_shape(a, module))


def _stored_in_out(a: Adapter, module: nn.Module) -> bool:
    """Whether the weight is stored ``(in, out)``: GPT-2's ``Conv1D``, experts that ``is_transposed``."""
    if a.num_experts > 1:
        return bool(getattr(module, "is_transposed", False))
    return isinstance(module, Conv1D)


def _shape(a: Adapter, module: nn.Module) -> tuple[int, ...]:
    shape = (a.in_features, a.out_features) if _stored_in_out(a, module) else (a.out_features, a.in_features)
    return (a.num_experts, *shape) if a.num_experts > 1 else shape


def _shares(gm: fx.GraphModule, name: str, weight: torch.Tensor) -> bool:
    try:
        return gm.get_parameter(name) is weight
    except AttributeError:
        return False
