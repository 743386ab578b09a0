"""What `lorafa_fx.estimate` plans for big models from their configs, how long it takes and its memory.

Each plan is one ``estimate`` call (fake weights, no downloads) in a fresh Python process, so
its peak RSS is that plan's alone: the process is reaped with ``os.wait4``, whose resource
usage (peak RSS, user + system CPU) is that child's only, as ``/usr/bin/time`` reports it.
Inside the child the ``estimate`` call itself is timed (wall and process CPU seconds; imports
left out). The plans (`PLANS`; ``--only`` picks a group):

* ``7b``: Llama-2-7B (``PRESETS["llama-2-7b"]``), batch 16 x 1024, r 64, under "40GB", and
  without a budget (prediction only);
* ``70b``: Llama-2-70B, batch 1 x 4096 per rank, r 16, 8 ranks (FSDP2), under "80GB";
* ``budgets``: the 7B plan under "40GB" timed on an H100 (``device="h100"``: the planner may
  offload blocks to host memory where its time model says that beats recomputing), under
  "24GB", and under "15GB" (below the smallest feasible budget: the row is the planner's
  `InfeasibleBudgetError`, its smallest feasible budget and what takes the memory there).
  ``python -m lorafa_fx plan --config llama-2-7b --batch 16 --seq 1024 --rank 64 --budget ...``
  prints the same plans.

The targets of issue #16 are printed against the figures, not asserted: 7B under 40GB <= 10 s,
70B on 8 ranks <= 30 s (both on 2 CPU cores), peak RSS < 1 GB. On a machine shared with other
jobs the wall time carries their load; CPU seconds do less so. ``--smoke`` plans the test
suite's tiny Llama instead.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter

import torch

import lorafa_fx
from bench import _harness as H
from lorafa_fx import zoo
from lorafa_fx.presets import PRESETS

GB, MB = 1e9, 1e6
RSS_TARGET_BYTES = 10**9
_7B = {"batch_size": 16, "seq_len": 1024, "r": 64, "lora_alpha": 16}

#: name -> (group, model: a preset or "zoo:<name>", estimate's shape and rank, its planning settings, wall target s).
PLANS: dict[str, tuple[str, str, dict, dict, float | None]] = {
    "7b-40GB": ("7b", "llama-2-7b", _7B, {"budget": "40GB"}, 10.0),
    "7b-unplanned": ("7b", "llama-2-7b", _7B, {}, None),
    "70b-8ranks-80GB": ("70b", "llama-2-70b", {"batch_size": 1, "seq_len": 4096, "r": 16, "lora_alpha": 32},
                        {"budget": "80GB", "world_size": 8}, 30.0),
    "7b-40GB-h100": ("budgets", "llama-2-7b", _7B, {"budget": "40GB", "device": "h100"}, None),
    "7b-24GB": ("budgets", "llama-2-7b", _7B, {"budget": "24GB"}, None),
    "7b-15GB": ("budgets", "llama-2-7b", _7B, {"budget": "15GB"}, None),
    "smoke": ("smoke", "zoo:llama", {"batch_size": 2, "seq_len": 16, "r": 8, "lora_alpha": 16}, {}, None),
}
GROUPS = ("7b", "70b", "budgets")


def add_arguments(ap) -> None:
    ap.add_argument("--only", choices=GROUPS, nargs="+", help="these groups of plans (default: all)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each plan (median wall time reported)")


def child(name: str) -> None:
    """Run plan `name` in this process and print its figures as one JSON line."""
    warnings.simplefilter("ignore")
    _, model, shape, settings, _ = PLANS[name]
    config = copy.deepcopy(zoo.make_model(model[4:], "test").config) if model.startswith("zoo:") else PRESETS[model]()
    lora = lorafa_fx.LoraFAConfig(r=shape["r"], lora_alpha=shape["lora_alpha"])
    t, c = time.perf_counter(), time.process_time()
    try:
        plan = lorafa_fx.estimate(config, batch_size=shape["batch_size"], seq_len=shape["seq_len"], config=lora,
                                  **H.plan_args(**settings))
        out = {"predicted_peak_bytes": plan.predicted_peak_bytes, "budget_bytes": plan.budget_bytes,
               "weights_bytes": plan.weights_bytes, "blocks": config.num_hidden_layers,
               "decisions": dict(Counter(str(d) for d in plan.recompute_by_block.values())),
               "chunked_cross_entropy": plan.chunked_cross_entropy, "extra_compute_pct": plan.extra_compute_pct,
               "world_size": plan.world_size, "predicted_step_s": plan.step_seconds,
               "predicted_overhead_pct": plan.overhead_pct}
    except lorafa_fx.InfeasibleBudgetError as e:
        out = {"infeasible": True, "budget_bytes": e.budget_bytes, "min_budget_bytes": e.min_budget_bytes,
               "what_takes_memory": e.what_takes_memory, "blocks": config.num_hidden_layers}
    out |= {"plan_wall_s": time.perf_counter() - t, "plan_cpu_s": time.process_time() - c,
            "torch_threads": torch.get_num_threads()}
    print("PLAN " + json.dumps(out))


def run_plan(name: str) -> dict:
    """One plan in a fresh interpreter: its own figures plus the child's rusage."""
    t0 = time.perf_counter()
    code = f"from bench.plan_time import child; child({name!r})"
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=H.ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        stdout = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage only
        err.seek(0)
        stderr = err.read()
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # reaped by wait4: keep Popen from waiting again
    line = next((x for x in stdout.splitlines() if x.startswith("PLAN ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"{name}: the planning process exited with {code}:\n{stderr[-3000:]}")
    return json.loads(line.removeprefix("PLAN ")) | {
        "process_wall_s": time.perf_counter() - t0, "process_cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB
    }


def summarise(name: str, runs: list[dict]) -> dict:
    _, model, shape, settings, target = PLANS[name]
    wall = statistics.median(r["plan_wall_s"] for r in runs)
    rss = max(r["peak_rss_bytes"] for r in runs)
    return runs[-1] | {
        "plan": name, "model": model, "shape": shape, "settings": settings, "repeats": len(runs),
        "plan_wall_s_median": wall, "plan_wall_s_min": min(r["plan_wall_s"] for r in runs),
        "plan_cpu_s_median": statistics.median(r["plan_cpu_s"] for r in runs), "peak_rss_bytes_max": rss,
        "wall_target_s": target, "wall_target_met": None if target is None else wall <= target,
        "rss_target_met": rss < RSS_TARGET_BYTES, "runs": runs,
    }


def run(args) -> dict:
    groups = ["smoke"] if args.smoke else args.only or GROUPS
    rows = []
    for name in [n for n, (group, *_) in PLANS.items() if group in groups]:
        runs = []
        for i in range(args.repeat):
            H.progress(f"planning {name} ({i + 1} of {args.repeat}) in a fresh process")
            runs.append(run_plan(name))
            r = runs[-1]
            H.progress(f"{name}: {r['plan_wall_s']:.1f} s wall, {r['plan_cpu_s']:.1f} s CPU, peak RSS "
                       f"{r['peak_rss_bytes'] / MB:,.0f} MB")
        rows.append(summarise(name, runs))
    return {"plans": rows}


def _arguments(r: dict) -> str:
    shape, settings = r["shape"], r["settings"]
    model = r["model"].removeprefix("zoo:") + (" (zoo, test)" if r["model"].startswith("zoo:") else "")
    parts = [model, f"{shape['batch_size']} x {shape['seq_len']}", f"r {shape['r']}"]
    return ", ".join(parts + [f"`{k}={v!r}`" for k, v in settings.items()])


def _outcome(r: dict) -> str:
    if r.get("infeasible"):
        return (f"infeasible: smallest feasible budget {r['min_budget_bytes'] / GB:.2f} GB; at that peak: "
                f"{r['what_takes_memory']}")
    decided = [f"{n} {d}" for d, n in sorted(r["decisions"].items()) if d != "keep"]
    out = f"of {r['blocks']} blocks: {', '.join(decided)}" if decided else f"all {r['blocks']} blocks kept"
    out += ", chunked CE" if r["chunked_cross_entropy"] else ""
    out += f", {r['extra_compute_pct']:.1f}% extra FLOPs" if r["extra_compute_pct"] else ""
    if r["predicted_step_s"] is not None:
        out += f"; predicted step {1e3 * r['predicted_step_s']:.0f} ms, +{r['predicted_overhead_pct']:.1f}%"
    return out


def _target(r: dict) -> str:
    if r["wall_target_s"] is None:
        return "-"
    met = {clock: r[f"plan_{clock}_s_median"] <= r["wall_target_s"] for clock in ("wall", "cpu")}
    return f"<= {r['wall_target_s']:.0f} s: " + ", ".join(f"{c} {'met' if ok else 'missed'}" for c, ok in met.items())


def markdown(result: dict) -> str:
    cells = []
    for r in result["plans"]:
        runs = ", ".join(f"{x['plan_wall_s']:.1f}" for x in r["runs"])
        peak = "-" if r.get("infeasible") else f"{r['predicted_peak_bytes'] / GB:.2f} GB"
        cells.append([r["plan"], _arguments(r), _outcome(r), peak, f"{r['plan_wall_s_median']:.1f} ({runs})",
                      f"{r['plan_cpu_s_median']:.1f}", f"{r['peak_rss_bytes_max'] / MB:,.0f} MB", _target(r)])
    return ("Wall s: median of the runs (each run in brackets); CPU s: median (the planning process's own CPU "
            "time, which the machine's other jobs do not add to); peak RSS: the largest. GB = 10^9 bytes.\n\n"
            + H.md_table(["plan", "`estimate` arguments", "what it plans", "predicted peak", "wall s", "CPU s",
                          "peak RSS", "time target"], cells, left=3))
