"""Eager AdamW step time of lorafa_fx against PEFT LoRA with ``lora_A`` frozen, one pair at a time.

The eager time ratio of the methods bench (lorafa_fx / PEFT LoRA-FA) without the rest of it:
the same model (``lorafa_fx.zoo.make_model("llama", "quick")``; ``--smoke``: "test"), batch
(4 x 128), r and alpha, one thread, steps interleaved A, B, A, B, ... and the median of the
per-pair ratios (machine noise hits both sides of a pair alike), in wall and in process CPU
time (CPU time leaves out the time other jobs held the core). ``--profile`` records each
side's top ops by self CPU time (torch.profiler) instead. Methods are the methods bench's
names (``--method``, ``--against``). Steps that page-fault are slower for reasons outside the
graph (glibc returning freed memory to the OS, then faulting it back in): the minor page
faults per step are recorded with the times, and ``--keep-heap`` tells glibc to keep freed
memory (`mallopt`), so that both sides are timed without them.
"""

from __future__ import annotations

import ctypes
import resource
import statistics
import time

import torch

from bench import _harness as H
from bench.methods import METHODS, build
from lorafa_fx import zoo

#: What `build` makes on its own (the budgeted row needs the methods bench's measured peak).
BUILDABLE = [m for m in METHODS if m != "lorafa_fx_budget60"]


def add_arguments(ap) -> None:
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--method", default="lorafa_fx", choices=BUILDABLE)
    ap.add_argument("--against", default="peft_lora_fa", choices=BUILDABLE)
    ap.add_argument("--keep-heap", action="store_true")


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
    """(wall, CPU) seconds and minor page faults of one step."""
    f0, t0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter(), time.process_time()
    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return time.perf_counter() - t0, time.process_time() - c0, faults


def run(args) -> dict:
    if args.smoke:
        args.pairs, args.batch, args.seq = 2, 2, 32
    if args.keep_heap:
        _keep_heap()
    torch.set_num_threads(1)
    size = "test" if args.smoke else "quick"
    model = zoo.make_model("llama", size)
    batch = zoo.make_batch("llama", args.batch, args.seq, size=size)
    steps = {}
    for m in (args.against, args.method):
        H.progress(f"building {m}")
        steps[m] = _step_fn(build(m, model, "llama", batch), batch)
    for step in steps.values():
        step(), step()
    out = {"model": f'zoo.make_model("llama", "{size}")', "batch": args.batch, "seq": args.seq,
           "method": args.method, "against": args.against, "keep_heap": args.keep_heap}
    if args.profile:
        profiles = {}
        for name, step in steps.items():
            H.progress(f"profiling 3 steps of {name}")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
            profiles[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        return out | {"profiles": profiles}
    H.progress(f"timing {args.pairs} pairs")
    ref, ours = [], []
    for _ in range(args.pairs):
        ref.append(_time(steps[args.against]))
        ours.append(_time(steps[args.method]))
    out["pairs"] = args.pairs
    out["minor_faults_median"] = {args.against: statistics.median(t[2] for t in ref),
                                  args.method: statistics.median(t[2] for t in ours)}
    for i, clock in enumerate(("wall", "cpu")):
        r, o = [t[i] for t in ref], [t[i] for t in ours]
        out[clock] = {"against_ms": 1e3 * statistics.median(r), "method_ms": 1e3 * statistics.median(o),
                      "paired_ratio_median": statistics.median(b / a for a, b in zip(r, o)),
                      "ratio_of_minima": min(o) / min(r), "against_s": r, "method_s": o}
    return out


def markdown(result: dict) -> str:
    head = (f"{result['model']}, batch {result['batch']} x {result['seq']}, 1 thread"
            + (", glibc heap kept (`--keep-heap`)" if result["keep_heap"] else "") + ".\n\n")
    method, against = result["method"], result["against"]
    if "profiles" in result:
        return head + "".join(f"{name}, top ops by self CPU time:\n\n```\n{table}\n```\n\n"
                              for name, table in result["profiles"].items())
    faults = result["minor_faults_median"]
    rows = [[clock, f"{d['against_ms']:.1f}", f"{d['method_ms']:.1f}", f"{d['paired_ratio_median']:.3f}",
             f"{d['ratio_of_minima']:.3f}"] for clock, d in ((c, result[c]) for c in ("wall", "cpu"))]
    return (head + H.md_table(["clock", f"{against} ms (median)", f"{method} ms (median)",
                               f"{method} / {against}, median paired ratio", "ratio of minima"], rows)
            + f"\nMedians of {result['pairs']} pairs; minor page faults per step (median): {against} "
              f"{faults[against]:.0f}, {method} {faults[method]:.0f}.\n")
