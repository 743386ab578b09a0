"""The simulation engine: run one training step of a graph on fake tensors and count its bytes.

The step is ``opt.zero_grad(); gm(**batch).loss.backward(); opt.step()`` with the optimizer's
states already allocated (the second and every later step); outputs other than the loss
(the logits) are dropped before backward, as training loops do. Its memory is::

    peak = weights + buffers + optimizer states + batch
         + max over the step's timeline of (saved activations + forward/backward transients
                                            + outputs + parameter grads)

The static terms are sums of ``size_of`` over the state; the timeline is obtained by running
the step on **fake tensors** (`FakeTensorMode`: shapes and dtypes, no data, no FLOPs) while a
dispatch mode (`LiveBytes`) keeps the bytes of every live storage. What autograd saves for
backward, and when it frees it, is therefore decided by autograd's own derivative formulas
rather than by a hand-written table per op: saved tensors live from their producer in forward
until the backward of their earliest saving op, activation grads from the backward of their
last user to the backward of their producer. The same run (`Recorder`) attributes every byte to
the FX node (and so the module) that allocated it, and records where the peak happens.

The cost models (`cost_model.py`: one process, `sharded_cost_model.py`: one rank) are
`Simulator`s built on these pieces: ``with simulator: estimate = simulator(gm)``.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import sympy
import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import TorchDispatchMode

from .. import meta
from ..choices import Decision
from ..graph import block_of, graph_copy, owner, repeated_block, set_attributes

#: Ops that read a tensor's metadata: they allocate nothing.
_METADATA = frozenset({
    torch.ops.prim.device.default, torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int,
    torch.ops.aten.sym_numel.default, torch.ops.aten.sym_storage_offset.default,
})

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def default_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer a plan assumes: AdamW (two states per trainable parameter)."""
    return torch.optim.AdamW(params, lr=1e-3)


def size_of(t: torch.Tensor) -> int:
    """Bytes of `t`'s storage: the same for real, fake and meta tensors."""
    return int(t.untyped_storage().nbytes())


@dataclass
class StepEstimate:
    """What `EstimateMemory` predicts for one training step (bytes)."""

    weights: int
    buffers: int
    optimizer_states: int
    batch: int
    peak: int
    peak_phase: str  # "forward", "backward" or "optimizer"
    peak_node: str  # FX node running when the peak was reached
    peak_module: str
    saved_activations: int  # saved for backward at the end of forward, unique storages
    saved_by_module: dict[str, int] = field(default_factory=dict)
    saved_by_node: dict[str, int] = field(default_factory=dict)
    # The live bytes over the step, one piece per node (`compose.py` reads it); the last
    # piece ("end") starts at the bytes still live after the optimizer step.
    timeline: list[Piece] = field(default_factory=list, repr=False)

    @property
    def static(self) -> int:
        return self.weights + self.buffers + self.optimizer_states + self.batch


class Realise(Protocol):
    """The rewrites that turn the planner's decisions into the graph that runs them: the
    pipeline's passes, handed to a simulator as an object (memory/ never imports a pass)."""

    def regions(self, gm: fx.GraphModule, decisions: Mapping[str, Decision]) -> fx.GraphModule:
        """`gm` with each block's decision realised (in place)."""

    def layers(self, gm: fx.GraphModule) -> fx.GraphModule:
        """`gm` with each repeated layer a called submodule owning its parameters (in place)."""


class Simulator:
    """Predicts one training step's memory: ``with simulator: estimate = simulator(gm, decisions)``
    (`decisions`: the planner's ``{block: Decision}``, realised on a copy of `gm` by `realise`).
    The context holds what a simulator sets up once for many candidate graphs (a fake
    process group for a sharded one); the base class needs none."""

    realise: Realise | None = None

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __call__(self, gm: fx.GraphModule, decisions: Mapping[str, Decision] | None = None) -> StepEstimate:
        if decisions and any(d is not Decision.KEEP for d in decisions.values()):
            gm = with_decisions(gm, decisions, self.realise)
        return self.step(gm)

    def step(self, gm: fx.GraphModule) -> StepEstimate:
        """The estimate of `gm`'s step, as it is."""
        raise NotImplementedError

    def sizes(self, gm: fx.GraphModule) -> dict[sympy.Symbol, int]:
        """The sizes `gm`'s symbolic dims take in the step simulated (`symbol_sizes`)."""
        return {}


