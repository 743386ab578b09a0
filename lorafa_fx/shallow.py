"""The shallow capture: plan a deep model from a capture of a few of its layers.

`torch.export` time grows with depth, and every layer of a transformer stack is the same graph.
`estimate` therefore builds, beside the model from its config, the same model with
`SHALLOW_LAYERS` layers per stack (`shallow_config`); the captured-model object captures that one
when the deep model's extra layers repeat the shallow model's last one (same modules, parameters,
adapters and modules to save: `repeated_stacks`), and `passes/expand_layers.py` grows the adapted
graph back to the deep model's depth. Adapters and paths of the deep model map to the shallow
one by `shallow_path`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

import torch.nn as nn
from transformers import PretrainedConfig

from .config import LoraFAConfig
from .targets import select_adapters, select_modules_to_save

#: Layers per stack of the shallow model: the last is copied, reading its outputs as it read the
#: one before (when the two are the same graph, `expand_layers.repeats_cleanly`).
SHALLOW_LAYERS = 2


def shallow_config(config: PretrainedConfig) -> PretrainedConfig | None:
    """`config` with `SHALLOW_LAYERS` layers, for a decoder with more whose config holds
    nothing that differs per layer; else None (capture the deep model)."""
    layers = getattr(config, "num_hidden_layers", None)
    if getattr(config, "is_encoder_decoder", False) or not isinstance(layers, int) or layers <= SHALLOW_LAYERS:
        return None
    per_layer = {k: v for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) == layers}
    if any(len({repr(x) for x in v}) > 1 for v in per_layer.values()):
        return None
    shallow = copy.deepcopy(config)
    shallow.num_hidden_layers = SHALLOW_LAYERS
    for k, v in per_layer.items():
        setattr(shallow, k, type(v)(v[:SHALLOW_LAYERS]))
    return shallow


def repeated_stacks(shallow: nn.Module, model: nn.Module, config: LoraFAConfig) -> dict[str, int]:
    """``{stack: depth}`` of `model`'s layer stacks that `shallow` has `SHALLOW_LAYERS` of, if
    every extra layer repeats `shallow`'s last one (modules, parameters, adapters, modules to
    save); else ``{}``."""
    depths = {}
    for path, stack in model.named_modules():
        if isinstance(stack, nn.ModuleList):
            short = _submodule(shallow, path)
            if not isinstance(short, nn.ModuleList):
                return {}
            if len(short) < len(stack):
                if len(short) != SHALLOW_LAYERS:
                    return {}
                depths[path] = len(stack)
    last = {path: _layout(shallow.get_submodule(f"{path}.{SHALLOW_LAYERS - 1}")) for path in depths}
    if any(_layout(model.get_submodule(f"{path}.{i}")) != last[path]
           for path, depth in depths.items() for i in range(SHALLOW_LAYERS - 1, depth)):
        return {}
    short = {a.path: a for a in select_adapters(shallow, config)}
    deep = [dataclasses.replace(a, path=shallow_path(a.path, depths)) for a in select_adapters(model, config)]
    if not depths or {a.path for a in deep} != set(short) or any(a != short[a.path] for a in deep):
        return {}
    modules = {shallow_path(m, depths) for m in select_modules_to_save(model, config)}
    return depths if modules == set(select_modules_to_save(shallow, config)) else {}


def shallow_path(path: str, depths: Mapping[str, int]) -> str:
    """Where `path` of the deep model is in the shallow one: a layer past the shallow stack's
    last is that last layer (the one `ExpandLayers` copies)."""
    for stack in depths:
        if path.startswith(stack + "."):
            index, _, rest = path[len(stack) + 1 :].partition(".")
            if index.isdigit() and int(index) >= SHALLOW_LAYERS:
                return f"{stack}.{SHALLOW_LAYERS - 1}" + (f".{rest}" if rest else "")
    return path


def depth_note(depths: Mapping[str, int]) -> str:
    return ", ".join(f"{SHALLOW_LAYERS} of {n} {stack}" for stack, n in depths.items())


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _layout(module: nn.Module) -> list[tuple]:
    return [(n, type(m).__name__) for n, m in module.named_modules()] + [
        (n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()
    ]
