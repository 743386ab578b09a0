"""The planner's candidates: mixes of block decisions, with their estimated peak and time.

A model's repeated blocks are alike, so a plan is described by how many blocks take each
decision (`Mix`), laid out in one order (`BlockFacts.order`: most bytes freed per recomputed
FLOP first, ties in model order, so the first layer, whose input needs no grad, comes last) in
runs: offloaded blocks first (their copies to the host then have the most forward compute
after them to hide behind), then offloaded ones recomputing part of their MLP, then recomputed
ones, then blocks offloading their MLP, then selective ones; the rest are kept. Runs keep the
composed simulation cheap (`compose.py`). The recomputed blocks are offloaded checkpoints on a card (`Decision.OFFLOAD_CHECKPOINT`: the same
FLOPs as `RECOMPUTE`, and their input leaves the card too), recomputed ones elsewhere, and at
the floor they may all run their MLP in mini-sequence chunks (``Mix.chunked``: that lowers the
peak of a recomputed block's backward, not what the blocks keep).

Per block ``b`` (bytes from the cost model's unplanned step, FLOPs from `flops.py`; ``mlp(b)``:
what its MLP keeps up to the last linear, `graph.mlp_spans`; ``kept(b)``: the outputs of that
span's frozen linears after its first, SwiGLU's up, `graph.kept_linears`; ``fwd(b)``: its forward
FLOPs less its tail's, which no recomputation reruns, `graph.MLPSpans.tail`)::

    decision              frees (steady)        reappears in b's backward   recomputes       crosses the link
    OFFLOAD               saved(b)              2 saved(b) (+ prefetch)     0                saved(b)
    OFFLOAD_MLP           mlp(b) + input(b)     twice that                  0                mlp(b) + input(b)
    OFFLOAD_SELECTIVE     saved(b)              2 (saved(b) - mlp(b)        its MLP's span   saved(b) - mlp(b)
                                                + kept(b)) + 2/8 of mlp(b)  but the kept     + kept(b)
                                                                            linears
    SELECTIVE             mlp(b)                mlp(b)                      its MLP's span   0
    RECOMPUTE             saved(b) - input(b)   saved(b) - input(b)         fwd(b)           0
    OFFLOAD_CHECKPOINT    saved(b)              saved(b) + input(b)         fwd(b)           input(b)
    chunked (*MINI_*)     as recomputed         less 7/8 of mlp(b), and no  fwd(b) (+        as recomputed
                                                prefetched input            forward(MLP) if
                                                                            its output is read)

    peak(mix)    ~= peak(unplanned) - sum of frees + max of reappears
    seconds(mix)  = recomputed FLOPs / rate + timing.transfer_wait(...)

What crosses the link starts crossing as it is saved (`Block.copies`: each tensor once its
first reader has run; what an offloaded-selective span keeps, when the span ends; an offloaded
checkpoint's input, when the block is called).

The planner ranks the mixes by seconds and checks the estimate with the simulated step
(`planner.plan_recompute`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from ..choices import Decision
from ..graph import block_ranges, kept_linears, mlp_spans
from ..ops.attention import attention_call
from ..ops.regions import MINI_SEQUENCE_CHUNKS
from ..units import natural_key
from .flops import backward_flops, concrete, node_flops
from .simulate import StepEstimate
from .timing import BlockTime, transfer_wait

_CHUNKED = {Decision.RECOMPUTE: Decision.MINI_SEQUENCE, Decision.OFFLOAD_CHECKPOINT: Decision.OFFLOAD_MINI_SEQUENCE}


@dataclass(frozen=True)
class Block:
    """What a mix reads of one block: bytes and FLOPs."""

    saved: int  # bytes autograd keeps for it, unplanned
    input: int  # bytes of its residual-stream input (what a recomputed block keeps)
    selective: int  # bytes its MLP keeps up to its last linear (0: no such MLP)
    forward: int  # FLOPs
    backward: int
    selective_flops: int  # forward FLOPs of the MLP span a selective block recomputes
    chunked_flops: int  # what a chunked block recomputes beyond its forward (`ops.regions.MiniSequence`)
    chunkable: bool  # its MLP may run in chunks of tokens inside its recomputation
    selective_chunkable: bool = False  # and its MLP's selective span (`Decision.OFFLOAD_SELECTIVE`)
    tail_flops: int = 0  # forward FLOPs of its tail, which its recomputation leaves out (`graph.MLPSpans.tail`)
    tail_kept: int = 0  # bytes its tail keeps (the last adapter's x·A)
    prefetch_lead: int = 0  # backward FLOPs after its attention (an OFFLOAD_MINI_SEQUENCE block's prefetch point)
    kept: int = 0  # bytes of the outputs of its MLP's frozen linears OFFLOAD_SELECTIVE keeps (`graph.kept_linears`)
    kept_flops: int = 0  # their forward FLOPs, which it does not recompute
    # Each saved tensor in forward order: the block's forward FLOPs when it is saved (its first
    # reader has run), its bytes, and whether its MLP's selective span saves it.
    saves: tuple[tuple[int, int, bool], ...] = ()
    selective_end: int = 0  # the block's forward FLOPs when its MLP's selective span ends

    def frees(self, d: Decision) -> int:
        if d in (Decision.RECOMPUTE, Decision.MINI_SEQUENCE):
            return self.saved - self.input - self.tail_kept
        if d is Decision.SELECTIVE:
            return self.selective
        if d is Decision.OFFLOAD_MLP:  # with the norm's input, the size of the block's
            return self.selective + self.input
        if d in (Decision.OFFLOAD_CHECKPOINT, Decision.OFFLOAD_MINI_SEQUENCE):
            return self.saved - self.tail_kept
        return 0 if d is Decision.KEEP else self.saved

    def reappears(self, d: Decision) -> int:
        offloaded_input = self.input if d is Decision.OFFLOAD_CHECKPOINT else 0  # the next one's, prefetched
        if d in (Decision.MINI_SEQUENCE, Decision.OFFLOAD_MINI_SEQUENCE):
            chunked = self.selective * (MINI_SEQUENCE_CHUNKS - 1) // MINI_SEQUENCE_CHUNKS
            return self.saved - self.input - self.tail_kept - chunked + offloaded_input
        if d in (Decision.OFFLOAD, Decision.OFFLOAD_MLP):  # fetched, and the next one's prefetched
            return 2 * self.frees(d)
        if d is Decision.OFFLOAD_SELECTIVE:  # the same, and the span's chunk with its gradients
            return 2 * self.crosses(d) + 2 * self.selective // MINI_SEQUENCE_CHUNKS
        return self.frees(d) + offloaded_input

    def recomputes(self, d: Decision) -> int:
        if d is Decision.SELECTIVE:
            return self.selective_flops
        if d is Decision.OFFLOAD_SELECTIVE:
            return self.selective_flops - self.kept_flops
        if d in (Decision.RECOMPUTE, Decision.OFFLOAD_CHECKPOINT):
            return self.forward - self.tail_flops
        return self.forward - self.tail_flops + self.chunked_flops if d in _CHUNKED.values() else 0

    def crosses(self, d: Decision) -> int:
        if d in (Decision.OFFLOAD, Decision.OFFLOAD_MLP):
            return self.frees(d)
        if d is Decision.OFFLOAD_SELECTIVE:
            return self.saved - self.selective + self.kept
        return self.input if d in (Decision.OFFLOAD_CHECKPOINT, Decision.OFFLOAD_MINI_SEQUENCE) else 0

    def copies(self, d: Decision) -> list[tuple[int, int]]:
        """What crosses the link in forward under `d`, in the order it is saved: (the block's
        forward FLOPs when its copy may start, bytes). Empty where nothing crosses or the saves
        are not known (the copies are then taken to start at the forward's end)."""
        if not self.saves or not self.crosses(d):
            return []
        if d is Decision.OFFLOAD:
            return [(at, nbytes) for at, nbytes, _ in self.saves]
        if d is Decision.OFFLOAD_MLP:  # the span's own saves, its input first
            span = [(at, nbytes) for at, nbytes, selective in self.saves if selective]
            return [(span[0][0] if span else self.selective_end, self.input), *span]
        if d is Decision.OFFLOAD_SELECTIVE:  # the span saves its input and kept outputs when it ends
            rest = [(at, nbytes) for at, nbytes, selective in self.saves if not selective]
            span = (self.selective_end, self.crosses(d) - sum(nbytes for _, nbytes in rest))
            return sorted([*rest, span], key=lambda row: row[0])
        return [(0, self.input)]  # a checkpoint's input, when it is called

    def copied(self, d: Decision, rate: float, link: float) -> float | None:
        """Seconds from the block's forward start until an idle link of `link` bytes/s has
        copied what crosses under `d` (`copies`: each copy starts when its tensor is saved,
        one at a time), at `rate` FLOP/s; None where the copies are not known."""
        done, copied, total = None, 0, self.crosses(d)
        for at, nbytes in self.copies(d):
            done = max(done or 0.0, at / rate + (total - copied) / link)
            copied += nbytes
        return done


@dataclass(frozen=True)
class BlockFacts:
    blocks: dict[str, Block]  # in graph order
    order: list[str]  # the layout order (module docstring)


def block_facts(
    gm: fx.GraphModule, unplanned: StepEstimate, sizes: Mapping[sympy.Symbol, int], grads, kept
) -> BlockFacts:
    """`gm`'s blocks as mixes read them; `grads`: `flops.needs_grad(gm)`, `kept`: a block's input
    bytes from its nodes. Blocks that are the same graph (ops, weights' shapes, which nodes
    need a grad) are counted once: a 7B graph has 32 alike blocks of ~750 nodes."""
    blocks, counted = {}, {}
    for b, nodes in block_ranges(gm.graph).items():
        key = tuple((n.op, n.target.removeprefix(b) if isinstance(n.target, str) else n.target, n in grads,
                     tuple(n.meta["val"].shape) if n.op == "get_attr" and "val" in n.meta else None) for n in nodes)
        if key not in counted:
            counted[key] = _Shape.of(nodes, grads, sizes)
        shape = counted[key]
        saved = [unplanned.saved_by_node.get(n.name, 0) for n in nodes]
        blocks[b] = Block(
            saved=unplanned.saved_by_module.get(b, 0), input=kept(nodes),
            selective=sum(saved[i] for i in shape.selective),
            forward=shape.forward, backward=shape.backward, selective_flops=shape.selective_flops,
            chunked_flops=shape.chunked_flops, chunkable=shape.chunkable, selective_chunkable=shape.selective_chunkable,
            tail_flops=sum(node_flops(nodes[i], sizes) for i in shape.tail),
            tail_kept=sum(saved[i] for i in shape.tail), prefetch_lead=shape.lead,
            kept=shape.kept, kept_flops=shape.kept_flops,
            saves=tuple((shape.saved_at[i], saved[i], i in shape.selective) for i in range(len(nodes)) if saved[i]),
            selective_end=shape.selective_end,
        )
    order = sorted(blocks, key=lambda b: (-blocks[b].frees(Decision.OFFLOAD) / max(blocks[b].forward, 1),
                                          natural_key(b)))
    return BlockFacts(blocks, order)


@dataclass(frozen=True)
class _Shape:
    """What `block_facts` counts once per alike block: FLOPs, and positions in its nodes."""

    forward: int
    backward: int
    selective_flops: int
    chunked_flops: int
    chunkable: bool
    selective_chunkable: bool
    selective: frozenset[int]  # its MLP's selective span
    tail: list[int]  # the tail's nodes that keep bytes of their own
    lead: int
    kept: int
    kept_flops: int
    saved_at: list[int]  # per node: the block's forward FLOPs once its first reader in the block has run
    selective_end: int

    @classmethod
    def of(cls, nodes: list[fx.Node], grads, sizes: Mapping[sympy.Symbol, int]) -> _Shape:
        spans = mlp_spans(nodes)
        positions = {n: i for i, n in enumerate(nodes)}
        done = list(itertools.accumulate(node_flops(n, sizes) for n in nodes))
        saved_at = [min((done[positions[u]] for u in n.users if u in positions), default=done[-1]) for n in nodes]
        kept = kept_linears(spans.selective) if spans.selective else []
        return cls(
            forward=done[-1], backward=sum(backward_flops(n, grads, sizes) for n in nodes),
            selective_flops=sum(node_flops(n, sizes) for n in spans.selective or []),
            # the chunks rerun in backward; the block's recomputation runs them too unless it may
            # skip them (a block with a tail chunks its selective span, which only the tail reads)
            chunked_flops=0 if spans.output_unread else sum(node_flops(n, sizes) for n in spans.whole or []),
            chunkable=bool(spans.selective_split) if spans.tail else spans.whole is not None,
            selective_chunkable=bool(spans.selective_split),
            selective=frozenset(positions[n] for n in spans.selective or []),
            # what the tail itself keeps: its output (the block's) is the next block's input
            tail=[positions[n] for n in spans.tail or [] if all(u in positions for u in n.users)],
            lead=sum(backward_flops(n, grads, sizes) for n in nodes[:positions.get(attention_call(nodes), 0)]),
            kept=sum(_nbytes(n, sizes) for n in kept), kept_flops=sum(node_flops(n, sizes) for n in kept),
            saved_at=saved_at, selective_end=done[positions[spans.selective[-1]]] if spans.selective else 0,
        )


def _nbytes(node: fx.Node, sizes: Mapping[sympy.Symbol, int]) -> int:
    val = node.meta["val"]
    return math.prod(concrete(d, sizes) for d in val.shape) * val.dtype.itemsize


#: The runs of the layout order: offloaded, offloaded-selective, recomputed, offloaded MLP, selective.
_RUNS = (Decision.OFFLOAD, Decision.OFFLOAD_SELECTIVE, None, Decision.OFFLOAD_MLP, Decision.SELECTIVE)
_RECOMPUTED = _RUNS.index(None)


def _run_kind(run: int, recompute: Decision, chunked: bool) -> Decision:
    """The decision of run `run`; the recomputed run's is `recompute` (or its chunked form)."""
    if run == _RECOMPUTED:
        return _CHUNKED[recompute] if chunked else recompute
    return _RUNS[run]


@dataclass(frozen=True)
class Mix:
    """How many blocks are offloaded, offloaded recomputing part of their MLP, recomputed
    (`recompute`: the kind), offload their MLP and recompute their MLP (selective), in the
    layout order."""

    offloaded: int
    offloaded_selective: int
    recomputed: int
    offloaded_mlp: int
    selective: int
    recompute: Decision
    chunked: bool = False

    def runs(self) -> list[tuple[Decision, int, int]]:
        """(decision, first, end) of each run of the layout order."""
        counts = (self.offloaded, self.offloaded_selective, self.recomputed, self.offloaded_mlp, self.selective)
        ends = itertools.accumulate(counts)
        return [(_run_kind(run, self.recompute, self.chunked), end - count, end)
                for run, (count, end) in enumerate(zip(counts, ends))]

    def decisions(self, facts: BlockFacts) -> dict[str, Decision]:
        chosen = {facts.order[i]: d for d, first, end in self.runs() for i in range(first, end)}
        return {b: chosen.get(b, Decision.KEEP) for b in facts.blocks}


class Candidates:
    """Every mix of `facts`' blocks (with `offload`, a card: offloaded blocks, MLPs and
    checkpoints; selective and chunked ones where every block's MLP allows them; counts in
    steps that keep them under ~10^6 on deep models), priced (module docstring) at `rate`
    FLOP/s over a `link` of bytes/s (None: nothing crosses), in order of their recomputation
    seconds (a lower bound of their seconds), then of their estimated peak. Hundreds of thousands
    of mixes are priced at once from running totals along the layout order."""

    def __init__(self, facts: BlockFacts, unplanned_peak: int, rate: float, link: float | None) -> None:
        self.facts, self.rate, self.link = facts, rate, link
        self._times: dict[tuple[str, Decision], BlockTime] = {}
        self.recompute = Decision.OFFLOAD_CHECKPOINT if link else Decision.RECOMPUTE
        n, blocks = len(facts.order), [facts.blocks[b] for b in facts.order]
        card = link is not None
        selective = all(b.selective > 0 for b in blocks)
        chunkable = all(b.chunkable for b in blocks)
        card_selective = card and selective and all(b.selective_chunkable for b in blocks)
        # Counts in steps of n/32: a 32-block model on a card has ~8 * 10^5 rows (five counts).
        step = max(1, round(n / 32))

        def counts(left: int, allowed: bool = True) -> list[int]:
            return sorted({*range(0, left + 1, step), left}) if allowed else [0]

        rows = [(a, o, r, m, s, c) for a in counts(n, card) for o in counts(n - a, card_selective)
                for r in counts(n - a - o) for m in counts(n - a - o - r, card and selective)
                for s in counts(n - a - o - r - m, selective) for c in ((0, 1) if r and chunkable else (0,))]
        self.rows = torch.tensor(rows, dtype=torch.long)
        ends = self.rows[:, :5].cumsum(1)
        starts = ends - self.rows[:, :5]
        freed = torch.zeros(len(rows), dtype=torch.long)
        recomputed = torch.zeros(len(rows), dtype=torch.float64)
        reappears = torch.zeros(len(rows), dtype=torch.long)
        for run in range(5):
            for chunked in (0, 1):
                d = _run_kind(run, self.recompute, bool(chunked))
                frees = torch.tensor([0, *itertools.accumulate(b.frees(d) for b in blocks)])
                flops = torch.tensor([0, *itertools.accumulate(b.recomputes(d) for b in blocks)], dtype=torch.float64)
                most = torch.tensor([[max((b.reappears(d) for b in blocks[i:j]), default=0) for j in range(n + 1)]
                                     for i in range(n + 1)])
                take = self.rows[:, 5] == chunked if run == _RECOMPUTED else torch.full((len(rows),), chunked == 0)
                i, j = starts[:, run], ends[:, run]
                freed += torch.where(take, frees[j] - frees[i], 0)
                recomputed += torch.where(take, flops[j] - flops[i], 0.0)
                reappears = torch.maximum(reappears, torch.where(take, most[i, j], 0))
        self.estimated = unplanned_peak - freed + reappears
        self.lower = recomputed / rate
        order = torch.argsort(self.estimated, stable=True)
        self.order = order[torch.argsort(self.lower[order], stable=True)].tolist()

    def mix(self, index: int) -> Mix:
        a, o, r, m, s, c = self.rows[index].tolist()
        return Mix(a, o, r, m, s, self.recompute, chunked=bool(c))

    def wait_seconds(self, decisions: Mapping[str, Decision]) -> float:
        """Seconds compute waits for the link (`timing.transfer_wait`) under `decisions`."""
        if self.link is None:
            return 0.0
        return transfer_wait([self._time(name, decisions.get(name, Decision.KEEP)) for name in self.facts.blocks])

    def _time(self, name: str, d: Decision) -> BlockTime:
        # Built once per block and decision: the planner prices ~10^4 mixes of the same few.
        if (name, d) not in self._times:
            b = self.facts.blocks[name]
            late = d is Decision.OFFLOAD_MINI_SEQUENCE
            self._times[name, d] = BlockTime(b.forward / self.rate, (b.backward + b.recomputes(d)) / self.rate,
                                             b.crosses(d) / self.link, prefetched=not late,
                                             lead=b.prefetch_lead / self.rate if late else 0.0,
                                             copied=b.copied(d, self.rate, self.link))
        return self._times[name, d]
