"""Every call of the transformed module, and ``gm.generate``: the captured graph for the training
call, the model itself, run eagerly on ``gm``'s tensors with ``gm``'s adapters, for the others.

`transform` captures one call: ``model(**example_inputs)``, with the training batch's keyword
names (``input_ids, attention_mask, labels``). A graph cannot take another call (no labels,
``labels=None``, no ``attention_mask``, ``position_ids`` or ``token_type_ids`` added, a KV cache
while generating), so `attach_calls` gives ``gm`` two ways to run:

- the captured call (exactly its keywords, a tensor for each captured tensor and the captured
  value for an input captured as a constant, e.g. ``use_cache=False``; positional arguments bind
  to the keywords in order, as before): ``gm``'s graph, unchanged. `_Forward` only looks at the
  keywords (microseconds in eager mode, nothing once ``torch.compile`` has traced it), and hands
  ``torch.compile`` the graph's code, so tracing keeps the nodes' meta (the partitioner's
  ``recompute`` tags); ``forward``'s signature is still the captured one, which ``Trainer`` reads
  to keep the batch's columns.
- any other call, and ``gm.generate(...)``: `EagerModel`, the model's own module tree (its
  module objects copied once at `transform` by `module_tree`; no tensor, config or other state
  copied, and bitsandbytes layers kept from changing the shared weights' layout:
  `bnb_layers.runs_shared_weights`) whose every parameter and buffer is ``gm``'s tensor of the
  same name, fetched again at each call (so ``gm.to(...)``, ``load_state_dict`` and the
  optimizer's updates are what it runs), in ``gm``'s train/eval mode, each ``nn.Dropout`` with
  the ``p`` and mode of ``gm``'s of the same name (``gm.train()`` and dropout edits, such as
  TRL's ``disable_dropout``, reach it), and with each adapter a
  forward hook adding ``(scaling * dropout(x) A^T) B^T`` to its linear's output: the ops of
  `passes.rewrite_lora_fa` (PEFT's, ``scaling`` applied to ``x A^T``) on ``gm``'s own
  ``lora_A``/``lora_B``; an MoE's expert and router adapters (not a linear module's) instead make
  their weight ``W + scaling * B A`` for the call, as PEFT's ``ParamWrapper`` does (one copy of
  those weights while the call runs); ``modules_to_save`` run ``gm``'s trained copies. Outputs are the
  model's (logits without labels, ``past_key_values`` in eval mode, T5 asking for
  ``decoder_input_ids``); gradients reach ``gm``'s ``lora_B``. ``gm.generate`` runs in ``gm``'s
  mode, as ``model.generate`` does (``gm.eval()`` first for no dropout), and changes no state of
  ``gm``: between two optimizer steps it generates with the adapters as trained so far.

Costs: no tensor memory (the module objects only); eager speed; what such a call saves for
backward is what PEFT with ``lora_A`` frozen saves, not ``gm.lorafa_plan``'s plan, so a training
call (grad enabled, train mode) of another signature warns. Under ``torch.no_grad()`` neither
path saves anything. ``torch.compile(gm)`` compiles either path (the eager one as the model's
own code).

A further capture per call signature, made on first use, was the alternative: planned and lean
for its call, but each costs a capture (seconds on a tiny model, minutes on a large one), none
can generate (no KV cache: the model's ``generate`` is needed anyway), and evaluation calls gain
nothing from a training plan. Training with a second signature is best served by transforming
with it.
"""

from __future__ import annotations

import copy
import inspect
import operator
import types
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .bnb_layers import runs_shared_weights
from .errors import LoraFAError
from .graph import generate_code, set_attributes
from .merge import adapter_delta
from .targets import Adapter

_EAGER = "lorafa_eager_model"
#: nn.Module's own containers (parameters, buffers, submodules, hooks): each module's copy gets its own.
_CONTAINERS = tuple(name for name, value in vars(nn.Module()).items() if isinstance(value, (dict, set)))


