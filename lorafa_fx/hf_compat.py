"""What Hugging Face `Trainer` and `accelerate` read from a model, given to the GraphModule.

`attach_hf_attributes(gm, model)` runs at the end of `transform`. What it sets and who reads it
(transformers 5.x ``Trainer``, accelerate 1.x ``Accelerator.prepare_model``):

- ``forward``'s signature: already the batch's keyword names (export keeps them), so
  ``Trainer``'s column removal and label-name discovery (``find_labels``) work unchanged; a
  ``copy.deepcopy(gm)`` generates its code at once so that its signature is the same (a lazy
  GraphModule's is ``(*args, **kwargs)`` until its first call, and ``Trainer`` would then drop
  every column).
- ``config``, ``name_or_path``, ``main_input_name``, ``loss_type``, ``generation_config``: the
  model's; ``Trainer`` sets ``config.use_cache``, counts tokens by ``main_input_name``;
  `save_adapter` records ``name_or_path``; TRL's ``SFTTrainer`` writes the tokenizer's eos/pad
  ids into ``generation_config``.
- ``add_model_tags(tags)``: records them in ``model_tags``, as ``PreTrainedModel`` does
  (``SFTTrainer`` tags the model it trains).
- ``base_model`` and ``get_output_embeddings()`` (causal LMs, `backbone.py`): the graph up to the
  last hidden state and the output projection's weight/bias, which TRL's ``SFTTrainer`` fused
  LM head calls in place of the model's head and loss. ``base_model`` is kept out of ``gm``'s
  submodules, so ``state_dict()`` and ``modules()`` are unchanged.
- ``accepts_loss_kwargs = False``: the captured forward takes no ``num_items_in_batch``, so
  ``Trainer`` divides each micro-batch loss by the accumulation steps itself.
- ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` / ``quantization_method`` / ``hf_device_map``:
  the model's, so ``Trainer`` and ``accelerate`` neither ``.to()`` nor ``DataParallel`` a
  bitsandbytes model. ``is_quantized`` / ``hf_quantizer`` are not copied: ``Trainer`` refuses
  those unless the model is a PEFT model, and ``gm`` has trainable adapters.
- ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable``: raise
  `LoraFAError` (the captured graph decides what is saved for backward);
  ``is_activation_checkpointing = False``, ``supports_gradient_checkpointing = False``.
- ``forward`` for every call, ``generate`` and ``can_generate()`` (the model's): `calls.py`
  (the captured call runs the graph, any other the model on ``gm``'s tensors and adapters);
  ``_keys_to_ignore_on_save = None`` (``Trainer`` reads it after loading).
- ``save_pretrained(dir)``: `save_adapter`, PEFT's format.
- ``state_dict()`` holds what training changes — every ``lora_A``, ``lora_B`` and
  ``modules_to_save`` parameter — not the frozen base weights, which stay the model's (as in
  PEFT checkpoints). ``Trainer`` checkpoints ``gm.state_dict()`` when the model is not a
  ``PreTrainedModel``; a full state dict would copy the base model into every checkpoint and
  fails on tied weights (GPT-2's ``lm_head``/``wte``). ``load_state_dict`` accepts such a dict
  with ``strict=True``: frozen base weights are not reported missing.
"""

from __future__ import annotations

import os
import types

import torch.fx as fx
import torch.nn as nn

from .backbone import causal_lm_backbone
from .calls import attach_calls
from .errors import LoraFAError
from .graph import set_attributes
from .peft_files import adapter_tensors, save_adapter

#: Attributes copied from the model when it has them.
_MIRRORED = (
    "config", "name_or_path", "main_input_name", "loss_type", "generation_config",
    "is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method", "hf_device_map",
)


def attach_hf_attributes(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give `gm` (from `transform`, with its `state.LoraFAState` set) what ``Trainer`` needs of `model`.
    Everything set here survives ``copy.deepcopy(gm)``."""
    set_attributes(
        gm,
        **{name: getattr(model, name) for name in _MIRRORED if getattr(model, name, None) is not None},
        accepts_loss_kwargs=False,
        is_activation_checkpointing=False,
        is_gradient_checkpointing=False,
        supports_gradient_checkpointing=False,
        activation_checkpointing_enable=_no_activation_checkpointing,
        gradient_checkpointing_enable=_no_activation_checkpointing,
        _keys_to_ignore_on_save=None,
        save_pretrained=types.MethodType(_save_pretrained, gm),
        model_tags=list(getattr(model, "model_tags", None) or []),
        add_model_tags=types.MethodType(_add_model_tags, gm),
    )
    backbone = causal_lm_backbone(gm, model)
    if backbone is not None:
        gm.meta[_BACKBONE] = backbone
        _attach_backbone(gm)
        # GraphModule's deepcopy copies meta (the backbone, re-rooted at the copy) but rebuilds the module.
        gm._register_deepcopy_hook(_attach_backbone)

    attach_calls(gm, model)  # its deepcopy hook generates a copy's code at once (see the module docstring)
    trained = frozenset(adapter_tensors(gm))
    gm.register_state_dict_post_hook(_TrainedOnly(trained))
    gm.register_load_state_dict_post_hook(_ForgiveFrozen(trained))


_BACKBONE = "lorafa_backbone"


def _attach_backbone(gm: fx.GraphModule) -> None:
    backbone = gm.meta[_BACKBONE]
    # Not through nn.Module.__setattr__: as gm's child (gm being the backbone's root) it would add its keys to
    # gm.state_dict() and make the module tree a cycle.
    object.__setattr__(gm, "base_model", backbone)
    gm.get_output_embeddings = backbone.output_embeddings


def _no_activation_checkpointing(*args, **kwargs) -> None:
    raise LoraFAError(
        "Activation checkpointing cannot be switched on a lorafa_fx GraphModule: the captured graph decides "
        "what a step saves for backward (LoRA-FA keeps only x A^T per adapter). Set "
        "TrainingArguments(activation_checkpointing=False) and pass a memory budget instead: "
        "lorafa_fx.transform(model, budget='40GB', ...) recomputes the fewest blocks that fit it."
    )


def _save_pretrained(gm: fx.GraphModule, save_directory: str | os.PathLike, *, is_main_process: bool = True,
                     **kwargs) -> None:
    """``gm.save_pretrained(dir)``: the adapter, in PEFT's format (``Trainer``'s keywords accepted)."""
    if is_main_process:
        save_adapter(gm, save_directory)


def _add_model_tags(gm: fx.GraphModule, tags: list[str] | str) -> None:
    for tag in [tags] if isinstance(tags, str) else tags:
        if tag not in gm.model_tags:
            gm.model_tags.append(tag)


class _TrainedOnly:
    def __init__(self, trained: frozenset[str]) -> None:
        self.trained = trained

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        for key in list(state_dict):
            if key.removeprefix(prefix) not in self.trained:
                del state_dict[key]


class _ForgiveFrozen:
    def __init__(self, trained: frozenset[str]) -> None:
        self.trained = trained

    def __call__(self, module: nn.Module, incompatible_keys) -> None:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if any(k == t or k.endswith(f".{t}") for t in self.trained)]
