"""The house rules a newcomer relies on, checked on the package's source: small modules, short functions, no import
cycle, imports at the top (but for heavy optional dependencies), every module in a role folder."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dptrain"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
# imported inside a function on purpose: heavy or optional, needed only on one path (a run that logs to wandb, an
# Opacus engine, LoRA, ScatterNet features, a plot, a torchvision dataset download)
LAZY = ("opacus", "peft", "wandb", "kymatio", "matplotlib", "torchvision.datasets", "sklearn", "dp_accounting",
        "transformers", "pandas", "tabulate", "submitit", "hydra_plugins", "optuna")
# deferred on purpose, per module: what it imports late and why
DEFERRED = {
    "cli/train.py": ("dptrain.train", "dptrain.privacy"),  # a bad command line is refused before torch loads
    "bench/gpu_check.py": ("dptrain.bench.speed",),  # pandas: a bare GPU machine may lack it (rows kept in json)
    "bench/steps.py": ("dptrain.config",),  # Hydra: installed by gpu_check's kit after this module is imported
}
TOP_LEVEL = {"__init__", "__main__", "errors", "config", "keys", "audit", "report", "testing"}


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported(node: ast.AST, module: str) -> list[str]:
    """dptrain module names an import statement reads (relative imports resolved against `module`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
        base = ".".join(pkg + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def test_no_module_is_longer_than_the_limit():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in _modules()}
    long = {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_longer_than_the_limit():
    long = {}
    for p in _modules():
        for node in ast.walk(_tree(p)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(PACKAGE)}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_imports_sit_at_the_top_unless_heavy_and_optional():
    inside = []
    for p in _modules():
        tree = _tree(p)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    allowed = LAZY + DEFERRED.get(str(p.relative_to(PACKAGE)), ())
                    if not all(n.startswith(allowed) for n in names):
                        inside.append(f"{p.relative_to(PACKAGE)}:{node.lineno} {', '.join(names)}")
    assert not inside, "imports inside functions (move them to the top, or add a heavy optional one to LAZY):\n" + \
        "\n".join(inside)


def test_the_package_has_no_import_cycle():
    graph: dict[str, set[str]] = {}
    modules = {_name(p): p for p in _modules()}
    for name, p in modules.items():
        deps = set()
        for node in ast.walk(_tree(p)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                ctx = name + (".__init__" if p.name == "__init__.py" else "")
                deps |= {m for m in _imported(node, ctx) if m in modules and m != name}
        graph[name] = deps
    # a package's __init__ re-exporting its submodules is not a cycle with them: drop the child → parent edge
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


@pytest.mark.parametrize("path", [p for p in _modules() if p.parent == PACKAGE], ids=lambda p: p.name)
def test_top_level_modules_are_shared_by_every_role(path):
    """Everything else lives in its role's folder (cli, train, data, models, engines, privacy, sweep, bench)."""
    assert path.stem in TOP_LEVEL
