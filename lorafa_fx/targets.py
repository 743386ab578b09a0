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

Mixture-of-experts models (transformers 5) keep their experts as 3-D parameters of one
module (``mlp.experts.gate_up_proj`` ``(E, 2·I, H)``, ``mlp.experts.down_proj``) and route
with a module holding a 2-D ``weight`` (``mlp.gate``), none of them `nn.Linear`. PEFT adapts
them through ``target_parameters`` (``ParamWrapper``); so does `LoraFAConfig`:

- ``target_parameters``: the parameters it names (a name or a dotted suffix of one), at ``r``;
- ``target_modules="all-linear"``: every experts parameter and router too, with the fused
  ``gate_up_proj`` at ``2·r`` and ``2·lora_alpha``. That is PEFT 0.21's ``"all-linear"`` on
  Mixtral, Qwen3-MoE, OLMoE and the other model types its transformers-v4 conversion knows
  (the two v4 linears fused into one parameter keep rank ``r`` each); PEFT's conversion table
  lacks Qwen2-MoE, where lorafa_fx adapts the same set as on the others;
- a ``target_modules`` name or regex that matches an experts module or a router (``"gate"``,
  ``"experts"``) adapts its parameters at ``r``.

PEFT wraps the parameters of one module in nested ``ParamWrapper``s, the first registered
innermost, so the adapter of parameter ``i`` of ``n`` targeted on module ``m`` is at
``m + ".base_layer" * (n - 1 - i)`` (``mlp.experts.base_layer`` for ``gate_up_proj``,
``mlp.experts`` for ``down_proj``): `Adapter.path`, the prefix of its ``lora_A``/``lora_B`` keys.
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
from .errors import ConfigError, TargetNotFoundError

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
    """One adapted linear (or parameter), in the paper's terms.

    ``path`` is the linear's module path; its parameters are ``f"{path}.lora_A.weight"``
    (shape ``(r, in_features)``, frozen) and ``f"{path}.lora_B.weight"`` (shape
    ``(out_features, r)``, trained). An adapter of a parameter (PEFT's ``target_parameters``)
    names it in ``parameter`` (on module `module`), and ``path`` is PEFT's wrapper path; an
    experts' 3-D parameter has ``num_experts`` experts of ``in_features -> out_features`` each,
    and its ``lora_A``/``lora_B`` are ``(E·r, in)``/``(out, E·r)`` (`folded_r`).
    """

    path: str
    r: int
    lora_alpha: float
    scaling: float
    in_features: int
    out_features: int
    parameter: str | None = None
    num_experts: int = 1

    @property
    def module(self) -> str:
        """The module holding the adapted weight."""
        path = self.path
        while path.endswith(_WRAPPER):
            path = path.removesuffix(_WRAPPER)
        return path

    @property
    def weight(self) -> str:
        """Full name of the adapted weight."""
        return f"{self.module}.{self.parameter or 'weight'}"

    @property
    def key(self) -> str:
        """What PEFT matches ``rank_pattern``/``alpha_pattern`` keys against: the module path,
        or the parameter's name for a ``target_parameters`` adapter."""
        return self.path if self.parameter is None else self.weight

    @property
    def folded_r(self) -> int:
        """Rows of ``lora_A`` (columns of ``lora_B``): ``r`` per expert."""
        return self.r * self.num_experts


#: PEFT's path of a wrapped module: ``ParamWrapper(base_layer=...)``.
_WRAPPER = ".base_layer"
#: transformers' name of the experts' fused gate and up projections (two linears in v4).
_FUSED_GATE_UP = "gate_up_proj"


@dataclass(frozen=True)
class MoEParameter:
    """An experts' 3-D parameter or a router's weight, adapted as a parameter."""

    module: str
    parameter: str
    in_features: int
    out_features: int
    num_experts: int


