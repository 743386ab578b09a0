"""LoRA-FA on a mixture-of-experts model's experts, planned from the config (fake weights, no GPU).

For the presets ``qwen3-30b-a3b`` (128 experts, top 8, expert width 768) and ``mixtral-8x7b``
(8 experts, top 2, width 14336), batch 8 x 2048, r 16 (lora_alpha 32), weights in bf16, the
saved activations of one unplanned step and the smallest budget any plan meets
(`InfeasibleBudgetError.min_budget_bytes`: every block recomputed, loss chunked; no offload, no
device named) for three ways to adapt the experts, every linear and the router adapted alike:

* ``lora-fa experts``: ``LoraFAConfig(r=16)`` (all-linear: experts and router too; gate_up_proj at
  2r as PEFT does); each expert projection keeps ``x·A_e`` (routed rows x r);
* ``experts frozen``: ``exclude_modules=["experts"]``; a frozen projection keeps nothing of its
  input (`passes/lean_experts.py`);
* ``peft-style (keeps x)``: the same adapters as the first, but each adapted expert projection
  keeps its routed input ``x`` (routed rows x in) as well, what LoRA with ``W + s·B A`` folded
  into the grouped matmul needs for B's gradient. (PEFT 0.21's ParamWrapper keeps more still: the
  folded ``W + s·B A`` of every expert, a copy of the expert weights per projection; its bytes
  are printed beside, not added.)

Routing needs no data: transformers' MoE is dropless, so a step routes tokens x top_k rows
whatever the router picks (how they split among experts changes no byte count).

    python bench/bench_moe.py [--only qwen3-30b-a3b|mixtral-8x7b]

Prints a table and writes bench/out/moe.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import lorafa_fx
from lorafa_fx import InfeasibleBudgetError, LoraFAConfig
from lorafa_fx.ops import experts
from lorafa_fx.presets import PRESETS
from lorafa_fx.targets import moe_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
BATCH, SEQ, R = 8, 2048, 16
MODELS = ("qwen3-30b-a3b", "mixtral-8x7b")
GB = 1e9


@contextlib.contextmanager
def _keeps_x() -> Iterator[None]:
    """Adapted expert projections keep their routed input too (PEFT-style)."""
    forward = experts._ExpertLinear.forward

    def keeping_x(ctx, x, w, offs, xa, lora_B):
        y = forward(ctx, x, w, offs, xa, lora_B)
        if xa is not None:
            ctx.save_for_backward(x, xa, w, offs, lora_B)
        return y

    experts._ExpertLinear.forward = staticmethod(keeping_x)
    try:
        yield
    finally:
        experts._ExpertLinear.forward = forward


METHODS = {
    "lora-fa experts": ({}, contextlib.nullcontext),
    "experts frozen": ({"exclude_modules": ["experts"]}, contextlib.nullcontext),
    "peft-style (keeps x)": ({}, _keeps_x),
}


def _row(preset: str, method: str) -> dict:
    extra, context = METHODS[method]
    config = LoraFAConfig(r=R, lora_alpha=2 * R, **extra)
    args = {"batch_size": BATCH, "seq_len": SEQ, "config": config, "dtype": torch.bfloat16}
    start = time.perf_counter()
    with context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = lorafa_fx.estimate(preset, **args)
        try:
            lorafa_fx.estimate(preset, budget=1, **args)
        except InfeasibleBudgetError as e:
            smallest = e.min_budget_bytes
    experts_adapted = sum(layer.path.split(".")[-1] in ("experts", "base_layer") for layer in plan.layers)
    return {
        "model": preset, "method": method, "saved_activations": plan.saved_activation_bytes,
        "unplanned_peak": plan.predicted_peak_bytes, "smallest_budget": smallest,
        "weights": plan.weights_bytes, "adapters": len(plan.layers), "expert_adapters": experts_adapted,
        "seconds": time.perf_counter() - start,
    }


def _folded_weight_bytes(preset: str) -> int:
    """Bytes of one bf16 copy of every expert weight: what PEFT's ParamWrapper keeps per step."""
    with torch.device("meta"):
        model = lorafa_fx.api.model_from_config(PRESETS[preset](), torch.bfloat16)
    params = dict(model.named_parameters())
    return sum(params[name].nbytes for name, p in moe_parameters(model).items() if p.num_experts > 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=MODELS, default=None)
    args = ap.parse_args()
    rows = [_row(preset, method) for preset in ([args.only] if args.only else MODELS) for method in METHODS]
    folded = {preset: _folded_weight_bytes(preset) for preset in {r["model"] for r in rows}}

    table = Table(title=f"MoE experts: batch {BATCH} x {SEQ}, r {R}, bf16 weights (plans from the config)")
    for col in ("model", "method", "adapters (experts)", "saved activations", "unplanned peak", "smallest budget"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in rows:
        table.add_row(r["model"], r["method"], f"{r['adapters']} ({r['expert_adapters']})",
                      f"{r['saved_activations'] / GB:.2f} GB", f"{r['unplanned_peak'] / GB:.2f} GB",
                      f"{r['smallest_budget'] / GB:.2f} GB")
    Console(width=150).print(table)
    for preset, nbytes in folded.items():
        print(f"{preset}: PEFT 0.21's ParamWrapper also keeps W + s·B A of every expert: {nbytes / GB:.2f} GB "
              "per step")
    OUT.mkdir(exist_ok=True)
    (OUT / "moe.json").write_text(json.dumps({"env": H.env_info(), "rows": rows, "peft_folded_weights": folded},
                                             indent=2))


if __name__ == "__main__":
    main()
