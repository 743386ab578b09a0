"""Optimizer-step and training-step time: lorafa_fx's LoRA-FA optimizer vs PEFT's LoraFAOptimizer.

A 32-layer Llama-like model (random weights, built from a `LlamaConfig`, no downloads) with
adapters on every linear (r=16). Both sides get the same A and B. Repetitions are interleaved
(ours, PEFT, ours, ...) so machine load hits both alike; medians are reported. PEFT is timed
as shipped (bf16 autocast around its correction, on by default on CPU) and with that autocast
off (fp32, the numerics ours reproduces).

    python bench/bench_optimizer.py [--quick]

Prints a table and writes bench/out/bench_optimizer.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import lorafa_fx  # noqa: E402
from lorafa_fx.optim import create_lorafa_optimizer  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def _model(layers: int, hidden: int, intermediate: int, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=512))


def _batch(vocab: int, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _peft_model(model: torch.nn.Module, gm: torch.fx.GraphModule, r: int, alpha: float) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))
    with torch.no_grad():
        for a in gm.lorafa.adapters:
            layer = ref.base_model.model.get_submodule(a.path)
            layer.lora_A["default"].weight.copy_(gm.get_parameter(f"{a.path}.lora_A.weight"))
            layer.lora_B["default"].weight.copy_(gm.get_parameter(f"{a.path}.lora_B.weight"))
    return ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 layers, few repetitions")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--step-reps", type=int, default=30)
    ap.add_argument("--train-reps", type=int, default=8)
    args = ap.parse_args()
    if args.quick:
        args.layers, args.step_reps, args.train_reps = 8, 8, 3

    import peft.optimizers.lorafa as peft_lorafa

    shipped_bf16_check = peft_lorafa.is_bf16_available
    alpha = 2 * args.r
    model = _model(args.layers, args.hidden, args.intermediate, args.vocab)
    batch = _batch(args.vocab, args.batch, args.seq, seed=1)
    t0 = time.perf_counter()
    gm = lorafa_fx.transform(model, example_inputs=batch, config=lorafa_fx.LoraFAConfig(
        r=args.r, lora_alpha=alpha, target_modules="all-linear"))
    transform_s = time.perf_counter() - t0
    ref = _peft_model(model, gm, args.r, alpha)
    n_adapters = len(gm.lorafa.adapters)

    ours = create_lorafa_optimizer(gm, lr=1e-4, weight_decay=0.01)
    peft_bf16 = peft_lorafa.create_lorafa_optimizer(ref, r=args.r, lora_alpha=alpha, lr=1e-4, weight_decay=0.01)
    peft_fp32 = peft_lorafa.create_lorafa_optimizer(ref, r=args.r, lora_alpha=alpha, lr=1e-4, weight_decay=0.01)

    def set_peft_bf16(on: bool) -> None:
        peft_lorafa.is_bf16_available = shipped_bf16_check if on else (lambda *a, **k: False)

    def peft_step(opt: torch.optim.Optimizer, bf16: bool) -> Callable[[], None]:
        def run() -> None:
            set_peft_bf16(bf16)
            opt.step()
        return run

    def train_step(module: torch.nn.Module, opt: torch.optim.Optimizer, bf16: bool | None = None) -> Callable[[], None]:
        def run() -> None:
            if bf16 is not None:
                set_peft_bf16(bf16)
            opt.zero_grad()
            module(**batch).loss.backward()
            opt.step()
        return run

    gm(**batch).loss.backward()
    ref(**batch).loss.backward()
    cold_s = H.timed(ours.step)  # first step: computes and caches every (A A^T)^-1
    step_fns = {"ours": ours.step, "peft_bf16": peft_step(peft_bf16, True), "peft_fp32": peft_step(peft_fp32, False)}
    H.interleaved(step_fns, 2)  # warm-up
    steps = H.interleaved(step_fns, args.step_reps)
    train_fns = {
        "ours": train_step(gm, ours), "peft_bf16": train_step(ref, peft_bf16, True),
        "peft_fp32": train_step(ref, peft_fp32, False),
    }
    H.interleaved(train_fns, 1)
    trains = H.interleaved(train_fns, args.train_reps)
    set_peft_bf16(True)

    med = {f"{k}_step_ms": 1e3 * statistics.median(v) for k, v in steps.items()}
    med |= {f"{k}_train_ms": 1e3 * statistics.median(v) for k, v in trains.items()}
    result = {
        "config": vars(args) | {"lora_alpha": alpha, "adapters": n_adapters},
        "env": H.env_info(),
        "transform_s": transform_s,
        "ours_first_step_ms": 1e3 * cold_s,
        "median": med,
        "speedup_step_vs_peft_bf16": med["peft_bf16_step_ms"] / med["ours_step_ms"],
        "speedup_step_vs_peft_fp32": med["peft_fp32_step_ms"] / med["ours_step_ms"],
        "speedup_train_vs_peft_bf16": med["peft_bf16_train_ms"] / med["ours_train_ms"],
        "speedup_train_vs_peft_fp32": med["peft_fp32_train_ms"] / med["ours_train_ms"],
        "raw_s": {"step": steps, "train": trains},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_optimizer.json").write_text(json.dumps(result, indent=2))

    print(f"Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{n_adapters} adapters r={args.r}; batch {args.batch}x{args.seq}; CPU, {torch.get_num_threads()} threads")
    print(f"medians of {args.step_reps} (step) / {args.train_reps} (train) interleaved repetitions")
    print(f"{'':28}{'optimizer.step ms':>18}{'fwd+bwd+step ms':>18}")
    rows = [("lorafa_fx (ours)", "ours"), ("PEFT as shipped (bf16 ac)", "peft_bf16"), ("PEFT fp32 (autocast off)", "peft_fp32")]
    for label, k in rows:
        print(f"{label:28}{med[f'{k}_step_ms']:>18.2f}{med[f'{k}_train_ms']:>18.1f}")
    for label, k in rows[1:]:
        print(f"{'speedup vs ' + label:28}{result[f'speedup_step_vs_{k}']:>17.1f}x{result[f'speedup_train_vs_{k}']:>17.2f}x")
    print(f"ours first step (computes the {n_adapters} inverses): {1e3 * cold_s:.1f} ms; transform {transform_s:.1f} s")
    print(f"wrote {OUT / 'bench_optimizer.json'}")


if __name__ == "__main__":
    main()
