"""A deep model's step, composed from a shallow sample of its repeated blocks.

A transformer's layers are alike, so its step's memory timeline repeats: each layer's forward
adds the same bytes on top of what the layers before it left (its saved tensors), reaches the
same height above its start, and each layer's backward gives the same bytes back. Simulating
all 32 layers of a 7B model to learn what one layer does is the planner's main cost.

`ComposedSimulator` wraps a whole-graph `Simulator`. For a graph and the planner's decisions
it groups the repeated blocks into *runs* (consecutive blocks that are structurally the same
graph, up to names, and get the same decision), keeps the first, second and last block of
each run (offloaded runs: the first four and the last; `_lead`) and drops the others (the
*sample*: the last block rewired to read the stand-in's outputs), simulates the sample once,
and composes the deep step's timeline from it: every dropped block repeats the timeline of its
run's stand-in (a block with blocks alike on either side), forward and backward, with the live
bytes shifted by what the blocks before it left. The peak, its phase and block, and the saved bytes per block and per node are read off
the composed timeline. A sample is cached per graph and run layout, so the planner's search
over how many blocks to recompute costs one simulation per layout, not one per candidate.

Composition is exact where the per-block deltas are additive (the state a block leaves does
not depend on how many blocks came before it); graphs without a run of four or more blocks,
or whose sample's timeline does not split into one stretch per block and phase, are simulated
whole. The whole-graph simulator stays the reference (`tests/test_compose.py`).

Reads ``node.meta["nn_module_stack"]`` and ``["val"]`` (block structure); writes no meta.
The sample's state carries ``sampled_from`` (every block of the graph it was drawn from), so a
sharded simulator can shard the dropped layers it never calls.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch.fx as fx

from ..choices import OFFLOADED, Decision
from ..graph import block_ranges, block_structure, graph_module, owner, set_attributes
from ..ops.offload import COPIES_IN_FLIGHT
from ..ops.regions import mlp_target, region_target
from .simulate import Piece, Simulator, StepEstimate


def _lead(decision: Decision) -> int:
    """Blocks sampled at the head of a run; the last of them is the one every dropped block
    repeats, a block with blocks alike on either side. An offloaded block's backward also
    fetches its predecessor's tensors, and its forward lets go of the tensors of the block
    `COPIES_IN_FLIGHT` before it (`ops.offload`): its stand-in needs that many and one more
    alike before it."""
    return 2 + COPIES_IN_FLIGHT if decision in OFFLOADED else 2


@dataclass(frozen=True)
class _Layout:
    """The repeated blocks of a flat graph, in graph order, with their structure class."""

    blocks: tuple[str, ...]
    kind: dict[str, int]  # block -> structure class (equal graphs up to names)
    names: dict[str, list[str]]  # block -> its node names, in order (positions correspond)
    block_of: dict[str, str]  # node name -> its block
    module_of: dict[str, str]  # node name -> the module it runs in (every node of the graph)

    def runs(self, decisions: Mapping[str, Decision]) -> list[list[str]]:
        runs: list[list[str]] = []
        for block in self.blocks:
            if runs and self._key(runs[-1][-1], decisions) == self._key(block, decisions):
                runs[-1].append(block)
            else:
                runs.append([block])
        return runs

    def _key(self, block: str, decisions: Mapping[str, Decision]) -> tuple[int, Decision]:
        return self.kind[block], decisions.get(block, Decision.KEEP)

    def counterpart(self, name: str, source: str, target: str) -> str | None:
        """The node of block `target` at `name`'s position in block `source` (a recompute
        region's call or output: the same of `target`'s region)."""
        if source == target:
            return name
        if _of_region(name, source):
            return region_target(target) + name[len(region_target(source)):]
        try:
            return self.names[target][self.names[source].index(name)]
        except ValueError:
            return None

    def block_named(self, name: str, among: Iterable[str]) -> str | None:
        """The block of node `name`: of the flat graph, or the call of a region of `among`."""
        if name in self.block_of:
            return self.block_of[name]
        return next((b for b in among if _of_region(name, b)), None)


@dataclass(frozen=True)
class _Group:
    """The pieces of the timeline one block (or the rest of the graph) spends in one phase."""

    phase: str
    block: str | None
    start: int
    most: int
    most_node: str
    end: int


@dataclass(frozen=True)
class _Sample:
    estimate: StepEstimate
    groups: tuple[_Group, ...]
    runs: tuple[tuple[str, ...], ...]  # the sampled blocks of each run


class ComposedSimulator(Simulator):
    """`inner`'s estimate of a graph, composed from a sample of its repeated blocks."""

    def __init__(self, inner: Simulator) -> None:
        self.inner = inner
        self._layouts: dict[int, tuple[fx.GraphModule, _Layout | None]] = {}
        self._samples: dict[tuple, _Sample | None] = {}

    def __enter__(self) -> ComposedSimulator:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.inner.__exit__(*exc)

    def __call__(self, gm: fx.GraphModule, decisions: Mapping[str, Decision] | None = None) -> StepEstimate:
        decisions = dict(decisions or {})
        layout = self._layout(gm)
        runs = layout.runs(decisions) if layout is not None else []
        leads = [_lead(decisions.get(run[0], Decision.KEEP)) for run in runs]
        if all(len(run) <= lead + 1 for run, lead in zip(runs, leads)):
            return self.inner(gm, decisions)
        shape = tuple((layout._key(run[0], decisions), min(len(run), lead + 1)) for run, lead in zip(runs, leads))
        key = (id(gm), shape)
        if key not in self._samples:
            self._samples[key] = self._sample(gm, layout, runs, decisions)
        sample = self._samples[key]
        if sample is None:
            return self.inner(gm, decisions)
        return _compose(sample, runs, leads, layout)

    def step(self, gm: fx.GraphModule) -> StepEstimate:
        return self(gm)

    def sizes(self, gm: fx.GraphModule) -> dict:
        return self.inner.sizes(gm)

    def _layout(self, gm: fx.GraphModule) -> _Layout | None:
        # The graph is held with its layout: an id is only unique while its object lives.
        if id(gm) not in self._layouts:
            self._layouts[id(gm)] = (gm, _layout_of(gm))
        return self._layouts[id(gm)][1]

    def _sample(
        self, gm: fx.GraphModule, layout: _Layout, runs: list[list[str]], decisions: Mapping[str, Decision]
    ) -> _Sample | None:
        sample = _sample_graph(gm, layout, runs, [_lead(decisions.get(run[0], Decision.KEEP)) for run in runs])
        if sample is None:
            return None
        estimate = self.inner(sample, decisions)
        groups = _groups(estimate.timeline)
        sampled = tuple(_sampled(run, _lead(decisions.get(run[0], Decision.KEEP))) for run in runs)
        # Each sampled block must be one stretch of forward and one of backward, or there is
        # no single place to repeat it at.
        for block in (b for run in sampled for b in run):
            for phase in ("forward", "backward"):
                if sum(g.block == block and g.phase == phase for g in groups) != 1:
                    return None
        return _Sample(estimate, groups, sampled)


