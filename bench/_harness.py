"""What the benchmarks share: running one (`run_bench`: its JSON with the commit, command, date
and machine; progress lines and a status line while it is silent), the planning keywords of
`lorafa_fx`'s entry points (`plan_args`), and the measurements of a training step (CPU; the
same calls work on a GPU):

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

import argparse
import contextlib
import importlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from lorafa_fx.measure import measure_peak_bytes as memtracker_peak_bytes
from lorafa_fx.measure import module_state, saved_activation_bytes

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
RESULTS = BENCH / "results"
#: A bench silent for this long gets a status line on stderr.
STATUS_EVERY_S = 10.0
MiB = 2**20


def plan_args(budget: int | str | None = None, **settings: object) -> dict[str, object]:
    """The planning keywords of `lorafa_fx.transform` / `estimate`: the budget, and the other
    `lorafa_fx.PlanConfig` fields (device, world_size, offload, ...) as ``plan=``."""
    import lorafa_fx

    return {"budget": budget, "plan": lorafa_fx.PlanConfig(**settings)}


def require(module: str, needed_for: str) -> ModuleType:
    """`module`, or an exit that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"{needed_for} needs {module}: pip install -e '.[bench]'") from None


def quiet_libraries() -> None:
    """No info/warning logs from transformers (e.g. per-model notices on every build)."""
    import transformers

    transformers.logging.set_verbosity_error()


# -- progress ---------------------------------------------------------------------------------

_status = {"line": "starting", "at": time.monotonic(), "paused": False}


def progress(line: str) -> None:
    """One line of progress on stdout, stamped with the time of day."""
    _status.update(line=line, at=time.monotonic())
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


@contextlib.contextmanager
def status_line(every_s: float = STATUS_EVERY_S) -> Iterator[None]:
    """While the body runs, a line on stderr whenever `progress` has been silent `every_s`."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(1.0):
            silent = time.monotonic() - _status["at"]
            if silent >= every_s and not _status["paused"]:
                print(f"[{time.strftime('%H:%M:%S')}] ... still at: {_status['line']}", file=sys.stderr, flush=True)
                _status["at"] = time.monotonic()

    _status["at"] = time.monotonic()
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def status_paused() -> Iterator[None]:
    """No status line from this process while the body runs (a child process prints its own)."""
    _status["paused"] = True
    try:
        yield
    finally:
        _status.update(paused=False, at=time.monotonic())


# -- one run: arguments, JSON, saving -----------------------------------------------------------


def parser(name: str, module: ModuleType) -> argparse.ArgumentParser:
    """The bench's own arguments, and those every bench takes."""
    ap = argparse.ArgumentParser(prog=f"python -m bench {name}", description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(ap)
    ap.add_argument("--smoke", action="store_true",
                    help="the smallest run (tiny models, seconds): checks the code path, figures are not results")
    ap.add_argument("--out", type=Path, default=OUT, help=f"where <name>.json goes (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--save", action="store_true", help=f"then copy the JSON to {RESULTS.relative_to(ROOT)}/")
    return ap


def run_bench(name: str, module: ModuleType, argv: list[str]) -> dict:
    """Run bench `name` with its arguments `argv`; write, print (and with --save, save) its JSON."""
    args = parser(name, module).parse_args(argv)
    # The code that runs is the code at the start: its commit, and whether it differs from it.
    commit, dirty = _git("rev-parse", "HEAD"), _dirty()
    started, load_before, threads = time.time(), _load_average(), torch.get_num_threads()
    quiet_libraries()
    try:
        with status_line(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bench reports figures; the library's notices are the tests' business
            result = module.run(args)
        env = machine(getattr(args, "device", "cpu"))  # before the thread count is restored
    finally:
        torch.set_num_threads(threads)  # a bench run in-process (the tests) leaves the caller's setting
    record = {
        "bench": name, "command": _command(name, argv), "commit": commit, "dirty": dirty,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)), "wall_s": time.time() - started,
        "machine": env | {"load_average": [load_before, _load_average()]},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "result": result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print("\n" + module.markdown(result))
    print(f"wrote {path} in {record['wall_s']:.0f} s")
    if args.save:
        save([name], args.out)
    return record


def save(names: Iterable[str], out: Path = OUT) -> None:
    """Copy each bench's JSON from `out` to bench/results/, the files RESULTS.md is made from."""
    RESULTS.mkdir(exist_ok=True)
    for name in names:
        src = out / f"{name}.json"
        if not src.exists():
            raise SystemExit(f"no {src}: run `python -m bench {name}` first")
        shutil.copyfile(src, RESULTS / src.name)
        print(f"saved {RESULTS / src.name}")


def _command(name: str, argv: list[str]) -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ)
    return " ".join(filter(None, [env, "python -m bench", name, shlex.join(argv)]))


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _dirty() -> bool | None:
    """Whether the code differs from the commit (the saved results and RESULTS.md do not count)."""
    status = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results", ":(exclude)bench/RESULTS.md")
    return None if status is None else bool(status)


def _load_average() -> float | None:
    with contextlib.suppress(OSError):
        return round(os.getloadavg()[0], 1)
    return None


def machine(device: str = "cpu") -> dict:
    import transformers

    return {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def md_table(header: Iterable[str], rows: Iterable[Iterable[object]], left: int = 1) -> str:
    """A markdown table; the first `left` columns are left-aligned, the rest right-aligned."""
    header = list(header)
    rule = "".join("---|" if i < left else "---:|" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", "|" + rule]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -- measurements -----------------------------------------------------------------------------

_MARKER_BYTES = 1 << 20


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
    # From the marker's free on: the marker itself is not the step's.
    return max((total for _, _, total in events[first + 1:]), default=baseline) - baseline


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
