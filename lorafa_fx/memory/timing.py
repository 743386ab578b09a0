"""The step-time model: how long a planned step takes on a card (`devices.DeviceProfile`).

    step = (forward + backward + recomputed FLOPs) / (dense bf16 FLOP/s x ACHIEVED_FRACTION)
         + transfer_wait

FLOPs are `flops.py`'s (FlopCounterMode's convention: matmuls and attention; the achieved
fraction stands for everything else a step spends time on). `transfer_wait` is the time compute
waits for the host link, on a schedule that follows `ops/offload.py`'s:

* forward: each tensor an offloaded block saves (an offloaded checkpoint's: its input, when the
  block is called) is copied to the host once autograd saves it (`ops.offload`'s pack hook:
  ``BlockTime.copied``, from the forward FLOPs before its first reader), one after another on
  one link (one direction: its rate is the profile's), while the block and the following ones
  compute. The copies in flight are bounded (`ops.offload.COPIES_IN_FLIGHT`): an offloaded
  block's forward starts only once the copies of the offloaded block that many before it are
  done, and after the last offloaded block's forward compute waits for every copy (their
  device memory is freed then); those waits are the forward's.
* backward: when backward reaches an offloaded block, the block's tensors are fetched (unless
  already on their way) and so are the previous offloaded block's (unless it is not
  ``prefetched``), queued behind them; the block's backward waits for its own. A block with a
  prefetch point (``lead``: the seconds of its backward after it, `ops.offload.PrefetchPoint`)
  fetches the previous offloaded block there instead. Each fetch overlaps the backward (and
  recomputation) of the blocks after it in backward order.

Assumptions (the plan printout states them): copies and compute overlap fully (a side stream,
pinned host memory) and one copy at a time uses the link's nominal rate; a block's forward is
its FLOPs at the achieved rate, its backward its backward FLOPs plus what it recomputes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..ops.offload import COPIES_IN_FLIGHT


@dataclass(frozen=True)
class BlockTime:
    """What the model reads of one repeated block, in graph order."""

    forward: float  # seconds of its forward
    backward: float  # seconds of its backward, recomputation included
    transfer: float = 0.0  # seconds its offloaded bytes take over the link, one way (0: none)
    prefetched: bool = True  # fetched during the backward of the offloaded block after it
    lead: float = 0.0  # seconds of its backward after its prefetch point (0: it has none)
    # Seconds from its forward's start until an idle link has copied it all, each tensor's copy
    # starting when autograd saves it (None: all of them when its forward ends).
    copied: float | None = None


def transfer_wait(blocks: Sequence[BlockTime]) -> float:
    """Seconds compute waits for the link in a step of `blocks` (see the module docstring)."""
    offloaded = [i for i, b in enumerate(blocks) if b.transfer]
    position = {i: p for p, i in enumerate(offloaded)}
    clock = link = wait = 0.0
    copied: list[float] = []  # when each offloaded block's copy is done, in forward order
    for i, block in enumerate(blocks):
        if block.transfer and len(copied) >= COPIES_IN_FLIGHT:
            wait, clock = wait + max(0.0, copied[-COPIES_IN_FLIGHT] - clock), max(clock, copied[-COPIES_IN_FLIGHT])
        start, clock = clock, clock + block.forward
        if block.transfer:
            copied_by = block.forward + block.transfer if block.copied is None else block.copied
            link = max(link + block.transfer, start + copied_by)  # one copy at a time, each once saved
            copied.append(link)
            if i == offloaded[-1]:
                wait, clock = wait + max(0.0, link - clock), max(clock, link)
    ready: dict[int, float] = {}  # offloaded block -> when its fetch is done
    clock = link = 0.0
    for i in reversed(range(len(blocks))):
        if i in position:
            p = position[i]
            ahead = offloaded[p - 1] if p and blocks[offloaded[p - 1]].prefetched else None
            for j in (i, ahead) if ahead is not None else (i,):
                if j not in ready:
                    link = max(link, clock) + blocks[j].transfer
                    ready[j] = link
            wait += max(0.0, ready[i] - clock)
            clock = max(clock, ready[i])
            if p and offloaded[p - 1] not in ready and blocks[i].lead:
                link = max(link, clock + blocks[i].backward - blocks[i].lead) + blocks[offloaded[p - 1]].transfer
                ready[offloaded[p - 1]] = link
        clock += blocks[i].backward
    return wait
