"""Activation offload at run time: a block's saved tensors wait in host memory for backward.

`Offload` calls a region (an outlined block, see `recompute_regions.py`) under
``torch.autograd.graph.saved_tensors_hooks``: each tensor autograd saves in it (but parameters,
and tensors under `MIN_BYTES`) is copied to host memory when saved, and the device copy is freed
once that copy is done (a bounded number of regions later: below); backward copies it back. On
CUDA the copies run on a side stream into pinned memory, and when backward first needs a
region's tensors it also fetches the previous region's, so that transfer overlaps
the region's backward compute (torchtune's OffloadActivations does the same), unless
that region is not ``prefetched``: then its tensors are fetched when its own backward needs them,
their transfer waited for but their bytes never on the device beside the next region's (the
floor's lever, `Decision.OFFLOAD_MINI_SEQUENCE`).

Copies in flight are bounded: a region's device tensors are held (not freed) until its copies
are done, and before region ``k`` (in forward order) runs, the compute stream waits for the
copies of region ``k - COPIES_IN_FLIGHT`` and lets go of its tensors (torchtune's stash: a wait
on the stream, not ``record_stream``, so the caching allocator may hand the bytes out again at
once, in stream order, rather than when the CPU next sees the copy done). At most the tensors
of the last ``COPIES_IN_FLIGHT`` offloaded regions (one done, one running) are held past their
last use; after the last offloaded region of a forward (``Offloader.count``, set by the pass)
the compute stream waits for every copy, so none is held into the loss or backward. The held
tensors are held the same way under `FakeTensorMode`, so the cost model counts them where they
are (the step's predicted peak includes them), and `memory.timing.transfer_wait` charges the
waits. On the
CPU the copy is a host tensor like any other: the code path is the same, the memory is not
freed, so the planner never chooses offload for a CPU step. Under `FakeTensorMode` (the cost
model) a saved tensor becomes a record of its shape, and fetching it allocates a fake tensor:
the simulated step frees and re-allocates what the real one does, where it does.

`OffloadedCheckpoint` is the same with the region checkpointed (torch's non-reentrant
checkpoint): its large inputs are packed by the same hook when it is called, and its forward
reads them directly, its recomputation in backward through their host copies (torch's
checkpoint would hold them in a closure, on the device). So the block keeps nothing on the
device between its forward and its backward: its input (the residual stream) waits in host
memory, is fetched back ahead of the block's backward like any offloaded tensor, and backward
reruns the block's forward from it (restoring the RNG state, so dropout draws the same masks).
Non-reentrant, the rerun's gradients flow through the forward's own graph: neither the block's
output gradient nor the rerun's outputs are held through the block's backward, as a reentrant
checkpoint's backward holds them (one b·s·d tensor each, at the floor's peak).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

#: Tensors smaller than this stay where they are: the copy's latency outweighs the bytes.
MIN_BYTES = 1 << 20

#: Offloaded regions whose copies may still run while a region computes (itself included): two
#: lets the previous region's copy overlap this one's forward.
COPIES_IN_FLIGHT = 2


class _Stored:
    """One offloaded storage (views of it saved by several ops are copied once): its host copy
    (fake: its size), and its device copy once fetched."""

    __slots__ = ("host", "nbytes", "mode", "device", "fetched", "views")

    def __init__(self, t: torch.Tensor, stream) -> None:
        storage = t.untyped_storage()
        self.device, self.nbytes, self.fetched, self.views = t.device, storage.nbytes(), None, 0
        self.mode = t.fake_mode if is_fake(t) else None
        if self.mode is not None:
            self.host = None
            return
        raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
        self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=t.is_cuda)
        if stream is None:
            self.host.copy_(raw)
            return
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            self.host.copy_(raw, non_blocking=True)

    def fetch(self, stream) -> None:
        if self.fetched is not None or self.views <= 0:
            return
        if self.mode is not None:
            with self.mode:
                self.fetched = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        elif stream is None:
            self.fetched = self.host.to(self.device)
        else:
            with torch.cuda.stream(stream):
                self.fetched = self.host.to(self.device, non_blocking=True)


class _Region:
    """The storages one region offloaded in one forward."""

    __slots__ = ("stored", "started", "prefetched", "held", "copied")

    def __init__(self, prefetched: bool) -> None:
        self.stored: list[_Stored] = []
        self.started = False  # backward has used one of them
        self.prefetched = prefetched  # fetched when backward reaches the region after it
        self.held: list[torch.Tensor] = []  # device tensors being copied (kept alive until `settle`)
        # The device and an event on its copy stream after the region's copies (CUDA only).
        self.copied: tuple[torch.device, torch.cuda.Event] | None = None

    def settle(self) -> None:
        """The compute stream waits for the region's copies; its device tensors may be freed."""
        if self.copied is not None:
            device, event = self.copied
            torch.cuda.current_stream(device).wait_event(event)
            self.copied = None
        self.held = []