def _of_region(name: str, block: str) -> bool:
    """Whether node `name` is the call of `block`'s region or its MLP's, or one of their outputs."""
    region, mlp = region_target(block), mlp_target(block)
    return name in (region, mlp) or name.startswith((f"{region}_out_", f"{mlp}_out_"))


def _sampled(run: list[str], lead: int) -> tuple[str, ...]:
    return tuple(run) if len(run) <= lead + 1 else (*run[:lead], run[-1])


def _layout_of(gm: fx.GraphModule) -> _Layout | None:
    ranges = block_ranges(gm.graph)
    if not ranges:
        return None
    classes: dict[tuple, int] = {}
    kind = {}
    for block, nodes in ranges.items():
        kind[block] = classes.setdefault(block_structure(block, nodes), len(classes))
    return _Layout(
        tuple(ranges), kind, {b: [n.name for n in nodes] for b, nodes in ranges.items()},
        {n.name: b for b, nodes in ranges.items() for n in nodes}, {n.name: owner(n)[0] for n in gm.graph.nodes},
    )


def _sample_graph(gm: fx.GraphModule, layout: _Layout, runs: list[list[str]], leads: list[int]) -> fx.GraphModule | None:
    """A copy of `gm` keeping of each run its `_sampled` blocks, the run's last block reading
    the second's outputs where it read its predecessor's; None if anything else reads a
    dropped block. Only the kept nodes are copied (the graph may have thousands)."""
    node = {n.name: n for n in gm.graph.nodes}
    # Parameter reads stay (unused): a copy of the sample (recompute regions realised on it)
    # then still holds every parameter, so weights and optimizer states are the whole model's.
    dropped = {
        node[name] for run, lead in zip(runs, leads) for b in run[lead:-1] for name in layout.names[b]
        if node[name].op != "get_attr"
    }
    stand_in: dict[fx.Node, fx.Node] = {}
    for run, lead in zip(runs, leads):
        if len(run) > lead + 1:
            before_last, repeated = run[-2], run[lead - 1]
            for name in layout.names[before_last]:
                stand_in[node[name]] = node[layout.counterpart(name, before_last, repeated)]
    if any(u not in dropped and n not in stand_in for n in dropped for u in n.users):
        return None
    graph = fx.Graph()
    with warnings.catch_warnings():  # torch's own pytree specs warn when deep-copied
        warnings.simplefilter("ignore", FutureWarning)
        graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n not in dropped:
            env[n] = graph.node_copy(n, lambda a: env[stand_in.get(a, a)])
    twin = graph_module(gm, graph)
    set_attributes(twin, lorafa=dataclasses.replace(gm.lorafa, sampled_from=tuple(layout.blocks)))
    return twin


