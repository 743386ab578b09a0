"""GPU: measured against predicted memory, and step time, of lorafa_fx and PEFT on a 7B-shaped Llama.

    python -m bench gpu            # one H100/H200; --layers 8, --modes eager: shorter runs
    python -m bench gpu --smoke    # the same code path on the CPU: tiny Llama, batch 2 x 64

The model is ``lorafa_fx.presets.PRESETS["llama-2-7b"]`` with random bf16 weights built on the
GPU (no downloads), rebuilt from one seed for every method so each starts on an empty device.
At batch 4 and 8 x 1024, r 64, lora_alpha 128, all linears, the methods (`METHODS`) are:
lorafa_fx unplanned; lorafa_fx under 0.8 x its unplanned predicted peak, so the planner must
recompute or chunk the loss (if 0.8 x is infeasible, under the planner's smallest feasible
budget); lorafa_fx under the same budget without offload (``offload=False``: recompute only);
PEFT LoRA-FA (PEFT LoRA, every ``lora_A`` frozen); PEFT LoRA + HF gradient checkpointing
(non-reentrant). Each runs eagerly, then under ``torch.compile`` (wrapping the eager run's
module and optimizer). On an A100/H100/H200 (known by its name, `lorafa_fx.devices`) the planner
may offload blocks to host memory instead of recomputing them, whichever its time model predicts
faster; the plan column says which it chose, and the no-offload row is the recompute plan it
compared against (on the CPU, ``--smoke``, nothing is offloaded: the two budget rows agree).

One step is ``zero_grad(set_to_none); module(**batch).loss.backward(); AdamW.step()``, torch's
AdamW over the trainable parameters for every method, so rows differ by the model step alone.
Per run: ``--warmup`` steps (the first compiles), then ``--steps`` timed steps (CUDA events),
their ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` and, for lorafa_fx, the
plan's predicted peak and measured / predicted. With ``--smoke`` the peak is MemTracker's
(`lorafa_fx.measure.measure_peak_bytes`, one more step), there is no reserved figure, times are
wall-clock, and runs are eager unless ``--modes`` says otherwise.

A run that runs out of memory is an "OOM" row, any other failure an "error: ..." row. The rows
so far are rewritten after every row to gpu.rows.json beside gpu.json, so a run cut short keeps
its finished rows.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
import traceback
from collections.abc import Callable, Iterator

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

import lorafa_fx
from bench import _harness as H
from lorafa_fx import zoo
from lorafa_fx.errors import InfeasibleBudgetError
from lorafa_fx.measure import measure_peak_bytes
from lorafa_fx.presets import PRESETS
from lorafa_fx.units import format_bytes

R, ALPHA = 64, 128
LORA = lorafa_fx.LoraFAConfig(r=R, lora_alpha=ALPHA)  # all linears, PEFT's "all-linear"
BUDGET_FRACTION = 0.8
Builder = Callable[[torch.nn.Module, dict, int | None], torch.nn.Module]


def _lorafa(model: torch.nn.Module, batch: dict, unplanned_peak: int | None, budget: int | None = None,
            offload: bool = True) -> torch.nn.Module:
    return lorafa_fx.transform(model, example_inputs=batch, config=LORA, **H.plan_args(budget, offload=offload))


def _lorafa_budget(offload: bool) -> Builder:
    """lorafa_fx under `BUDGET_FRACTION` x its unplanned peak (or the smallest feasible budget);
    `offload`: whether the planner may offload blocks to host memory (on a known card)."""

    def build(model: torch.nn.Module, batch: dict, unplanned_peak: int | None) -> torch.nn.Module:
        if unplanned_peak is None:  # the unplanned row was not run (or failed) at this batch
            b, s = batch["input_ids"].shape
            unplanned_peak = lorafa_fx.estimate(model, batch_size=b, seq_len=s, config=LORA).predicted_peak_bytes
        try:
            return _lorafa(model, batch, unplanned_peak, int(BUDGET_FRACTION * unplanned_peak), offload)
        except InfeasibleBudgetError as e:
            return _lorafa(model, batch, unplanned_peak, e.min_budget_bytes, offload)

    return build


def _peft(train_A: bool, grad_ckpt: bool) -> Builder:
    def build(model: torch.nn.Module, batch: dict, unplanned_peak: int | None) -> torch.nn.Module:
        peft = H.require("peft", "bench gpu (its PEFT rows)")
        if grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(train_A)
        return peft_model

    return build


#: name -> (label, builder(model, batch, lorafa_fx's unplanned predicted peak) -> module to train).
METHODS: dict[str, tuple[str, Builder]] = {
    "lorafa_fx": ("lorafa_fx, unplanned", _lorafa),
    "lorafa_fx_budget": (f"lorafa_fx, budget {BUDGET_FRACTION}x", _lorafa_budget(offload=True)),
    "lorafa_fx_budget_no_offload": (f"lorafa_fx, budget {BUDGET_FRACTION}x, no offload", _lorafa_budget(offload=False)),
    "peft_lora_fa": ("PEFT LoRA-FA (A frozen)", _peft(train_A=False, grad_ckpt=False)),
    "peft_lora_gc": ("PEFT LoRA + HF grad-ckpt", _peft(train_A=True, grad_ckpt=True)),
}


def model_config(args: argparse.Namespace) -> PretrainedConfig:
    # Smoke: the test suite's tiny Llama (2 layers, hidden 64).
    config = copy.deepcopy(zoo.make_model("llama", "test").config) if args.smoke else PRESETS["llama-2-7b"]()
    config.num_hidden_layers = args.layers or config.num_hidden_layers
    return config


def fresh_model(config: PretrainedConfig, device: str) -> torch.nn.Module:
    """`config`'s causal LM with seeded random bf16 weights, allocated on `device` directly
    (a 7B model never passes through host memory)."""
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).train()


def make_batch(vocab: int, b: int, s: int, device: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, vocab, (b, s), generator=torch.Generator().manual_seed(1)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def free_memory(device: str) -> None:
    """Drop compiled graphs and cached blocks, so the next run starts on an empty device."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(step: Callable[[], None], state: list, args: argparse.Namespace) -> dict:
    """Warm-up, then timed steps: their peaks and times."""
    t0 = time.perf_counter()
    step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    first_step_s = time.perf_counter() - t0  # includes compilation
    for _ in range(args.warmup - 1):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(args.steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    else:
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        allocated, reserved = measure_peak_bytes(step, *state), None
    return {"first_step_s": first_step_s, "times_s": times, "step_ms": 1e3 * statistics.median(times),
            "max_allocated_bytes": allocated, "max_reserved_bytes": reserved}


def _failure(e: BaseException) -> dict:
    traceback.print_exc(limit=3)
    if isinstance(e, torch.OutOfMemoryError):
        return {"status": "OOM"}
    first_line = str(e).splitlines()[0] if str(e) else ""
    return {"status": f"error: {type(e).__name__}: {first_line}"[:200]}


def method_rows(name: str, b: int, config: PretrainedConfig, args: argparse.Namespace,
                unplanned_peaks: dict[int, int]) -> Iterator[dict]:
    """One row per mode of method `name` at batch `b`, each yielded as soon as it is measured."""
    head = {"batch": b, "seq": args.seq, "method": name, "label": METHODS[name][0]}
    try:
        batch = make_batch(config.vocab_size, b, args.seq, args.device)
        t0 = time.perf_counter()
        module = METHODS[name][1](fresh_model(config, args.device), batch, unplanned_peaks.get(b))
        head.update(_plan_fields(module, unplanned_peaks.get(b)), build_s=time.perf_counter() - t0,
                    trainable=sum(p.numel() for p in module.parameters() if p.requires_grad))
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    except Exception as e:  # noqa: BLE001 -- a method that cannot be built is a row too
        failure = _failure(e)
        for mode in args.modes:
            yield head | {"mode": mode} | failure
        return
    if name == "lorafa_fx":
        unplanned_peaks[b] = head["predicted_peak_bytes"]
    for mode in args.modes:
        step = _train_step(torch.compile(module) if mode == "compiled" else module, opt, batch)
        try:
            row = head | {"mode": mode, "status": "ok"} | measure(step, [module, opt, *batch.values()], args)
        except Exception as e:  # noqa: BLE001 -- one run's OOM or failure is a row, not the end of the benchmark
            row = head | {"mode": mode} | _failure(e)
        yield _ratios(row)
        del step  # holds the compiled module
        free_memory(args.device)  # between modes too: after an OOM the compiled run starts clean


def _train_step(forward: Callable, opt: torch.optim.Optimizer, batch: dict) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        forward(**batch).loss.backward()
        opt.step()

    return step


def _plan_fields(module: torch.nn.Module, unplanned_peak: int | None) -> dict:
    plan = getattr(module, "lorafa_plan", None)
    if plan is None:  # PEFT: no prediction
        return {}
    return {"predicted_peak_bytes": plan.predicted_peak_bytes, "budget_bytes": plan.budget_bytes,
            "budget_vs_unplanned_peak": (plan.budget_bytes / unplanned_peak
                                         if plan.budget_bytes and unplanned_peak else None),
            "recomputed_blocks": len(plan.recomputed_blocks), "offloaded_blocks": len(plan.offloaded_blocks),
            "chunked_cross_entropy": plan.chunked_cross_entropy, "predicted_step_seconds": plan.step_seconds,
            "extra_compute_pct": plan.extra_compute_pct}


def _ratios(row: dict) -> dict:
    if row["status"] == "ok":
        row["tokens_per_s"] = row["batch"] * row["seq"] / (row["step_ms"] / 1e3)
        if row.get("predicted_peak_bytes"):
            row["allocated_over_predicted"] = row["max_allocated_bytes"] / row["predicted_peak_bytes"]
    return row


COLUMNS = ("batch", "method", "mode", "status", "predicted peak", "max allocated", "alloc / predicted",
           "max reserved", "step ms (median)", "tokens/s", "1st step s", "plan")


def _cells(row: dict) -> list[str]:
    def size(key: str) -> str:
        return format_bytes(row[key]) if row.get(key) is not None else "—"

    plan = "—"
    if "recomputed_blocks" in row:
        plan = (f"{row['recomputed_blocks']} blocks recomputed, {row['offloaded_blocks']} offloaded"
                + (", chunked CE" if row["chunked_cross_entropy"] else ""))
        if row["budget_bytes"]:
            plan += f"; budget {format_bytes(row['budget_bytes'])}"
            if row["budget_vs_unplanned_peak"]:
                plan += f" ({row['budget_vs_unplanned_peak']:.2f}x unplanned peak)"
    ok = row["status"] == "ok"
    return [f"{row['batch']} x {row['seq']}", row["label"], row["mode"], row["status"], size("predicted_peak_bytes"),
            size("max_allocated_bytes"),
            f"{row['allocated_over_predicted']:.3f}" if "allocated_over_predicted" in row else "—",
            size("max_reserved_bytes"), f"{row['step_ms']:.1f}" if ok else "—",
            f"{row['tokens_per_s']:,.0f}" if ok else "—", f"{row['first_step_s']:.1f}" if ok else "—", plan]


def markdown(result: dict) -> str:
    meta = result["meta"]
    return (f"Device: {meta['device_name']}. Model: {meta['model']}. r {R}, lora_alpha {ALPHA}, all linears; AdamW; "
            f"{meta['warmup']} warm-up + {meta['steps']} timed steps. Peak: {meta['peak_source']}.\n\n"
            + H.md_table(COLUMNS, [_cells(r) for r in result["rows"]], left=4))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--layers", type=int, help="decoder layers (default: 32; smoke: 2)")
    ap.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 4 8; smoke: 2)")
    ap.add_argument("--seq", type=int, help="sequence length (default 1024; smoke: 64)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--modes", nargs="+", choices=("eager", "compiled"), help="default both; smoke: eager")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)


