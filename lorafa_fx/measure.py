"""Measurements of a real training step, used by the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.distributed._tools.mem_tracker import MemTracker


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


class _FrozenSafeMemTracker(MemTracker):
    """MemTracker without per-parameter grad hooks.

    MemTracker hooks every parameter to label its gradient, and ``register_hook`` raises on
    a parameter that does not require grad ("cannot register a hook on a tensor that doesn't
    require gradient") — every frozen LoRA base weight. Gradients are still allocated
    through the dispatcher, so the totals and the peak are unchanged; only the GRAD label is
    lost.
    """

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        return super()._track_module_params_and_buffers(module, install_grad_hooks=False)


def measure_peak_bytes(step: Callable[[], object], *state: object) -> int:
    """Peak bytes of live tensors while `step()` runs, on the device of `state`'s tensors.

    `state`: modules, optimizers and tensors alive before the step (weights, optimizer
    states, the batch); they count toward the peak as they do on a real device. Measured with
    torch's `MemTracker` (CPU and GPU alike); on a GPU `torch.cuda.max_memory_allocated` is the
    allocator's view of the same thing.
    """
    tracker = _FrozenSafeMemTracker()
    tracker.track_external(*state)
    with tracker:
        step()
    peaks = tracker.get_tracker_snapshot("peak")
    return max(snap["Total"] for snap in peaks.values())
