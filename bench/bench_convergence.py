"""Does LoRA-FA's gradient correction speed convergence? Loss with and without it, same seeds.

The paper (LoRA-FA, arXiv 2308.03303) claims the closed-form correction of ``grad_B`` closes
part of the gap to full fine-tuning. Here: the zoo's tiny random-init Llama
(``lorafa_fx.zoo.make_model("llama", "test", seed)``: 2 layers, hidden 64), adapters on every
linear, trained on a synthetic next-token task with learnable structure. Each sequence walks a fixed
random permutation of the vocabulary (``x[t+1] = perm[x[t]]``) from a random start, so every
token but the first is predictable from its predecessor and the loss floor is about
``log(V) / seq``. For each (seed, lr) both runs start from identical weights and see
identical batches; only ``gradient_correction`` differs.

    python bench/bench_convergence.py [--quick]

Prints a table and writes bench/out/bench_convergence.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import lorafa_fx
from lorafa_fx import zoo
from lorafa_fx.optim import create_lorafa_optimizer

OUT = Path(__file__).resolve().parent / "out"
VOCAB = zoo.VOCAB


def _batch(perm: torch.Tensor, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(batch, seq, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
    for t in range(1, seq):
        ids[:, t] = perm[ids[:, t - 1]]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _run(gm: torch.fx.GraphModule, init: dict[str, torch.Tensor], perm: torch.Tensor, *, lr: float,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 lr, 100 steps")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds, args.lrs = 100, 1, [1e-3]
    every = max(args.steps // 6, 1)

    t0 = time.perf_counter()
    runs = []
    for seed in range(args.seeds):
        perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))
        model = zoo.make_model("llama", "test", seed=seed)
        gm = lorafa_fx.transform(model, example_inputs=_batch(perm, 2, args.seq, seed=0), config=lorafa_fx.LoraFAConfig(
            r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", seed=seed))
        gm.train()
        init = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
        for lr in args.lrs:
            for correction in (True, False):
                hist = _run(gm, init, perm, lr=lr, correction=correction, steps=args.steps,
                            batch=args.batch, seq=args.seq, seed=seed, every=every)
                runs.append({"seed": seed, "lr": lr, "correction": correction, **hist})

    checkpoints = [every * (k + 1) for k in range(args.steps // every)]

    def mean_eval(lr: float, correction: bool) -> list[float]:
        evals = [r["eval"] for r in runs if r["lr"] == lr and r["correction"] == correction]
        return [statistics.mean(e[k] for e in evals) for k in range(len(checkpoints))]

    table = {lr: {c: mean_eval(lr, c) for c in (True, False)} for lr in args.lrs}
    wins = sum(
        r["eval"][-1] < o["eval"][-1]
        for r in runs if r["correction"]
        for o in runs if not o["correction"] and o["seed"] == r["seed"] and o["lr"] == r["lr"]
    )
    result = {
        "config": vars(args) | {"vocab": VOCAB, "task": "permutation walk x[t+1] = perm[x[t]]"},
        "checkpoints": checkpoints,
        "mean_eval_loss": {str(lr): {("with" if c else "without"): v for c, v in d.items()} for lr, d in table.items()},
        "correction_lower_final_eval_loss": f"{wins}/{len(runs) // 2}",
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_convergence.json").write_text(json.dumps(result, indent=2))

    print(f"tiny Llama (2 layers, hidden 64), all-linear r={args.r}, permutation-walk task V={VOCAB}, "
          f"batch {args.batch}x{args.seq}; held-out loss, mean over {args.seeds} seed(s); "
          f"floor ~{torch.log(torch.tensor(float(VOCAB))).item() / args.seq:.2f}")
    print(f"{'lr':>8} {'correction':>11} " + " ".join(f"{'@' + str(c):>7}" for c in checkpoints))
    for lr, d in table.items():
        for c in (True, False):
            print(f"{lr:>8.0e} {('with' if c else 'without'):>11} " + " ".join(f"{v:>7.3f}" for v in d[c]))
    print(f"correction gave the lower final held-out loss in {result['correction_lower_final_eval_loss']} "
          f"(seed, lr) pairs; {result['seconds']:.0f} s")
    print(f"wrote {OUT / 'bench_convergence.json'}")


if __name__ == "__main__":
    main()