def with_decisions(gm: fx.GraphModule, decisions: Mapping[str, Decision], realise: Realise | None) -> fx.GraphModule:
    """A copy of `gm` (sharing its parameters) with `decisions` realised by `realise`."""
    if realise is None:
        raise TypeError("this simulator was built without `realise`, so it cannot price block decisions")
    twin = graph_copy(gm)
    set_attributes(twin, lorafa=gm.lorafa)
    return realise.regions(twin, decisions)


class LiveBytes(TorchDispatchMode):
    """Bytes of every storage allocated while active, freed when its last tensor dies.

    It also keeps the step's timeline, one `Piece` per label (the node running, or whose
    backward runs): the live bytes when the label was set and the most reached under it, which
    is what `compose.py` rebuilds a deep model's step from."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.where: tuple[str, str] = ("", "")
        self.pieces: list[Piece] = [Piece("forward", "", None, 0, 0)]
        self._seen: set[int] = set()

    @property
    def label(self) -> tuple[str, str]:
        return self.pieces[-1].phase, self.pieces[-1].node

    def set_label(self, phase: str, node: str, block: str | None) -> None:
        self.pieces.append(Piece(phase, node, block, self.live, self.live))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _METADATA:  # most calls the autograd engine makes in backward; no tensor out
            return out
        # Views and in-place results share an input's storage: no new bytes. This also keeps
        # out the state that existed before the step (weights), which the static terms count.
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._seen:
            return
        self._seen.add(key)
        nbytes = int(storage.nbytes())
        weakref.finalize(storage, self._free, key, nbytes)
        self.grow(nbytes)

    def grow(self, nbytes: int) -> None:
        self.live += nbytes
        piece = self.pieces[-1]
        if self.live > piece.most:
            piece.most = self.live
        if self.live > self.peak:
            self.peak, self.where = self.live, self.label

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


@dataclass
class Piece:
    """A stretch of the step's timeline under one label: `start` live bytes when it began,
    `most` the highest reached in it (live bytes of the step, static state excluded)."""

    phase: str  # "forward", "backward" or "optimizer"
    node: str
    block: str | None  # the repeated block the node runs in (`timeline_block`)
    start: int
    most: int


def timeline_block(node: fx.Node) -> str | None:
    """The repeated block `node` runs in, seen through the calls that outline blocks (a
    recompute region's or an FSDP layer's call, and the getitems of their outputs)."""
    return _outlined_in(node) or repeated_block(node)


def _outlined_in(node: fx.Node) -> str | None:
    """The block whose outlining call `node` is, or is an output of (None: neither)."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    info = meta.lorafa_meta(node)
    return next((info[key] for key in (meta.LAYER, meta.BLOCK) if key in info), None)


class Recorder(fx.Interpreter):
    """Runs the graph node by node, labelling allocations and saved tensors with their node."""

    def __init__(self, gm: torch.nn.Module, tracker: LiveBytes, graph: fx.Graph | None = None) -> None:
        super().__init__(gm, graph=graph)  # `graph`: run on `gm`'s attributes (default: its own)
        self.tracker = tracker
        self.producer: dict[int, fx.Node] = {}
        self.saved: dict[int, tuple[fx.Node, int]] = {}
        self._hooked: set[int] = set()

    def run_node(self, n: fx.Node):
        self.current = n
        self.tracker.set_label("forward", n.name, timeline_block(n))
        result = super().run_node(n)
        grad_fn = None
        for t in pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                # A view keeps its base's producer; a freed storage's address may come back.
                if storage._cdata not in self.producer:
                    self.producer[storage._cdata] = n
                    weakref.finalize(storage, self.producer.pop, storage._cdata, None)
                grad_fn = grad_fn or t.grad_fn
        if grad_fn is not None and id(grad_fn) not in self._hooked:
            self._hooked.add(id(grad_fn))
            grad_fn.register_prehook(self._backward_label(n))
        return result

    def _backward_label(self, n: fx.Node):
        name, block = n.name, timeline_block(n)

        def hook(grad_outputs):
            self.tracker.set_label("backward", name, block)

        return hook

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        # Tensors made inside the running node (a dropout mask, SDPA's logsumexp) are its own.
        node = self.producer.get(key, self.current)
        if node.op != "get_attr":
            self.saved[key] = (node, size_of(t))
        return t


