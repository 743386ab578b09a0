"""Budget planner vs what a user would otherwise do, at equal measured peak (CPU).

1. HF gradient checkpointing (``gradient_checkpointing_enable``: every decoder layer recomputed)
   on PEFT LoRA with A frozen: its measured peak P becomes lorafa_fx's budget; the planner then
   recomputes only the blocks it needs. Compared: measured peak, recompute FLOPs, step time.
2. torch's knapsack (``torch._functorch.config.activation_memory_budget``) on the compiled,
   unplanned lorafa_fx module, at several budgets: each measured peak becomes the budget of a
   compiled planned module.

Recompute is *measured* the same way for every method: the matmul and attention FLOPs that
`FlopCounterMode` counts in one forward + backward, minus those of the same method without
recomputation. The knapsack's are counted on AOTAutograd's partitioned graphs run eagerly
(``backend="aot_eager_decomp_partition"``: the min-cut partitioner, knapsack included, that
inductor uses, without inductor's code generation, so the ops are visible).

Prints a table and writes bench/out/planner.json.

    python bench/bench_planner.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

import lorafa_fx
from lorafa_fx.measure import measure_peak_bytes

OUT = Path(__file__).parent / "out"


def model_and_batch(layers: int, hidden: int, batch: int, seq: int):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, vocab_size=2048, max_position_embeddings=4 * seq)
    ids = torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(1))
    return LlamaForCausalLM(config), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def transform(base, batch, budget):
    config = lorafa_fx.LoraFAConfig(r=16, lora_alpha=32)
    return lorafa_fx.transform(copy.deepcopy(base), budget=budget, example_inputs=batch, config=config)


def planned(base, batch, target: int) -> tuple[torch.fx.GraphModule, int]:
    """lorafa_fx planned under `target`, or under the planner's minimum when the target is below
    it; and that budget (reported as the row's budget). In train mode."""
    try:
        return transform(base, batch, target).train(), target
    except lorafa_fx.InfeasibleBudgetError as e:
        return transform(base, batch, e.min_budget_bytes).train(), e.min_budget_bytes


def peft_lora_fa(model):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
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
    peak = measure_peak_bytes(step, params_owner, opt, batch)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer repetitions")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message="To meet budget=")  # the planner chunking the loss: expected
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*is deprecated")
    layers, hidden, bs, seq, repeats = (8, 256, 4, 256, 3) if args.quick else (12, 512, 8, 512, 5)
    base, batch = model_and_batch(layers, hidden, bs, seq)
    rows = []

    # 1. HF gradient checkpointing, all layers.
    hf_model = copy.deepcopy(base)
    hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf_model.config.use_cache = False
    hf = peft_lora_fa(hf_model).train()
    hf_peak, hf_time = measure(hf, hf, batch, repeats)
    plain = peft_lora_fa(copy.deepcopy(base)).train()
    plain_peak, plain_time = measure(plain, plain, batch, repeats)

    unplanned = transform(base, batch, None).train()
    base_flops = step_flops(unplanned, batch)
    rows += [
        {"method": "PEFT LoRA-FA, no recompute", "peak": plain_peak, "step_s": plain_time, "recompute_pct": 0.0},
        {"method": "PEFT LoRA-FA + HF gradient checkpointing", "peak": hf_peak, "step_s": hf_time,
         "recompute_pct": 100 * (step_flops(hf, batch) - step_flops(plain, batch)) / base_flops},
    ]
    # HF's checkpointing is all or nothing; the planner meets any budget in between.
    for fraction in (0.0, 0.25, 0.5, 0.75):
        ours, budget = planned(base, batch, int(hf_peak + fraction * (plain_peak - hf_peak)))
        peak, seconds = measure(ours, ours, batch, repeats)
        rows.append({"method": f"lorafa_fx, budget = HF GC peak + {fraction:.0%} of the gap", "peak": peak,
                     "step_s": seconds, "recompute_pct": 100 * (step_flops(ours, batch) - base_flops) / base_flops,
                     "budget": budget, "plan": _plan_summary(ours.lorafa_plan)})

    # 2. torch's activation-memory knapsack on the compiled unplanned module, vs the planner
    # at the knapsack's measured peak.
    for knapsack_budget in (0.5, 0.2, 0.05):
        with torch._functorch.config.patch(activation_memory_budget=knapsack_budget):
            knapsack = torch.compile(unplanned)
            k_peak, k_time = measure(knapsack, unplanned, batch, repeats)
            torch._dynamo.reset()
            k_flops = step_flops(torch.compile(unplanned, backend="aot_eager_decomp_partition"), batch)
        torch._dynamo.reset()
        eager_partition_flops = step_flops(torch.compile(unplanned, backend="aot_eager_decomp_partition"), batch)
        torch._dynamo.reset()
        at_knapsack, k_budget = planned(base, batch, k_peak)
        p_peak, p_time = measure(torch.compile(at_knapsack), at_knapsack, batch, repeats)
        torch._dynamo.reset()
        rows += [
            {"method": f"lorafa_fx compiled, torch knapsack activation_memory_budget={knapsack_budget}",
             "peak": k_peak, "step_s": k_time, "recompute_pct": 100 * (k_flops - eager_partition_flops) / base_flops},
            {"method": "lorafa_fx compiled, planned at the knapsack's measured peak", "peak": p_peak,
             "step_s": p_time, "recompute_pct": 100 * (step_flops(at_knapsack, batch) - base_flops) / base_flops,
             "budget": k_budget, "plan": _plan_summary(at_knapsack.lorafa_plan)},
        ]

    table = Table(title=f"Planner vs alternatives: Llama {layers}x{hidden}, batch {bs}x{seq}, r 16, CPU fp32")
    for col in ("method", "measured peak", "budget", "step time", "measured recompute (% step FLOPs)", "plan"):
        table.add_column(col, justify="left" if col in ("method", "plan") else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['peak'] / 1e6:.1f} MB", f"{r['budget'] / 1e6:.1f} MB" if "budget" in r else "-",
                      f"{r['step_s'] * 1e3:.0f} ms", f"{r['recompute_pct']:.1f}%", r.get("plan", ""))
    Console(width=150).print(table)
    print(f"at HF GC's peak: lorafa_fx recompute {rows[2]['recompute_pct']:.1f}% vs HF {rows[1]['recompute_pct']:.1f}% "
          f"of step FLOPs, step time {rows[2]['step_s'] / rows[1]['step_s']:.2f}x, "
          f"measured peak {rows[2]['peak'] / 1e6:.2f} vs {hf_peak / 1e6:.2f} MB")
    for knapsack, ours in zip(rows[-6::2], rows[-5::2]):
        print(f"{knapsack['method']}: peak {knapsack['peak'] / 1e6:.2f} MB, recompute {knapsack['recompute_pct']:.1f}%; "
              f"lorafa_fx at that budget: peak {ours['peak'] / 1e6:.2f} MB, recompute {ours['recompute_pct']:.1f}%")
    OUT.mkdir(exist_ok=True)
    (OUT / "planner.json").write_text(json.dumps(rows, indent=2))


def _plan_summary(plan: lorafa_fx.MemoryPlan) -> str:
    blocks = sum(d != "keep" for d in plan.recompute_by_block.values())
    return f"{blocks} blocks" + (", chunked CE" if plan.chunked_cross_entropy else "")


if __name__ == "__main__":
    main()
