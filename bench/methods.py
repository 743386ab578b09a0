"""Memory and step time of lorafa_fx against PEFT LoRA, PEFT LoRA-FA, HF gradient checkpointing and full fine-tuning.

Models are `lorafa_fx.zoo`'s (random weights from configs, no downloads; ``--quick``: its
"quick" size, else "full"; ``--smoke``: "test", the Llama only): a Llama-like decoder, GPT-2,
RoBERTa (sequence classification, head trained in full) and T5. Methods: full fine-tuning,
PEFT LoRA, PEFT LoRA with ``lora_A`` frozen (PEFT's LoRA-FA), HF gradient checkpointing + PEFT
LoRA, lorafa_fx (unplanned, and planned under 60% of its measured peak, or the planner's
smallest feasible budget where 60% is not); each eagerly and under ``torch.compile`` (quick
mode compiles the Llama only). On the Llama, chunked cross-entropy gets a row of its own, and
a tiny Llama with a 128k vocabulary checks what it saves.

One step is ``zero_grad(set_to_none); model(**batch).loss.backward(); AdamW.step()`` at
r=16, lora_alpha=32, all linears. Per method:

* saved act.: bytes autograd saves in forward (`lorafa_fx.measure`);
* peak: weights + buffers + optimizer states + batch + the highest count of bytes the step
  allocates on top (CPU allocator, via the profiler; `bench/_harness.py`), on the second
  or later step so AdamW's states exist; eager rows are cross-checked with torch's
  `MemTracker` (JSON: ``peak_memtracker_bytes``);
* step time: median of interleaved repetitions after warm-up (round-robin over all methods
  of a model, same process, same batch), and tokens/s = batch x sequence / median. Time
  ratios are medians of paired ratios (a slow spell of the machine hits both sides alike).

Each model runs in a child process (the full-size ones outgrow 24 GB in one). Writes
methods.json, and with matplotlib (the bench extra) methods.png, a plot of peak against step
time.
"""

from __future__ import annotations

import copy
import multiprocessing
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorafa_fx
from bench import _harness as H
from bench import _methods_report as report
from bench._methods_report import METHODS, MiB
from lorafa_fx import zoo
from lorafa_fx.errors import InfeasibleBudgetError
from lorafa_fx.passes.chunk_cross_entropy import ChunkCrossEntropy

R, ALPHA = 16, 32
MODELS = ("llama", "gpt2", "roberta", "t5")
#: Rows that are plain lorafa_fx with one more pass applied (Llama only).
PASSES = {"lorafa_fx+chunk_ce": ChunkCrossEntropy}
SMOKE_METHODS = ("peft_lora_fa", "lorafa_fx", "lorafa_fx_budget60")


def add_arguments(ap) -> None:
    ap.add_argument("--quick", action="store_true", help="scaled-down models, compile only the Llama (minutes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core machine)")
    ap.add_argument("--models", nargs="*", choices=MODELS)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--methods", nargs="*", choices=list(METHODS))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-passes", action="store_true", help="also compile the pass rows (always on in full mode)")
    ap.add_argument("--no-memtracker", action="store_true", help="skip the MemTracker cross-check of eager peaks")
    ap.add_argument("--no-chunk-ce", action="store_true", help="skip the 128k-vocabulary chunked-CE section")


def _settings(args) -> dict:
    size = "test" if args.smoke else "quick" if args.quick else "full"
    models = args.models or (["llama"] if args.smoke else list(MODELS))
    compiled = [] if args.no_compile or args.smoke else (["llama"] if args.quick else models)
    return {
        "size": size, "models": models, "compiled_models": [m for m in compiled if m in models],
        "methods": args.methods or list(SMOKE_METHODS if args.smoke else METHODS),
        "batch": args.batch or {"test": 2, "quick": 4, "full": 2}[size],
        "seq": args.seq or {"test": 32, "quick": 128, "full": 256}[size],
        "reps": args.reps or {"test": 2, "quick": 5, "full": 7}[size],
        "compile_passes": args.compile_passes or size == "full", "memtracker": not args.no_memtracker,
        "chunk_ce": not (args.no_chunk_ce or args.smoke), "threads": args.threads, "r": R, "lora_alpha": ALPHA,
    }


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
    peft = H.require("peft", "bench methods (its PEFT baselines)")
    model = copy.deepcopy(model)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                            **zoo.CONFIG_KWARGS.get(name, {})))
    if not train_A:
        for n, p in peft_model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    return peft_model


