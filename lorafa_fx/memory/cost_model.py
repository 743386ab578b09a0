"""The cost model of one process: the memory of one training step of a graph, from the graph.

`CostModel(batch, autocast_dtype=...)` is the `Simulator` of a single-process step (its forward
under autocast to that dtype: a mixed-precision step) at `batch`'s shapes (real or
fake tensors, or ``{name: (shape, dtype)}``), in the mode the graph is in (the pipeline's
graphs are in train mode: dropout keeps its masks): it runs the step on fake tensors with the
engine of `simulate.py` and returns a `StepEstimate`. `annotate_saved_bytes` writes an
estimate's per-node saved bytes into the graph (``meta.SAVED_BYTES``), for the report.

Reads ``node.meta["val"]`` (placeholders: dtypes, non-batch dims) and ``["nn_module_stack"]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.fx as fx

from .. import meta
from ..ops.attention import assume_unpadded
from .fake_state import allocate_optimizer_states, fake_input, fake_mode_of, fake_param, parameter_layout
from .simulate import (
    LiveBytes,
    OptimizerFactory,
    Realise,
    Recorder,
    Simulator,
    StepEstimate,
    default_optimizer,
    flatten_inputs,
    is_unpadded,
    size_of,
    step_estimate,
    symbol_sizes,
    train_step,
)


class CostModel(Simulator):
    """One AdamW (or `optimizer`) training step of a graph, in one process, at `batch`."""

    def __init__(
        self,
        batch: Mapping[str, object],
        optimizer: OptimizerFactory | None = None,
        autocast_dtype: torch.dtype | None = None,
        realise: Realise | None = None,
    ) -> None:
        self.batch, self.realise = batch, realise
        self.optimizer = optimizer or default_optimizer
        self.autocast_dtype = autocast_dtype
        self._states: dict[tuple, _FakeState] = {}

    def sizes(self, gm: fx.GraphModule) -> dict:
        return symbol_sizes(gm, self.batch)

    def step(self, gm: fx.GraphModule) -> StepEstimate:
        # The planner's candidates share their parameters' layout: fake copies and optimizer
        # states are made once for all of them.
        key = parameter_layout(gm)
        if key not in self._states:
            self._states[key] = _FakeState(gm, self.batch, self.optimizer)
        return _simulate_step(gm, self._states[key], self.batch, self.autocast_dtype)


class _FakeState:
    """Fake copies of a graph's parameters, buffers and `batch`, with AdamW's states allocated."""

    def __init__(self, gm: fx.GraphModule, batch: Mapping[str, object], optimizer: OptimizerFactory) -> None:
        self.mode = mode = fake_mode_of(gm)
        with mode:
            # Tied weights (GPT-2's lm_head/wte) are one parameter under two names: one fake each.
            fakes = {id(p): fake_param(mode, p) for p in gm.parameters()}
            self.by_name = {name: fakes[id(p)] for name, p in gm.named_parameters(remove_duplicate=False)}
            self.fakes = list(fakes.values())
            self.buffers = {name: mode.from_tensor(b, static_shapes=True) for name, b in gm.named_buffers()}
            self.inputs = {name: fake_input(mode, v) for name, v in batch.items()}
        self.trainable = [p for p in self.fakes if p.requires_grad]
        self.opt = optimizer(self.trainable)
        with mode:
            allocate_optimizer_states(self.opt, self.trainable)


def annotate_saved_bytes(gm: fx.GraphModule, estimate: StepEstimate) -> None:
    """Write ``meta.SAVED_BYTES`` on every node (in `gm` and its outlined graphs) that the
    estimate says keeps bytes for backward."""
    for node in meta.all_graph_nodes(gm):
        saved = estimate.saved_by_node.get(node.name)
        if saved:
            meta.annotate(node, saved_bytes=saved)


def _simulate_step(
    gm: fx.GraphModule, fake: _FakeState, batch: Mapping[str, object], autocast_dtype: torch.dtype | None
) -> StepEstimate:
    for p in fake.trainable:
        p.grad = None
    tracker = LiveBytes()
    recorder = Recorder(gm, tracker)
    flat_inputs = flatten_inputs(gm, fake.inputs)
    unpadded = assume_unpadded() if is_unpadded(batch) else contextlib.nullcontext()
    with (
        fake.mode,
        torch.nn.utils.stateless._reparametrize_module(gm, {**fake.by_name, **fake.buffers}),
        unpadded,
        tracker,
    ):
        # Interpreter.run applies the graph's pytree codegen: its output is the model's output type.
        saved_at_end_of_forward = train_step(recorder.run, flat_inputs, recorder, tracker, fake.opt.step, autocast_dtype)
    opt = fake.opt
    return step_estimate(
        recorder, tracker, {n.name: n for n in gm.graph.nodes}, saved_at_end_of_forward,
        weights=sum(size_of(p) for p in fake.fakes),
        buffers=sum(size_of(b) for b in fake.buffers.values()),
        optimizer_states=sum(size_of(t) for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)),
        batch=sum(size_of(t) for t in fake.inputs.values() if isinstance(t, torch.Tensor)),
    )
