"""LoRA-FA on a mixture-of-experts model's experts, against the experts frozen and PEFT-style expert LoRA.

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

``--only`` picks one preset; ``--smoke`` plans the test suite's tiny Mixtral instead.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator

import torch

import lorafa_fx
from bench import _harness as H
from lorafa_fx import InfeasibleBudgetError, LoraFAConfig, zoo
from lorafa_fx.api import model_from_config
from lorafa_fx.ops import experts
from lorafa_fx.presets import PRESETS
from lorafa_fx.targets import moe_parameters

BATCH, SEQ, R = 8, 2048, 16
MODELS = ("qwen3-30b-a3b", "mixtral-8x7b")
GB = 1e9
#: The smoke run: the tests' tiny Mixtral, batch 2 x 16.
SMOKE = ("zoo:mixtral", 2, 16)


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


def _config(model: str):
    return copy.deepcopy(zoo.make_model(model[4:]).config) if model.startswith("zoo:") else PRESETS[model]()


def _row(model: str, method: str, batch: int, seq: int) -> dict:
    extra, context = METHODS[method]
    config = LoraFAConfig(r=R, lora_alpha=2 * R, **extra)
    args = {"batch_size": batch, "seq_len": seq, "config": config, "dtype": torch.bfloat16}
    start = time.perf_counter()
    with context():
        plan = lorafa_fx.estimate(_config(model), **args)
        try:
            lorafa_fx.estimate(_config(model), budget=1, **args)
        except InfeasibleBudgetError as e:
            smallest = e.min_budget_bytes
    experts_adapted = sum(layer.path.split(".")[-1] in ("experts", "base_layer") for layer in plan.layers)
    return {
        "model": model, "method": method, "batch": batch, "seq": seq, "saved_activations": plan.saved_activation_bytes,
        "unplanned_peak": plan.predicted_peak_bytes, "smallest_budget": smallest, "weights": plan.weights_bytes,
        "adapters": len(plan.layers), "expert_adapters": experts_adapted, "seconds": time.perf_counter() - start,
    }


def _folded_weight_bytes(model: str) -> int:
    """Bytes of one bf16 copy of every expert weight: what PEFT's ParamWrapper keeps per step."""
    with torch.device("meta"):
        built = model_from_config(_config(model), torch.bfloat16)
    params = dict(built.named_parameters())
    return sum(params[name].nbytes for name, p in moe_parameters(built).items() if p.num_experts > 1)


def add_arguments(ap) -> None:
    ap.add_argument("--only", choices=MODELS, default=None, help="one preset (default: both)")


def run(args) -> dict:
    shapes = [SMOKE] if args.smoke else [(m, BATCH, SEQ) for m in ([args.only] if args.only else MODELS)]
    rows = []
    for model, batch, seq in shapes:
        for method in METHODS:
            H.progress(f"{model}: {method}: the unplanned step and the smallest budget (two plans)")
            rows.append(_row(model, method, batch, seq))
    return {"rows": rows, "peft_folded_weights": {model: _folded_weight_bytes(model) for model, _, _ in shapes}}


def markdown(result: dict) -> str:
    cells = [[r["model"], r["method"], f"{r['batch']} x {r['seq']}", f"{r['adapters']} ({r['expert_adapters']})",
              *(f"{r[k] / GB:.2f}" for k in ("saved_activations", "unplanned_peak", "smallest_budget"))]
             for r in result["rows"]]
    folded = "; ".join(f"{m}: {b / GB:.2f} GB" for m, b in result["peft_folded_weights"].items())
    return (H.md_table(["model", "method", "batch", "adapters (experts)", "saved activations GB", "unplanned peak GB",
                        "smallest budget GB"], cells, left=2)
            + f"\n\nPEFT 0.21's ParamWrapper also keeps the folded W + s·B A of every expert for backward "
              f"(not added above): {folded}.")