def train_step(
    run: Callable,
    inputs: list,
    recorder: Recorder,
    tracker: LiveBytes,
    step: Callable[[], None],
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """Forward (saved tensors recorded; under CPU autocast to `autocast_dtype` if given, as a
    mixed-precision loop runs it), backward of the loss, then `step`; inside the caller's fake
    mode and `tracker`. Returns the bytes saved for backward at the end of forward."""
    autocast = torch.autocast("cpu", autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t), autocast:
        out = run(*inputs)
    loss = _loss_of(out)
    # Training loops keep only the loss: `gm(**batch).loss.backward()`, or HF Trainer's
    # compute_loss, free the logits before backward starts (the Interpreter's env holds
    # the graph outputs too).
    del out
    recorder.env.clear()
    saved_at_end_of_forward = sum(nbytes for _, nbytes in recorder.saved.values())
    loss.backward()
    tracker.set_label("optimizer", "step", None)
    step()
    tracker.set_label("end", "", None)
    return saved_at_end_of_forward


def step_estimate(
    recorder: Recorder, tracker: LiveBytes, nodes: Mapping[str, fx.Node], saved_at_end_of_forward: int, **static: int
) -> StepEstimate:
    """The `StepEstimate` of a recorded step; `static`: weights, buffers, optimizer_states, batch."""
    by_node: dict[str, int] = defaultdict(int)
    by_module: dict[str, int] = defaultdict(int)
    for node, nbytes in recorder.saved.values():
        by_node[node.name] += nbytes
        by_module[timeline_block(node) or block_of(node)] += nbytes
    phase, name = tracker.where
    peak_node = nodes.get(name)
    return StepEstimate(
        **static,
        peak=sum(static.values()) + tracker.peak,
        peak_phase=phase,
        peak_node=name,
        # A recompute region's or FSDP layer's call (and its outputs) runs in no module of its own: its block's.
        peak_module=(_outlined_in(peak_node) or owner(peak_node)[0] or timeline_block(peak_node) or "")
        if peak_node is not None else "",
        saved_activations=saved_at_end_of_forward,
        saved_by_module=dict(by_module),
        saved_by_node=dict(by_node),
        timeline=tracker.pieces,
    )


def is_unpadded(batch: Mapping[str, object]) -> bool:
    """True unless a real attention mask in `batch` masks a token (shapes alone: unpadded)."""
    return all(
        bool(v.all()) for k, v in batch.items()
        if "attention_mask" in k and isinstance(v, torch.Tensor) and not is_fake(v)
    )


def symbol_sizes(gm: fx.GraphModule, batch: Mapping[str, object]) -> dict[sympy.Symbol, int]:
    """The sizes `gm`'s symbolic dims (dynamic batch and sequence) take at `batch`."""
    sizes: dict[sympy.Symbol, int] = {}
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), flatten_inputs(gm, batch)):
        val = node.meta.get("val")
        shape = value.shape if isinstance(value, torch.Tensor) else value[0] if isinstance(value, tuple) else None
        if isinstance(val, torch.Tensor) and shape is not None:
            for dim, size in zip(val.shape, shape):
                if isinstance(dim, torch.SymInt) and dim.node.expr.is_Symbol:
                    sizes[dim.node.expr] = int(size)
    return sizes


def flatten_inputs(gm: fx.GraphModule, inputs: Mapping[str, object]) -> list:
    return fx_pytree.tree_flatten_spec(((), dict(inputs)), gm.graph._codegen.pytree_info.in_spec)


def _loss_of(out: object) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        # A bare module output: d(sum)/d(out) is a ones tensor of out's size, as in the tests.
        first = next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        loss = first.sum()
    return loss
