"""The package's structure, as docs/architecture.md states it: no import circle, libraries that
know nothing of the app's config, and no code that points outside the repository."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "glmsnake"

# Libraries: reusable without a Workflow. Only steps/, cli, plan, status and the Snakefile tie
# them to the app's config.
LIBRARIES = ("glmsnake.convert", "glmsnake.trainer", "glmsnake.launch", "glmsnake.hub")
APP = ("glmsnake.config", "glmsnake.resolve", "glmsnake.steps", "glmsnake.staleness", "glmsnake.parallel_layout",
       "glmsnake.status", "glmsnake.plan", "glmsnake.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "_ray_site" not in p.parts}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """glmsnake modules `path` imports; with top_level_only, those run at import time (not in
    functions, not under `if TYPE_CHECKING`), the ones that can make a circle fail."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    known = modules()

    def add(name: str) -> None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:  # `from glmsnake.x import y` may name a module y
                    sub = f"{node.module}.{a.name}"
                    add(sub if sub in known else node.module)
            elif isinstance(node, ast.If):
                if not (top_level_only and _is_type_checking(node)):
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, (ast.Try,)):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.finalbody)
            elif not top_level_only:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        visit([child])
                    for grand in ast.walk(child):
                        if isinstance(grand, (ast.Import, ast.ImportFrom)):
                            visit([grand])

    visit(tree.body)
    return {m for m in found if m.startswith("glmsnake")} - {module_name(path)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := dfs(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := dfs(n)):
            return c
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_at_import_time():
    graph = {name: imports(path, top_level_only=True) for name, path in modules().items()}
    assert find_cycle(graph) is None


def test_no_import_circle_in_any_import():
    """Lazy imports inside functions may not close a circle either: they only hide one."""
    graph = {name: imports(path, top_level_only=False) for name, path in modules().items()}
    assert find_cycle(graph) is None


@pytest.mark.parametrize("library", LIBRARIES)
def test_libraries_know_nothing_of_the_app_config(library):
    offenders = {}
    for name, path in modules().items():
        if name == library or name.startswith(library + "."):
            bad = sorted(m for m in imports(path, top_level_only=False) if m.startswith(APP))
            if bad:
                offenders[name] = bad
    assert offenders == {}


def test_every_module_imports_alone():
    """Each module in a fresh interpreter (one process for all, a fresh import each)."""
    code = (
        "import importlib, sys\n"
        "bad = []\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [k for k in sys.modules if k.startswith('glmsnake')]: del sys.modules[m]\n"
        "    try: importlib.import_module(name)\n"
        "    except Exception as e: bad.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *modules()], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr



def test_the_snakefile_does_not_import_torch():
    """Every snakemake call parses the Snakefile (a dry run, each job on a node): torch's import
    would add seconds to each. Its glmsnake imports, run in a fresh interpreter, must not load it."""
    lines = [ln.strip() for p in [REPO / "Snakefile", *(REPO / "rules").glob("*.smk")]
             for ln in p.read_text().splitlines() if re.match(r"\s*(from glmsnake\S* import|import glmsnake)", ln)]
    assert lines, "the Snakefile imports nothing of glmsnake: this test no longer looks at the right file"
    code = "\n".join([*lines, "import sys", "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"the Snakefile's imports load torch: {r.stdout.strip()}"

# Spelled in pieces, so this file does not match itself.
POINTING_OUTSIDE = re.compile("|".join(["design" + r" section", "design" + r"\.md", r"\.\./" + "shared",
                                        r"\bissue" + r" #?\d+"]), re.IGNORECASE)


def test_no_code_points_outside_the_repository():
    files = [*PACKAGE.rglob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"),
             *(REPO / "rules").rglob("*.smk"), REPO / "Snakefile"]
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if POINTING_OUTSIDE.search(line)]
    assert hits == []


def test_architecture_doc_names_every_package():
    doc = (REPO / "docs" / "architecture.md").read_text()
    packages = sorted({p.parent.name for p in PACKAGE.rglob("__init__.py")} - {"glmsnake"})
    assert [p for p in packages if f"{p}/" not in doc] == []