def _groups(pieces: list[Piece]) -> tuple[_Group, ...]:
    """Consecutive pieces of one phase and block, merged; a stretch of pieces outside any
    block between two pieces of the same block (a shape computation) counts as the block's."""
    blocks = [p.block for p in pieces]
    for i, p in enumerate(pieces):
        if blocks[i] is None and i > 0 and blocks[i - 1] is not None:
            j = next((j for j in range(i + 1, len(pieces)) if pieces[j].block is not None or pieces[j].phase != p.phase), None)
            if j is not None and pieces[j].phase == p.phase and pieces[j].block == blocks[i - 1]:
                blocks[i] = blocks[i - 1]
    groups: list[_Group] = []
    for i, p in enumerate(pieces[:-1]):  # the last piece marks the end of the step
        end = pieces[i + 1].start
        last = groups[-1] if groups else None
        if last is not None and (last.phase, last.block) == (p.phase, blocks[i]):
            most, node = (p.most, p.node) if p.most > last.most else (last.most, last.most_node)
            groups[-1] = dataclasses.replace(last, most=most, most_node=node, end=end)
        else:
            groups.append(_Group(p.phase, blocks[i], p.start, p.most, p.node, end))
    return tuple(groups)


def _compose(sample: _Sample, runs: list[list[str]], leads: list[int], layout: _Layout) -> StepEstimate:
    """The estimate of the graph whose blocks form `runs`, from `sample` (same run layout)."""
    est = sample.estimate
    standing: dict[str, str] = {}  # sampled block -> the block it stands for
    repeats: dict[str, list[str]] = {}  # a run's stand-in -> the blocks it repeats as
    for sampled, run, lead in zip(sample.runs, runs, leads):
        if len(sampled) < len(run):
            standing.update(zip(sampled, (*run[:lead], run[-1])))
            repeats[sampled[lead - 1]] = run[lead:-1]
        else:
            standing.update(zip(sampled, run))
    timeline: list[tuple[_Group, str | None]] = []
    for g in sample.groups:
        own = [(g, standing.get(g.block, g.block))]
        copies = [(g, b) for b in repeats.get(g.block, ())]
        timeline += (own + copies) if g.phase != "backward" else (copies[::-1] + own)

    live = sample.groups[0].start
    top, at = -1, None
    for g, block in timeline:
        if live + g.most - g.start > top:
            top, at = live + g.most - g.start, (g, block)
        live += g.end - g.start
    group, block = at
    sampled_top = max(g.most for g in sample.groups)
    node = layout.counterpart(group.most_node, group.block, block) if group.block in layout.kind else None

    by_module = {b: v for b, v in est.saved_by_module.items() if b not in layout.kind}
    by_node = {}
    for name, v in est.saved_by_node.items():
        source = layout.block_named(name, standing)
        if source is None or source not in standing:
            by_node[name] = v
            continue
        for target in [standing[source], *repeats.get(source, ())]:
            if (mapped := layout.counterpart(name, source, target)) is not None:
                by_node[mapped] = v
    for source, target in standing.items():
        if source in est.saved_by_module:
            for b in [target, *repeats.get(source, ())]:
                by_module[b] = est.saved_by_module[source]
    copied = sum(est.saved_by_module.get(s, 0) * len(repeats.get(s, ())) for s in standing)
    return dataclasses.replace(
        est,
        peak=est.peak - sampled_top + top,
        peak_phase=group.phase,
        peak_node=node or group.most_node,
        peak_module=_module_in(layout, group, block),
        saved_activations=est.saved_activations + copied,
        saved_by_module=by_module,
        saved_by_node=by_node,
        timeline=[],
    )


def _module_in(layout: _Layout, group: _Group, block: str | None) -> str:
    """The module where the composed peak happens: the sampled node's, moved to the block it
    stands for (a node the flat graph lacks, a recompute region's, is placed at its block)."""
    path = layout.module_of.get(group.most_node, group.block or "")
    if group.block is not None and block is not None and path.startswith(group.block):
        path = block + path[len(group.block):]
    return path
