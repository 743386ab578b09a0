"""Eager AdamW step time of lorafa_fx against PEFT LoRA with ``lora_A`` frozen, on the zoo's quick Llama.

The eager time ratio of bench_methods.py (lorafa_fx / PEFT LoRA-FA) without the rest of it:
same model (``lorafa_fx.zoo.make_model("llama", "quick")``), batch, r and alpha, one thread,
steps interleaved A, B, A, B, ... and the median of the per-pair ratios (machine noise hits
both sides of a pair alike). ``--profile`` prints each side's top ops by self CPU time
(torch.profiler) instead.

    OMP_NUM_THREADS=1 python -m bench.bench_eager_step [--pairs 15] [--profile] [--method M --against M]

(``-m`` from the repository root, so the checkout's `lorafa_fx` is the one imported.) Methods
are bench_methods' names (``lorafa_fx``, ``lorafa_fx+chunk_ce``, ``peft_lora_fa``, ...). Steps
that page-fault are slower for reasons outside the graph (glibc returning freed memory to the
OS, then faulting it back in): the minor page faults per step are printed with the times, and
``--keep-heap`` tells glibc to keep freed memory (`mallopt`), so that both sides are timed
without them.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import METHODS, build  # noqa: E402

from lorafa_fx import zoo  # noqa: E402

#: What `build` makes on its own (the budgeted row needs bench_methods' measured peak).
BUILDABLE = [m for m in METHODS if m != "lorafa_fx_budget60"]


def _step_fn(module: torch.nn.Module, batch: dict):
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    module.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        module(**batch).loss.backward()
        opt.step()
    return step


def _keep_heap() -> None:
    """glibc: serve allocations up to 32 MiB (its maximum) from the heap and never trim it."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def _time(step) -> tuple[float, float, int]:
    """(wall, CPU) seconds and minor page faults of one step; CPU time leaves out the time
    other jobs held the core."""
    f0, t0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter(), time.process_time()
    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return time.perf_counter() - t0, time.process_time() - c0, faults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--method", default="lorafa_fx", choices=BUILDABLE)
    ap.add_argument("--against", default="peft_lora_fa", choices=BUILDABLE)
    ap.add_argument("--keep-heap", action="store_true")
    args = ap.parse_args()
    if args.keep_heap:
        _keep_heap()
    torch.set_num_threads(1)
    model = zoo.make_model("llama", "quick")
    batch = zoo.make_batch("llama", args.batch, args.seq, size="quick")
    steps = {m: _step_fn(build(m, model, "llama", batch), batch) for m in (args.against, args.method)}
    for step in steps.values():
        step(), step()
    if args.profile:
        for name, step in steps.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
            print(f"== {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        return
    ref, ours = [], []
    for _ in range(args.pairs):
        ref.append(_time(steps[args.against]))
        ours.append(_time(steps[args.method]))
    faults = [statistics.median(t[2] for t in ts) for ts in (ref, ours)]
    print(f"median minor page faults per step: {args.against} {faults[0]:.0f}, {args.method} {faults[1]:.0f}")
    for i, clock in enumerate(("wall", "CPU")):
        r, o = [t[i] for t in ref], [t[i] for t in ours]
        ratio = statistics.median(b / a for a, b in zip(r, o))
        print(f"{clock:4}: {args.against} {1e3 * statistics.median(r):.1f} ms, {args.method} "
              f"{1e3 * statistics.median(o):.1f} ms (medians of {args.pairs}); "
              f"median paired ratio {args.method} / {args.against} = {ratio:.3f}, ratio of minima "
              f"{min(o) / min(r):.3f}")


if __name__ == "__main__":
    main()