class _Saved:
    """A saved tensor: a view of an offloaded storage."""

    __slots__ = ("stored", "view", "regions", "region")

    def __init__(self, stored: _Stored, t: torch.Tensor, regions: list[_Region], region: int) -> None:
        self.stored, self.regions, self.region = stored, regions, region
        self.view = (t.dtype, t.storage_offset(), t.shape, t.stride())

    def tensor(self) -> torch.Tensor:
        dtype, offset, shape, stride = self.view
        return self.stored.fetched.view(dtype).as_strided(shape, stride, offset)


class Offloader:
    """Offloads the saved tensors of a graph's `Offload` regions, one forward at a time."""

    def __init__(self, regions: int = 0) -> None:
        self.count = regions  # offloaded regions a forward runs (the pass sets it)
        self.regions: list[_Region] = []
        self._open: dict[int, tuple[torch.UntypedStorage, _Stored]] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def __deepcopy__(self, memo) -> Offloader:
        return Offloader(self.count)  # streams and in-flight tensors belong to this module's steps

    # The hooks below run eagerly under torch.compile: they keep host-side books and copies
    # that no graph holds, and traced, dynamo compiled one frame per saved tensor's shape and
    # dtype until its recompile limit.
    @torch.compiler.disable
    def pack_hook(self, position: int, prefetched: bool = True):
        """The pack hook of the region at `position` (0: the first a forward runs); not
        `prefetched`: its tensors are fetched when its own backward needs them."""
        if position == 0:
            for r in self.regions:  # a forward that never reached its last region
                r.settle()
            self.regions = []  # a new forward: its regions, which its backward will fetch
        regions, region = self.regions, len(self.regions)
        if region >= COPIES_IN_FLIGHT:
            regions[region - COPIES_IN_FLIGHT].settle()
        regions.append(_Region(prefetched))

        def pack(t: torch.Tensor):
            if isinstance(t, torch.nn.Parameter) or t.untyped_storage().nbytes() < MIN_BYTES:
                return t
            storage = t.untyped_storage()
            # The storage is held while the region runs, so its address names it alone.
            if storage._cdata not in self._open:
                stored = _Stored(t, self._stream(t.device, is_fake(t)))
                self._open[storage._cdata] = (storage, stored)
                regions[region].stored.append(stored)
                regions[region].held.append(t)
            stored = self._open[storage._cdata][1]
            stored.views += 1
            return _Saved(stored, t, regions, region)

        return torch.compiler.disable(pack)

    @torch.compiler.disable
    def end_region(self) -> None:
        """The region's forward is over: its copies are on their way (the forward's last
        region: the compute stream waits for every copy, and their device tensors are freed)."""
        self._open.clear()
        region = self.regions[-1]
        if region.held:
            device, fake = region.held[0].device, region.stored[0].mode is not None
            if (stream := self._stream(device, fake)) is not None:
                region.copied = (device, stream.record_event())
        if len(self.regions) >= self.count:
            for r in self.regions:
                r.settle()

    @torch.compiler.disable
    def unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        region = saved.regions[saved.region]
        if not region.started:
            # Backward reached this region: fetch what it has not yet, and the one before it
            # ahead of its need (so each region's fetch overlaps the backward of the next).
            region.started = True
            ahead = saved.regions[saved.region - 1] if saved.region > 0 else None
            for r in (region, *([ahead] if ahead is not None and ahead.prefetched else [])):
                for stored in r.stored:
                    stored.fetch(self._stream(stored.device, stored.mode is not None))
        saved.stored.fetch(self._stream(saved.stored.device, saved.stored.mode is not None))
        t = saved.tensor()
        saved.stored.views -= 1
        if saved.stored.views <= 0:  # its last view is out: the device copy dies with the tensors using it
            saved.stored.fetched = None
        if t.is_cuda and t.device in self._streams:
            torch.cuda.current_stream(t.device).wait_stream(self._streams[t.device])
            t.record_stream(torch.cuda.current_stream(t.device))
        return t

    @torch.compiler.disable
    def fetch_ahead(self, position: int) -> None:
        """Backward passed the prefetch point of the region at `position`: fetch the region
        before it (one not ``prefetched``) now, while the rest of this region's backward runs."""
        if 0 < position <= len(self.regions):
            for stored in self.regions[position - 1].stored:
                stored.fetch(self._stream(stored.device, stored.mode is not None))

    def _stream(self, device: torch.device, fake: bool) -> torch.cuda.Stream | None:
        if device.type != "cuda" or fake:
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]


