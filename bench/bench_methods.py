"""Memory and step time of LoRA-FA with lorafa_fx against the other ways to fine-tune.

Models are `lorafa_fx.zoo`'s (random weights from configs, no downloads; ``--quick``: its
"quick" size, else "full"): a Llama-like decoder, GPT-2, RoBERTa (sequence classification,
head trained in full) and T5. Methods: full fine-tuning, PEFT LoRA, PEFT LoRA with
``lora_A`` frozen (PEFT's LoRA-FA), HF gradient checkpointing + PEFT LoRA, lorafa_fx (unplanned, and planned under 60% of its measured peak); each eagerly
and under ``torch.compile``. On the Llama model chunked cross-entropy gets a row of its own,
and a tiny Llama with a 128k vocabulary checks what it saves.

One step is ``zero_grad(set_to_none); model(**batch).loss.backward(); AdamW.step()`` at
r=16, lora_alpha=32, all linears. Per method:

* saved activations: bytes autograd saves in forward (`lorafa_fx.measure`);
* peak: weights + buffers + optimizer states + batch + the highest count of bytes the step
  allocates on top (CPU allocator, via the profiler; `bench/_harness.py`), on the second
  or later step so AdamW's states exist; eager rows are cross-checked with torch's
  `MemTracker` (JSON: ``peak_memtracker``);
* step time: median of interleaved repetitions after warm-up (round-robin over all methods
  of a model, same process, same batch), and tokens/s = batch x sequence / median.

    OMP_NUM_THREADS=1 python bench/bench_methods.py [--quick] [--threads 1] [--models llama ...]

Writes bench/out/methods.json, bench/out/methods.md and bench/out/methods.png (``--out`` renames);
the tables, ratios and plot are `_methods_report.py`'s, the measurements `_harness.py`'s.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
import _methods_report as report  # noqa: E402
from _methods_report import METHODS, MiB  # noqa: E402

import lorafa_fx  # noqa: E402
from lorafa_fx import zoo  # noqa: E402
from lorafa_fx.errors import InfeasibleBudgetError  # noqa: E402
from lorafa_fx.passes.chunk_cross_entropy import ChunkCrossEntropy  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
R, ALPHA = 16, 32
MODELS = ("llama", "gpt2", "roberta", "t5")
#: Rows that are plain lorafa_fx with one more pass applied (Llama only).
PASSES = {"lorafa_fx+chunk_ce": ChunkCrossEntropy}


@dataclass
class Run:
    method: str
    mode: str  # "eager" | "compiled"
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable
    step: Callable[[], None] = field(init=False)
    row: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.method}/{self.mode}"


def _peft(model: torch.nn.Module, name: str, train_A: bool, grad_ckpt: bool = False) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(model)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                      **zoo.CONFIG_KWARGS.get(name, {})))
    if not train_A:
        for n, p in peft_model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    return peft_model


def _lorafa(model: torch.nn.Module, name: str, batch: dict, budget: int | None = None) -> torch.nn.Module:
    config = lorafa_fx.LoraFAConfig(r=R, lora_alpha=ALPHA, **zoo.CONFIG_KWARGS.get(name, {}))
    return lorafa_fx.transform(copy.deepcopy(model), budget, example_inputs=batch, config=config)


def lorafa_fx_with_budget(model: torch.nn.Module, name: str, batch: dict, budget: int
                          ) -> tuple[torch.nn.Module, int, str]:
    """lorafa_fx planned under `budget`: (module, budget used, note). Where the planner finds
    the budget infeasible, the module is planned at the smallest feasible budget it reports
    instead, and the note says so."""
    try:
        return _lorafa(model, name, batch, budget=budget), budget, ""
    except InfeasibleBudgetError as e:
        note = "planner's minimum; 60% infeasible"
        return _lorafa(model, name, batch, budget=e.min_budget_bytes), e.min_budget_bytes, note


def build(method: str, model: torch.nn.Module, name: str, batch: dict) -> torch.nn.Module:
    """The module a method trains (`model` itself is left as it is)."""
    if method == "full_ft":
        m = copy.deepcopy(model)
        for p in m.parameters():
            p.requires_grad_(True)
        return m
    if method in ("peft_lora", "peft_lora_fa", "hf_gc_peft_lora"):
        return _peft(model, name, train_A=method != "peft_lora_fa", grad_ckpt=method == "hf_gc_peft_lora")
    gm = _lorafa(model, name, batch)
    if method in PASSES:
        result = PASSES[method]()(gm)
        if not result.modified:
            raise RuntimeError(f"{method}: the pass found nothing to rewrite in {name}")
        gm = result.graph_module
    return gm


def _new_run(method: str, mode: str, module: torch.nn.Module, batch: dict,
             shared: Run | None = None) -> Run:
    # The compiled run of a method wraps the eager run's module and optimizer (same weights).
    if shared is not None:
        opt = shared.optimizer
    else:
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    fwd = torch.compile(module) if mode == "compiled" else module
    run = Run(method, mode, module, opt, fwd)

    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        run.forward(**batch).loss.backward()
        run.optimizer.step()

    run.step = step
    module.train()
    return run


def measure_memory(run: Run, batch: dict, cross_check: bool) -> None:
    run.row.update(H.step_memory(run.step, run.forward, run.module, run.optimizer, batch, cross_check))


def bench_model(name: str, args, compile_modes: list[str], methods: list[str]) -> list[dict]:
    model = zoo.make_model(name, "quick" if args.quick else "full")
    batch = zoo.make_batch(name, args.batch, args.seq, size="quick" if args.quick else "full")
    tokens = args.batch * args.seq
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n== {name}: {type(model).__name__}, {n_params / 1e6:.1f}M params, batch {args.batch}x{args.seq}, "
          f"modes {compile_modes}", flush=True)
    runs: list[Run] = []
    rows: list[dict] = []
    for method in methods:
        if method == "lorafa_fx_budget60":
            continue  # built once lorafa_fx's unconstrained peak is known
        t0 = time.perf_counter()
        try:
            module = build(method, model, name, batch)
        except Exception as e:  # a method that cannot run on this model is reported, not fatal
            rows.append(_error_row(name, method, "eager", e))
            continue
        build_s = time.perf_counter() - t0
        eager = None
        for mode in compile_modes if method not in PASSES or args.compile_passes else ["eager"]:
            run = _new_run(method, mode, module, batch, shared=eager)
            eager = eager or run
            run.row.update(model=name, method=method, label=METHODS[method], mode=mode, params=n_params,
                           trainable=sum(p.numel() for p in module.parameters() if p.requires_grad),
                           build_s=build_s, tokens=tokens)
            runs.append(run)

    def warm_and_measure(todo: list[Run]) -> list[Run]:
        ok = []
        for run in todo:
            try:
                t0 = time.perf_counter()
                run.step()
                run.row["first_step_s"] = time.perf_counter() - t0  # includes compilation
                run.step()
                measure_memory(run, batch, cross_check=run.mode == "eager" and not args.no_memtracker)
                ok.append(run)
                r = run.row
                print(f"  {run.key:34} first step {r['first_step_s']:6.1f}s  peak {r['peak_bytes'] / MiB:8.1f} MiB"
                      f"  saved {r['saved_bytes'] / MiB:8.1f} MiB", flush=True)
            except Exception as e:
                rows.append(_error_row(name, run.method, run.mode, e))
        return ok

    runs = warm_and_measure(runs)
    if "lorafa_fx_budget60" in methods:
        runs += _budget_runs(model, name, batch, runs, compile_modes, warm_and_measure, n_params, tokens)
    times = H.interleaved({r.key: r.step for r in runs}, args.reps)
    for run in runs:
        med = H.median(times[run.key])
        run.row.update(step_ms=1e3 * med, tokens_per_s=tokens / med, times_s=times[run.key])
        rows.append(run.row)
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (order[r["method"]], r["mode"] != "eager"))
    del runs, model
    return rows


def _budget_runs(model, name, batch, runs, compile_modes, warm_and_measure, n_params, tokens) -> list[Run]:
    base = next((r for r in runs if r.key == "lorafa_fx/eager"), None)
    if base is None:
        return []
    unconstrained = base.row["peak_bytes"]
    module, budget, note = lorafa_fx_with_budget(model, name, batch, int(0.6 * unconstrained))
    label = f"lorafa_fx, budget {budget / unconstrained:.0%} of its peak" + (f" ({note})" if note else "")
    new, eager = [], None
    for mode in compile_modes:
        run = _new_run("lorafa_fx_budget60", mode, module, batch, shared=eager)
        eager = eager or run
        run.row.update(model=name, method="lorafa_fx_budget60", label=label, mode=mode,
                       params=n_params, budget_bytes=budget, budget_note=note, tokens=tokens,
                       trainable=sum(p.numel() for p in module.parameters() if p.requires_grad))
        new.append(run)
    return warm_and_measure(new)


def _error_row(name: str, method: str, mode: str, e: Exception) -> dict:
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    print(f"  {method}/{mode}: FAILED {msg}", flush=True)
    traceback.print_exc(limit=3)
    return {"model": name, "method": method, "label": METHODS[method], "mode": mode, "status": f"error: {msg}"}


def bench_chunk_ce(args) -> dict:
    """Tiny Llama, 128k vocabulary (not a zoo size): peak of lorafa_fx with and without chunked
    cross-entropy."""
    torch.manual_seed(0)
    vocab = 128256
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024))
    b, s = (2, 64) if args.quick else (4, 256)
    ids = torch.randint(2, vocab, (b, s), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    runs = [_new_run(m, "eager", build(m, model, "llama", batch), batch) for m in ("lorafa_fx", "lorafa_fx+chunk_ce")]
    for run in runs:
        run.step()
        run.step()
        measure_memory(run, batch, cross_check=False)
    times = H.interleaved({r.key: r.step for r in runs}, max(3, args.reps // 2))
    logits = b * s * vocab * 4
    out = {"vocab": vocab, "batch": b, "seq": s, "logits_bytes": logits}
    for run in runs:
        out[run.method] = {"peak_bytes": run.row["peak_bytes"], "saved_bytes": run.row["saved_bytes"],
                           "step_ms": 1e3 * H.median(times[run.key])}
    out["peak_drop_bytes"] = out["lorafa_fx"]["peak_bytes"] - out["lorafa_fx+chunk_ce"]["peak_bytes"]
    out["drop_over_logits"] = out["peak_drop_bytes"] / logits
    return out


def _quiet(threads: int) -> None:
    H.set_threads(threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()


def _in_child(threads: int, fn: Callable, *args):
    """`fn(*args)` in a fresh process, so each model's modules, compiled graphs and caches are
    freed when it ends (kept in one process, the full-mode models outgrow 24 GB)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_quiet, initargs=(threads,)) as pool:
        return pool.submit(fn, *args).result()


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="scaled-down models, compile only the Llama (a few minutes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core machine)")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-passes", action="store_true",
                    help="also compile the pass rows (always on in full mode)")
    ap.add_argument("--no-memtracker", action="store_true", help="skip the MemTracker cross-check of eager peaks")
    ap.add_argument("--no-chunk-ce", action="store_true", help="skip the 128k-vocabulary chunked-CE section")
    ap.add_argument("--out", default="methods", help="output name: bench/out/<out>.{json,md,png}")
    args = ap.parse_args()
    args.batch = args.batch or (4 if args.quick else 2)
    args.seq = args.seq or (128 if args.quick else 256)
    args.reps = args.reps or (5 if args.quick else 7)
    args.compile_passes = args.compile_passes or not args.quick
    return args


