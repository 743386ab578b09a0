"""Regenerate every output block of the docs from the command that makes it.

An output block is a fenced block right after a marker line naming its command::

    <!-- output: python -m lorafa_fx plan --config llama-2-7b --batch 16 --seq 1024 -->
    ```text
    ...what the command printed...
    ```

``python docs/regen.py`` runs each command from the repository root (``python`` is this
interpreter, the terminal 110 columns wide) and writes what it printed, stdout then stderr,
into the block. ``--check`` writes nothing and fails if a block differs; file arguments
restrict it to those files (default: README.md and docs/*.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: A marker, then its block: the fence line, the content, the closing fence.
BLOCK = re.compile(r"(?P<marker><!-- output: (?P<command>.+?) -->\n)(?P<fence>```[a-z]*\n)(?P<body>.*?)```", re.S)


def files(names: list[str]) -> list[Path]:
    return [ROOT / n for n in names] if names else [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def run(command: str) -> str:
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    env = {**os.environ, "COLUMNS": "110", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    out = done.stdout + done.stderr
    return "\n".join(line.rstrip() for line in out.rstrip().splitlines()) + "\n"


def regenerate(path: Path, check: bool) -> bool:
    """Whether every block of `path` was already what its command prints."""
    text = path.read_text()
    same = True

    def replace(m: re.Match) -> str:
        nonlocal same
        body = run(m["command"])
        if body != m["body"]:
            same = False
            print(f"{path.relative_to(ROOT)}: changed: {m['command']}", file=sys.stderr)
        return f"{m['marker']}{m['fence']}{body}```"

    new = BLOCK.sub(replace, text)
    if not check and new != text:
        path.write_text(new)
    return same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="markdown files, relative to the repository root")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is stale")
    args = p.parse_args()
    stale = [path for path in files(args.files) if not regenerate(path, args.check)]
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
