"""Which modules to adapt and which to train in full: PEFT's matching rules, applied to the
model's module paths.

The rules are PEFT's (`peft.tuners.tuners_utils.check_target_module_exists`,
`_maybe_include_all_linear_layers`, `peft.utils.other.get_pattern_key`), so a
`LoraFAConfig` adapts exactly the modules a `LoraConfig` with the same fields adapts.

Task heads follow PEFT's task models (`peft.PeftModelForSequenceClassification` and its
siblings): a task type adds its head's names (`TASK_HEADS`) to ``modules_to_save``; a module
whose path ends with one of them is trained in full (PEFT's ``_set_trainable`` matches with a
plain ``str.endswith``) and gets no adapter. PEFT 0.21 adds the names for ``TOKEN_CLS`` and
``QUESTION_ANS`` only after it has put LoRA layers in, so with ``target_modules="all-linear"``
it adapts the head and then fails to wrap it (``TypeError``); here every task behaves as
``SEQ_CLS`` does in PEFT, which is PEFT's result with the head listed in ``modules_to_save``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass

import torch.nn as nn
from transformers import PreTrainedModel
from transformers.models.auto import modeling_auto
from transformers.pytorch_utils import Conv1D

from .config import LoraFAConfig
from .errors import TargetNotFoundError

ALL_LINEAR = "all-linear"

#: The heads PEFT's task models add to ``modules_to_save`` (peft_model.py, peft 0.21).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}

#: The task of each transformers auto class, the classes listed by model type (`modeling_auto`).
_TASK_CLASSES = (
    ("SEQ_CLS", modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
    ("TOKEN_CLS", modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
    ("QUESTION_ANS", modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
    ("SEQ_2_SEQ_LM", modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
    ("CAUSAL_LM", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    ("FEATURE_EXTRACTION", modeling_auto.MODEL_MAPPING_NAMES),
)


@dataclass(frozen=True)
class Adapter:
    """One adapted linear, in the paper's terms.

    ``path`` is the linear's module path; its parameters are ``f"{path}.lora_A.weight"``
    (shape ``(r, in_features)``, frozen) and ``f"{path}.lora_B.weight"`` (shape
    ``(out_features, r)``, trained).
    """

    path: str
    r: int
    lora_alpha: float
    scaling: float
    in_features: int
    out_features: int


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module LoRA can adapt, by path: `nn.Linear` and GPT-2's `Conv1D`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def in_out_features(module: nn.Module) -> tuple[int, int]:
    # Conv1D stores its weight transposed: (in, out).
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _matches(patterns: list[str] | str, key: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return key in patterns or any(key.endswith(f".{p}") for p in patterns)


@dataclass(frozen=True)
class Task:
    """The task a model is adapted for: PEFT's task type, and the model class it was inferred
    from (None when ``LoraFAConfig.task_type`` gave it)."""

    task_type: str | None
    inferred_from: str | None = None


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for `model`'s class (or the nearest base class transformers' auto
    classes list): ``*ForSequenceClassification`` -> ``"SEQ_CLS"``, ``*ForCausalLM`` ->
    ``"CAUSAL_LM"``, a bare ``*Model`` -> ``"FEATURE_EXTRACTION"``...; None for other classes."""
    for cls in type(model).__mro__:
        for task_type, classes in _TASK_CLASSES:
            if any(cls.__name__ in ((c,) if isinstance(c, str) else c) for c in classes.values()):
                return task_type
    return None


def resolve_task(model: nn.Module, config: LoraFAConfig) -> tuple[Task, LoraFAConfig]:
    """The task `model` is adapted for, and `config` with its ``task_type`` set to it."""
    task = Task(config.task_type) if config.task_type is not None else Task(infer_task_type(model), type(model).__name__)
    heads = TASK_HEADS.get(task.task_type, ())
    if heads and not config.modules_to_save and not any(name.endswith(heads) for name, _ in model.named_modules()):
        warnings.warn(
            f"task_type={task.task_type!r} trains the modules named {' or '.join(heads)} in full, as PEFT does, but "
            f"{type(model).__name__} has none: its head is adapted like any other linear. Name the head in "
            "modules_to_save to train it in full.",
            stacklevel=3,
        )
    return task, dataclasses.replace(config, task_type=task.task_type)


def saved_module_names(config: LoraFAConfig) -> list[str]:
    """``modules_to_save`` as PEFT's task model extends it: the configured names, then the task's heads."""
    return list(dict.fromkeys([*(config.modules_to_save or ()), *TASK_HEADS.get(config.task_type, ())]))


def _in_modules_to_save(config: LoraFAConfig, key: str) -> bool:
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in saved_module_names(config))


