"""``python -m bench``: the benches, one line each; ``python -m bench <name> [options]`` runs one,
``save <name> ...`` copies their JSON to bench/results/, ``report`` writes bench/RESULTS.md."""

from __future__ import annotations

import ast
import importlib
import sys

from bench import BENCHES, _harness

USAGE = """usage: python -m bench <name> [--smoke] [--save] [options]   (python -m bench <name> --help)
       python -m bench save [<name> ...]  copy bench/out/<name>.json to bench/results/ (all there are)
       python -m bench report             write bench/RESULTS.md from bench/results/*.json
"""


def summary(name: str) -> str:
    """The first line of bench `name`'s docstring, read without importing it (no torch at start)."""
    source = (_harness.BENCH / f"{name}.py").read_text()
    return (ast.get_docstring(ast.parse(source)) or "").splitlines()[0]


def main(argv: list[str] | None = None) -> dict | None:
    """Run the command in `argv` (default: the command line); a bench returns its JSON record."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(USAGE + "\nbenches:")
        for name in BENCHES:
            print(f"  {name:12} {summary(name)}")
        return None
    command, rest = argv[0], argv[1:]
    if command == "report":
        from bench import _report

        _report.main(rest)
        return None
    if command == "save":
        _harness.save(rest or [name for name in BENCHES if (_harness.OUT / f"{name}.json").exists()])
        return None
    if command not in BENCHES:
        raise SystemExit(f"no bench {command!r}; the benches: {', '.join(BENCHES)} (or: report, save)")
    return _harness.run_bench(command, importlib.import_module(f"bench.{command}"), rest)


if __name__ == "__main__":
    main()