def moe_parameters(model: nn.Module) -> dict[str, MoEParameter]:
    """The MoE parameters LoRA can adapt, by full name, in module order: each experts module's
    ``(E, out, in)`` parameters (``(E, in, out)`` where the module ``is_transposed``) and the
    2-D ``(E, hidden)`` ``weight`` of a router beside it (a module that is not a linear)."""
    found = {}
    for path, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        stacked = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == experts}
        if not isinstance(experts, int) or not stacked:
            continue
        parent, _, _ = path.rpartition(".")
        for name, router in (model.get_submodule(parent).named_children() if parent else ()):
            w = getattr(router, "weight", None)
            if (not isinstance(router, (nn.Linear, Conv1D)) and isinstance(w, nn.Parameter) and w.dim() == 2
                    and w.shape[0] == experts):
                found[f"{parent}.{name}.weight"] = MoEParameter(f"{parent}.{name}", "weight", w.shape[1], w.shape[0], 1)
        transposed = getattr(module, "is_transposed", False)
        for name, p in stacked.items():
            _, a, b = p.shape
            in_features, out_features = (a, b) if transposed else (b, a)
            found[f"{path}.{name}"] = MoEParameter(path, name, in_features, out_features, experts)
    return found


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
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR
    if all_linear:
        targets: list[str] | str = sorted(set(linears) - {_output_embedding_path(model)})
    else:
        targets = config.target_modules

    adapters = []
    for path, module in linears.items():
        if _matches(targets, path) and not _excluded(config, path):
            r, alpha = _rank_and_alpha(config, path)
            adapters.append(Adapter(path, r, alpha, _scaling(config, alpha, r), *in_out_features(module)))
    adapters += _parameter_adapters(model, config, all_linear)
    if not adapters:
        raise TargetNotFoundError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
            f"matched no linear module of {type(model).__name__}. Its linear modules are:\n  "
            + _summarise(linears)
            + '\nPass suffixes of these names (e.g. ["q_proj", "v_proj"]), a regex over the full '
            'path, or "all-linear".'
        )
    for path, others in tied_weights(model, [a.module for a in adapters if a.parameter is None]).items():
        warnings.warn(
            f"{path} is adapted but its weight is tied to {', '.join(others)} (the model ties them, e.g. "
            "tie_word_embeddings=True); PEFT warns for the same config. Training is unaffected (the adapter adds to "
            f"{path}'s output only), but a merge cannot add it into a weight {others[0]} also uses: lorafa_fx.merge "
            f"gives {path} its own copy of the weight (and sets config.tie_word_embeddings=False). To keep the tie, "
            f"leave {path} out: exclude_modules=[{path!r}].",
            stacklevel=3,
        )
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(adapters, key=lambda a: order[a.module])


def _parameter_adapters(model: nn.Module, config: LoraFAConfig, all_linear: bool) -> list[Adapter]:
    """Adapters of the MoE parameters `config` selects (module docstring), PEFT's paths."""
    adapters = []
    for name, p in moe_parameters(model).items():
        named = any(name == t or name.endswith(f".{t}") for t in config.target_parameters or ())
        if not (all_linear or named or _matches(config.target_modules, p.module)):
            continue
        if _excluded(config, p.module) or (config.exclude_modules and _matches(config.exclude_modules, name)):
            continue
        fused = 2 if all_linear and p.parameter == _FUSED_GATE_UP else 1
        r, alpha = _rank_and_alpha(config, name, fused)
        adapters.append(Adapter(p.module, r, alpha, _scaling(config, alpha, r), p.in_features, p.out_features,
                                p.parameter, p.num_experts))
    if adapters and config.lora_dropout:
        raise ConfigError(
            f"lora_dropout={config.lora_dropout} cannot apply to adapted parameters ({adapters[0].weight}, ...): "
            "as in PEFT (ParamWrapper), dropout cannot be factored out of a parameter's adapter. Set "
            "lora_dropout=0.0, or exclude the experts and routers (exclude_modules=[\"experts\", \"gate\"])."
        )
    return _nested(adapters)


def _nested(adapters: list[Adapter]) -> list[Adapter]:
    """`adapters` at PEFT's paths: the ``i``-th of ``n`` parameters adapted on one module at
    ``module + ".base_layer" * (n - 1 - i)`` (a parameter adapter's `path` is its wrapper's)."""
    counts: dict[str, int] = {}
    for a in adapters:
        if a.parameter is not None:
            counts[a.module] = counts.get(a.module, 0) + 1
    seen: dict[str, int] = {}
    nested = []
    for a in adapters:
        if a.parameter is not None:
            i = seen[a.module] = seen.get(a.module, -1) + 1
            a = dataclasses.replace(a, path=a.module + _WRAPPER * (counts[a.module] - 1 - i))
        nested.append(a)
    return nested


def _excluded(config: LoraFAConfig, path: str) -> bool:
    return bool(config.exclude_modules and _matches(config.exclude_modules, path)) or _in_modules_to_save(config, path)


def _rank_and_alpha(config: LoraFAConfig, key: str, fused: int = 1) -> tuple[int, float]:
    r = _pattern_value(config.rank_pattern, key, config.r * fused)
    return r, _pattern_value(config.alpha_pattern, key, config.lora_alpha * fused)


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
        r = a.r if rank_is_fixed(config, a.key) else min(a.r, cap)
        if r:
            capped.append(dataclasses.replace(a, r=r, scaling=_scaling(config, a.lora_alpha, r)))
    return _nested(capped)


def rank_is_fixed(config: LoraFAConfig, key: str) -> bool:
    """Whether ``rank_pattern`` names the adapter of `key` (`Adapter.key`; the planner keeps its rank)."""
    return _pattern_value(config.rank_pattern, key, None) is not None


def planned_config(config: LoraFAConfig, configured: list[Adapter], planned: list[Adapter]) -> LoraFAConfig:
    """`config` amended to select exactly `planned` (ranks the planner lowered go to
    ``rank_pattern``, adapters it dropped to ``exclude_modules``), so a saved adapter's PEFT
    config describes the adapters that were trained."""
    ranks = {a.key: a.r for a in planned}
    lowered = {re.escape(a.key): ranks[a.key] for a in configured if a.key in ranks and ranks[a.key] != a.r}
    dropped = [a.key for a in configured if a.key not in ranks]
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
