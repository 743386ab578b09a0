"""How long `lorafa_fx.estimate` takes to plan big models from their configs, and its memory.

Each plan runs in a fresh Python process, so its peak RSS is that plan's alone; the process is
reaped with ``os.wait4``, whose resource usage (peak RSS, user + system CPU) is that child's
only, as ``/usr/bin/time`` reports it. Inside the child, the ``estimate`` call itself is timed
(wall and process CPU seconds; imports left out). Plans (fake weights, no downloads):

* ``7b-40GB``: Llama-2-7B (``PRESETS["llama-2-7b"]``), batch 16 x 1024, r 64, budget "40GB";
* ``7b-unplanned``: the same without a budget (prediction only);
* ``70b-8ranks-80GB``: Llama-2-70B, batch 1 x 4096 per rank, r 16, 8 ranks (FSDP2), "80GB".

The targets (issue #16) are printed against the figures, not asserted: 7B under 40GB <= 10 s,
70B on 8 ranks <= 30 s (both on 2 CPU cores), peak RSS < 1 GB. On a machine shared with other jobs
the wall time carries their load; CPU seconds do less so.

    python bench/bench_plan_time.py [--only 7b|70b] [--repeat N]

Prints a table and writes bench/out/plan_time.json (plans not run this time, e.g. the 70B one
under ``--only 7b``, are kept from the file's previous contents, each with its own ``env``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
GB = 1e9
MB = 1e6
RSS_TARGET_BYTES = 10**9

#: name -> (group, preset, `estimate`'s other arguments as source, wall-time target in seconds or None).
PLANS: dict[str, tuple[str, str, str, float | None]] = {
    "7b-40GB": ("7b", "llama-2-7b", 'batch_size=16, seq_len=1024, config=LoraFAConfig(r=64, lora_alpha=16), '
                'budget="40GB"', 10.0),
    "7b-unplanned": ("7b", "llama-2-7b", "batch_size=16, seq_len=1024, config=LoraFAConfig(r=64, lora_alpha=16)",
                     None),
    "70b-8ranks-80GB": ("70b", "llama-2-70b", 'batch_size=1, seq_len=4096, config=LoraFAConfig(r=16, lora_alpha=32), '
                        'plan=PlanConfig(world_size=8), budget="80GB"', 30.0),
}

_CHILD = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch
from lorafa_fx import LoraFAConfig, PlanConfig, estimate
from lorafa_fx.presets import PRESETS
model_config = PRESETS["{preset}"]()
t, c = time.perf_counter(), time.process_time()
plan = estimate(model_config, {kwargs})
wall, cpu = time.perf_counter() - t, time.process_time() - c
recomputed = sum(d != "keep" for d in plan.recompute_by_block.values())
print("PLAN_TIME " + json.dumps({{
    "plan_wall_s": wall, "plan_cpu_s": cpu, "torch_threads": torch.get_num_threads(),
    "predicted_peak_bytes": plan.predicted_peak_bytes, "budget_bytes": plan.budget_bytes,
    "weights_bytes": plan.weights_bytes, "blocks_recomputed": recomputed,
    "blocks": model_config.num_hidden_layers, "chunked_cross_entropy": plan.chunked_cross_entropy,
    "extra_compute_pct": plan.extra_compute_pct, "world_size": plan.world_size,
}}))
"""


