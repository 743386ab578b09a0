"""`LoraFAState`: what lorafa_fx keeps on the module it emits, as ``gm.lorafa``.

The node-level annotations live in ``node.meta["lorafa"]`` (`meta.py`); the module-level ones
live here, in one typed object instead of loose attributes. Stages write it through `attach`,
which also makes it survive ``copy.deepcopy(gm)`` (GraphModule's deepcopy keeps only the
attributes it is told of: `graph.set_attributes`).

================  ==============================================  ===================================
field             what                                            written by / read by
================  ==============================================  ===================================
config            the `LoraFAConfig` as planned (ranks the        captured_model / peft_files, calls,
                  planner lowered, adapters it dropped)           targets of a saved adapter
adapters          the `Adapter`s (path, rank, scaling, shapes)    captured_model / optim, peft_files,
                                                                  merge, calls, report, tests
chunked_loss      whether the loss is computed in chunks (no      captured_model / report, pipeline
                  logits in train mode)
plan              the `MemoryPlan` of a step at the example       pipeline / distributed, users
                  batch (also ``gm.lorafa_plan``)
sampled_from      a composed sample's: every block of the graph   memory.compose / sharded cost model
                  it was drawn from (empty otherwise)
================  ==============================================  ===================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn as nn

from .graph import set_attributes

if TYPE_CHECKING:
    from .config import LoraFAConfig
    from .memory.report import MemoryPlan
    from .targets import Adapter

#: The attribute of the emitted module that holds its `LoraFAState`.
ATTRIBUTE = "lorafa"


@dataclass(frozen=True)
class LoraFAState:
    config: LoraFAConfig
    adapters: tuple[Adapter, ...]
    chunked_loss: bool = False
    plan: MemoryPlan | None = None
    sampled_from: tuple[str, ...] = ()


def state_of(module: nn.Module) -> LoraFAState | None:
    """`module`'s state, or None for a module `lorafa_fx.transform` did not emit."""
    state = getattr(module, ATTRIBUTE, None)
    return state if isinstance(state, LoraFAState) else None


def attach(gm: nn.Module, state: LoraFAState | None = None, **changes: object) -> LoraFAState:
    """Set `gm`'s state to `state` (default: its current one) with `changes`; the plan is also
    ``gm.lorafa_plan``, the name users print."""
    state = dataclasses.replace(state or state_of(gm), **changes)
    set_attributes(gm, **{ATTRIBUTE: state, "lorafa_plan": state.plan})
    return state
