"""Regions: a block of the graph outlined into a sub-GraphModule and called through a wrapper
that decides what it keeps for backward (`passes/recompute_regions.py` makes them,
`passes/outline_layers.py` nests them in called layers for FSDP2).

`Recompute` runs its region under ``torch.utils.checkpoint(use_reentrant=False)``: the block
keeps only its inputs and backward reruns its forward (checkpointing restores the RNG state, so
dropout draws the same masks; `torch.compile` traces the same call as its activation-checkpoint
higher-order op). Early stop is off: the region's forward is rerun whole, so what
`memory/flops.py` counts is what FlopCounterMode measures. A recomputed block's region leaves
out its tail (its last linear with LoRA-FA's adapter and the residual add, `graph.MLPSpans`):
the tail keeps only x·A for its backward, so it stays outside and is never rerun (for Llama, a
fifth of the block's matmul FLOPs). `offload.Offload` keeps the region's
saved tensors in host memory instead.

`MiniSequence` runs a token-wise region (a block's MLP, `graph.mlp_spans`) a chunk of tokens at
a time (the Mini-Sequence Transformer's scheme): its forward runs the chunks without grad and
keeps only the region's inputs (``ctx.save_for_backward``, so an offloading region's hooks see
them), and its backward reruns each chunk's forward with grad and takes that chunk's
gradients, so the MLP's b·s·intermediate tensors exist a chunk at a time. Inside a recomputed
block whose MLP output only a residual add reads (``rerun_skips``, `graph.MLPSpans`), the
block's recomputation (a call during backward: autograd's engine is running) does not run the
chunks at all: the block's backward needs none of the output's values, and the chunks'
backward computes them again anyway; so such a chunked block recomputes its forward FLOPs once,
like a whole-block recompute (otherwise its MLP's once more). With the block's tail, the chunks
run the MLP up to its last linear, each chunk followed by the tail on its own tokens (kept, not
rerun), so the last linear's input gradient also exists a chunk at a time. A region may also
keep the outputs of frozen linears (``rerun``: an offloaded block's up matmul) beside its inputs:
its backward then reruns a copy that reads them (`known_linear`), so only the rest is
recomputed, and their input gradients are taken as autograd takes them. Each output row is
the unchunked region's row, so the forward and the
input gradients are the same bits; the gradients of inputs that are not split (its adapters'
lora_B) are sums over chunks, equal up to the rounding of that order.
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from .. import meta


class Recompute(torch.nn.Module):
    """Calls `region` under activation checkpointing."""

    def __init__(self, region: fx.GraphModule) -> None:
        super().__init__()
        self.region = region

    def forward(self, *args):
        with set_checkpoint_early_stop(False):
            return checkpoint(self.region, *args, use_reentrant=False)


#: Chunks of tokens a `MiniSequence` region runs in: its b·s·intermediate tensors exist an
#: eighth at a time, under the block's b·s·hidden ones for Llama's 11008/4096 (MsT: a chunk
#: count of intermediate/hidden keeps the chunk under the hidden states).
MINI_SEQUENCE_CHUNKS = 8


class MiniSequence(torch.nn.Module):
    """Calls `region` on `chunks` chunks of tokens (dim -2) of the arguments at `split` (the
    others, its parameters, whole) and concatenates its one output; `rerun_skips`: a call
    during backward (the block's recomputation) leaves the output unwritten.

    With a `tail` (the MLP's last linear and adapter, `graph.MLPSpans.tail`; `tail_args`: the
    call's argument at each of its inputs, -1 for `region`'s output), each chunk is its own
    autograd node followed by the tail on that chunk: backward reruns a chunk's region and
    runs its tail's backward, which reads only what the tail kept (x·A), one chunk at a time,
    and the tail is never rerun.

    With `rerun` (`region` then returns, after its output, the outputs of frozen linears it
    keeps for backward): forward saves those outputs beside the inputs, and backward runs
    `rerun` instead of `region`, a copy that reads each kept output from an argument after
    the region's (`known_linear`) rather than computing it again."""

    def __init__(self, region: fx.GraphModule, chunks: int, split: tuple[int, ...], rerun_skips: bool = False,
                 tail: fx.GraphModule | None = None, tail_args: tuple[int, ...] = (),
                 rerun: fx.GraphModule | None = None) -> None:
        super().__init__()
        self.region, self.chunks, self.split, self.rerun_skips = region, chunks, split, rerun_skips
        self.tail, self.tail_args = tail, tail_args
        if rerun is not None and (rerun_skips or tail is not None):
            raise ValueError("a MiniSequence that keeps outputs for backward (`rerun`) runs neither a tail nor skips")
        self.rerun = rerun
        # The last dim and dtype of the region's output and of the tail's, once run.
        self.region_output: tuple[int, torch.dtype] | None = None
        self.output: tuple[int, torch.dtype] | None = None

    def forward(self, *args):
        rerun = self.rerun_skips and torch._C._current_graph_task_id() != -1
        if self.tail is None:
            return (_Chunks.apply(self, rerun, self.chunks, *args),)
        region_args = args[:len(self.region.graph.find_nodes(op="placeholder"))]
        outputs = []
        for chunk in self.pieces(region_args):
            h = _Chunks.apply(self, rerun, 1, *chunk)
            if rerun:  # the tail's own autograd nodes from forward serve backward
                continue
            # What the tail saves stays with it (it is not a recomputation's to rebuild).
            with torch.autograd.graph.saved_tensors_hooks(_itself, _itself):
                outputs.append(self.tail(*(h if i < 0 else args[i] for i in self.tail_args))[0])
        x = region_args[self.split[0]]
        if rerun:
            width, dtype = self.output
            return (x.new_empty((*x.shape[:-1], width), dtype=dtype),)
        self.output = (outputs[0].shape[-1], outputs[0].dtype)
        return (_whole(outputs, x.shape[-2]),)

    def pieces(self, args: tuple, chunks: int | None = None, kept: int = 0) -> list[tuple]:
        """The region's arguments chunk by chunk (`kept`: so many kept outputs follow them, split
        too). On fake tensors (the cost model) one chunk: one chunk's tensors are what the real
        loop holds at a time."""
        tokens = args[self.split[0]].shape[-2]
        at = (*self.split, *range(len(args) - kept, len(args)))
        split = {i: args[i].split(-(-tokens // (chunks or self.chunks)), dim=-2) for i in at}
        count = 1 if is_fake(args[self.split[0]]) else len(split[self.split[0]])
        return [tuple(split[i][c] if i in split else a for i, a in enumerate(args)) for c in range(count)]

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}, rerun_skips={self.rerun_skips}, keeps={self.rerun is not None}"


def _autocast_state(device_type: str) -> dict:
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type), "cache_enabled": torch.is_autocast_cache_enabled()}


def _itself(t):
    return t


def _whole(outputs: list[torch.Tensor], tokens: int) -> torch.Tensor:
    """The chunks' outputs concatenated along tokens (fake: one chunk ran, the rest is empty)."""
    rest = tokens - sum(o.shape[-2] for o in outputs)
    if rest:
        outputs = [*outputs, outputs[0].new_empty((*outputs[0].shape[:-2], rest, outputs[0].shape[-1]))]
    return torch.cat(outputs, dim=-2)


def _written(region: fx.GraphModule, pieces: list[tuple], tokens: int) -> list[torch.Tensor]:
    """`region`'s outputs over the chunks `pieces`, each chunk's written into the whole outputs
    as it runs: one chunk's outputs exist beside the whole ones, where concatenating at the end
    would hold every chunk's (fake: one chunk ran, the rest is left empty)."""
    wholes, start = [], 0
    for chunk in pieces:
        outputs = region(*chunk)
        wholes = wholes or [o.new_empty((*o.shape[:-2], tokens, o.shape[-1])) for o in outputs]
        for whole, o in zip(wholes, outputs):
            whole.narrow(-2, start, o.shape[-2]).copy_(o)
        start += outputs[0].shape[-2]
        del outputs  # before the next chunk runs
    return wholes


class _Chunks(torch.autograd.Function):
    """`MiniSequence`'s step: forward without grad (`rerun`: the block's recomputation, the
    output left unwritten), backward a chunk at a time."""

    @staticmethod
    def forward(ctx, mini: MiniSequence, rerun: bool, chunks: int, *args):
        ctx.mini, ctx.chunks = mini, chunks
        # Backward reruns the chunks under the forward's autocast (as torch's checkpoint does):
        # backward runs outside it, and a rerun in other dtypes would give other gradients.
        ctx.autocast = [_autocast_state(d) for d in dict.fromkeys(("cpu", args[mini.split[0]].device.type))]
        x = args[mini.split[0]]
        if rerun and mini.region_output is not None:  # the forward's output row: width and dtype
            ctx.save_for_backward(*args)
            width, dtype = mini.region_output
            return x.new_empty((*x.shape[:-1], width), dtype=dtype)
        # Detached: views taken without grad of tensors that need one confuse module hooks (MemTracker's).
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        output, *kept = _written(mini.region, mini.pieces(plain, chunks), x.shape[-2])
        ctx.save_for_backward(*args, *kept)  # what an offloading region's hooks see: they take the kept outputs too
        ctx.kept = len(kept)
        mini.region_output = (output.shape[-1], output.dtype)
        return output

    @staticmethod
    def backward(ctx, grad):
        mini, saved = ctx.mini, ctx.saved_tensors
        kept = getattr(ctx, "kept", 0)
        wanted = ctx.needs_input_grad[3:]
        args = saved[:len(wanted)]
        grads: list = [None] * len(args)
        chunk_grads: dict[int, list] = {i: [] for i in mini.split if wanted[i]}
        start = 0
        for chunk in mini.pieces(saved, ctx.chunks, kept):
            inputs = [a.detach().requires_grad_(w) if isinstance(a, torch.Tensor) else a for a, w in zip(chunk, wanted)]
            with torch.enable_grad(), contextlib.ExitStack() as autocast:
                for state in ctx.autocast:
                    autocast.enter_context(torch.autocast(**state))
                # The region reads views of the leaves: module hooks that watch its inputs'
                # gradients (FlopCounterMode's, MemTracker's) cannot watch a leaf's in autograd.grad.
                views = (a.view_as(a) if isinstance(a, torch.Tensor) and w else a for a, w in zip(inputs, wanted))
                out = (mini.rerun(*views, *chunk[len(args):]) if kept else mini.region(*views))[0]
            rows = out.shape[-2]
            needed = [i for i, w in enumerate(wanted) if w]
            got = torch.autograd.grad(out, [inputs[i] for i in needed], grad.narrow(-2, start, rows))
            start += rows
            for i, g in zip(needed, got):
                if i in chunk_grads:
                    chunk_grads[i].append(g)
                else:
                    grads[i] = g if grads[i] is None else grads[i] + g
        for i, pieces in chunk_grads.items():
            whole = torch.cat(pieces, dim=-2)
            if whole.shape[-2] < args[i].shape[-2]:  # fake: one chunk ran
                whole = whole.new_zeros(args[i].shape)
            grads[i] = whole
        return None, None, None, *grads


class _KnownLinear(torch.autograd.Function):
    """A frozen linear (no bias, or a frozen one) whose output is known: forward returns it,
    backward takes the input gradient autograd takes for ``F.linear`` (grad · weight, in the
    gradient's dtype: under autocast the weight's cast, as autocast casts it)."""

    @staticmethod
    def forward(ctx, x, weight, output):
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight.to(grad.dtype)).to(ctx.x_dtype), None, None


def known_linear(x: torch.Tensor, weight: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)``, whose value `output` was kept in forward: backward reruns a
    `MiniSequence` region without this matmul, and its input gradient is still taken."""
    return _KnownLinear.apply(x, weight, output)


def region_target(block: str) -> str:
    """The region module of `block`, which also names its call (and, suffixed ``_out_<i>``, the
    call's outputs): a block's nodes are named after it, so a node of one block can be matched
    to the same node of another (`memory/compose.py`)."""
    return "lorafa_region_" + block.replace(".", "_")


def mlp_target(block: str) -> str:
    """The region of `block`'s MLP alone (selective recomputation, mini-sequence chunks)."""
    return region_target(block) + "_mlp"


def has_regions(gm: fx.GraphModule) -> bool:
    """Whether `gm` calls a region (a block with a decision other than keep)."""
    return any(meta.RECOMPUTE in meta.lorafa_meta(n) for n in gm.graph.find_nodes(op="call_module"))


def outlined_layers(gm: fx.GraphModule) -> list[str]:
    """Paths of the layers outlined into called submodules (FSDP2 units), in call order."""
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and meta.LAYER in meta.lorafa_meta(n)]
