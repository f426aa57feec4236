"""The layers import only downward: Ray only in runtime/, and core/ and methods/ need neither MLflow,
pyarrow nor boto3 (what the GPU machine lacks)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "raysseg"
RAY_FREE = sorted(p for p in PACKAGE.rglob("*.py") if "runtime" not in p.relative_to(PACKAGE).parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, at any depth (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_every_module_outside_runtime_imports_without_ray():
    modules = [module_name(p) for p in RAY_FREE]
    code = ("import sys; sys.modules['ray'] = None\n"
            f"for name in {modules!r}:\n    __import__(name)\nprint(len(sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(modules) > 40


@pytest.mark.parametrize("layer", ["core", "methods", "engine"])
def test_lower_layers_never_name_ray_mlflow_pyarrow_or_boto3(layer):
    banned = ("ray", "mlflow", "pyarrow", "boto3", "botocore")
    allowed_upward = {"core": ("raysseg.core",), "methods": ("raysseg.core", "raysseg.methods", "raysseg.settings"),
                      "engine": None}
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in imported(path):
            top = name.split(".")[0]
            if layer != "engine" or top in banned[:1]:
                assert top not in banned, f"{path.relative_to(PACKAGE)} imports {name}"
            if allowed_upward[layer] and name.startswith("raysseg"):
                assert name.startswith(allowed_upward[layer]), f"{path.relative_to(PACKAGE)} imports {name} (upward)"


def test_no_module_imports_ray_outside_runtime():
    offenders = [str(p.relative_to(PACKAGE)) for p in RAY_FREE if any(n.split(".")[0] == "ray" for n in imported(p))]
    assert offenders == []


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def depends_on(name: str) -> set[str]:
    """The raysseg modules ``name`` imports: at module level, inside functions and under ``TYPE_CHECKING``
    alike (a lazy import is still a dependency; it only hides the circle from the import order).
    ``from package import module`` names that module; the parent packages an import runs are not counted."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of ``name``
                package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    found.add(f"{base}.{alias.name}")
                elif base in MODULES:
                    found.add(base)
    return found - {name}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_the_circle_finder_finds_circles():
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []




def test_no_modules_import_each_other_in_a_circle():
    graph = {name: depends_on(name) for name in MODULES}
    assert graph["raysseg.io.prepared"] >= {"raysseg.io.images", "raysseg.io.storage"}  # the parser sees imports
    assert "raysseg.io.store_uri" in graph["raysseg.io.checkpoints"]  # imports inside functions count
    assert import_circles(graph) == []