def run_plan(name: str) -> dict:
    """One plan in a fresh interpreter: its own timings plus the child's rusage."""
    _, preset, kwargs, _ = PLANS[name]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(preset=preset, kwargs=kwargs)],
                                stdout=subprocess.PIPE, stderr=err, text=True)
        stdout = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage only
        err.seek(0)
        stderr = err.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    process_wall = time.perf_counter() - t0
    line = next((x for x in stdout.splitlines() if x.startswith("PLAN_TIME ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{name}: the planning process exited with {proc.returncode}:\n{stderr[-3000:]}")
    out = json.loads(line.removeprefix("PLAN_TIME "))
    return out | {
        "process_wall_s": process_wall, "process_cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB
    }


def summarise(name: str, runs: list[dict]) -> dict:
    _, preset, kwargs, target = PLANS[name]
    last = runs[-1]
    wall = statistics.median(r["plan_wall_s"] for r in runs)
    rss = max(r["peak_rss_bytes"] for r in runs)
    return {
        "plan": name, "estimate": f'estimate(PRESETS["{preset}"](), {kwargs})', "repeats": len(runs),
        "plan_wall_s_median": wall, "plan_wall_s_min": min(r["plan_wall_s"] for r in runs),
        "plan_cpu_s_median": statistics.median(r["plan_cpu_s"] for r in runs),
        "peak_rss_bytes_max": rss, "wall_target_s": target,
        "wall_target_met": None if target is None else wall <= target,
        "rss_target_met": rss < RSS_TARGET_BYTES,
        **{k: last[k] for k in ("predicted_peak_bytes", "budget_bytes", "weights_bytes", "blocks_recomputed",
                                "blocks", "chunked_cross_entropy", "extra_compute_pct", "world_size")},
        "runs": runs,
    }


def _merged(path: Path, rows: list[dict]) -> list[dict]:
    """`rows`, plus the plans of an earlier bench/out/plan_time.json that were not run now."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return rows
    ran = {r["plan"] for r in rows}
    kept = []
    for r in earlier.get("plans", []):
        if r["plan"] not in ran:
            r.setdefault("env", earlier.get("env"))  # files written before rows carried their env
            kept.append(r)
    return sorted(kept + rows, key=lambda r: list(PLANS).index(r["plan"]) if r["plan"] in PLANS else len(PLANS))


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.1f} (1 min), {five:.1f} (5 min)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("7b", "70b"), help="only the 7B plans, or only the 70B plan")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each plan (median wall time reported)")
    args = ap.parse_args()
    names = [n for n, (group, *_) in PLANS.items() if args.only in (None, group)]
    load_before = _load()
    rows = []
    for name in names:
        runs = []
        for i in range(args.repeat):
            print(f"planning {name} ({i + 1}/{args.repeat}) ...", flush=True)
            runs.append(run_plan(name))
            r = runs[-1]
            print(f"  {r['plan_wall_s']:.1f} s wall, {r['plan_cpu_s']:.1f} s CPU, "
                  f"peak RSS {r['peak_rss_bytes'] / MB:,.0f} MB", flush=True)
        rows.append(summarise(name, runs))

    table = Table(title=f"lorafa_fx.estimate planning time, one fresh process per plan (median of {args.repeat})")
    for col in ("plan", "wall s", "CPU s", "peak RSS MB", "predicted peak", "budget", "blocks recomputed",
                "wall target", "RSS < 1 GB"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for r in rows:
        blocks = f"{r['blocks_recomputed']} of {r['blocks']}"
        blocks += ", chunked CE" if r["chunked_cross_entropy"] else ""
        target = "-" if r["wall_target_s"] is None else (
            f"<= {r['wall_target_s']:.0f} s: {'met' if r['wall_target_met'] else 'MISSED'}")
        table.add_row(r["plan"], f"{r['plan_wall_s_median']:.1f}", f"{r['plan_cpu_s_median']:.1f}",
                      f"{r['peak_rss_bytes_max'] / MB:,.0f}", f"{r['predicted_peak_bytes'] / GB:.2f} GB",
                      "-" if r["budget_bytes"] is None else f"{r['budget_bytes'] / GB:.2f} GB", blocks, target,
                      "met" if r["rss_target_met"] else "MISSED")
    env = H.env_info() | {"load_average_before": load_before, "load_average_after": _load(),
                          "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    console = Console(width=160)
    console.print(table)
    console.print(f"{env['cpu']}, {env['cpus']} cores; load average before {load_before}, after {env['load_average_after']}"
                  " (wall time includes other jobs' load; CPU s counts this process's threads only)")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "plan_time.json"
    path.write_text(json.dumps({"env": env, "plans": _merged(path, [r | {"env": env} for r in rows])}, indent=1))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
