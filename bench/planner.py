"""Budget planner against what a user would otherwise do, at equal measured peak (CPU).

1. HF gradient checkpointing (``gradient_checkpointing_enable``: every decoder layer recomputed)
   on PEFT LoRA with A frozen: its measured peak P becomes lorafa_fx's budget, then budgets
   between P and PEFT LoRA-FA's peak without recomputation (25%, 50%, 75% of the gap): HF's
   checkpointing is all or nothing, the planner recomputes only the blocks each budget needs.
2. torch's knapsack (``torch._functorch.config.activation_memory_budget``) on the compiled,
   unplanned lorafa_fx module, at several budgets: each measured peak becomes the budget of a
   compiled planned module.

The model is a Llama (``--quick``: 8 layers, hidden 256, batch 4 x 256; default 12 layers,
hidden 512, batch 8 x 512; vocabulary 2048; ``--smoke``: 2 layers, hidden 64, batch 2 x 32, no
knapsack, 1 thread), r 16, fp32, 2 torch threads. Peak: the CPU allocator's peak of a full AdamW step
(`_harness.step_peak_bytes`, which sees Inductor's buffers too) after two warm-up steps; step
time: the median of the timed steps. Recompute is measured the same way for every method:
the matmul and attention FLOPs that `FlopCounterMode` counts in one forward + backward, minus
those of the same method without recomputation; the knapsack's are counted on AOTAutograd's
partitioned graphs run eagerly (``backend="aot_eager_decomp_partition"``: the min-cut
partitioner, knapsack included, that Inductor uses, without Inductor's code generation, so the
ops are visible). For lorafa_fx rows the plan's own predictions (peak, extra FLOPs) are kept
beside the measurements. Peaks and FLOPs are exact; step times carry the machine's load.
"""

from __future__ import annotations

import contextlib
import copy
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

import lorafa_fx
from bench import _harness as H

MB = 1e6
FRACTIONS = (0.0, 0.25, 0.5, 0.75)
KNAPSACK_BUDGETS = (0.5, 0.2, 0.05)


def add_arguments(ap) -> None:
    ap.add_argument("--quick", action="store_true", help="a smaller model, fewer repetitions")
    ap.add_argument("--no-knapsack", action="store_true", help="skip part 2 (torch.compile of each module)")


def _sizes(args) -> dict:
    layers, hidden, batch, seq, repeats = (2, 64, 2, 32, 1) if args.smoke else (8, 256, 4, 256, 3) if args.quick \
        else (12, 512, 8, 512, 5)
    # The smoke run keeps one thread: the test suite runs it beside another test on 2 cores.
    return {"layers": layers, "hidden": hidden, "batch": batch, "seq": seq, "repeats": repeats, "vocab": 2048,
            "r": 16, "lora_alpha": 32, "threads": 1 if args.smoke else 2}


def model_and_batch(s: dict):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=s["hidden"], intermediate_size=int(s["hidden"] * 2.6875),
                         num_hidden_layers=s["layers"], num_attention_heads=max(s["hidden"] // 64, 1),
                         vocab_size=s["vocab"], max_position_embeddings=4 * s["seq"])
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(1))
    return LlamaForCausalLM(config), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def transform(base, batch, budget):
    config = lorafa_fx.LoraFAConfig(r=16, lora_alpha=32)
    return lorafa_fx.transform(copy.deepcopy(base), example_inputs=batch, config=config, **H.plan_args(budget))


def planned(base, batch, target: int) -> tuple[torch.fx.GraphModule, int]:
    """lorafa_fx planned under `target`, or under the planner's minimum when the target is below
    it; and that budget (reported as the row's budget). In train mode."""
    try:
        return transform(base, batch, target).train(), target
    except lorafa_fx.InfeasibleBudgetError as e:
        return transform(base, batch, e.min_budget_bytes).train(), e.min_budget_bytes


def peft_lora_fa(model):
    peft = H.require("peft", "bench planner (its PEFT baselines)")
    ref = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for name, p in ref.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    return ref


