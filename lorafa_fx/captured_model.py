"""`CapturedModel`: a model captured once, its graph stages run once, and adapted per rung of the
planner's lever ladder (the planner's `Rungs`).

    CapturedModel(model, example_inputs, config)
      capture -> graph_passes(model) -> LEAN_PASSES            once (`stages.py`)
      .build(levers): adapter_passes at the rung's rank cap
                      [-> ExpandLayers] [-> ChunkCrossEntropy]   once per rank cap / per rung

The capture function and the pass lists are arguments, so a test injects a cached capture or
runs without the lean passes. With `shallow` (`estimate` builds it from the config:
`shallow.py`), the shallow model is captured when the deep one's extra layers repeat its last
one, and each adapted graph is grown to the deep model's depth.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from . import stages
from .bnb_layers import traceable
from .capture import capture
from .config import LoraFAConfig
from .errors import TargetNotFoundError
from .graph import graph_copy
from .memory.planner import Levers, lever_ladder
from .passes.chunk_cross_entropy import ChunkCrossEntropy
from .passes.expand_layers import ExpandLayers, repeats_cleanly
from .passes.rewrite_lora_fa import weight_nodes
from .shallow import depth_note, repeated_stacks, shallow_path
from .state import LoraFAState, attach
from .targets import Adapter, cap_ranks, planned_config, resolve_task, select_adapters, select_modules_to_save

#: Receives a short line per stage ("capturing the model", ...); the CLI shows it.
Progress = Callable[[str], None]
Capture = Callable[[nn.Module, Mapping[str, torch.Tensor]], fx.GraphModule]


def silent(stage: str) -> None:
    return None


class CapturedModel:
    """`model` captured with `example_inputs`, adapted as `config` and each planner rung ask."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Mapping[str, torch.Tensor],
        config: LoraFAConfig,
        progress: Progress = silent,
        shallow: nn.Module | None = None,
        *,
        capture: Capture = capture,
        graph_passes: Callable[[nn.Module], Sequence[stages.Pass]] = stages.graph_passes,
        lean_passes: Sequence[stages.Pass] = stages.LEAN_PASSES,
    ) -> None:
        self.task, config = resolve_task(model, config)
        adapters = select_adapters(model, config)
        self.saved_modules = select_modules_to_save(model, config)
        self.depths = repeated_stacks(shallow, model, config) if shallow is not None else {}
        progress("capturing the model (torch.export)" + (f", {depth_note(self.depths)}" if self.depths else ""))

        def captured(m: nn.Module) -> fx.GraphModule:
            with traceable(m):
                gm = capture(m, example_inputs)
            return stages.run(gm, [*graph_passes(m), *lean_passes])

        base = captured(shallow if self.depths else model)
        if self.depths and not all(repeats_cleanly(base.graph, stack) for stack in self.depths):
            self.depths = {}
            base = captured(model)
        weights = weight_nodes(base)
        self.adapters = _drop_unused(adapters, {a.path for a in adapters if shallow_path(a.weight, self.depths) in weights})
        if not self.adapters and not self.saved_modules:
            raise TargetNotFoundError(
                f"Nothing to train: none of the {len(adapters)} modules target_modules={config.target_modules!r} "
                f"selects runs as a linear layer in the captured forward (e.g. {adapters[0].path}). lorafa_fx adapts "
                "nn.Linear calls and matmuls with a layer's transposed weight; target the linear layers the "
                "forward calls, or name the trained modules in modules_to_save."
            )
        self.base, self.config = base, config
        self._by_rank_cap: dict[int | None, fx.GraphModule] = {}
        chunk_applies = config.chunked_cross_entropy is not False and ChunkCrossEntropy.applies(base)
        self.ladder = lever_ladder(config, self.adapters, bool(self.saved_modules), chunk_applies)

    def build(self, levers: Levers | None = None) -> fx.GraphModule:
        """The adapted graph at `levers` (default: the configured model, the ladder's top)."""
        levers = levers or self.ladder[-1]
        adapters = cap_ranks(self.adapters, self.config, levers.rank_cap)
        gm = graph_copy(self._adapted(levers.rank_cap))
        chunked = False
        if levers.chunked_cross_entropy:  # an adapted output projection is not chunked
            result = ChunkCrossEntropy()(gm)
            gm, chunked = result.graph_module, result.modified
        _set_trainable(gm, adapters, self.saved_modules)
        attach(gm, LoraFAState(planned_config(self.config, self.adapters, adapters), tuple(adapters), chunked))
        return gm

    def _adapted(self, rank_cap: int | None) -> fx.GraphModule:
        """The graph with adapters at `rank_cap`, grown to depth: rungs that differ only in
        the loss (the planner's floor and the configured model) are adapted and grown once."""
        if rank_cap not in self._by_rank_cap:
            adapters = cap_ranks(self.adapters, self.config, rank_cap)
            captured = [a for a in adapters if shallow_path(a.path, self.depths) == a.path]
            passes = stages.adapter_passes(captured, self.config)
            if self.depths:
                passes.append(ExpandLayers(self.depths))
            self._by_rank_cap[rank_cap] = stages.run(graph_copy(self.base), passes)
        return self._by_rank_cap[rank_cap]


def _drop_unused(adapters: list[Adapter], called: Collection[str]) -> list[Adapter]:
    unused = [a.path for a in adapters if a.path not in called]
    if unused:
        warnings.warn(
            f"{len(unused)} targeted modules are not called in the model's forward and get no adapter: "
            f"{', '.join(unused)}.",
            stacklevel=4,
        )
    return [a for a in adapters if a.path in called]


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
