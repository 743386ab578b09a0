"""The memory floor on an H100: the smallest budget a step can be planned under, and the predicted
cost of the common card sizes, for Llama-2-7B and Llama-3-8B planned from their configs.

Each row is ``lorafa_fx.estimate(preset, ..., budget=..., plan=PlanConfig(device="h100"))`` (fake weights, no
downloads; the step is timed on the H100 profile, `lorafa_fx.devices.PROFILES`): the floor is
the ``min_budget_bytes`` of the error a 1 GB budget raises, then each budget's plan: its
predicted peak, its predicted step time over the unplanned step's (``overhead_pct``: the
recomputation and the time waiting for the host link, `memory/timing.py`), and how many blocks
take each decision. Models and shapes:

* ``llama-2-7b``: batch 16 x 1024 tokens, r 64 (alpha 128), bf16 weights;
* ``llama-3-8b``: batch 2 x 8192 tokens (the same 16k tokens, a 128k vocabulary), r 64.

``--only`` picks one model; ``--smoke`` plans the test suite's tiny Llama. The figures are
predictions of the time model (`memory/timing.py`, stated in each plan's printout).
"""

from __future__ import annotations

import copy
import time
from collections import Counter

import lorafa_fx
from bench import _harness as H
from lorafa_fx import zoo

GB = 1e9
#: model (a preset, or "zoo:<name>") -> (batch, seq, a budget below the floor (its error names the floor), budgets)
MODELS = {"llama-2-7b": (16, 1024, "1GB", ("16GB", "24GB", "40GB")),
          "llama-3-8b": (2, 8192, "1GB", ("16GB", "24GB", "40GB"))}
SMOKE = {"zoo:llama": (2, 64, "1kB", ("2MB",))}


def _config(model: str):
    return copy.deepcopy(zoo.make_model(model[4:]).config) if model.startswith("zoo:") else model


def _row(model: str, batch: int, seq: int, budget: str) -> dict:
    config = lorafa_fx.LoraFAConfig(r=64, lora_alpha=128)
    start = time.perf_counter()
    try:
        plan = lorafa_fx.estimate(_config(model), batch_size=batch, seq_len=seq, config=config,
                                  **H.plan_args(budget, device="h100"))
    except lorafa_fx.InfeasibleBudgetError as e:
        return {"budget": budget, "feasible": False, "min_budget_bytes": e.min_budget_bytes,
                "plan_seconds": time.perf_counter() - start}
    return {
        "budget": budget, "feasible": True, "predicted_peak_bytes": plan.predicted_peak_bytes,
        "overhead_pct": plan.overhead_pct, "offload_seconds": plan.offload_seconds, "step_seconds": plan.step_seconds,
        "decisions": dict(Counter(str(d) for d in plan.recompute_by_block.values())),
        "chunked_cross_entropy": plan.chunked_cross_entropy, "weights_bytes": plan.weights_bytes,
        "plan_seconds": time.perf_counter() - start,
    }


def add_arguments(ap) -> None:
    ap.add_argument("--only", choices=list(MODELS), help="one model (default: both)")


def run(args) -> dict:
    models = SMOKE if args.smoke else {m: v for m, v in MODELS.items() if args.only in (None, m)}
    out = {}
    for model, (batch, seq, below, budgets) in models.items():
        rows = []
        for budget in (below, *budgets):
            H.progress(f"{model} {batch} x {seq}: planning under {budget} on an H100")
            rows.append(_row(model, batch, seq, budget))
        out[model] = {"batch": batch, "seq": seq, "rows": rows}
    return {"models": out}


def markdown(result: dict) -> str:
    cells = []
    for model, m in result["models"].items():
        for row in m["rows"]:
            name = f"{model} ({m['batch']} x {m['seq']})"
            if not row["feasible"]:
                cells.append([name, row["budget"], "no", f"smallest feasible {row['min_budget_bytes'] / GB:.2f} GB",
                              "", "", ""])
                continue
            decisions = ", ".join(f"{n} {d}" for d, n in sorted(row["decisions"].items()) if d != "keep") or "none"
            cells.append([name, row["budget"], "yes", f"{row['predicted_peak_bytes'] / GB:.2f} GB",
                          f"+{row['overhead_pct']:.1f}%", f"{row['offload_seconds'] * 1e3:.0f} ms", decisions])
    return ("Predicted on the H100 profile (r 64, bf16 weights); overhead: the step's predicted time over the "
            "unplanned step's; link wait: time waiting for the host link.\n\n"
            + H.md_table(["model", "budget", "fits", "predicted peak", "overhead", "link wait", "blocks by decision"],
                         cells, left=3))