def _lorafa(model: torch.nn.Module, name: str, batch: dict, budget: int | None = None) -> torch.nn.Module:
    config = lorafa_fx.LoraFAConfig(r=R, lora_alpha=ALPHA, **zoo.CONFIG_KWARGS.get(name, {}))
    return lorafa_fx.transform(copy.deepcopy(model), example_inputs=batch, config=config, **H.plan_args(budget))


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


def _new_run(method: str, mode: str, module: torch.nn.Module, batch: dict, shared: Run | None = None) -> Run:
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


def _runs(method: str, module: torch.nn.Module, batch: dict, modes: list[str], **row) -> list[Run]:
    """One run per mode of `module`, their rows started with `row`."""
    runs, eager = [], None
    for mode in modes:
        run = _new_run(method, mode, module, batch, shared=eager)
        eager = eager or run
        run.row.update(method=method, mode=mode, **row,
                       trainable=sum(p.numel() for p in module.parameters() if p.requires_grad))
        runs.append(run)
    return runs


def _warm_and_measure(todo: list[Run], batch: dict, memtracker: bool, failed: list[dict]) -> list[Run]:
    ok = []
    for run in todo:
        H.progress(f"{run.row['model']}: {run.key}: first steps and memory")
        try:
            t0 = time.perf_counter()
            run.step()
            run.row["first_step_s"] = time.perf_counter() - t0  # includes compilation
            run.step()
            run.row.update(H.step_memory(run.step, run.forward, run.module, run.optimizer, batch,
                                         cross_check=memtracker and run.mode == "eager"))
            ok.append(run)
            r = run.row
            H.progress(f"{r['model']}: {run.key}: first step {r['first_step_s']:.1f} s, peak "
                       f"{r['peak_bytes'] / MiB:.1f} MiB, saved {r['saved_bytes'] / MiB:.1f} MiB")
        except Exception as e:  # noqa: BLE001 -- a method that fails on this model is a row, not the end of the bench
            failed.append(_error_row(run.row["model"], run.method, run.mode, e))
    return ok


def bench_model(name: str, s: dict) -> list[dict]:
    """All methods on zoo model `name`: one row per method and mode."""
    model = zoo.make_model(name, s["size"])
    batch = zoo.make_batch(name, s["batch"], s["seq"], size=s["size"])
    modes = ["eager", "compiled"] if name in s["compiled_models"] else ["eager"]
    head = {"model": name, "params": sum(p.numel() for p in model.parameters()), "tokens": s["batch"] * s["seq"]}
    H.progress(f"{name}: {type(model).__name__}, {head['params'] / 1e6:.1f}M params, batch {s['batch']}x{s['seq']}, "
               f"modes {modes}")
    runs: list[Run] = []
    rows: list[dict] = []
    methods = [m for m in s["methods"] if name == "llama" or m not in PASSES]
    for method in methods:
        if method == "lorafa_fx_budget60":
            continue  # built once lorafa_fx's unconstrained peak is known
        H.progress(f"{name}: building {method}")
        t0 = time.perf_counter()
        try:
            module = build(method, model, name, batch)
        except Exception as e:  # noqa: BLE001 -- a method that cannot run on this model is a row, not fatal
            rows.append(_error_row(name, method, "eager", e))
            continue
        method_modes = modes if method not in PASSES or s["compile_passes"] else ["eager"]
        runs += _runs(method, module, batch, method_modes, label=METHODS[method], build_s=time.perf_counter() - t0,
                      **head)
    runs = _warm_and_measure(runs, batch, s["memtracker"], rows)
    base = next((r for r in runs if r.key == "lorafa_fx/eager"), None)
    if "lorafa_fx_budget60" in methods and base is not None:
        unconstrained = base.row["peak_bytes"]
        H.progress(f"{name}: planning lorafa_fx under 60% of its measured peak")
        module, budget, note = lorafa_fx_with_budget(model, name, batch, int(0.6 * unconstrained))
        label = f"lorafa_fx, budget {budget / unconstrained:.0%} of its peak" + (f" ({note})" if note else "")
        planned = _runs("lorafa_fx_budget60", module, batch, modes, label=label, budget_bytes=budget,
                        budget_note=note, **head)
        runs += _warm_and_measure(planned, batch, s["memtracker"], rows)
    H.progress(f"{name}: timing {len(runs)} runs x {s['reps']} interleaved rounds")
    times = H.interleaved({r.key: r.step for r in runs}, s["reps"])
    for run in runs:
        med = H.median(times[run.key])
        run.row.update(step_ms=1e3 * med, tokens_per_s=run.row["tokens"] / med, times_s=times[run.key])
        rows.append(run.row)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (order[r["method"]], r["mode"] != "eager"))


