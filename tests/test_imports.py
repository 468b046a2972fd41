"""The layers hold, read from the source: `paper` (the research protocol) imports the pipeline and never the
reverse, `cmaclip` (the model library) never imports `pipeline`, and no module imports itself back through
others. Every import statement counts, at module top or inside a function, absolute or relative: a lazy
import defers a dependency, it does not remove it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cmaclip", "pipeline", "paper")


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """{dotted name: file} of every module under the packages; a package is its __init__.py."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names, with a relative one resolved against `module`."""
    if not node.level:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 >= len(base):
        raise ValueError(f"{module}: relative import beyond the top-level package (level {node.level})")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module `module` imports, as absolute dotted names. `from p import m` names the module p.m where
    that is one of `known`, else p. The packages above a name are not counted: Python loads them first, but
    `from cmaclip.config import X` depends on cmaclip.config, not on what cmaclip/__init__ imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, path.name == "__init__.py", node)
            submodules = {f"{source}.{alias.name}" for alias in node.names} & known
            out.update(submodules or {source})
    return out


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """{module: every module it imports, of any package}."""
    found = modules(root, packages)
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's own modules, as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every import below is explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node] & graph.keys()):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _importers(graph: dict[str, set[str]], of: str, target: str) -> dict[str, list[str]]:
    """The modules of package `of` that import anything of package `target`, and what."""
    return {m: sorted(i for i in deps if i.split(".")[0] == target)
            for m, deps in graph.items() if m.split(".")[0] == of
            and any(i.split(".")[0] == target for i in deps)}


# --- the project ---------------------------------------------------------------------------------------

GRAPH = import_graph(REPO_ROOT, PACKAGES)


def test_every_package_is_read():
    # the walk sees what these tests are about: without these edges the rules below would pass vacuously
    assert "pipeline.tracking.tracker" in GRAPH["paper.outputs"] and "cmaclip.config" in GRAPH["pipeline.training.data"]
    assert "cmaclip.corruption" in GRAPH["pipeline.tracking.stage_logging"]
    # pipeline/'s sub-packages are walked too, their relative imports (`from ..io import storage`) resolved
    assert {"pipeline.io.storage", "pipeline.reasons", "pipeline.scoring.planner"} <= GRAPH["pipeline.scoring.reader"]
    assert {p.parent.name for p in (REPO_ROOT / "pipeline").glob("*/__init__.py")} <= {
        m.split(".")[1] for m in GRAPH if m.startswith("pipeline.") and m.count(".") == 2}


def test_pipeline_and_cmaclip_never_import_paper():
    offenders = {**_importers(GRAPH, "pipeline", "paper"), **_importers(GRAPH, "cmaclip", "paper")}
    assert not offenders, f"production imports the paper protocol: {offenders}"


def test_cmaclip_never_imports_pipeline():
    offenders = _importers(GRAPH, "cmaclip", "pipeline")
    assert not offenders, f"the model library imports the pipeline: {offenders}"


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_publishing_loads_no_torch():
    """The steps after scoring (finalize, report, gate, publish, versions, retention) read and write Parquet
    only: run as Airflow tasks, they must not pay torch's import (seconds, hundreds of MB of RSS) nor count it in
    the peak memory bench/nightly.py measures. Loaded in a fresh interpreter: this one has torch already."""
    probe = ("import sys, pipeline.scoring.publish, pipeline.scoring.finalize, pipeline.scoring.retention; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip')))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


# --- the walk itself, on a made-up package --------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_relative_and_lazy_imports_are_edges(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "import os\n\ndef f():\n    from . import b\n    return b\n",
        "pkg/b.py": "from .sub.c import x\nfrom pkg.sub import c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "x = 1\n\ndef g():\n    from .. import a\n    from ..a import f\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"os", "pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": set(),
                     "pkg.sub.c": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    del graph["pkg.sub.c"]  # the edge back to pkg.a goes with it
    assert find_cycle(graph) is None


def test_rules_name_the_offending_import(tmp_path):
    _write(tmp_path, {"pipeline/__init__.py": "", "pipeline/x.py": "def f():\n    import paper.protocol\n",
                      "paper/__init__.py": "", "paper/protocol.py": "from pipeline import x\n"})
    graph = import_graph(tmp_path, ("pipeline", "paper"))
    assert _importers(graph, "pipeline", "paper") == {"pipeline.x": ["paper.protocol"]}
    assert find_cycle(graph) == ["paper.protocol", "pipeline.x", "paper.protocol"]
