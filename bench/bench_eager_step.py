"""Eager AdamW step time of lorafa_fx against PEFT LoRA with ``lora_A`` frozen, on bench_methods' quick Llama.

The acceptance ratio of issue 8 (lorafa_fx / PEFT LoRA-FA, eager) without the rest of
bench_methods: same model, batch, r and alpha, one thread, steps interleaved A, B, A, B, ...
and the median of the per-pair ratios (machine noise hits both sides of a pair alike).
``--profile`` prints each side's top ops by self CPU time (torch.profiler) instead.

    OMP_NUM_THREADS=1 python -m bench.bench_eager_step [--pairs 15] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import MODELS, build, make_batch  # noqa: E402


def _step_fn(module: torch.nn.Module, batch: dict):
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    module.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        module(**batch).loss.backward()
        opt.step()
    return step


def _time(step) -> tuple[float, float]:
    """(wall, CPU) seconds of one step; CPU time leaves out the time other jobs held the core."""
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MODELS["llama"][1]()
    batch = make_batch("llama", model.config.vocab_size, args.batch, args.seq)
    steps = {m: _step_fn(build(m, model, "llama", batch), batch) for m in ("peft_lora_fa", "lorafa_fx")}
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
    peft, ours = [], []
    for _ in range(args.pairs):
        peft.append(_time(steps["peft_lora_fa"]))
        ours.append(_time(steps["lorafa_fx"]))
    for i, clock in enumerate(("wall", "CPU")):
        p, o = [t[i] for t in peft], [t[i] for t in ours]
        ratio = statistics.median(b / a for a, b in zip(p, o))
        print(f"{clock:4}: PEFT LoRA-FA eager {1e3 * statistics.median(p):.1f} ms, lorafa_fx eager "
              f"{1e3 * statistics.median(o):.1f} ms (medians of {args.pairs}); "
              f"median paired ratio lorafa_fx / PEFT = {ratio:.3f}")


if __name__ == "__main__":
    main()
