"""The package's layers, read from its source: imports only go down, no cycles, small files.

Layers, bottom to top (a module may import its own layer and the ones below): leaves (units,
choices, meta, errors, config, plan_config, atomic_dir, devices, checks, json_fields) -> graph editing (graph) and what the graph
runs (ops/) -> model-side helpers (targets, capture, bnb_layers, presets, shallow) -> passes/ ->
memory/ -> stages (the pass lists) -> the training-side modules (optim, peft_files, merge,
hf_compat, backbone, calls, distributed, measure) -> captured_model -> pipeline -> api. memory/ never
imports passes/: it receives the rewrites it needs as an object. The package root, the CLI (with ctrl_c), the
demo and the zoo may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lorafa_fx"

LAYERS = [
    {"units", "choices", "meta", "errors", "config", "plan_config", "atomic_dir", "devices", "checks", "json_fields"},
    {"graph", "ops"},
    {"targets", "capture", "bnb_layers", "presets", "shallow"},
    {"passes"},
    {"memory"},
    {"stages"},
    {"state", "optim", "peft_files", "merge", "hf_compat", "backbone", "calls", "distributed", "measure"},
    {"captured_model"},
    {"pipeline"},
    {"api"},
]
TOP = {"__init__", "__main__", "ctrl_c", "demo", "demo_text", "zoo"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports() -> nx.DiGraph:
    """Every import of a lorafa_fx module by another, at any depth in the file (functions too)."""
    graph = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph.add_node(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from pkg import submodule` imports the submodule; `from mod import name`, mod.
                subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
                targets = subs if len(subs) == len(node.names) else [target, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t.startswith("lorafa_fx") and _is_module(t) and t != name:
                    graph.add_edge(name, t)
    return graph


def _layer(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    assert top in TOP, f"{module} is in no layer: add it to LAYERS or TOP in {__file__}"
    return None


def test_no_import_cycles():
    graph = _imports()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"


def test_imports_only_go_down():
    upward = []
    for a, b in _imports().edges:
        la, lb = _layer(a), _layer(b)
        if la is not None and lb is not None and lb > la:
            upward.append(f"{a} -> {b}")
    assert not upward, "imports that go up a layer:\n  " + "\n  ".join(upward)


def test_memory_never_imports_a_pass():
    """The memory model prices the planner's decisions with rewrites handed to it as an object
    (`memory.simulate.Realise`); what the graph runs, it imports from ops/."""
    edges = [f"{a} -> {b}" for a, b in _imports().edges if a.startswith("lorafa_fx.memory") and b.startswith("lorafa_fx.passes")]
    assert not edges, "memory/ imports passes/:\n  " + "\n  ".join(edges)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400