def _pattern_value(patterns: dict, key: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _output_embedding_path(model: nn.Module) -> str | None:
    if not isinstance(model, PreTrainedModel):
        return None
    out = model.get_output_embeddings()
    return next((name for name, m in model.named_modules() if m is out), None) if out is not None else None


def select_adapters(model: nn.Module, config: LoraFAConfig) -> list[Adapter]:
    """The adapters `config` asks for on `model`, in module order.

    Raises `TargetNotFoundError` listing the linear module names when nothing matches.
    """
    linears = linear_modules(model)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        targets: list[str] | str = sorted(set(linears) - {_output_embedding_path(model)})
    else:
        targets = config.target_modules

    adapters = []
    for path, module in linears.items():
        if not _matches(targets, path):
            continue
        if config.exclude_modules and _matches(config.exclude_modules, path):
            continue
        if _in_modules_to_save(config, path):
            continue
        r = _pattern_value(config.rank_pattern, path, config.r)
        alpha = _pattern_value(config.alpha_pattern, path, config.lora_alpha)
        adapters.append(Adapter(path, r, alpha, _scaling(config, alpha, r), *in_out_features(module)))
    if not adapters:
        raise TargetNotFoundError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
            f"matched no linear module of {type(model).__name__}. Its linear modules are:\n  "
            + _summarise(linears)
            + '\nPass suffixes of these names (e.g. ["q_proj", "v_proj"]), a regex over the full '
            'path, or "all-linear".'
        )
    for path, others in tied_weights(model, [a.path for a in adapters]).items():
        warnings.warn(
            f"{path} is adapted but its weight is tied to {', '.join(others)} (the model ties them, e.g. "
            "tie_word_embeddings=True); PEFT warns for the same config. Training is unaffected (the adapter adds to "
            f"{path}'s output only), but a merge cannot add it into a weight {others[0]} also uses: lorafa_fx.merge "
            f"gives {path} its own copy of the weight (and sets config.tie_word_embeddings=False). To keep the tie, "
            f"leave {path} out: exclude_modules=[{path!r}].",
            stacklevel=3,
        )
    return adapters


def tied_weights(model: nn.Module, paths: list[str]) -> dict[str, list[str]]:
    """For each module of `paths` whose ``weight`` other modules of `model` hold too (tied
    embeddings), those modules' paths."""
    holders: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name.removesuffix(".weight"))
    tied = {}
    for path in paths:
        weight = getattr(model.get_submodule(path), "weight", None)
        others = [h for h in holders.get(id(weight), []) if h != path]
        if others:
            tied[path] = others
    return tied


def cap_ranks(adapters: list[Adapter], config: LoraFAConfig, cap: int | None) -> list[Adapter]:
    """`adapters` with every rank not fixed by ``rank_pattern`` at most `cap` (0: dropped)."""
    if cap is None:
        return list(adapters)
    capped = []
    for a in adapters:
        r = a.r if rank_is_fixed(config, a.path) else min(a.r, cap)
        if r:
            capped.append(dataclasses.replace(a, r=r, scaling=_scaling(config, a.lora_alpha, r)))
    return capped


def rank_is_fixed(config: LoraFAConfig, path: str) -> bool:
    """Whether ``rank_pattern`` names the adapter at `path` (the planner keeps its rank)."""
    return _pattern_value(config.rank_pattern, path, None) is not None


def planned_config(config: LoraFAConfig, configured: list[Adapter], planned: list[Adapter]) -> LoraFAConfig:
    """`config` amended to select exactly `planned` (ranks the planner lowered go to
    ``rank_pattern``, adapters it dropped to ``exclude_modules``), so a saved adapter's PEFT
    config describes the adapters that were trained."""
    ranks = {a.path: a.r for a in planned}
    lowered = {re.escape(a.path): ranks[a.path] for a in configured if a.path in ranks and ranks[a.path] != a.r}
    dropped = [a.path for a in configured if a.path not in ranks]
    if not lowered and not dropped:
        return config
    exclude = config.exclude_modules
    if dropped:
        if isinstance(exclude, str):
            exclude = "|".join([f"(?:{exclude})", *map(re.escape, dropped)])
        else:
            exclude = [*(exclude or ()), *dropped]
    return dataclasses.replace(config, rank_pattern={**config.rank_pattern, **lowered}, exclude_modules=exclude)


def _scaling(config: LoraFAConfig, alpha: float, r: int) -> float:
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def select_modules_to_save(model: nn.Module, config: LoraFAConfig) -> list[str]:
    """Paths of the outermost modules trained in full: named by `modules_to_save` (each must
    match something) or ending with a name of the task's heads (PEFT's rule; none may match)."""
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    found = [n for n in names if n.endswith(TASK_HEADS.get(config.task_type, ()))]
    for pattern in config.modules_to_save or ():
        hits = [n for n in names if n == pattern or n.endswith(f".{pattern}")]
        if not hits:
            children = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise TargetNotFoundError(
                f"modules_to_save entry {pattern!r} matches no module of {type(model).__name__}. "
                f"Module names it could end with: {', '.join(children)}."
            )
        found += hits
    return sorted(p for p in set(found) if not any(p.startswith(f"{q}.") for q in found))


def _summarise(linears: dict[str, nn.Module]) -> str:
    # Group layer-indexed names ("model.layers.0.mlp.up_proj") so 32-layer models print short.
    groups: dict[str, int] = {}
    for name in linears:
        key = re.sub(r"\.\d+\.", ".<i>.", name)
        groups[key] = groups.get(key, 0) + 1
    return "\n  ".join(f"{k}  (x{n})" if n > 1 else k for k, n in groups.items())
