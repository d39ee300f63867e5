"""Layers run one way (docs/architecture.md): every import inside glymphmpi, function-level ones too,
points down or sideways, and no two subpackages import each other (directly or around a loop).

    core    config, errors, log, parallel, subject, io/, store/ (and the package's __init__)
    runner  runner, methods
    methods romt/, fem/, pinn/, synth/, concentration/
    grids   pinnselect/, cohort/
    bids    bids/
    report  report/
    top     cli, info, demo, __main__

A subpackage's ``cli.py`` (``cohort/cli.py``, ``bids/cli.py``) is the command-line wiring of that
subpackage and belongs to the top layer. The registry refers to methods by dotted strings
("glymphmpi.fem.solve:solve"), which are not imports: that is how the runner layer calls a
method without importing it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "glymphmpi"

LAYERS = {
    0: {"__init__", "config", "errors", "log", "parallel", "subject", "io", "store"},
    1: {"runner", "methods"},
    2: {"romt", "fem", "pinn", "synth", "concentration"},
    3: {"pinnselect", "cohort"},
    4: {"bids"},
    5: {"report"},
    6: {"cli", "info", "demo", "__main__"},
}
LAYER_NAMES = {0: "core", 1: "runner", 2: "methods", 3: "pinnselect/cohort", 4: "bids", 5: "report", 6: "cli"}
LAYER_OF = {c: n for n, comps in LAYERS.items() for c in comps}

#: Known violations, each with its owner; the list shrinks to nothing as the owners fix theirs.
#: An entry is (importing file relative to glymphmpi/, imported component).
ALLOWED: dict[tuple[str, str], str] = {
}


def _component(module: str) -> str | None:
    """``glymphmpi.fem.solve`` -> ``fem``; ``glymphmpi`` -> ``__init__``; others -> None."""
    parts = module.split(".")
    if parts[0] != "glymphmpi":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(line, imported module) for every import in the file, at any depth, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield node.lineno, mod
            if mod == "glymphmpi" or (node.level and not node.module):
                for a in node.names:  # ``from glymphmpi import methods`` imports a submodule
                    sub = f"{mod}.{a.name}"
                    if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                            (PKG.parent / sub.replace(".", "/")).is_dir():
                        yield node.lineno, sub


def _source_component(rel: Path) -> str:
    if len(rel.parts) == 1:
        return rel.parts[0].removesuffix(".py")
    if len(rel.parts) == 2 and rel.name == "cli.py":
        return "cli"  # a subpackage's command-line wiring is part of the CLI layer
    return rel.parts[0]


def _edges():
    """(file, line, from component, to component) for every import between components."""
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        src = _source_component(rel)
        for line, mod in _imports(path):
            dst = _component(mod)
            if dst is not None and dst != src:
                yield str(rel), line, src, dst


def test_every_component_has_a_layer():
    comps = {p.name.removesuffix(".py") for p in PKG.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    missing = sorted(comps - set(LAYER_OF))
    assert not missing, f"components without a layer in tests/test_architecture.py: {missing}"


def test_no_upward_import():
    bad, used = [], set()
    for rel, line, src, dst in _edges():
        if LAYER_OF[dst] > LAYER_OF[src]:
            if (rel, dst) in ALLOWED:
                used.add((rel, dst))
                continue
            bad.append(f"glymphmpi/{rel}:{line}: {src} ({LAYER_NAMES[LAYER_OF[src]]}) imports {dst} "
                       f"({LAYER_NAMES[LAYER_OF[dst]]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"allow-list entries that no longer occur (remove them): {stale}"


def test_no_cycle_between_subpackages():
    graph, where = defaultdict(set), {}
    for rel, line, src, dst in _edges():
        if (rel, dst) in ALLOWED:
            continue
        graph[src].add(dst)
        where.setdefault((src, dst), f"glymphmpi/{rel}:{line}")
    # Tarjan's strongly connected components
    index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    msgs = []
    for comp in sccs:
        edges = [f"{where[(a, b)]} ({a} -> {b})" for a in comp for b in comp if (a, b) in where]
        msgs.append(f"cycle between {', '.join(comp)}: " + "; ".join(edges))
    assert not msgs, "\n".join(msgs)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The walker must not miss an import hidden in a function or written relatively."""
    f = PKG / "fem" / "_probe_arch.py"
    try:
        f.write_text("def f():\n    from ..report import fem_figures\n    import glymphmpi.cli\n")
        found = {(line, _component(m)) for line, m in _imports(f)}
        assert (2, "report") in found and (3, "cli") in found
    finally:
        f.unlink()


def test_no_module_cites_a_design_file_the_repository_lacks():
    """The architecture is described in docs/architecture.md (issue 13: five modules cited a DESIGN.md)."""
    assert (PKG.parent / "docs" / "architecture.md").exists()
    bad = [f"glymphmpi/{p.relative_to(PKG)}:{n}" for p in sorted(PKG.rglob("*.py"))
           for n, line in enumerate(p.read_text().splitlines(), 1) if "DESIGN.md" in line]
    assert not bad, "cite docs/architecture.md instead: " + ", ".join(bad)