def run(args: argparse.Namespace) -> dict:
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (torch.cuda.is_available() is False). This bench measures a GPU; "
                         "`python -m bench gpu --smoke` checks its code path on the CPU.")
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1 (the first warm-up step compiles).")
    args.device = "cpu" if args.smoke else "cuda"
    args.batches = args.batches or ([2] if args.smoke else [4, 8])
    # Smoke: at 2 x 16 the tiny model's 0.8x budget is infeasible and nothing is recomputed; 2 x 64 recomputes.
    args.seq = args.seq or (64 if args.smoke else 1024)
    args.modes = args.modes or (["eager"] if args.smoke else ["eager", "compiled"])
    config = model_config(args)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    meta = {"device_name": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
            "model": f"Llama {config.num_hidden_layers} layers, hidden {config.hidden_size}, {params:,} params, bf16",
            "r": R, "lora_alpha": ALPHA, "warmup": args.warmup, "steps": args.steps,
            "peak_source": "torch.cuda.max_memory_allocated over the timed steps" if args.device == "cuda"
            else "MemTracker (lorafa_fx.measure.measure_peak_bytes) over one step; misses Inductor's buffers"}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    unplanned_peaks: dict[int, int] = {}
    for b in args.batches:
        for name in args.methods:
            H.progress(f"batch {b} x {args.seq}: {METHODS[name][0]}: building and measuring")
            for row in method_rows(name, b, config, args, unplanned_peaks):
                rows.append(row)
                H.progress(" | ".join(_cells(row)))
                (args.out / "gpu.rows.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            free_memory(args.device)  # the method's module is gone now: return its blocks
    return {"meta": meta, "rows": rows}
