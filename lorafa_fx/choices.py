"""The named choices a plan is made of: what happens to a block's activations (`Decision`) and
how a data-parallel job holds its parameters (`Sharding`). Both are `str` enums, so a plan's
JSON, its printout and ``sharding="full"`` in a call read as before."""

from __future__ import annotations

from enum import Enum


class Decision(str, Enum):
    """What one repeated block (``model.layers.3``) does with what autograd saves in it."""

    KEEP = "keep"  # saved tensors stay on the device until backward (eager PyTorch)
    RECOMPUTE = "recompute"  # keeps only its inputs; backward reruns its forward (checkpointing)
    OFFLOAD = "offload"  # saved tensors wait in host memory between forward and backward
    OFFLOAD_CHECKPOINT = "offload_checkpoint"  # recomputed, and its inputs wait in host memory
    SELECTIVE = "selective"  # its MLP up to the last linear recomputed from the norm's input; the rest kept
    OFFLOAD_MLP = "offload_mlp"  # what that part of its MLP keeps waits in host memory; the rest kept
    OFFLOAD_SELECTIVE = "offload_selective"  # offloaded, but its MLP's gate recomputed (in chunks) instead
    MINI_SEQUENCE = "mini_sequence"  # recomputed, its MLP a chunk of tokens at a time (MsT)
    OFFLOAD_MINI_SEQUENCE = "offload_mini_sequence"  # both: recomputed in chunks, its inputs in host memory

    def __str__(self) -> str:
        return self.value


#: The decisions whose block sends tensors to host memory (a card's lever: `ops/offload.py`).
OFFLOADED = frozenset({
    Decision.OFFLOAD, Decision.OFFLOAD_CHECKPOINT, Decision.OFFLOAD_MLP, Decision.OFFLOAD_SELECTIVE,
    Decision.OFFLOAD_MINI_SEQUENCE,
})


class Sharding(str, Enum):
    """How a data-parallel job (``world_size``) holds the parameters."""

    FULL = "full"  # FSDP2: every parameter sharded 1/world_size, each layer a called unit
    NONE = "none"  # DDP: replicated; only trained parameters' gradients are all-reduced

    def __str__(self) -> str:
        return self.value


def choice(enum: type[Enum], value: object, name: str, error: type[Exception]) -> Enum:
    """`value` (a member or its string) as a member of `enum`; `error` naming `name` and the
    accepted values otherwise."""
    try:
        return enum(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in enum)
        raise error(f"{name}={value!r}: use one of {accepted}.") from None