def main() -> None:
    args = _parse_args()
    _quiet(args.threads)
    compiled_models = [] if args.no_compile else (["llama"] if args.quick else list(args.models))
    rows: list[dict] = []
    t0 = time.perf_counter()
    for name in args.models:
        methods = [m for m in args.methods if name == "llama" or m not in PASSES]
        modes = ["eager", "compiled"] if name in compiled_models else ["eager"]
        rows += _in_child(args.threads, bench_model, name, args, modes, methods)
    chunk = None if args.no_chunk_ce else _in_child(args.threads, bench_chunk_ce, args)
    ratios = report.acceptance(rows)
    passes = report.pass_effects(rows, PASSES)
    meta = {"quick": args.quick, "batch": args.batch, "seq": args.seq, "reps": args.reps, "r": R,
            "lora_alpha": ALPHA, "compiled_models": compiled_models, "env": H.env_info(),
            "wall_s": time.perf_counter() - t0,
            "command": "OMP_NUM_THREADS=1 python bench/bench_methods.py " + " ".join(sys.argv[1:])}
    OUT.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (OUT / f"{args.out}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps(
        {"meta": meta, "rows": rows, "acceptance": ratios, "passes": passes, "chunk_cross_entropy": chunk}, indent=1))
    md = report.markdown(rows, ratios, passes, chunk, meta)
    md_path.write_text(md)
    report.plot(rows, png_path)
    print("\n" + md)
    for line in report.summary(rows, ratios):
        print(line)
    print(f"wrote {json_path}, {md_path}, {png_path} in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
