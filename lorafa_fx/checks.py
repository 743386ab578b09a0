"""Checks of the public entry points' arguments that the pipeline would otherwise meet deep
inside torch (an ``AttributeError`` for ``dtype="bf16"``, an ``IndexError`` in the model's
masking code for a 1-D batch, ``.item()`` on a meta tensor): each raises the library's error
naming the argument, the value and the fix. `api.py` calls them before it builds anything.

A leaf module: it imports only leaves.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from .errors import ConfigError, ExampleInputsError

#: Inputs of one token per position: shaped (batch, seq), or (batch, seq, hidden) for embeddings.
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
                "decoder_input_ids", "decoder_attention_mask")


def check_example_inputs(model: nn.Module, example_inputs: Mapping[str, object]) -> None:
    """`transform`'s model and batch: real weights, and a batch of tensors shaped (batch, seq)."""
    check_real_weights(model, "lorafa_fx.transform needs the model's weights: load them (from_pretrained, or "
                              "to_empty() and load_state_dict) before transforming")
    for key, value in example_inputs.items():
        if isinstance(value, (list, tuple)) or type(value).__module__ == "numpy":
            raise ExampleInputsError(
                f"example_inputs[{key!r}] is a {type(value).__name__}, not a tensor: pass torch.tensor(...) of it "
                "(a collator's return_tensors='pt' gives tensors)."
            )
        if not isinstance(value, torch.Tensor):
            continue
        if value.is_meta:
            raise ExampleInputsError(
                f"example_inputs[{key!r}] is on the meta device (shape {tuple(value.shape)}, no data): capture runs "
                "the model on it; pass a real batch on the model's device."
            )
        if key in TOKEN_INPUTS and value.dim() < 2:
            raise ExampleInputsError(
                f"example_inputs[{key!r}] has shape {tuple(value.shape)}; a batch is (batch, seq): add the batch "
                f"dim, e.g. {key}.unsqueeze(0) for one sequence."
            )
        if key in TOKEN_INPUTS and 0 in value.shape:
            raise ExampleInputsError(
                f"example_inputs[{key!r}] has shape {tuple(value.shape)}, with no rows or no tokens: pass a batch "
                "of at least one sequence of at least one token."
            )


def check_estimate_arguments(model_or_config: object, dtype: object, progress: object) -> None:
    """`estimate`'s and `largest_batch_size`'s `dtype` and `progress`, and a model's weights."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(
            f"dtype={dtype!r} must be a floating torch dtype, the weights' dtype: torch.bfloat16, torch.float16 "
            "or torch.float32 (the command line's --dtype bf16 is torch.bfloat16)."
        )
    if progress is not None and not callable(progress):
        raise ConfigError(
            f"progress={progress!r} must be a callable taking one line of text per stage (e.g. print), or None."
        )
    if isinstance(model_or_config, nn.Module):
        check_real_weights(model_or_config, "a model's own weights are what estimate plans with; to plan "
                                            "without weights pass its config: lorafa_fx.estimate(model.config, ...)")
    else:
        check_model_config(model_or_config, type(model_or_config).__name__)


def check_real_weights(model: nn.Module, fix: str) -> None:
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ConfigError(f"{type(model).__name__}'s weights are on the meta device ({meta!r} has no data): {fix}.")


#: Config fields that are counts or sizes, in the spellings of the architectures transformers has.
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "head_dim", "n_embd", "n_layer", "n_head", "n_positions",
               "n_inner", "d_model", "d_ff", "d_kv", "num_layers", "num_decoder_layers", "num_heads",
               "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size")
#: The most layers a config may have. Planning time grows with depth (about 0.08 s a layer on two
#: CPU cores: 1000 layers take 83 s, so 32000 would take 45 minutes); the deepest released decoders
#: have about 130 (Llama-3.1-405B: 126).
MAX_LAYERS = 1024


def check_model_config(config: object, source: str) -> None:
    """A transformers config's sizes: positive ints (where set), heads that divide, a depth
    planning can reach (`MAX_LAYERS`); `ConfigError` naming `source`, the field and the value."""
    for name in SIZE_FIELDS:
        value = getattr(config, name, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{source}: {name}={value!r} must be a positive integer (a size or a count); "
                              "correct it in the config.")
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads} "
                          "(each key/value head serves a group of query heads); correct one of them in the config.")
    layers = max((getattr(config, name, None) or 0 for name in ("num_hidden_layers", "n_layer", "num_layers",
                                                                 "num_decoder_layers")), default=0)
    if layers > MAX_LAYERS:
        raise ConfigError(f"{source}: {layers} layers is more than the {MAX_LAYERS} lorafa_fx plans (planning "
                          f"time grows with depth, about 0.08 s a layer on two CPU cores); plan at most {MAX_LAYERS}.")