def attach_calls(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give `gm` (from `transform`, with its `state.LoraFAState` set) ``forward`` for every call,
    ``generate`` and ``can_generate`` of `model`. All survive ``copy.deepcopy(gm)``."""
    gm.meta[_EAGER] = EagerModel(gm, module_tree(model))
    can_generate = getattr(model, "can_generate", None)
    set_attributes(
        gm,
        forward=_Forward(gm),
        generate=types.MethodType(_generate, gm),
        can_generate=can_generate if callable(can_generate) else _cannot_generate,
    )
    # A deep copy's code is generated lazily, its class's forward a stand-in taking (*args, **kwargs) until then;
    # Trainer reads the signature before the first call (and finds the labels by the class's forward).
    gm._register_deepcopy_hook(generate_code)


def eager_model(gm: fx.GraphModule) -> nn.Module:
    """The model `gm` was made from as it runs `gm`'s calls other than the captured one: on `gm`'s
    tensors as they are now, in `gm`'s mode, with its adapters."""
    return gm.meta[_EAGER].synced(gm)


def module_tree(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module objects, each with containers of its own (parameters, buffers,
    submodules, hooks) holding what the original's hold, and sharing every other attribute (configs,
    bitsandbytes' quantisation states): `model` as the user has it, whose tensors and hooks can be
    swapped without touching `model`. The copy of a module the tree holds twice is one copy."""
    copies: dict[int, nn.Module] = {}

    def copied(module: nn.Module) -> nn.Module:
        if id(module) not in copies:
            twin = copies[id(module)] = copy.copy(module)
            for name in _CONTAINERS:
                if name in vars(module):
                    vars(twin)[name] = copy.copy(vars(module)[name])
            vars(twin)["_modules"] = {k: m if m is None else copied(m) for k, m in module._modules.items()}
        return copies[id(module)]

    twin = copied(model)
    runs_shared_weights(twin)
    return twin


class EagerModel:
    """`model` (a `module_tree` copy of the model `gm` was made from) run on `gm`'s tensors, with
    `gm`'s adapters as forward hooks."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module) -> None:
        self.model = model
        for a in gm.lorafa.adapters:
            module = self.model.get_submodule(a.module)
            if a.parameter is not None or not isinstance(module, (nn.Linear, Conv1D)):
                leaf = a.weight.rpartition(".")[2]
                for role in ("lora_A", "lora_B"):
                    holder = nn.Module()
                    holder.weight = gm.get_parameter(f"{a.path}.{role}.weight")
                    module.add_module(f"{leaf}_{role}", holder)
                merged = MergedWeight(leaf, a)
                module.register_forward_pre_hook(merged.before)
                module.register_forward_hook(merged.after)
                continue
            linear = module
            for role in ("lora_A", "lora_B"):
                holder = nn.Module()
                holder.weight = gm.get_parameter(f"{a.path}.{role}.weight")
                linear.add_module(role, holder)
            if gm.lorafa.config.lora_dropout:
                linear.add_module("lora_dropout", nn.Dropout(gm.lorafa.config.lora_dropout))
            linear.register_forward_hook(LoraFABranch(a.scaling))
        #: (a dropout of the copy, the name of gm's): gm's p and mode are the copy's at each call (TRL zeroes p)
        self.dropouts = [(twin, name) for name, module in gm.named_modules()
                         if isinstance(module, nn.Dropout) and isinstance(twin := _submodule(model, name), nn.Dropout)]
        gm_names = {id(t): n for n, t in _named_tensors(gm)}
        #: (owner module, attribute, gm's name of the tensor, or None where gm has none: the model's own)
        self.slots: list[tuple[nn.Module, str, str | None]] = []
        for name, t in _named_tensors(self.model):
            owner, _, leaf = name.rpartition(".")
            # By name first: a modules_to_save copy has its module's name in gm, not the original's identity.
            in_gm = name if isinstance(_attribute(gm, name), torch.Tensor) else gm_names.get(id(t))
            self.slots.append((self.model.get_submodule(owner), leaf, in_gm))
        self.model.train(gm.training)
        self.synced(gm)

    def synced(self, gm: fx.GraphModule) -> nn.Module:
        """The model on `gm`'s tensors as they are now, in `gm`'s train/eval mode."""
        own = []
        for owner, leaf, name in self.slots:
            table = owner._parameters if leaf in owner._parameters else owner._buffers
            if name is None:
                own.append((table, leaf))
            else:
                table[leaf] = _attribute(gm, name)
        devices = {t.device for t in gm.parameters()}
        if len(devices) == 1:  # the model's own tensors (unused by the captured call) follow gm.to(device)
            (device,) = devices
            for table, leaf in own:
                if table[leaf].device != device:
                    table[leaf] = _moved(table[leaf], device)
        if self.model.training != gm.training:  # only this class sets the copy's modes
            self.model.train(gm.training)
        for dropout, name in self.dropouts:
            followed = _attribute(gm, name)
            dropout.p, dropout.training = followed.p, followed.training
        return self.model


class LoraFABranch:
    """The forward hook of an adapted linear: its output plus ``(scaling * dropout(x) A^T) B^T``."""

    def __init__(self, scaling: float) -> None:
        self.scaling = scaling

    def __call__(self, linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        dropout = getattr(linear, "lora_dropout", None)
        xa = F.linear(dropout(x) if dropout is not None else x, linear.lora_A.weight)
        if self.scaling != 1:
            xa = xa * self.scaling
        return output + F.linear(xa, linear.lora_B.weight)


class MergedWeight:
    """The forward pre-hook and hook of a module whose adapted weight is not a linear module's (an
    MoE's experts, a router): while it runs, its weight is ``W + scaling * B A``."""

    def __init__(self, leaf: str, adapter: Adapter) -> None:
        self.leaf, self.adapter, self.base = leaf, adapter, None

    def before(self, module: nn.Module, args: tuple) -> None:
        self.base = module._parameters[self.leaf]
        lora_A, lora_B = (getattr(module, f"{self.leaf}_{role}").weight for role in ("lora_A", "lora_B"))
        module._parameters[self.leaf] = self.base + adapter_delta(self.adapter, module, lora_A, lora_B).to(self.base.dtype)

    def after(self, module: nn.Module, args: tuple, output: object) -> None:
        module._parameters[self.leaf], self.base = self.base, None


class _Forward:
    """``gm.forward``: the captured graph for the captured call, `eager_model` for any other."""

    def __new__(cls, *args: object) -> _Forward:
        # torch.compile(gm) enters at __call__, and dynamo keeps at most recompile_limit (8) compilations on the
        # code object it enters, whichever module they are for: with one __call__ code for all, a process that
        # compiles a ninth module (or eight and then a new shape) is refused (an error under fullgraph=True). Each
        # instance, a deep copy's included (copy makes it with __new__), is of a class whose __call__ is its own
        # copy of the code, so each module has the limit to itself.
        call = _Forward.__call__
        own_call = types.FunctionType(call.__code__.replace(), call.__globals__, call.__name__)
        return object.__new__(type(_Forward.__name__, (_Forward,), {"__call__": own_call, "__module__": __name__}))

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm, self.names = gm, _captured_names(gm)
        # Inputs captured as constants (use_cache=False): the graph holds for that value only.
        self.constants = {n.target: n.meta["val"] for n in gm.graph.find_nodes(op="placeholder")
                          if "val" in n.meta and not isinstance(n.meta["val"], torch.Tensor)}

    @property
    def __signature__(self) -> inspect.Signature:
        # The captured forward's: Trainer keeps the dataset columns it names and drops the rest.
        generate_code(self.gm)
        return inspect.signature(types.MethodType(type(self.gm).forward, self.gm))

    @property
    def __code__(self) -> types.CodeType:
        # torch.compile(gm) marks the code of gm.forward as a GraphModule's, so that tracing it keeps each node's meta
        # (the `recompute` tags AOTAutograd's partitioner reads): that code is the captured forward's.
        generate_code(self.gm)
        return type(self.gm).forward.__code__

    def __call__(self, *args, **kwargs):
        gm, names = self.gm, self.names
        if args:
            if len(args) > len(names) or any(n in kwargs for n in names[: len(args)]):
                raise TypeError(f"forward() takes the keywords {', '.join(names)} (positional in that order); "
                                f"got {len(args)} positional arguments and {', '.join(kwargs) or 'no keywords'}")
            kwargs = dict(zip(names, args)) | kwargs
        if kwargs.keys() == set(names) and all(self._as_captured(k, v) for k, v in kwargs.items()):
            return type(gm).forward(gm, **kwargs)
        if gm.training and torch.is_grad_enabled():
            warnings.warn(
                f"gm({', '.join(kwargs)}) is not the call transform captured ({', '.join(names)}): it runs the model "
                "eagerly with the adapters, saving for backward what PEFT with lora_A frozen saves, not what "
                "gm.lorafa_plan plans. To train with this call, transform the model with example_inputs holding "
                "these keywords.",
                stacklevel=6,  # past nn.Module.__call__ and GraphModule's wrapped call: the caller of gm(...)
            )
        return eager_model(gm)(**kwargs)


    def _as_captured(self, name: str, value: object) -> bool:
        if name in self.constants:
            constant = self.constants[name]
            return type(value) is type(constant) and value == constant
        return isinstance(value, torch.Tensor)


def _generate(gm: fx.GraphModule, *args, **kwargs):
    """``gm.generate(...)``: the model's ``generate`` on `gm`'s current adapters, in `gm`'s mode (as
    ``model.generate``: call ``gm.eval()`` first for generation without dropout)."""
    model = eager_model(gm)
    if not gm.can_generate():
        raise LoraFAError(
            f"{type(model).__name__} cannot generate (its can_generate() is False): transform a model class that "
            "generates (a ...ForCausalLM or ...ForConditionalGeneration) to call gm.generate."
        )
    if getattr(gm, "generation_config", None) is not None:  # Seq2SeqTrainer and TRL set gm's
        model.generation_config = gm.generation_config
    return model.generate(*args, **kwargs)


def _cannot_generate() -> bool:
    return False


def _captured_names(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.find_nodes(op="placeholder")]


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under each name it has (tied weights twice)."""
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def _attribute(module: nn.Module, name: str) -> object:
    try:
        return operator.attrgetter(name)(module)
    except AttributeError:
        return None


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    found = _attribute(module, name) if name else module
    return found if isinstance(found, nn.Module) else None


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    moved = t.to(device)
    return nn.Parameter(moved, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else moved

