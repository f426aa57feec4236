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
