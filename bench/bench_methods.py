"""Memory and step time of LoRA-FA with lorafa_fx against the other ways to fine-tune.

Models are built from configs (random weights, no downloads): a Llama-like decoder, GPT-2,
RoBERTa (sequence classification, head trained in full) and T5. Methods: full fine-tuning,
PEFT LoRA, PEFT LoRA with ``lora_A`` frozen (PEFT's LoRA-FA), HF gradient checkpointing +
PEFT LoRA, lorafa_fx; each eagerly and under ``torch.compile``. On the Llama model the speed
passes (`fuse_lora_a`, `fuse_linears`, `chunk_cross_entropy`) get rows of their own, and a
tiny Llama with a 128k vocabulary checks what chunked cross-entropy saves.

One step is ``zero_grad(set_to_none); model(**batch).loss.backward(); AdamW.step()`` at
r=16, lora_alpha=32, all linears. Per method:

* saved activations: bytes autograd saves in forward (`lorafa_fx.measure`);
* peak: weights + buffers + optimizer states + batch + the highest count of bytes the step
  allocates on top (CPU allocator, via the profiler; `bench/_harness.py`), on the second
  or later step so AdamW's states exist; eager rows are cross-checked with torch's
  `MemTracker` (JSON: ``peak_memtracker``);
* step time: median of interleaved repetitions after warm-up (round-robin over all methods
  of a model, same process, same batch), and tokens/s = batch x sequence / median.

    OMP_NUM_THREADS=1 python bench/bench_methods.py [--quick] [--threads 1]

Writes bench/out/methods.json, bench/out/methods.md and bench/out/methods.png (``--out`` renames).
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
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import lorafa_fx  # noqa: E402
from lorafa_fx.errors import InfeasibleBudgetError  # noqa: E402
from lorafa_fx.measure import module_state, saved_activation_bytes  # noqa: E402
from lorafa_fx.passes.chunk_cross_entropy import ChunkCrossEntropy  # noqa: E402
from lorafa_fx.passes.fuse_linears import FuseLinears  # noqa: E402
from lorafa_fx.passes.fuse_lora_a import FuseLoraA  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
R, ALPHA = 16, 32
MiB = 2**20

T5_IDS = {"decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}

#: (full mode, quick mode) configs. Full: the sizes named in issue 8; quick: scaled down.
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], torch.nn.Module]]] = {
    "llama": (
        lambda: LlamaForCausalLM(LlamaConfig(  # ~56M parameters
            hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)),
        lambda: LlamaForCausalLM(LlamaConfig(  # ~6M
            hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=8192, max_position_embeddings=512)),
    ),
    "gpt2": (
        lambda: GPT2LMHeadModel(GPT2Config()),  # GPT-2 small, 124M
        lambda: GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=8192, n_positions=512)),
    ),
    "roberta": (
        lambda: RobertaForSequenceClassification(RobertaConfig(num_labels=2)),  # RoBERTa-base, 125M
        lambda: RobertaForSequenceClassification(RobertaConfig(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            vocab_size=8192, max_position_embeddings=514, num_labels=2)),
    ),
    "t5": (
        lambda: T5ForConditionalGeneration(T5Config(**T5_IDS)),  # T5-small, 60M
        lambda: T5ForConditionalGeneration(T5Config(
            d_model=256, d_ff=1024, num_layers=3, num_heads=4, d_kv=64, vocab_size=8192, **T5_IDS)),
    ),
}
#: Arguments beyond r/alpha/all-linear (RoBERTa trains its classification head in full).
EXTRA_CONFIG = {"roberta": {"modules_to_save": ["classifier"]}}

METHODS = {
    "full_ft": "full fine-tuning",
    "peft_lora": "PEFT LoRA",
    "peft_lora_fa": "PEFT LoRA, A frozen",
    "hf_gc_peft_lora": "HF grad-ckpt + PEFT LoRA",
    "lorafa_fx": "lorafa_fx",
    "lorafa_fx_budget60": "lorafa_fx, budget 60%",
    "lorafa_fx+fuse_lora_a": "lorafa_fx +fuse_lora_a",
    "lorafa_fx+fuse_linears": "lorafa_fx +fuse_linears",
    "lorafa_fx+chunk_ce": "lorafa_fx +chunk_ce",
}
PASSES = {"lorafa_fx+fuse_lora_a": FuseLoraA, "lorafa_fx+fuse_linears": FuseLinears,
          "lorafa_fx+chunk_ce": ChunkCrossEntropy}
PENDING = "n/a (planner pending)"


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


def make_batch(name: str, vocab: int, batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "roberta":
        out["labels"] = torch.randint(0, 2, (batch,), generator=g)
    elif name == "t5":
        out["labels"] = torch.randint(2, vocab, (batch, seq // 2), generator=g)
    else:
        out["labels"] = ids.clone()
    return out


def _peft(model: torch.nn.Module, name: str, train_A: bool, grad_ckpt: bool = False) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(model)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                      **EXTRA_CONFIG.get(name, {})))
    if not train_A:
        for n, p in peft_model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    return peft_model


def _lorafa(model: torch.nn.Module, name: str, batch: dict, budget: int | None = None) -> torch.nn.Module | None:
    config = lorafa_fx.LoraFAConfig(r=R, lora_alpha=ALPHA, **EXTRA_CONFIG.get(name, {}))
    return lorafa_fx.transform(copy.deepcopy(model), budget, example_inputs=batch, config=config)


def lorafa_fx_with_budget(model: torch.nn.Module, name: str, batch: dict, budget: int
                          ) -> tuple[torch.nn.Module | None, int, str]:
    """HOOK (issue 8): lorafa_fx under a memory budget (60% of its unconstrained measured peak).

    Returns (module, budget used, note). The module is None while the budget planner is
    pending (``transform(budget=...)`` raises NotImplementedError). When the planner finds
    the budget infeasible, the module is planned at the smallest feasible budget it reports
    instead, and the note says so.
    """
    try:
        return _lorafa(model, name, batch, budget=budget), budget, ""
    except NotImplementedError:
        return None, budget, PENDING
    except InfeasibleBudgetError as e:
        note = "planner's minimum; 60% infeasible"
        return _lorafa(model, name, batch, budget=e.min_budget_bytes), e.min_budget_bytes, note


def build(method: str, model: torch.nn.Module, name: str, batch: dict) -> torch.nn.Module:
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


def _make_step(run: Run, batch: dict) -> Callable[[], None]:
    def step() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        run.forward(**batch).loss.backward()
        run.optimizer.step()
    return step


def _new_run(method: str, mode: str, module: torch.nn.Module, batch: dict,
             shared: Run | None = None) -> Run:
    # The compiled run of a method wraps the eager run's module and optimizer (same weights).
    if shared is not None:
        opt = shared.optimizer
    else:
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    fwd = torch.compile(module) if mode == "compiled" else module
    run = Run(method, mode, module, opt, fwd)
    run.step = _make_step(run, batch)
    module.train()
    return run


def measure_memory(run: Run, batch: dict, cross_check: bool) -> None:
    row = run.row
    run.optimizer.zero_grad(set_to_none=True)
    row.update({f"{k}_bytes": v for k, v in H.step_peak_bytes(
        run.step, H.state_tensors(run.module, run.optimizer, batch)).items()})
    run.optimizer.zero_grad(set_to_none=True)
    row["saved_bytes"] = saved_activation_bytes(lambda: run.forward(**batch).loss, exclude=module_state(run.module))
    if cross_check:
        run.optimizer.zero_grad(set_to_none=True)
        row["peak_memtracker_bytes"] = H.memtracker_peak_bytes(
            run.step, run.module, run.optimizer, *[v for v in batch.values() if isinstance(v, torch.Tensor)])


def bench_model(name: str, args, compile_modes: list[str], methods: list[str]) -> list[dict]:
    torch.manual_seed(0)
    model = MODELS[name][1 if args.quick else 0]()
    vocab = model.config.vocab_size
    batch = make_batch(name, vocab, args.batch, args.seq)
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
        runs += _budget_runs(model, name, batch, runs, compile_modes, warm_and_measure, rows, n_params, tokens)
    times = H.interleaved({r.key: r.step for r in runs}, args.reps)
    for run in runs:
        med = H.median(times[run.key])
        run.row.update(step_ms=1e3 * med, tokens_per_s=tokens / med, times_s=times[run.key])
        rows.append(run.row)
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (order[r["method"]], r["mode"] != "eager"))
    del runs, model
    return rows


def _budget_runs(model, name, batch, runs, compile_modes, warm_and_measure, rows, n_params, tokens) -> list[Run]:
    base = next((r for r in runs if r.key == "lorafa_fx/eager"), None)
    if base is None:
        return []
    unconstrained = base.row["peak_bytes"]
    module, budget, note = lorafa_fx_with_budget(model, name, batch, int(0.6 * unconstrained))
    if module is None:
        for mode in compile_modes:
            rows.append({"model": name, "method": "lorafa_fx_budget60", "label": METHODS["lorafa_fx_budget60"],
                         "mode": mode, "budget_bytes": budget, "status": note})
        return []
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
    """Tiny Llama, 128k vocabulary: peak of lorafa_fx with and without chunked cross-entropy."""
    torch.manual_seed(0)
    vocab = 128256
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024))
    b, s = (2, 64) if args.quick else (4, 256)
    batch = make_batch("llama", vocab, b, s)
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


def _mib(x) -> str:
    return f"{x / MiB:,.1f}" if isinstance(x, (int, float)) else "—"


def markdown(rows: list[dict], ratios: dict, passes: list[dict], chunk: dict | None, meta: dict) -> str:
    lines = [f"Machine: {meta['env']['cpu']}, {meta['env']['cpus']} cores, torch {meta['env']['torch']}, "
             f"{meta['env']['threads']} thread(s); mode: {'quick' if meta['quick'] else 'full'}; "
             f"batch {meta['batch']}x{meta['seq']}; r={R}, alpha={ALPHA}, all linears; "
             f"median of {meta['reps']} interleaved steps.", ""]
    if meta["quick"]:
        lines += ["Quick mode: scaled-down models (see `MODELS` in bench/bench_methods.py); "
                  f"torch.compile only for: {', '.join(meta['compiled_models'])}.", ""]
    for name in dict.fromkeys(r["model"] for r in rows):
        model_rows = [r for r in rows if r["model"] == name]
        params = next((r["params"] for r in model_rows if "params" in r), 0)
        ref = next((r for r in model_rows if r.get("method") == "peft_lora" and r["mode"] == "eager"
                    and "step_ms" in r), None)
        lines += [f"### {name} ({params / 1e6:.1f}M params)", "",
                  "| method | mode | trainable | saved act. MiB | peak MiB | step ms (median) | step ms (min) | tokens/s "
                  "| time vs PEFT LoRA eager |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in model_rows:
            if "step_ms" not in r:
                lines.append(f"| {r['label']} | {r['mode']} | | | | {r.get('status', '')} | | | |")
                continue
            rel = f"{r['step_ms'] / ref['step_ms']:.2f}x" if ref else "—"
            lines.append(f"| {r['label']} | {r['mode']} | {r['trainable'] / 1e6:.2f}M | {_mib(r['saved_bytes'])} | "
                         f"{_mib(r['peak_bytes'])} | {r['step_ms']:,.0f} | {1e3 * min(r['times_s']):,.0f} | "
                         f"{r['tokens_per_s']:,.0f} | {rel} |")
        lines.append("")
    lines += ["### Acceptance ratios (times: median of paired ratios)", "",
              "| model | lorafa_fx / PEFT LoRA-FA, eager time (<= 1) | lorafa_fx / PEFT LoRA-FA, eager peak (<= 1) "
              "| lorafa_fx compiled / PEFT LoRA eager time (<= 0.8) | planned 60% / unplanned, eager time (<= 1.15) "
              "| HF grad-ckpt / PEFT LoRA, eager time | planned 60% peak / HF grad-ckpt peak |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    keys = ("time_eager_vs_peft_lora_fa", "peak_eager_vs_peft_lora_fa", "time_compiled_vs_peft_lora_eager",
            "planned_overhead", "hf_gc_overhead", "planned_peak_vs_hf_gc")
    for name, r in ratios.items():
        cells = [f"{v:.2f}" if isinstance(v, float) else "—" for v in (r.get(k) for k in keys)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if passes:
        lines += ["", "### Speed passes vs plain lorafa_fx (same model, same mode)", "",
                  "| pass | model | mode | peak | saved act. | step time (median of paired ratios) "
                  "| step time (min / min) |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for p in passes:
            lines.append(f"| {METHODS[p['method']]} | {p['model']} | {p['mode']} | {p['peak_ratio']:.3f}x | "
                         f"{p['saved_ratio']:.3f}x | {p['time_ratio_paired_median']:.3f}x | "
                         f"{p['time_ratio_min']:.3f}x |")
    if chunk:
        lines += ["", f"### Chunked cross-entropy, tiny Llama, vocab {chunk['vocab']:,}, batch {chunk['batch']}x"
                  f"{chunk['seq']} (fp32 logits {_mib(chunk['logits_bytes'])} MiB)", "",
                  "| method | saved act. MiB | peak MiB | step ms |", "|---|---:|---:|---:|"]
        for m in ("lorafa_fx", "lorafa_fx+chunk_ce"):
            c = chunk[m]
            lines.append(f"| {METHODS[m]} | {_mib(c['saved_bytes'])} | {_mib(c['peak_bytes'])} | {c['step_ms']:,.0f} |")
        lines += ["", f"Peak drop {_mib(chunk['peak_drop_bytes'])} MiB = {chunk['drop_over_logits']:.2f}x the full "
                  f"logits (acceptance: >= 1.00x)."]
    return "\n".join(lines) + "\n"


def acceptance(rows: list[dict]) -> dict:
    """Issue 8's ratios per model. Times: median over rounds of the paired ratio (rounds are
    interleaved, so a slow spell of the machine hits both sides of each ratio alike)."""
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        get = {(r["method"], r["mode"]): r for r in rows if r["model"] == name and "times_s" in r}
        ours, ours_c = get.get(("lorafa_fx", "eager")), get.get(("lorafa_fx", "compiled"))
        fa, lora = get.get(("peft_lora_fa", "eager")), get.get(("peft_lora", "eager"))
        planned, hf_gc = get.get(("lorafa_fx_budget60", "eager")), get.get(("hf_gc_peft_lora", "eager"))
        r = {}
        if ours and fa:
            r["time_eager_vs_peft_lora_fa"] = _paired(ours, fa)
            r["peak_eager_vs_peft_lora_fa"] = ours["peak_bytes"] / fa["peak_bytes"]
        if ours_c and lora:
            r["time_compiled_vs_peft_lora_eager"] = _paired(ours_c, lora)
        if planned and ours:
            r["planned_overhead"] = _paired(planned, ours)
        if hf_gc and lora:
            r["hf_gc_overhead"] = _paired(hf_gc, lora)
            r["planned_peak_vs_hf_gc"] = planned["peak_bytes"] / hf_gc["peak_bytes"] if planned else None
        out[name] = r
    return out


def _paired(a: dict, b: dict) -> float:
    return H.median([x / y for x, y in zip(a["times_s"], b["times_s"])])


def pass_effects(rows: list[dict]) -> list[dict]:
    """Each speed pass against plain lorafa_fx in the same mode: peak, saved bytes and step time.

    Time ratio: median over rounds of (pass time / lorafa_fx time in the same round); rounds are
    interleaved, so a slow spell of the machine hits both sides of each ratio alike.
    """
    out = []
    for r in rows:
        if r.get("method") not in PASSES or "times_s" not in r:
            continue
        base = next((b for b in rows if b["model"] == r["model"] and b.get("method") == "lorafa_fx"
                     and b["mode"] == r["mode"] and "times_s" in b), None)
        if base is None:
            continue
        out.append({
            "model": r["model"], "method": r["method"], "mode": r["mode"],
            "peak_ratio": r["peak_bytes"] / base["peak_bytes"], "saved_ratio": r["saved_bytes"] / base["saved_bytes"],
            "time_ratio_paired_median": H.median([a / b for a, b in zip(r["times_s"], base["times_s"])]),
            "time_ratio_min": min(r["times_s"]) / min(base["times_s"]),
        })
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = min(2, len(models))
    rows_n = -(-len(models) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 4.2 * rows_n + 1.4), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(models):]:
        ax.set_visible(False)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    for ax, name in zip(axes, models):
        for r in rows:
            if r["model"] != name or "step_ms" not in r:
                continue
            ax.scatter(r["step_ms"], r["peak_bytes"] / MiB, color=colors[r["method"]], s=60,
                       marker="o" if r["mode"] == "eager" else "^", edgecolors="black", linewidths=0.5,
                       label=f"{METHODS[r['method']]} ({r['mode']})")
        ax.set_title(name)
        ax.set_xlabel("median step time (ms)")
        ax.set_ylabel("peak memory of a step (MiB)")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Peak memory vs step time (o eager, ^ torch.compile); lower-left is better")
    fig.tight_layout(rect=(0, 1.3 / fig.get_figheight(), 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def main() -> None:
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
                    help="also compile the speed-pass rows (always on in full mode)")
    ap.add_argument("--no-memtracker", action="store_true", help="skip the MemTracker cross-check of eager peaks")
    ap.add_argument("--no-chunk-ce", action="store_true", help="skip the 128k-vocabulary chunked-CE section")
    ap.add_argument("--out", default="methods", help="output name: bench/out/<out>.{json,md,png}")
    args = ap.parse_args()
    args.batch = args.batch or (4 if args.quick else 2)
    args.seq = args.seq or (128 if args.quick else 256)
    args.reps = args.reps or (5 if args.quick else 7)
    args.compile_passes = args.compile_passes or not args.quick
    _quiet(args.threads)
    compiled_models = [] if args.no_compile else (["llama"] if args.quick else list(args.models))
    rows: list[dict] = []
    t0 = time.perf_counter()
    for name in args.models:
        methods = [m for m in args.methods if name == "llama" or m not in PASSES]
        modes = ["eager", "compiled"] if name in compiled_models else ["eager"]
        rows += _in_child(args.threads, bench_model, name, args, modes, methods)
    chunk = None if args.no_chunk_ce else _in_child(args.threads, bench_chunk_ce, args)
    ratios = acceptance(rows)
    passes = pass_effects(rows)
    meta = {"quick": args.quick, "batch": args.batch, "seq": args.seq, "reps": args.reps, "r": R,
            "lora_alpha": ALPHA, "compiled_models": compiled_models, "env": H.env_info(),
            "wall_s": time.perf_counter() - t0,
            "command": "OMP_NUM_THREADS=1 python bench/bench_methods.py " + " ".join(sys.argv[1:])}
    OUT.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (OUT / f"{args.out}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps(
        {"meta": meta, "rows": rows, "acceptance": ratios, "passes": passes, "chunk_cross_entropy": chunk}, indent=1))
    md = markdown(rows, ratios, passes, chunk, meta)
    md_path.write_text(md)
    plot(rows, png_path)
    print("\n" + md)
    for name, r in ratios.items():
        parts = []
        if "time_eager_vs_peft_lora_fa" in r:
            parts.append(f"lorafa_fx eager / PEFT LoRA-FA eager: time {r['time_eager_vs_peft_lora_fa']:.2f}, "
                         f"peak {r['peak_eager_vs_peft_lora_fa']:.2f}")
        if "time_compiled_vs_peft_lora_eager" in r:
            parts.append(f"lorafa_fx compiled / PEFT LoRA eager: time {r['time_compiled_vs_peft_lora_eager']:.2f} "
                         "(target <= 0.8)")
        if parts:
            print(f"{name}: " + "; ".join(parts))
    for r in rows:
        if r.get("method") == "lorafa_fx_budget60" and r["mode"] == "eager":
            status = r.get("status") or (f"peak {r['peak_bytes'] / MiB:,.1f} MiB under a {r['budget_bytes'] / MiB:,.1f} "
                                         f"MiB budget, {r['step_ms']:,.0f} ms/step {r.get('budget_note', '')}")
            print(f"{r['model']}: lorafa_fx with budget at 60% of its unconstrained peak: {status}")
    print(f"wrote {json_path}, {md_path}, {png_path} in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
