"""Command line: ``python -m lorafa_fx demo`` and ``python -m lorafa_fx plan``."""

from __future__ import annotations

import argparse
import json
import sys

from . import demo

PLAN_EXAMPLES = """examples:
  python -m lorafa_fx plan --config llama-2-7b --batch 16 --seq 1024 --rank 64 --budget 40GB
  python -m lorafa_fx plan --config llama-2-70b --batch 1 --seq 4096 --rank 16 --json
  python -m lorafa_fx plan --config path/to/config.json --batch 8 --seq 2048
  python -m lorafa_fx plan --config llama-2-70b --batch 1 --seq 4096 --rank 16 --world-size 8 --budget 80GB
presets: """


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lorafa_fx",
        description="LoRA-FA fine-tuning as an FX graph transformation.",
        epilog="example: python -m lorafa_fx demo --steps 40",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a small Llama built from a config with LoRA-FA (no downloads)")
    d.add_argument("--steps", type=int, default=40)
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--seq", type=int, default=64)
    _add_plan_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.run(steps=args.steps, batch=args.batch, seq=args.seq)
        return 0
    return _plan(args)


def _add_plan_parser(sub) -> None:
    from .presets import PRESETS

    p = sub.add_parser(
        "plan",
        help="print the memory plan of a model from its config (no weights, no GPU)",
        description="Capture a model built from its config with fake weights, apply LoRA-FA and predict "
        "(and, with --budget, plan) the memory of one AdamW training step.",
        epilog=PLAN_EXAMPLES + ", ".join(PRESETS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="a preset name or a config.json (file or directory)")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 x rank)")
    p.add_argument("--budget", default=None, help="e.g. 40GB (10^9) or 40GiB (2^30)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--world-size", type=int, default=None,
                   help="plan one rank of a data-parallel job of N processes (--batch is per rank)")
    p.add_argument("--sharding", choices=("full", "none"), default="full",
                   help="with --world-size: full = FSDP2 (weights sharded 1/N), none = DDP (replicated)")


def _plan(args) -> int:
    import torch
    from rich.console import Console

    from .config import LoraFAConfig
    from .errors import LoraFAError
    from .estimate import estimate
    from .presets import load_config

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    console = Console(stderr=True)
    try:
        config = load_config(args.config)
        lora = LoraFAConfig(r=args.rank, lora_alpha=args.alpha or 2 * args.rank)
        with console.status(f"capturing {args.config} with fake weights and simulating a step..."):
            plan = estimate(config, batch_size=args.batch, seq_len=args.seq, config=lora, dtype=dtype,
                            budget=args.budget, world_size=args.world_size, sharding=args.sharding)
    except (LoraFAError, ValueError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
