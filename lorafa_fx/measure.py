"""Measurements of a real training step, used by the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def saved_activation_bytes(step: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd saves for backward while `step()` runs its forward.

    Every tensor autograd packs (`torch.autograd.graph.saved_tensors_hooks`) is counted once
    per storage, at the storage's size, so views of one buffer are not double-counted.
    Storages of `exclude` (the parameters and buffers: saved by reference, not activations)
    are left out.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(saved.values())


def module_state(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of `module`, the tensors `saved_activation_bytes` excludes."""
    return [*module.parameters(), *module.buffers()]