def _error_row(name: str, method: str, mode: str, e: Exception) -> dict:
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    H.progress(f"{name}: {method}/{mode}: FAILED {msg}")
    traceback.print_exc(limit=3)
    return {"model": name, "method": method, "label": METHODS[method], "mode": mode, "status": f"error: {msg}"}


def bench_chunk_ce(s: dict) -> dict:
    """Tiny Llama, 128k vocabulary (not a zoo size): peak of lorafa_fx with and without chunked
    cross-entropy."""
    torch.manual_seed(0)
    vocab = 128256
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024))
    b, seq = (2, 64) if s["size"] == "quick" else (4, 256)
    ids = torch.randint(2, vocab, (b, seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    H.progress(f"chunked cross-entropy: vocab {vocab:,}, batch {b}x{seq}")
    runs = [_new_run(m, "eager", build(m, model, "llama", batch), batch) for m in ("lorafa_fx", "lorafa_fx+chunk_ce")]
    for run in runs:
        run.step()
        run.step()
        run.row.update(H.step_memory(run.step, run.forward, run.module, run.optimizer, batch, cross_check=False))
    times = H.interleaved({r.key: r.step for r in runs}, max(3, s["reps"] // 2))
    logits = b * seq * vocab * 4
    out = {"vocab": vocab, "batch": b, "seq": seq, "logits_bytes": logits}
    for run in runs:
        out[run.method] = {"peak_bytes": run.row["peak_bytes"], "saved_bytes": run.row["saved_bytes"],
                           "step_ms": 1e3 * H.median(times[run.key])}
    out["peak_drop_bytes"] = out["lorafa_fx"]["peak_bytes"] - out["lorafa_fx+chunk_ce"]["peak_bytes"]
    out["drop_over_logits"] = out["peak_drop_bytes"] / logits
    return out


def _child_init(threads: int) -> None:
    torch.set_num_threads(threads)
    H.quiet_libraries()
    warnings.simplefilter("ignore")


def _with_status(fn: Callable, *args):
    with H.status_line():
        return fn(*args)


def _in_child(threads: int, fn: Callable, *args):
    """`fn(*args)` in a fresh process, so each model's modules, compiled graphs and caches are
    freed when it ends; the child prints its own progress."""
    ctx = multiprocessing.get_context("spawn")
    with H.status_paused(), ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_child_init,
                                                initargs=(threads,)) as pool:
        return pool.submit(_with_status, fn, *args).result()


def run(args) -> dict:
    s = _settings(args)
    torch.set_num_threads(s["threads"])
    # Smoke runs stay in this process: a child's start (imports) would cost more than the run.
    call = (lambda fn, *a: fn(*a)) if args.smoke else (lambda fn, *a: _in_child(s["threads"], fn, *a))
    rows = [row for name in s["models"] for row in call(bench_model, name, s)]
    chunk = call(bench_chunk_ce, s) if s["chunk_ce"] else None
    result = {"settings": s, "rows": rows, "acceptance": report.acceptance(rows),
              "passes": report.pass_effects(rows, PASSES), "chunk_cross_entropy": chunk}
    if not args.smoke:
        report.plot(rows, args.out / "methods.png")
    return result


markdown = report.markdown
