"""Command line: ``python -m lorafa_fx demo``."""

from __future__ import annotations

import argparse

from . import demo


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
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.run(steps=args.steps, batch=args.batch, seq=args.seq)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
