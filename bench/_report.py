"""``python -m bench report``: bench/RESULTS.md from the saved JSON (bench/results/<name>.json).

RESULTS.md is bench/RESULTS.head.md (hand-written: what the file is, how the figures were
taken) followed by one section per bench, in `BENCHES` order: its docstring (what it
measures), the run's command, commit, date and machine, and its tables (the bench's
``markdown(result)``). A bench with no saved JSON gets a "not run" section with the command.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from pathlib import Path

from bench import BENCHES, _harness

HEAD = _harness.BENCH / "RESULTS.head.md"


def section(name: str, record: dict | None) -> str:
    module = importlib.import_module(f"bench.{name}")
    title, _, about = inspect.cleandoc(module.__doc__).partition("\n")
    lines = [f"## {name}: {title}", "", about.strip(), ""]
    if record is None:
        lines += [f"**Not run.** Run `python -m bench {name} --save`, then `python -m bench report`.", ""]
        return "\n".join(lines)
    m = record["machine"]
    tree = "uncommitted changes" if record["dirty"] else "clean tree"
    commit = (record["commit"] or "unknown")[:10]
    load = " → ".join(str(x) for x in record["machine"]["load_average"])
    lines += [f"Run: `{record['command']}`; commit {commit} ({tree}), {record['date_utc']} UTC, "
              f"{record['wall_s']:.0f} s. Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch "
              f"thread(s), torch {m['torch']}, transformers {m['transformers']}, device {m['device']}; "
              f"load average {load}.", ""]
    if record["args"].get("smoke"):
        lines += ["*A smoke run (`--smoke`): tiny models, a check of the code path; its figures are not results.*", ""]
    elif record["args"].get("quick"):
        lines += [f"*A quick run (`--quick`): the full-size run, `python -m bench {name}`, takes more than ~15 minutes "
                  "of this machine's two cores.*", ""]
    return "\n".join(lines) + "\n" + module.markdown(record["result"])


def render(results: Path) -> str:
    parts = [HEAD.read_text().rstrip() + "\n"]
    for name in BENCHES:
        path = results / f"{name}.json"
        parts.append(section(name, json.loads(path.read_text()) if path.exists() else None))
    return "\n".join(parts)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench report", description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=_harness.RESULTS, help="the JSON files' folder")
    ap.add_argument("--output", type=Path, default=_harness.BENCH / "RESULTS.md")
    args = ap.parse_args(argv)
    args.output.write_text(render(args.results))
    print(f"wrote {args.output}")
