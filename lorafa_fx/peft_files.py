"""Adapters on disk, in PEFT's format.

- `save_adapter(gm, path)` writes ``adapter_config.json`` + ``adapter_model.safetensors`` as
  PEFT's ``save_pretrained`` does: keys ``base_model.model.<path>.lora_A.weight`` /
  ``.lora_B.weight`` and ``base_model.model.<module>.<param>`` for ``modules_to_save``; a
  ``LoraConfig`` with ``peft_type: "LORA"`` whose ``target_modules`` is the exact list of adapted
  paths (as PEFT writes for ``"all-linear"``), whose ``target_parameters`` names every adapted
  parameter (an MoE's experts and routers: keys ``<wrapper path>.lora_A.weight``, see `targets`),
  and the ``task_type`` and ``modules_to_save`` as PEFT's task model writes them (the configured
  names, then the task's heads: ``["classifier", "score"]`` for ``SEQ_CLS``).
  ``peft.PeftModel.from_pretrained(model, path)`` loads it (as the task's ``PeftModelFor...``).
  The write is atomic (`atomic_dir.py`): a crash leaves the old adapter (or nothing), never half a
  new one, and the next save or load of `path` removes what the crash left beside it (restoring
  the old adapter if the crash came mid-swap). In a distributed job every rank calls it (FSDP2
  shards are gathered); rank 0 writes.
- `load_adapter(gm, path)` reads such a directory, ours or one PEFT saved (LoRA, same targets),
  into ``gm``'s ``lora_A``/``lora_B``/``modules_to_save`` in place (optimizers holding them keep
  working). Any difference in targets, shapes, rank or scaling raises `AdapterMismatchError`
  listing all of them; nothing is loaded then.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from .atomic_dir import atomic_directory, fsync_file, recover
from .errors import AdapterFileError, AdapterMismatchError, ConfigError, LoraFAError
from .json_fields import (
    BOOL,
    NAMES,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    STRING,
    STRINGS,
    field,
    optional,
    pattern_map,
    read_json_object,
)
from .state import state_of
from .targets import _pattern_value, saved_module_names, select_modules_to_save

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: PEFT's prefix of every key: ``PeftModel.base_model`` (the tuner) ``.model`` (the user's model).
PREFIX = "base_model.model."
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def save_adapter(gm: fx.GraphModule, path: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> None:
    """Write `gm`'s adapter to directory `path` in PEFT's format, atomically.

    Inside a ``torch.distributed`` job every rank calls it: parameters sharded by FSDP2
    (`lorafa_fx.distributed.prepare`) are all-gathered, a collective, and rank 0 writes.

    Args:
        gm: a module returned by `lorafa_fx.transform`.
        path: the adapter directory; created, or replaced as a whole if it exists (files in it
            other than the two adapter files are kept). A symlink to a directory stays a link:
            the directory it points to receives the adapter.
        base_model_name_or_path: recorded in the config for ``AutoPeftModel`` loaders; defaults
            to the model's ``name_or_path`` when the model was loaded with ``from_pretrained``.
    """
    check_transformed(gm)
    if os.fspath(path) == "":
        raise ConfigError("save_adapter(gm, path='') names no directory (it would be the working directory): pass "
                          "a directory path for the adapter, e.g. 'my-adapter'.")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LoraFAError(f"{path} exists and is not a directory; pass a directory path for the adapter.")
    config = _peft_config(gm, base_model_name_or_path or getattr(gm, "name_or_path", None) or None)
    tensors = {PREFIX + k: _full_tensor(v.detach()).to("cpu").contiguous() for k, v in adapter_tensors(gm).items()}
    if dist.is_initialized() and dist.get_rank() != 0:
        return

    with atomic_directory(path, replaced=(CONFIG_NAME, WEIGHTS_NAME)) as tmp:
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        fsync_file(tmp / WEIGHTS_NAME)


def load_adapter(gm: fx.GraphModule, path: str | os.PathLike) -> None:
    """Load the adapter in directory `path` (ours or PEFT's, LoRA) into `gm`, in place.

    Every field of ``adapter_config.json`` that loading reads is checked first (`AdapterFileError`
    naming the file, the field and the value).

    Raises `AdapterMismatchError` listing every adapted module missing from the file or not in
    `gm`, every shape, rank or scaling (``lora_alpha / r``) that differs, and the
    ``modules_to_save`` parameters that do not match; nothing is loaded in that case.
    """
    check_transformed(gm)
    path = recover(Path(path))
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise AdapterFileError(
            f"{path} holds no adapter: expected {CONFIG_NAME} and {WEIGHTS_NAME} (PEFT's save_pretrained "
            "or lorafa_fx.save_adapter write both)."
        )
    saved_config = _read_config(config_file)
    _check_peft_config(saved_config, path)
    saved = {k.removeprefix(PREFIX): v for k, v in _read_weights(weights_file).items()}

    problems = _mismatches(gm, saved, saved_config)
    task_type = saved_config.get("task_type")
    if problems and task_type != gm.lorafa.config.task_type:
        problems.append(f"task_type: saved {task_type!r}, here {gm.lorafa.config.task_type!r} (a task's head is "
                        "trained in full, not adapted: transform with LoraFAConfig(task_type=...) as saved)")
    if problems:
        raise AdapterMismatchError(
            f"The adapter in {path} does not fit this transformed model:\n  " + "\n  ".join(problems)
            + "\nTransform the base model with a LoraFAConfig matching the adapter's "
            f"{CONFIG_NAME} (target_modules, r, lora_alpha, rank_pattern, alpha_pattern, use_rslora, "
            "modules_to_save, task_type)."
        )
    with torch.no_grad():
        for name, value in saved.items():
            gm.get_parameter(name).copy_(value)


def check_transformed(gm: nn.Module) -> None:
    if state_of(gm) is None:
        raise LoraFAError(
            f"{type(gm).__name__} is not a lorafa_fx module; pass the GraphModule lorafa_fx.transform returned."
        )


def saved_module_params(gm: fx.GraphModule) -> dict[str, nn.Parameter]:
    # gm keeps the model's module paths, so PEFT's modules_to_save rules find the same modules.
    out = {}
    for path in select_modules_to_save(gm, gm.lorafa.config):
        for name, p in gm.get_submodule(path).named_parameters():
            out[f"{path}.{name}"] = p
    return out


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def adapter_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    out = {}
    for a in gm.lorafa.adapters:
        for suffix in _LORA_SUFFIXES:
            out[a.path + suffix] = gm.get_parameter(a.path + suffix)
    out.update(saved_module_params(gm))
    return out


def _peft_config(gm: fx.GraphModule, base_model_name_or_path: str | None) -> dict[str, Any]:
    cfg = gm.lorafa.config
    # Adapted parameters (PEFT's target_parameters) are listed by name; those whose rank is not
    # the config's plain r (an experts' fused gate_up_proj under "all-linear") get an exact pattern.
    parameters = [a for a in gm.lorafa.adapters if a.parameter is not None]
    # The keys of PEFT's LoraConfig that define the adapter; PEFT fills the rest with defaults.
    return {
        "peft_type": "LORA",
        "task_type": cfg.task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "target_modules": [a.path for a in gm.lorafa.adapters if a.parameter is None],
        "target_parameters": [a.weight for a in parameters] or None,
        "exclude_modules": None,
        "rank_pattern": _exact_patterns(cfg.rank_pattern, cfg.r, {a.key: a.r for a in parameters}),
        "alpha_pattern": _exact_patterns(cfg.alpha_pattern, cfg.lora_alpha, {a.key: a.lora_alpha for a in parameters}),
        "use_rslora": cfg.use_rslora,
        "lora_dropout": cfg.lora_dropout,
        "modules_to_save": saved_module_names(cfg) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
    }


#: The fields of PEFT's LoraConfig that loading reads: their tests and PEFT's defaults.
_CONFIG_FIELDS = {
    "peft_type": (optional(STRING), None),
    "r": (POSITIVE_INT, 8),
    "lora_alpha": (POSITIVE_NUMBER, 8),
    "rank_pattern": (optional(pattern_map(POSITIVE_INT)), None),
    "alpha_pattern": (optional(pattern_map(POSITIVE_NUMBER)), None),
    "use_rslora": (BOOL, False),
    "target_modules": (optional(NAMES), None),
    "modules_to_save": (optional(STRINGS), None),
    "bias": (STRING, "none"),
    "use_dora": (optional(BOOL), False),
    "lora_bias": (optional(BOOL), False),
    "use_qalora": (optional(BOOL), False),
}
_SAVE_AGAIN = "save the adapter again (lorafa_fx.save_adapter or PEFT's save_pretrained write it)"


def _exact_patterns(patterns: Mapping[str, Any], default: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """`patterns` plus an exact pattern for each key of `values` whose value `patterns` (and
    `default`) do not give."""
    exact = {re.escape(key): v for key, v in values.items() if _pattern_value(patterns, key, default) != v}
    return {**patterns, **exact}


def _read_config(file: Path) -> dict[str, Any]:
    """The saved config, every field loading reads checked (`AdapterFileError` naming the file,
    the field and the value otherwise), PEFT's defaults filled in."""
    config = read_json_object(file, AdapterFileError, "a PEFT adapter config is a JSON object with peft_type, r, "
                              f"lora_alpha, target_modules: {_SAVE_AGAIN}")
    checked = {key: field(config, key, check, file, AdapterFileError, f"correct it, or {_SAVE_AGAIN}", default)
               for key, (check, default) in _CONFIG_FIELDS.items()}
    return {**config, **checked}


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own SafetensorError (not exported) or OSError
        raise AdapterFileError(f"{file} cannot be read as safetensors ({type(e).__name__}: {e}); the file is "
                               "truncated or not an adapter: save the adapter again.") from None


def _check_peft_config(config: Mapping[str, Any], path: Path) -> None:
    unsupported = []
    if config.get("peft_type") != "LORA":
        unsupported.append(f"peft_type={config.get('peft_type')!r} (only LORA is supported)")
    for key in ("use_dora", "lora_bias", "use_qalora"):
        if config.get(key):
            unsupported.append(f"{key}=true")
    if config["bias"] != "none":
        unsupported.append(f"bias={config['bias']!r} (only 'none')")
    if config.get("trainable_token_indices"):
        unsupported.append("trainable_token_indices")
    if unsupported:
        raise AdapterMismatchError(
            f"The adapter in {path} uses PEFT features LoRA-FA does not implement: {', '.join(unsupported)}."
        )


def _saved_scaling(config: Mapping[str, Any], path: str) -> tuple[int, float, float]:
    r = _pattern_value(config["rank_pattern"] or {}, path, config["r"])
    alpha = _pattern_value(config["alpha_pattern"] or {}, path, config["lora_alpha"])
    return r, alpha, alpha / math.sqrt(r) if config["use_rslora"] else alpha / r


def _mismatches(gm: fx.GraphModule, saved: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[str]:
    ours = adapter_tensors(gm)
    adapted = {a.path: a for a in gm.lorafa.adapters}
    saved_paths = {k.removesuffix(s) for k in saved for s in _LORA_SUFFIXES if k.endswith(s)}
    problems = []

    missing = sorted(set(adapted) - saved_paths)
    unexpected = sorted(saved_paths - set(adapted))
    if missing:
        problems.append(f"adapted here but not in the file ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"in the file but not adapted here ({len(unexpected)}): {', '.join(unexpected)}")
    for path in sorted(saved_paths & set(adapted)):
        a = adapted[path]
        r, alpha, scaling = _saved_scaling(config, a.key)
        if r != a.r or not math.isclose(scaling, a.scaling, rel_tol=1e-6):
            problems.append(
                f"{path}: saved r={r}, lora_alpha={alpha} (scaling {scaling:g}); here r={a.r}, "
                f"lora_alpha={a.lora_alpha} (scaling {a.scaling:g})"
            )

    for name in sorted(saved.keys() - ours.keys()):
        if not name.endswith(_LORA_SUFFIXES):
            problems.append(f"{name}: in the file but not a modules_to_save parameter here")
    for name in sorted(ours.keys() - saved.keys()):
        if not name.endswith(_LORA_SUFFIXES):
            problems.append(f"{name}: a modules_to_save parameter here but not in the file")
        elif name.rsplit(".", 2)[0] in saved_paths:
            problems.append(f"{name}: not in the file (only the other half of the adapter is)")
    for name in sorted(saved.keys() & ours.keys()):
        if tuple(saved[name].shape) != tuple(ours[name].shape):
            problems.append(f"{name}: saved shape {tuple(saved[name].shape)}, here {tuple(ours[name].shape)}")
    return problems
