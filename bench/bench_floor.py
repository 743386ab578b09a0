"""The memory floor on an H100: the smallest budget a step can be planned under, and the predicted
cost of the common card sizes, for Llama-2-7B and Llama-3-8B planned from their configs.

Each row is ``lorafa_fx.estimate(preset, ..., device="h100", budget=...)`` (fake weights, no
downloads; the step is timed on the H100 profile, `lorafa_fx.devices.PROFILES`): the floor is
the ``min_budget_bytes`` of the error a 1 GB budget raises, then each budget's plan: its
predicted peak, its predicted step time over the unplanned step's (``overhead_pct``: the
recomputation and the time waiting for the host link, `memory/timing.py`), and how many blocks
take each decision. Models and shapes:

* ``llama-2-7b``: batch 16 x 1024 tokens, r 64 (alpha 128), bf16 weights;
* ``llama-3-8b``: batch 2 x 8192 tokens (the same 16k tokens, a 128k vocabulary), r 64.

    PYTHONPATH=. python bench/bench_floor.py [--only llama-2-7b|llama-3-8b]

Prints a table and writes bench/out/floor.json. The figures are predictions (no GPU here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import lorafa_fx  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
GB = 1e9
#: preset -> (batch, seq)
MODELS = {"llama-2-7b": (16, 1024), "llama-3-8b": (2, 8192)}
BUDGETS = ("16GB", "24GB", "40GB")


def _row(preset: str, batch: int, seq: int, budget: str) -> dict:
    config = lorafa_fx.LoraFAConfig(r=64, lora_alpha=128)
    start = time.perf_counter()
    try:
        plan = lorafa_fx.estimate(preset, batch_size=batch, seq_len=seq, config=config, device="h100", budget=budget)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(MODELS))
    args = parser.parse_args()
    results = {"env": H.env_info(), "models": {}}
    table = Table(title="the floor on an H100 (predicted; batch x seq tokens, r 64, bf16)")
    for column in ("model", "budget", "fits", "peak / floor", "overhead", "link wait", "decisions"):
        table.add_column(column)
    for preset, (batch, seq) in MODELS.items():
        if args.only not in (None, preset):
            continue
        rows = [_row(preset, batch, seq, "1GB"), *(_row(preset, batch, seq, b) for b in BUDGETS)]
        results["models"][preset] = {"batch": batch, "seq": seq, "rows": rows}
        for row in rows:
            name = f"{preset} ({batch} x {seq})"
            if not row["feasible"]:
                table.add_row(name, row["budget"], "no", f"floor {row['min_budget_bytes'] / GB:.2f} GB", "", "", "")
                continue
            table.add_row(name, row["budget"], "yes", f"{row['predicted_peak_bytes'] / GB:.2f} GB",
                          f"+{row['overhead_pct']:.1f}%", f"{row['offload_seconds'] * 1e3:.0f} ms",
                          ", ".join(f"{n} {d}" for d, n in sorted(row["decisions"].items()) if d != "keep") or "none")
    Console(width=150).print(table)
    OUT.mkdir(exist_ok=True)
    (OUT / "floor.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
