"""Does LoRA-FA's gradient correction speed convergence? Held-out loss with and without it, same seeds.

The paper (LoRA-FA, arXiv 2308.03303) claims the closed-form correction of ``grad_B`` closes
part of the gap to full fine-tuning. Here: the zoo's tiny random-init Llama
(``lorafa_fx.zoo.make_model("llama", "test", seed)``: 2 layers, hidden 64, intermediate 112),
adapters on every linear, trained on a synthetic next-token task with learnable structure.
Each sequence walks a fixed random permutation of the vocabulary (``x[t+1] = perm[x[t]]``)
from a random start, so every token but the first is predictable from its predecessor and the
loss floor is about ``log(V) / seq``. For each (seed, lr) both runs start from identical
weights and see identical batches; only ``gradient_correction`` differs. The task plateaus far
above its floor, so it is weak evidence either way.
"""

from __future__ import annotations

import math
import statistics

import torch

import lorafa_fx
from bench import _harness as H
from lorafa_fx import zoo
from lorafa_fx.optim import create_lorafa_optimizer

VOCAB = zoo.VOCAB


def add_arguments(ap) -> None:
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 lr, 100 steps")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)


def _batch(perm: torch.Tensor, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(batch, seq, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
    for t in range(1, seq):
        ids[:, t] = perm[ids[:, t - 1]]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _train(gm: torch.fx.GraphModule, init: dict[str, torch.Tensor], perm: torch.Tensor, *, lr: float,
           correction: bool, steps: int, batch: int, seq: int, seed: int, every: int) -> dict[str, list[float]]:
    with torch.no_grad():
        for n, t in init.items():
            gm.get_parameter(n).copy_(t)
    opt = create_lorafa_optimizer(gm, lr=lr, gradient_correction=correction)
    held_out = _batch(perm, 64, seq, seed=10_000 + seed)
    train, evals = [], []
    for i in range(steps):
        opt.zero_grad()
        loss = gm(**_batch(perm, batch, seq, seed=seed * 100_000 + i)).loss
        loss.backward()
        opt.step()
        train.append(loss.item())
        if (i + 1) % every == 0:
            with torch.no_grad():
                evals.append(gm(**held_out).loss.item())
    return {"train": train, "eval": evals}


def run(args) -> dict:
    if args.smoke:
        args.steps, args.seeds, args.lrs, args.batch, args.seq = 6, 1, [1e-2], 4, 16
    elif args.quick:
        args.steps, args.seeds, args.lrs = 100, 1, [1e-3]
    every = max(args.steps // 6, 1)
    runs = []
    for seed in range(args.seeds):
        perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))
        H.progress(f"seed {seed}: transforming the tiny Llama")
        config = lorafa_fx.LoraFAConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", seed=seed)
        model = zoo.make_model("llama", "test", seed=seed)
        gm = lorafa_fx.transform(model, example_inputs=_batch(perm, 2, args.seq, seed=0), config=config)
        gm.train()
        init = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
        for lr in args.lrs:
            for correction in (True, False):
                H.progress(f"seed {seed}, lr {lr:g}, correction {'on' if correction else 'off'}: {args.steps} steps")
                hist = _train(gm, init, perm, lr=lr, correction=correction, steps=args.steps,
                              batch=args.batch, seq=args.seq, seed=seed, every=every)
                runs.append({"seed": seed, "lr": lr, "correction": correction, **hist})
    checkpoints = [every * (k + 1) for k in range(args.steps // every)]

    def mean_eval(lr: float, correction: bool) -> list[float]:
        evals = [r["eval"] for r in runs if r["lr"] == lr and r["correction"] == correction]
        return [statistics.mean(e[k] for e in evals) for k in range(len(checkpoints))]

    wins = sum(r["eval"][-1] < o["eval"][-1] for r in runs if r["correction"]
               for o in runs if not o["correction"] and o["seed"] == r["seed"] and o["lr"] == r["lr"])
    return {
        "settings": {k: getattr(args, k) for k in ("steps", "seeds", "lrs", "r", "batch", "seq")}
        | {"vocab": VOCAB, "task": "permutation walk x[t+1] = perm[x[t]]", "loss_floor": math.log(VOCAB) / args.seq},
        "checkpoints": checkpoints,
        "mean_eval_loss": {str(lr): {("with" if c else "without"): mean_eval(lr, c) for c in (True, False)}
                           for lr in args.lrs},
        "correction_wins": wins, "pairs": len(runs) // 2, "runs": runs,
    }


def markdown(result: dict) -> str:
    s, checkpoints = result["settings"], result["checkpoints"]
    rows = [[f"{float(lr):.0e}", side, *(f"{v:.3f}" for v in losses)]
            for lr, d in result["mean_eval_loss"].items() for side, losses in d.items()]
    return (f"All-linear r {s['r']}, vocabulary {s['vocab']}, batch {s['batch']} x {s['seq']}, {s['steps']} steps; "
            f"held-out loss, mean over {s['seeds']} seed(s), at each checkpoint step; loss floor about "
            f"{s['loss_floor']:.2f}.\n\n"
            + H.md_table(["lr", "correction", *(f"step {c}" for c in checkpoints)], rows, left=2)
            + f"\nThe correction gave the lower final held-out loss in {result['correction_wins']} of "
              f"{result['pairs']} (seed, lr) pairs.\n")
