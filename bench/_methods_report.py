"""The report of bench/methods.py: method labels, the markdown tables, the acceptance ratios,
the effect of each pass against plain lorafa_fx, and the plot.

Everything here reads the rows `methods.py` measures (one dict per method and mode:
``model``, ``method``, ``label``, ``mode``, ``peak_bytes``, ``saved_bytes``, ``times_s``, ...).
Time ratios are medians over rounds of paired ratios: rounds are interleaved, so a slow spell
of the machine hits both sides of each ratio alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from bench import _harness as H

MiB = H.MiB

#: Method keys, in table order, and their labels.
METHODS = {
    "full_ft": "full fine-tuning",
    "peft_lora": "PEFT LoRA",
    "peft_lora_fa": "PEFT LoRA, A frozen",
    "hf_gc_peft_lora": "HF grad-ckpt + PEFT LoRA",
    "lorafa_fx": "lorafa_fx",
    "lorafa_fx_budget60": "lorafa_fx, budget 60%",
    "lorafa_fx+chunk_ce": "lorafa_fx +chunk_ce",
}

_ACCEPTANCE_COLUMNS = {
    "time_eager_vs_peft_lora_fa": "lorafa_fx / PEFT LoRA-FA, eager time (<= 1)",
    "peak_eager_vs_peft_lora_fa": "lorafa_fx / PEFT LoRA-FA, eager peak (<= 1)",
    "time_compiled_vs_peft_lora_eager": "lorafa_fx compiled / PEFT LoRA eager time (<= 0.8)",
    "planned_overhead": "planned 60% / unplanned, eager time (<= 1.15)",
    "hf_gc_overhead": "HF grad-ckpt / PEFT LoRA, eager time",
    "planned_peak_vs_hf_gc": "planned 60% peak / HF grad-ckpt peak",
}


def _mib(x) -> str:
    return f"{x / MiB:,.1f}" if isinstance(x, (int, float)) else "—"


def _ratio(x) -> str:
    return f"{x:.2f}" if isinstance(x, float) else "—"


def _paired(a: dict, b: dict) -> float:
    return H.median([x / y for x, y in zip(a["times_s"], b["times_s"])])


def acceptance(rows: list[dict]) -> dict:
    """The acceptance ratios per model (see `_ACCEPTANCE_COLUMNS`)."""
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


def pass_effects(rows: list[dict], pass_methods: Iterable[str]) -> list[dict]:
    """Each pass row against plain lorafa_fx in the same model and mode: peak, saved bytes and
    step time (median of paired ratios, and ratio of minima)."""
    pass_methods = set(pass_methods)
    out = []
    for r in rows:
        if r.get("method") not in pass_methods or "times_s" not in r:
            continue
        base = next((b for b in rows if b["model"] == r["model"] and b.get("method") == "lorafa_fx"
                     and b["mode"] == r["mode"] and "times_s" in b), None)
        if base is None:
            continue
        out.append({
            "model": r["model"], "method": r["method"], "mode": r["mode"],
            "peak_ratio": r["peak_bytes"] / base["peak_bytes"], "saved_ratio": r["saved_bytes"] / base["saved_bytes"],
            "time_ratio_paired_median": _paired(r, base),
            "time_ratio_min": min(r["times_s"]) / min(base["times_s"]),
        })
    return out


def markdown(result: dict) -> str:
    s, rows, ratios = result["settings"], result["rows"], result["acceptance"]
    compiled = ", ".join(s["compiled_models"]) or "none"
    lines = [f"Models: `lorafa_fx.zoo.make_model(name, \"{s['size']}\")`; batch {s['batch']}x{s['seq']}; "
             f"r={s['r']}, alpha={s['lora_alpha']}, all linears; {s['threads']} torch thread(s); median of "
             f"{s['reps']} interleaved steps; torch.compile for: {compiled}.", ""]
    for name in dict.fromkeys(r["model"] for r in rows):
        lines += _model_table(name, [r for r in rows if r["model"] == name])
    lines += ["### Acceptance ratios (times: median of paired ratios)", "",
              H.md_table(["model", *_ACCEPTANCE_COLUMNS.values()],
                         [[name, *map(_ratio, map(r.get, _ACCEPTANCE_COLUMNS))] for name, r in ratios.items()])]
    if result["passes"]:
        lines += ["### Speed passes vs plain lorafa_fx (same model, same mode)", "", H.md_table(
            ["pass", "model", "mode", "peak", "saved act.", "step time (median of paired ratios)",
             "step time (min / min)"],
            [[METHODS[p["method"]], p["model"], p["mode"], f"{p['peak_ratio']:.3f}x", f"{p['saved_ratio']:.3f}x",
              f"{p['time_ratio_paired_median']:.3f}x", f"{p['time_ratio_min']:.3f}x"] for p in result["passes"]],
            left=3)]
    if result["chunk_cross_entropy"]:
        lines += _chunk_table(result["chunk_cross_entropy"])
    return "\n".join(lines) + "\n"


def _model_table(name: str, model_rows: list[dict]) -> list[str]:
    params = next((r["params"] for r in model_rows if "params" in r), 0)
    ref = next((r for r in model_rows if r.get("method") == "peft_lora" and r["mode"] == "eager"
                and "step_ms" in r), None)
    cells = []
    for r in model_rows:
        if "step_ms" not in r:
            cells.append([r["label"], r["mode"], "", "", "", r.get("status", ""), "", "", ""])
            continue
        cells.append([r["label"], r["mode"], f"{r['trainable'] / 1e6:.2f}M", _mib(r["saved_bytes"]),
                      _mib(r["peak_bytes"]), f"{r['step_ms']:,.0f}", f"{1e3 * min(r['times_s']):,.0f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['step_ms'] / ref['step_ms']:.2f}x" if ref else "—"])
    return [f"### {name} ({params / 1e6:.1f}M params)", "", H.md_table(
        ["method", "mode", "trainable", "saved act. MiB", "peak MiB", "step ms (median)", "step ms (min)", "tokens/s",
         "time vs PEFT LoRA eager"], cells, left=2)]


def _chunk_table(chunk: dict) -> list[str]:
    rows = [[METHODS[m], _mib(chunk[m]["saved_bytes"]), _mib(chunk[m]["peak_bytes"]), f"{chunk[m]['step_ms']:,.0f}"]
            for m in ("lorafa_fx", "lorafa_fx+chunk_ce")]
    return [f"### Chunked cross-entropy, tiny Llama, vocab {chunk['vocab']:,}, batch {chunk['batch']}x"
            f"{chunk['seq']} (fp32 logits {_mib(chunk['logits_bytes'])} MiB)", "",
            H.md_table(["method", "saved act. MiB", "peak MiB", "step ms"], rows),
            f"Peak drop {_mib(chunk['peak_drop_bytes'])} MiB = {chunk['drop_over_logits']:.2f}x the full logits "
            "(acceptance: >= 1.00x)."]


def plot(rows: list[dict], path: Path) -> None:
    """Peak memory against median step time, one panel per model (skipped, with a note, where
    matplotlib is not installed)."""
    try:
        import matplotlib
    except ImportError:
        H.progress("no plot: matplotlib is missing (pip install -e '.[bench]')")
        return

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
    H.progress(f"wrote {path}")
