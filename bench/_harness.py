"""Timing and memory helpers shared by the benchmarks (CPU; the same calls work on a GPU).

* `step_peak_bytes`: peak memory of one training step = the state alive before it (weights,
  buffers, optimizer states, batch; unique storages) + the highest point of the bytes the
  step allocates on top. The second term is read from the CPU allocator itself: with
  ``torch.profiler(profile_memory=True)`` c10's allocator reports every allocation and free
  with its running total, so tensors created inside `torch.compile`'d code (Inductor's
  buffers, which no `TorchDispatchMode` sees) are counted too.
* `memtracker_peak_bytes`: the same peak from torch's `MemTracker` (a `TorchDispatchMode`),
  as an eager-only cross-check: `lorafa_fx.measure.measure_peak_bytes`, whose tracker skips
  the per-parameter grad hooks that raise on frozen parameters.
* `step_memory`: all of a step's memory figures at once (peaks, saved activations).
* `interleaved`: round-robin repetitions over all methods, so machine noise hits all alike.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from lorafa_fx.measure import measure_peak_bytes as memtracker_peak_bytes
from lorafa_fx.measure import module_state, saved_activation_bytes

_MARKER_BYTES = 1 << 20


def set_threads(n: int) -> int:
    torch.set_num_threads(n)
    return torch.get_num_threads()


def env_info() -> dict:
    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "cpu": _cpu_name(), "python": platform.python_version(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def state_tensors(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch: dict) -> list[torch.Tensor]:
    """Everything alive before a step: parameters, buffers, grads, optimizer states, the batch."""
    out = [*module.parameters(), *module.buffers()]
    out += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        out += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    out += [v for v in batch.values() if isinstance(v, torch.Tensor)]
    return out


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's start/stop lines (C++ logging on fd 2)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocated_peak_bytes(step: Callable[[], object]) -> int:
    """Highest total of bytes allocated by `step()` and not yet freed (CPU allocator's count).

    Frees of tensors allocated before the call are not seen (the allocator cannot size them),
    so release what should not count (e.g. ``zero_grad(set_to_none=True)``) beforehand.
    """
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        marker = torch.empty(_MARKER_BYTES, dtype=torch.uint8)
        del marker
        step()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.typed[1].device.type == "cpu":
            events.append((e.start_time_ns, e.typed[1].alloc_size, e.typed[1].total_allocated))
        stack.extend(e.children)
    events.sort()
    first = next(i for i, e in enumerate(events) if e[1] == _MARKER_BYTES)
    baseline = events[first][2] - _MARKER_BYTES
    return max(total for _, _, total in events[first:]) - baseline


def step_peak_bytes(step: Callable[[], object], state: Iterable[torch.Tensor]) -> dict[str, int]:
    """Peak bytes of `step()`: unique storages of `state` + `allocated_peak_bytes(step)`."""
    state_b = unique_bytes(state)
    extra = allocated_peak_bytes(step)
    return {"peak": state_b + extra, "state": state_b, "step_extra": extra}


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """`reps` rounds; each round runs every fn once, in order. Seconds per call, by name."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def step_memory(step: Callable[[], object], forward: Callable[..., object], module: torch.nn.Module,
                optimizer: torch.optim.Optimizer, batch: dict, cross_check: bool) -> dict[str, int]:
    """Memory of one training step `step()` (AdamW states already allocated):

    ``peak_bytes``, ``state_bytes``, ``step_extra_bytes`` (`step_peak_bytes`), ``saved_bytes``
    (bytes autograd saves in ``forward(**batch)``, parameters and buffers left out) and, with
    `cross_check` (eager code only), ``peak_memtracker_bytes``.
    """
    optimizer.zero_grad(set_to_none=True)
    out = {f"{k}_bytes": v for k, v in step_peak_bytes(step, state_tensors(module, optimizer, batch)).items()}
    optimizer.zero_grad(set_to_none=True)
    out["saved_bytes"] = saved_activation_bytes(lambda: forward(**batch).loss, exclude=module_state(module))
    if cross_check:
        optimizer.zero_grad(set_to_none=True)
        out["peak_memtracker_bytes"] = memtracker_peak_bytes(
            step, module, optimizer, *[v for v in batch.values() if isinstance(v, torch.Tensor)])
    return out
