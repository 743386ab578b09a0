"""The cost model of one rank: the memory of one data-parallel training step on one rank.

``sharding="full"`` (FSDP2): the step is simulated with torch's own FSDP2 on fake tensors and a
fake process group of ``world_size`` ranks (``torch.distributed`` "fake" backend: collectives
do nothing, shapes are exact), as rank 0. Each outlined layer (`outline_layers`) and the root
get ``fully_shard``, as ``lorafa_fx.distributed.prepare`` does in training, so what is counted is
what FSDP2 allocates, in its order:

    peak = sharded weights (1/N of every parameter, dim 0 padded to a multiple of N)
         + buffers + optimizer states of the local shards of ``lora_B`` + the rank's batch
         + max over the step of (activations + transients + all-gathered layers
                                 (the running layer; in backward also the prefetched one)
                                 + all-gather / reduce-scatter buffers + grads)

Adapters are sharded like every parameter of a layer (``lora_A``/``lora_B`` and their AdamW
states: 1/N per rank). FSDP2 frees an all-gathered layer by resizing its storage to 0
(``UntypedStorage.resize_``, which dispatch does not see); the tracker follows resizes, as
torch's ``MemTracker`` does. Collectives run in program order here (CPU): on a GPU, FSDP2's
separate all-gather stream can hold the next layer's all-gathered weights during a layer's
forward as well.

``sharding="none"`` (DDP): every rank holds the whole model; the step is the single-process one
at the rank's batch plus DDP's gradient buckets (one copy of the trainable parameters).

All ranks of a data-parallel group hold the same shapes (equal batch per rank, padded shards),
so rank 0's plan is every rank's. `FSDPCostModel` shards the fake model once per set of
parameters and runs each of the planner's candidate graphs on it (outlined first: it takes the
flat graphs the planner builds); AdamW steps the local shards (the same bytes as
stepping the DTensors, without DTensor's per-op dispatch).

Reads ``node.meta["nn_module_stack"]`` and ``meta.LAYER`` (the outlined layer calls); writes no meta.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.distributed.tensor import DTensor

from ..choices import Sharding
from ..errors import DistributedPlanError
from ..graph import graph_copy
from ..ops.attention import assume_unpadded
from ..ops.regions import has_regions, outlined_layers
from .cost_model import CostModel
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


def rank_cost_model(
    batch: Mapping[str, object],
    world_size: int,
    sharding: Sharding,
    realise: Realise,
    optimizer: OptimizerFactory | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Simulator:
    """The `Simulator` of one rank's step (`batch`: the rank's) under `sharding`."""
    if sharding is Sharding.FULL:
        return FSDPCostModel(batch, world_size, realise, optimizer, autocast_dtype)
    return DDPCostModel(batch, optimizer, autocast_dtype, realise)


class DDPCostModel(CostModel):
    """DDP: the single-process step plus DDP's gradient buckets (one copy of the trainable
    parameters)."""

    def step(self, gm: fx.GraphModule) -> StepEstimate:
        est = super().step(gm)
        est.peak += sum(size_of(p) for p in gm.parameters() if p.requires_grad)
        return est


_RUNG_STATE = ("fake_mode", "twin", "inputs", "sharded", "local", "opt", "static")


class FSDPCostModel(Simulator):
    """Simulates FSDP2 steps: each call outlines a copy of the graph's layers, the fake model
    is sharded once per set of parameters (the planner's candidates share one per rung), and
    the candidate's graphs run on it.

    ``with FSDPCostModel(batch, world_size) as simulate: estimate = simulate(gm)``
    """

    def __init__(
        self,
        batch: Mapping[str, object],
        world_size: int,
        realise: Realise,
        optimizer: OptimizerFactory | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.batch, self.world_size, self.autocast_dtype, self.realise = batch, world_size, autocast_dtype, realise
        self.optimizer = optimizer or default_optimizer
        self.unpadded = is_unpadded(batch)  # reads a real mask: outside the fake mode
        self._rungs: dict[tuple, dict] = {}
        self._world = contextlib.ExitStack()

    def __enter__(self):
        self.mesh = self._world.enter_context(fake_world(self.world_size))
        return self

    def __exit__(self, *exc) -> None:
        self._world.close()

    def sizes(self, gm: fx.GraphModule) -> dict:
        return symbol_sizes(gm, self.batch)

    def step(self, gm: fx.GraphModule) -> StepEstimate:
        # Outlining edits the graph: a planner's candidate is copied first, unless it is a copy
        # already (the planner's recompute candidates are; its rungs are kept and reused).
        every_layer = gm.lorafa.sampled_from
        if not outlined_layers(gm):
            gm = self.realise.layers(gm if has_regions(gm) else graph_copy(gm))
        layers = outlined_layers(gm)
        if not layers:
            raise DistributedPlanError(
                "sharding='full' found no repeated layers to shard in this model; use sharding='none' (DDP)."
            )
        # One sharded copy per parameter layout and set of called layers (the planner's
        # candidates share them: other ranks, another loss, are other layouts).
        key = (parameter_layout(gm), tuple(layers))
        if key not in self._rungs:
            self._shard(gm, layers, [b for b in every_layer if b not in layers])
            self._rungs[key] = {k: getattr(self, k) for k in _RUNG_STATE}
        for k, v in self._rungs[key].items():
            setattr(self, k, v)
        with self.fake_mode:
            return self._run(gm, layers)

    def _shard(self, gm: fx.GraphModule, layers: list[str], uncalled: list[str]) -> None:
        """Shard a fake twin of `gm` as `distributed.prepare` does. The `uncalled` layers of a
        composed sample (`compose.py`) are left out of it: each holds what a called layer of
        the same parameters holds (its shards and their optimizer states), counted in
        `static` instead of sharding them one by one."""
        from torch.distributed.fsdp import fully_shard

        self.fake_mode = fake_mode_of(gm)
        with self.fake_mode:
            self.twin = _fake_twin(gm, self.fake_mode, {})
            like = {path: _same_layer(self.twin, path, layers) for path in uncalled}
            for path in uncalled:
                parent, _, leaf = path.rpartition(".")
                delattr(self.twin.get_submodule(parent), leaf)
            self.inputs = {name: fake_input(self.fake_mode, v) for name, v in self.batch.items()}
            self.twin.train()
            for path in layers:
                fully_shard(self.twin.get_submodule(path), mesh=self.mesh)
            fully_shard(self.twin, mesh=self.mesh)
            # The optimizer steps the local shards (same storages, states and temporaries as
            # stepping the DTensors, without DTensor's per-op dispatch).
            named = [(n, p) for n, p in self.twin.named_parameters() if p.requires_grad]
            self.sharded = [p for _, p in named]
            self.local = [torch.nn.Parameter(_local(p)) for p in self.sharded]
            self.opt = self.optimizer(self.local)
            allocate_optimizer_states(self.opt, self.local)
        held = {
            path: (
                sum(_local_bytes(p) for p in self.twin.get_submodule(path).parameters()),
                sum(_local_bytes(t) for (n, _), q in zip(named, self.local) if n.startswith(path + ".")
                    for t in self.opt.state[q].values() if isinstance(t, torch.Tensor)),
            )
            for path in set(like.values())
        }
        self.static = tuple(sum(held[like[path]][i] for path in uncalled) for i in range(2))

    def _run(self, gm: fx.GraphModule, layers: list[str]) -> StepEstimate:
        twin, opt = self.twin, self.opt
        for p in self.sharded:
            p.grad = None
        opt.zero_grad(set_to_none=True)
        tracker = _ResizingLiveBytes()
        # FSDP2's hooks are the modules' forward hooks: the graphs run through module calls, each
        # interpreted node by node (saved bytes are attributed to nodes inside the layers too).
        recorder = _NestedRecorder(twin, tracker, graph=gm.graph, fallback=gm)
        twin.forward = recorder.run
        for path in layers:
            layer = twin.get_submodule(path)
            candidate = gm.get_submodule(path)
            layer.forward = _NestedRecorder(layer, tracker, recorder, graph=candidate.graph, fallback=candidate).run
        flat_inputs = flatten_inputs(gm, self.inputs)
        with assume_unpadded() if self.unpadded else contextlib.nullcontext(), tracker, tracker.resizes():
            saved_at_end_of_forward = train_step(twin, flat_inputs, recorder, tracker, self._step, self.autocast_dtype)
        return step_estimate(
            recorder, tracker, recorder.nodes, saved_at_end_of_forward,
            weights=sum(_local_bytes(p) for p in twin.parameters()) + self.static[0],
            buffers=sum(_local_bytes(b) for b in twin.buffers()),
            optimizer_states=self.static[1] + sum(
                _local_bytes(t) for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
            ),
            batch=sum(size_of(t) for t in self.inputs.values() if isinstance(t, torch.Tensor)),
        )

    def _step(self) -> None:
        for p, q in zip(self.sharded, self.local):
            q.grad = None if p.grad is None else _local(p.grad)
        self.opt.step()


class _NestedRecorder(Recorder):
    """A `Recorder` running `graph` (a candidate's root or layer graph) on `gm` (the sharded
    twin: FSDP-managed parameters); what the twin lacks (a candidate's parameter-free recompute
    regions) comes from `fallback`. Layers share the root's bookkeeping: the saved-tensor hook is
    the root's and labels with the node running now."""

    def __init__(self, gm, tracker, root: _NestedRecorder | None = None, *, graph: fx.Graph, fallback) -> None:
        super().__init__(gm, tracker, graph)
        self.fallback = fallback
        self.root = root or self
        if root is not None:
            self.producer, self.saved, self._hooked = root.producer, root.saved, root._hooked
        self.root.nodes = getattr(self.root, "nodes", {})
        self.root.nodes.update({n.name: n for n in graph.nodes})

    def fetch_attr(self, target: str):
        try:
            return super().fetch_attr(target)
        except RuntimeError:
            return fx.Interpreter(self.fallback).fetch_attr(target)

    def run_node(self, n: fx.Node):
        self.root.current = n
        return super().run_node(n)


def _same_layer(twin: torch.nn.Module, path: str, layers: list[str]) -> str:
    """The first of `layers` whose parameters are `path`'s (names, shapes, dtypes, training)."""
    def layout(p: str) -> list:
        return [(n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in twin.get_submodule(p).named_parameters()]

    mine = layout(path)
    match = next((layer for layer in layers if layout(layer) == mine), None)
    if match is None:
        raise DistributedPlanError(f"the uncalled layer {path} has no called layer like it to be counted as.")
    return match


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_bytes(t: torch.Tensor) -> int:
    return size_of(_local(t))


class _ResizingLiveBytes(LiveBytes):
    """`LiveBytes` that also follows ``UntypedStorage.resize_`` (FSDP2 frees and re-allocates
    all-gathered parameters that way; dispatch does not see it)."""

    def __init__(self) -> None:
        super().__init__()
        self._size: dict[int, int] = {}

    def track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key not in self._seen:
            self._size[key] = int(t.untyped_storage().nbytes())
        super().track(t)

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= self._size.pop(key, nbytes)

    @contextlib.contextmanager
    def resizes(self) -> Iterator[None]:
        original = torch.UntypedStorage.resize_

        def resize_(storage: torch.UntypedStorage, size: int):
            out = original(storage, size)
            key = storage._cdata
            if key not in self._size and size:  # allocated before this step (FSDP's unsharded
                self._seen.add(key)  # parameters), freed by resize_(0): re-allocated now
                self._size[key] = 0
            if key in self._size:
                self.grow(int(size) - self._size[key])
                self._size[key] = int(size)
            return out

        torch.UntypedStorage.resize_ = resize_
        try:
            yield
        finally:
            torch.UntypedStorage.resize_ = original


#: The planning mesh's dim name: DTensor caches sharding decisions per mesh *equality* (layout,
#: device type, dim names), so the fake mesh must never equal the job's real one.
_MESH_DIM_NAMES = ("lorafa_fx_planning",)


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[object]:
    """A 1-D `DeviceMesh` of `world_size` ranks over torch's fake process group (this process is
    rank 0). Outside a distributed job it is the default group for the duration; inside one (the
    default group is real) it is a new group over all ranks, which every rank must enter."""
    import torch.testing._internal.distributed.fake_pg as fake_pg  # registers the "fake" backend
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=world_size)
        try:
            yield init_device_mesh("cpu", (world_size,), mesh_dim_names=_MESH_DIM_NAMES)
        finally:
            dist.destroy_process_group()
        return
    if dist.get_world_size() != world_size:
        raise DistributedPlanError(
            f"planning for world_size={world_size} inside a job of {dist.get_world_size()} processes: pass "
            f"world_size={dist.get_world_size()}, or plan other sizes outside the job (lorafa_fx.estimate, "
            "python -m lorafa_fx plan --world-size N)."
        )
    group = dist.new_group(backend="fake")
    try:
        yield DeviceMesh.from_group(group, "cpu", mesh_dim_names=_MESH_DIM_NAMES)
    finally:
        dist.destroy_process_group(group)


def _fake_twin(module: torch.nn.Module, mode, fakes: dict[int, torch.nn.Parameter]) -> torch.nn.Module:
    """A structural copy of `module` whose parameters and buffers are fake (FSDP shards the
    copy's parameters in place; the user's module is left alone). Graphs are shared."""
    twin = copy.copy(module) if not isinstance(module, fx.GraphModule) else _copy_graph_module(module)
    twin._parameters = {}
    twin._buffers = {}
    twin._modules = {}
    for name, p in module._parameters.items():
        if p is None:
            twin._parameters[name] = None
            continue
        if id(p) not in fakes:  # tied weights stay one parameter
            fakes[id(p)] = fake_param(mode, p)
        twin._parameters[name] = fakes[id(p)]
    for name, b in module._buffers.items():
        twin._buffers[name] = None if b is None else mode.from_tensor(b, static_shapes=True)
    for name, child in module._modules.items():
        twin._modules[name] = None if child is None else _fake_twin(child, mode, fakes)
    # No hooks: the copy runs flat graph inputs (export's input check would refuse them) and
    # gets FSDP's own.
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        setattr(twin, hooks, OrderedDict())
    return twin


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    twin = object.__new__(type(gm))
    twin.__dict__ = dict(gm.__dict__)
    return twin

