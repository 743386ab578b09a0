"""The docs say what the code is: the README's size, links that lead somewhere, the tests the
evidence page names, the stage table against `stages.py`, the lever table against
`choices.Decision`, output blocks that come from a command (``docs/regen.py``), and the
README's example, run.
Reference: the repository's own files and the library's lists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn as nn

from lorafa_fx import LoraFAConfig, stages
from lorafa_fx.choices import Decision

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)$", re.M)


def _rows(page: Path, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header line starts with `header`."""
    lines = page.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows


def _slug(heading: str) -> str:
    # GitHub's anchors: lower case, punctuation dropped, spaces as hyphens.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_bytes()) <= 10_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_leads_to_a_file_and_heading_that_exist(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name} links to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name} links to {target}: no such heading"


def test_every_test_the_docs_name_exists():
    named = set()
    for page in PAGES:
        named |= set(re.findall(r"(tests/test_\w+\.py)(?:::(\w+))?", page.read_text()))
    assert len(named) > 40
    for file, test in named:
        assert (ROOT / file).exists(), file
        if test:
            assert re.search(rf"^def {test}\(", (ROOT / file).read_text(), re.M), f"{file}::{test}"


def test_the_stage_table_is_stages_py():
    rows = _rows(ROOT / "docs" / "design.md", "| stage | pass |")
    documented = [(stage, name) for stage, name, _ in rows]

    def named(stage: str, passes) -> list[tuple[str, str]]:
        return [(stage, type(p).__module__.rpartition(".")[2]) for p in passes]

    run_in_order = (named("graph", stages.graph_passes(nn.Linear(1, 1))) + named("lean", stages.LEAN_PASSES)
                    + named("adapter", stages.adapter_passes([], LoraFAConfig())))
    assert documented[:len(run_in_order)] == run_in_order
    every_pass = {p.stem for p in (ROOT / "lorafa_fx" / "passes").glob("*.py") if p.stem != "__init__"}
    assert sorted(name for _, name in documented) == sorted(every_pass)


def test_the_lever_table_is_the_decisions():
    rows = _rows(ROOT / "docs" / "planning.md", "| decision |")
    assert [row[0] for row in rows] == [d.value for d in Decision]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_output_block_comes_from_a_command(page):
    """A ``text`` block is program output: docs/regen.py fills it from the marker above it."""
    lines = page.read_text().splitlines()
    fences = [i for i, line in enumerate(lines) if FENCE.match(line)]
    for opening, closing in zip(fences[::2], fences[1::2]):
        if lines[opening] == "```text":
            assert lines[opening - 1].startswith("<!-- output: "), f"{page.name}:{opening + 1} has no command"
            assert closing > opening + 1, f"{page.name}:{opening + 1}: run python docs/regen.py"


def test_the_readmes_example_trains_and_loads_in_peft(tmp_path):
    """The README's first Python block, run as a user runs it (its own assertion is the
    reference: the saved adapter in PEFT gives the trained module's logits)."""
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S)[1]
    (tmp_path / "example.py").write_text(example)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predicted peak" in done.stdout and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