def measure(module, params_owner, batch, repeats: int) -> tuple[int, float]:
    """(measured peak bytes of a full AdamW step, median step seconds)."""
    opt = torch.optim.AdamW([p for p in params_owner.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        module(**batch).loss.backward()
        opt.step()

    for _ in range(2):
        step()
    opt.zero_grad(set_to_none=True)
    peak = H.step_peak_bytes(step, H.state_tensors(params_owner, opt, batch))["peak"]
    times = [H.timed(step) for _ in range(repeats)]
    return peak, statistics.median(times)


def step_flops(module, batch) -> int:
    """Matmul/attention FLOPs of one forward + backward, as `FlopCounterMode` counts them
    (after a first step outside the counter, so a compiled module is traced without it)."""
    counter = FlopCounterMode(display=False)
    for mode in (contextlib.nullcontext(), counter):
        with mode:
            module(**batch).loss.backward()
        for p in module.parameters():
            p.grad = None
    return counter.get_total_flops()


def _row(method: str, peak: int, seconds: float, recompute_flops: int, base_flops: int, **more) -> dict:
    H.progress(f"{method}: peak {peak / MB:.1f} MB, step {1e3 * seconds:.0f} ms, "
               f"recompute {100 * recompute_flops / base_flops:.1f}%")
    return {"method": method, "peak_bytes": peak, "step_s": seconds,
            "recompute_pct": 100 * recompute_flops / base_flops, **more}


def _plan_fields(gm) -> dict:
    plan = gm.lorafa_plan
    blocks = sum(d != "keep" for d in plan.recompute_by_block.values())
    return {"plan": f"{blocks} blocks" + (", chunked CE" if plan.chunked_cross_entropy else ""),
            "predicted_peak_bytes": plan.predicted_peak_bytes, "predicted_recompute_pct": plan.extra_compute_pct}


def run(args) -> dict:
    s = _sizes(args)
    torch.set_num_threads(s["threads"])
    base, batch = model_and_batch(s)
    reps = s["repeats"]
    rows = []

    H.progress("PEFT LoRA-FA with and without HF gradient checkpointing (all layers)")
    hf_model = copy.deepcopy(base)
    hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf_model.config.use_cache = False
    hf = peft_lora_fa(hf_model).train()
    hf_peak, hf_time = measure(hf, hf, batch, reps)
    plain = peft_lora_fa(copy.deepcopy(base)).train()
    plain_peak, plain_time = measure(plain, plain, batch, reps)
    H.progress("lorafa_fx unplanned: capture and FLOPs")
    unplanned = transform(base, batch, None).train()
    base_flops = step_flops(unplanned, batch)
    rows += [_row("PEFT LoRA-FA, no recompute", plain_peak, plain_time, 0, base_flops),
             _row("PEFT LoRA-FA + HF gradient checkpointing", hf_peak, hf_time,
                  step_flops(hf, batch) - step_flops(plain, batch), base_flops)]
    for fraction in FRACTIONS[:1] if args.smoke else FRACTIONS:
        H.progress(f"lorafa_fx under HF GC's peak + {fraction:.0%} of the gap: planning")
        target = int(hf_peak + fraction * (plain_peak - hf_peak))
        ours, budget = planned(base, batch, target)
        peak, seconds = measure(ours, ours, batch, reps)
        rows.append(_row(f"lorafa_fx, budget = HF GC peak + {fraction:.0%} of the gap", peak, seconds,
                         step_flops(ours, batch) - base_flops, base_flops, target_bytes=target, budget_bytes=budget,
                         **_plan_fields(ours)))

    if not (args.smoke or args.no_knapsack):
        rows += _knapsack_rows(base, unplanned, batch, base_flops, reps)
    return {"settings": s, "rows": rows}


def _knapsack_rows(base, unplanned, batch, base_flops: int, reps: int) -> list[dict]:
    """torch's activation-memory knapsack on the compiled unplanned module, and the planner at
    each of the knapsack's measured peaks."""
    rows = []
    for knapsack_budget in KNAPSACK_BUDGETS:
        H.progress(f"torch knapsack activation_memory_budget={knapsack_budget}: compiling and measuring")
        with torch._functorch.config.patch(activation_memory_budget=knapsack_budget):
            k_peak, k_time = measure(torch.compile(unplanned), unplanned, batch, reps)
            torch._dynamo.reset()
            k_flops = step_flops(torch.compile(unplanned, backend="aot_eager_decomp_partition"), batch)
        torch._dynamo.reset()
        eager_partition_flops = step_flops(torch.compile(unplanned, backend="aot_eager_decomp_partition"), batch)
        torch._dynamo.reset()
        rows.append(_row(f"lorafa_fx compiled, torch knapsack activation_memory_budget={knapsack_budget}", k_peak,
                         k_time, k_flops - eager_partition_flops, base_flops))
        H.progress(f"lorafa_fx compiled, planned at the knapsack's peak {k_peak / MB:.1f} MB")
        at_knapsack, k_budget = planned(base, batch, k_peak)
        p_peak, p_time = measure(torch.compile(at_knapsack), at_knapsack, batch, reps)
        torch._dynamo.reset()
        rows.append(_row("lorafa_fx compiled, planned at the knapsack's measured peak", p_peak, p_time,
                         step_flops(at_knapsack, batch) - base_flops, base_flops, target_bytes=k_peak,
                         budget_bytes=k_budget, **_plan_fields(at_knapsack)))
    return rows


def markdown(result: dict) -> str:
    s, rows = result["settings"], result["rows"]

    def mb(x) -> str:
        return "-" if x is None else f"{x / MB:.1f} MB"

    def budget(r: dict) -> str:
        if r.get("target_bytes", r.get("budget_bytes")) == r.get("budget_bytes"):
            return mb(r.get("budget_bytes"))
        return f"{mb(r['budget_bytes'])} (the planner's minimum; {mb(r['target_bytes'])} infeasible)"

    table = H.md_table(
        ["method", "plan", "measured peak", "budget", "predicted peak", "step ms", "measured recompute (% step FLOPs)",
         "planned recompute (%)"],
        [[r["method"], r.get("plan", ""), mb(r["peak_bytes"]), budget(r), mb(r.get("predicted_peak_bytes")),
          f"{1e3 * r['step_s']:.0f}", f"{r['recompute_pct']:.1f}%",
          f"{r['predicted_recompute_pct']:.1f}%" if "predicted_recompute_pct" in r else "-"] for r in rows], left=2)
    hf, ours = rows[1], rows[2]
    lines = [f"Llama {s['layers']} layers, hidden {s['hidden']}, vocabulary {s['vocab']}, batch {s['batch']} x "
             f"{s['seq']}, r {s['r']}, fp32, {s['threads']} threads, median of {s['repeats']} steps.", "", table,
             f"Planned at HF gradient checkpointing's peak ({mb(hf['peak_bytes'])}"
             + (")" if ours["budget_bytes"] == hf["peak_bytes"] else f"; the planner's smallest feasible budget is "
                f"{mb(ours['budget_bytes'])})")
             + f", lorafa_fx recomputes {ours['recompute_pct']:.1f}% of the step's matmul FLOPs (HF: "
               f"{hf['recompute_pct']:.1f}%) and its measured peak is {mb(ours['peak_bytes'])}."]
    for knapsack, at in zip(rows[-6::2], rows[-5::2]) if len(rows) > 6 else ():
        lines.append(f"{knapsack['method'].split(', ')[-1]}: knapsack peak {mb(knapsack['peak_bytes'])}, recompute "
                     f"{knapsack['recompute_pct']:.1f}%; lorafa_fx at that budget: peak {mb(at['peak_bytes'])}, "
                     f"recompute {at['recompute_pct']:.1f}%.")
    return "\n".join(lines) + "\n"
