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
from .targets import tied_weights


@torch.no_grad()
def merge(gm: fx.GraphModule, model: nn.Module) -> nn.Module:
    """Fold `gm`'s adapters into `model`'s weights; return `model`, a plain Hugging Face model.

    Each adapted weight becomes ``W + scaling * B @ A`` (transposed for GPT-2's ``Conv1D``,
    which stores ``W`` as ``(in, out)``), computed in float32 and cast to ``W``'s dtype;
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
    for a in gm.lorafa_adapters:
        try:
            module = model.get_submodule(a.path)
        except AttributeError:
            problems.append(f"{a.path}: no such module in {type(model).__name__}")
            continue
        w = module.weight
        expected = (a.in_features, a.out_features) if isinstance(module, Conv1D) else (a.out_features, a.in_features)
        if not w.dtype.is_floating_point or tuple(w.shape) != expected:
            problems.append(
                f"{a.path}: weight {tuple(w.shape)} {w.dtype}, expected a float weight of shape {expected} "
                "(a quantised weight cannot hold the merged sum: merge into a float copy of the base model)"
            )
    if problems:
        raise LoraFAError("merge: cannot merge into this model:\n  " + "\n  ".join(problems))

    untied = tied_weights(model, [a.path for a in gm.lorafa_adapters])
    for path in untied:
        module = model.get_submodule(path)
        module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=module.weight.requires_grad)
    if untied and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # or from_pretrained would tie the saved model again
    for a in gm.lorafa_adapters:
        module = model.get_submodule(a.path)
        lora_A = gm.get_parameter(f"{a.path}.lora_A.weight")
        lora_B = gm.get_parameter(f"{a.path}.lora_B.weight")
        delta = (lora_B.float() @ lora_A.float()) * a.scaling
        if isinstance(module, Conv1D):
            delta = delta.T
        module.weight.add_(delta.to(device=module.weight.device, dtype=module.weight.dtype))
        if _shares(gm, f"{a.path}.weight", module.weight):
            shared.append(lora_B)
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


def _shares(gm: fx.GraphModule, name: str, weight: torch.Tensor) -> bool:
    try:
        return gm.get_parameter(name) is weight
    except AttributeError:
        return False
