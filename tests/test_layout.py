"""The package's layers: every import points down (or sideways), no two modules import each other, and
reading results never loads the training stack."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "onelayer"

# bottom to top; a module may import from its own layer or those below it
LAYERS = [
    ["onelayer.errors", "onelayer.compat", "onelayer.jsonl", "onelayer.progress", "onelayer.tracking",
     "onelayer.config"],
    ["onelayer.profile", "onelayer.models"],
    ["onelayer.layers", "onelayer.interop", "onelayer.memory", "onelayer.checkpoint", "onelayer.adapters",
     "onelayer.compiled", "onelayer.fused", "onelayer.variants", "onelayer.algorithms", "onelayer.rollout", "onelayer.tasks",
     "onelayer.envs", "onelayer.sandbox"],
    ["onelayer.evaluate"],
    ["onelayer.analysis"],
    ["onelayer.training"],
    ["onelayer.experiments"],
    ["onelayer.cli", "onelayer.__main__", "onelayer"],
]


def _rank(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["onelayer", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The onelayer modules ``module`` imports, at the top or inside functions."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            out.update(n if n in known else target for n in names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, set(modules)) for m, p in modules.items()}


def test_every_import_points_down_or_sideways():
    upward = [f"{m} (layer {_rank(m)}) imports {t} (layer {_rank(t)})"
              for m, targets in _graph().items() for t in targets if _rank(t) > _rank(m)]
    assert upward == []


def test_no_modules_import_each_other_in_a_circle():
    graph = _graph()
    # a package importing its own submodules (re-exports) is not a circle through them
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_reading_results_does_not_import_training():
    code = ("import sys\nimport onelayer.experiments.report, onelayer.experiments.scan, onelayer.profile\n"
            "import onelayer.experiments.compare, onelayer.experiments.ood\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('onelayer.training'))\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1000:]