class Offload(torch.nn.Module):
    """Calls `region`, the `position`-th offloaded region of its graph, with its saved tensors
    offloaded by `offloader` (one per graph); `prefetched`: fetched ahead, during the backward
    of the offloaded region after it."""

    def __init__(
        self, region: torch.fx.GraphModule, offloader: Offloader, position: int, prefetched: bool = True
    ) -> None:
        super().__init__()
        self.region = region
        self.offloader = offloader
        self.position = position
        self.prefetched = prefetched

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.region(*args)
        try:
            return self.run(self.offloader.pack_hook(self.position, self.prefetched), *args)
        finally:
            self.offloader.end_region()

    def run(self, pack, *args):
        """The region's forward, what it saves packed by `pack` (this region's hook)."""
        with torch.autograd.graph.saved_tensors_hooks(pack, self.offloader.unpack):
            return self.region(*args)


class OffloadedCheckpoint(Offload):
    """An `Offload` region that is also checkpointed: what it keeps is its inputs, in host memory."""

    def run(self, pack, *args):
        packed = [pack(a) if isinstance(a, torch.Tensor) else a for a in args]
        offloaded = {i: a.requires_grad for i, (a, p) in enumerate(zip(args, packed)) if isinstance(p, _Saved)}
        first = {i: args[i] for i in offloaded}  # the forward's own inputs, let go once it ran

        def rerun(*kept_and_devices):
            inputs = iter(kept_and_devices)
            return self.region(*(
                (first.pop(i) if i in first else self._fetch(packed[i], offloaded[i]))
                if i in offloaded else next(inputs) for i in range(len(packed))
            ))

        # torch's checkpoint restores the RNG state of its tensor arguments' devices: an
        # empty tensor stands on each offloaded input's device, so dropout draws the same masks.
        devices = [torch.empty(0, device=args[i].device) for i in offloaded]
        with set_checkpoint_early_stop(False):
            return checkpoint(rerun, *(a for i, a in enumerate(args) if i not in offloaded), *devices,
                              use_reentrant=False)

    def _fetch(self, saved: _Saved, requires_grad: bool) -> torch.Tensor:
        # The rerun must save what the forward saved: ops save their inputs only when one needs a grad.
        return self.offloader.unpack(saved).detach().requires_grad_(requires_grad)


class PrefetchPoint(torch.nn.Module):
    """Passes its input through; when backward passes it, the offloaded region before the
    `position`-th is fetched (`Offloader.fetch_ahead`). Placed on a block's attention input: the
    block's backward is past its attention's (where its peak is, at the floor) and the fetch
    overlaps the query/key/value projections' backward."""

    def __init__(self, offloader: Offloader, position: int) -> None:
        super().__init__()
        self.offloader, self.position = offloader, position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FetchAhead.apply(self, x) if torch.is_grad_enabled() and x.requires_grad else x


class _FetchAhead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, point: PrefetchPoint, x: torch.Tensor) -> torch.Tensor:
        ctx.point = point
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.point.offloader.fetch_ahead(ctx.point.position)
        return None, grad
