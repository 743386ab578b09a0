"""Optimizer-step and training-step time: lorafa_fx's LoRA-FA optimizer against PEFT's LoraFAOptimizer.

A Llama-like model (random weights from a `LlamaConfig`, no downloads; default 32 layers,
hidden 256, intermediate 688, vocabulary 1024; ``--quick``: 8 layers; ``--smoke``: 2 layers,
hidden 64) with adapters on every linear (r 16, lora_alpha 32), batch 2 x 64, CPU. Both sides
get the same A and B. Repetitions are interleaved (ours, PEFT, ours, ...) so machine load hits
both alike; medians are reported. PEFT is timed as shipped (bf16 autocast around its
correction, on by default on CPU) and with that autocast off (fp32, the numerics ours
reproduces). Ours' first step computes and caches every (A A^T)^-1: timed apart.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorafa_fx
from bench import _harness as H
from lorafa_fx.optim import create_lorafa_optimizer

SIDES = {"ours": "lorafa_fx (ours)", "peft_bf16": "PEFT as shipped (bf16 autocast)",
         "peft_fp32": "PEFT fp32 (autocast off)"}


def add_arguments(ap) -> None:
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


def _model(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=args.vocab, max_position_embeddings=512))


def _batch(vocab: int, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _peft_model(model: torch.nn.Module, gm: torch.fx.GraphModule, r: int, alpha: float) -> torch.nn.Module:
    peft = H.require("peft", "bench optimizer (PEFT's LoraFAOptimizer)")
    ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))
    with torch.no_grad():
        for a in gm.lorafa.adapters:
            layer = ref.base_model.model.get_submodule(a.path)
            layer.lora_A["default"].weight.copy_(gm.get_parameter(f"{a.path}.lora_A.weight"))
            layer.lora_B["default"].weight.copy_(gm.get_parameter(f"{a.path}.lora_B.weight"))
    return ref


@contextlib.contextmanager
def _peft_bf16_switch(peft_lorafa) -> Iterator[Callable[[bool], None]]:
    """A switch for PEFT's bf16 autocast (its `is_bf16_available` check), restored on exit."""
    shipped = peft_lorafa.is_bf16_available

    def switch(on: bool) -> None:
        peft_lorafa.is_bf16_available = shipped if on else (lambda *a, **k: False)

    try:
        yield switch
    finally:
        peft_lorafa.is_bf16_available = shipped


def run(args) -> dict:
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.vocab, args.step_reps, args.train_reps = 2, 64, 112, 96, 2, 1
    elif args.quick:
        args.layers, args.step_reps, args.train_reps = 8, 8, 3
    peft_lorafa = H.require("peft.optimizers.lorafa", "bench optimizer (PEFT's LoraFAOptimizer)")
    alpha = 2 * args.r
    model = _model(args)
    batch = _batch(args.vocab, args.batch, args.seq, seed=1)
    H.progress(f"transforming a {args.layers}-layer Llama")
    t0 = time.perf_counter()
    gm = lorafa_fx.transform(model, example_inputs=batch, config=lorafa_fx.LoraFAConfig(
        r=args.r, lora_alpha=alpha, target_modules="all-linear"))
    transform_s = time.perf_counter() - t0
    ref = _peft_model(model, gm, args.r, alpha)
    ours = create_lorafa_optimizer(gm, lr=1e-4, weight_decay=0.01)
    peft_bf16, peft_fp32 = (peft_lorafa.create_lorafa_optimizer(ref, r=args.r, lora_alpha=alpha, lr=1e-4,
                                                                weight_decay=0.01) for _ in range(2))
    with _peft_bf16_switch(peft_lorafa) as bf16:
        def switched(fn: Callable[[], None], on: bool | None) -> Callable[[], None]:
            def call() -> None:
                if on is not None:
                    bf16(on)
                fn()
            return call

        def train_step(module: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
            def call() -> None:
                opt.zero_grad()
                module(**batch).loss.backward()
                opt.step()
            return call

        gm(**batch).loss.backward()
        ref(**batch).loss.backward()
        H.progress("first step of ours (computes the inverses)")
        cold_s = H.timed(ours.step)
        bf16_of = {"ours": None, "peft_bf16": True, "peft_fp32": False}
        opts = {"ours": ours, "peft_bf16": peft_bf16, "peft_fp32": peft_fp32}
        step_fns = {k: switched(opt.step, bf16_of[k]) for k, opt in opts.items()}
        H.progress(f"optimizer.step: 2 warm-up + {args.step_reps} interleaved rounds")
        H.interleaved(step_fns, 2)
        steps = H.interleaved(step_fns, args.step_reps)
        train_fns = {k: switched(train_step(gm if k == "ours" else ref, opt), bf16_of[k]) for k, opt in opts.items()}
        H.progress(f"whole training step: 1 warm-up + {args.train_reps} interleaved rounds")
        H.interleaved(train_fns, 1)
        trains = H.interleaved(train_fns, args.train_reps)

    step_ms = {k: 1e3 * statistics.median(v) for k, v in steps.items()}
    train_ms = {k: 1e3 * statistics.median(v) for k, v in trains.items()}
    return {
        "model": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "vocab", "r", "batch", "seq")}
        | {"lora_alpha": alpha, "adapters": len(gm.lorafa.adapters), "threads": torch.get_num_threads(),
           "step_reps": args.step_reps, "train_reps": args.train_reps},
        "transform_s": transform_s, "ours_first_step_ms": 1e3 * cold_s,
        "step_ms": step_ms, "train_ms": train_ms, "raw_s": {"step": steps, "train": trains},
    }


def markdown(result: dict) -> str:
    m, step, train = result["model"], result["step_ms"], result["train_ms"]
    rows = [[label, f"{step[k]:.2f}", f"{train[k]:.1f}",
             "-" if k == "ours" else f"{step[k] / step['ours']:.1f}x", "-" if k == "ours" else
             f"{train[k] / train['ours']:.2f}x"] for k, label in SIDES.items()]
    return (f"Llama {m['layers']} layers, hidden {m['hidden']}, intermediate {m['intermediate']}, {m['adapters']} "
            f"adapters r {m['r']}; batch {m['batch']} x {m['seq']}; CPU, {m['threads']} threads; medians of "
            f"{m['step_reps']} (optimizer.step) / {m['train_reps']} (training step) interleaved rounds.\n\n"
            + H.md_table(["optimizer", "optimizer.step ms", "fwd+bwd+step ms", "ours faster, step",
                          "ours faster, whole step"], rows)
            + f"\nOurs' first step (computes the {m['adapters']} inverses): {result['ours_first_step_ms']:.1f} ms; "
              f"transform {result['transform_s']:.1f} s.\n")
