"""The package graph says what the README says: model/ is a leaf (PyTorch + tokenizer), the front ends depend on it and
on runtime/ downward, cli/ sits on top, and no two packages import each other (lazy imports inside functions count).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("model", "runtime", "pipelines", "deployments", "training", "cli", "demo", "benchmarks")
# What model/ may import besides the standard library: the tensors, the images, the tokenizer and the weight files, and
# llguidance (token masks from a JSON schema over the tokenizer's vocabulary: the sampler's constrained output).
MODEL_THIRD_PARTY = {"torch", "numpy", "PIL", "tokenizers", "transformers", "safetensors", "llguidance", "torchao"}
LIBRARY = ("model", "runtime", "pipelines", "deployments", "training", "cli")


def imports_of(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(ROOT).parts[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(package if node.level else (node.module or "").split(".")[0])
    return names


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for pkg in FIRST_PARTY:
        for f in package_files(pkg):
            graph[pkg] |= {m for m in imports_of(f) if m in FIRST_PARTY and m != pkg}
    return graph


def test_model_is_a_leaf():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = {}
    for f in package_files("model"):
        extra = imports_of(f) - stdlib - MODEL_THIRD_PARTY - {"model"}
        if extra:
            bad[str(f.relative_to(ROOT))] = sorted(extra)
    assert not bad, f"model/ must import only PyTorch, numpy, PIL and the tokenizer/weight libraries: {bad}"


def test_no_cycles_between_packages():
    graph = package_graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle between packages: {' -> '.join([*path, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for pkg in sorted(graph):
        if pkg not in state:
            visit(pkg, [])


def test_layers_point_down():
    """model <- runtime <- pipelines, deployments <- training <- cli <- demo (benchmarks may use anything)."""
    layer = {"model": 0, "runtime": 1, "pipelines": 2, "deployments": 2, "training": 3, "cli": 4, "demo": 5}
    graph = package_graph()
    upward = {(a, b) for a, deps in graph.items() if a in layer for b in deps if b in layer and layer[b] >= layer[a]}
    assert not upward, f"imports that point up or sideways between layers: {sorted(upward)}"


def test_cli_sits_on_the_front_ends():
    """cli/ imports the front ends' CLIs by name, so the graph (and the two tests above) see it above them."""
    assert {"pipelines", "deployments", "training"} <= package_graph()["cli"]


def test_imports_are_statements():
    """An import by string (`__import__`, `importlib.import_module`) is invisible to the graph these tests read."""
    hidden = [
        f"{f.relative_to(ROOT)}:{node.lineno}"
        for pkg in FIRST_PARTY
        for f in package_files(pkg)
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
        )
    ]
    assert not hidden, f"imports by string: {hidden}"


def test_cli_help_loads_neither_torch_nor_ray():
    code = (
        "import sys, contextlib, io\n"
        "from cli.main import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "print([m for m in ('torch', 'ray', 'model') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"`infimm-hd --help` loaded {out.stdout.strip()}"


def test_import_model_does_not_load_ray():
    code = (
        "import sys, model; "
        "print([m for m in ('ray', 'fastapi', 'pyarrow', 'pipelines', 'deployments') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"`import model` loaded {out.stdout.strip()}"


def test_no_import_time_environment_writes():
    """Only runtime.local_ray.prepare_local_env() sets the local-Ray environment, and only when called."""
    offenders = []
    for pkg in LIBRARY:
        for f in package_files(pkg):
            for node in ast.parse(f.read_text()).body:  # module level statements only
                src = ast.unparse(node)
                if "os.environ" in src and any(w in src for w in ("setdefault", "update(", "os.environ[")):
                    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"module-level environment writes: {offenders}"


def test_library_asserts_have_messages():
    bare = [
        f"{f.relative_to(ROOT)}:{node.lineno}"
        for pkg in LIBRARY
        for f in package_files(pkg)
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.Assert) and node.msg is None
    ]
    assert not bare, f"asserts without a message: {bare}"


def test_every_first_party_import_resolves():
    """Lazy imports inside functions included: a moved module must not leave a stale `from .old import x` behind."""
    missing = []
    for pkg in FIRST_PARTY:
        for f in package_files(pkg):
            here = f.relative_to(ROOT).with_suffix("").parts[:-1]  # the package the file is in
            for node in ast.walk(ast.parse(f.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    parts = (*base, *(node.module.split(".") if node.module else ()))
                elif node.module and node.module.split(".")[0] in FIRST_PARTY:
                    parts = tuple(node.module.split("."))
                else:
                    continue
                target = ROOT.joinpath(*parts)
                if target.with_suffix(".py").exists() or (target / "__init__.py").exists():
                    continue
                if not node.module and all((target / f"{a.name}.py").exists() for a in node.names):
                    continue  # `from . import submodule`
                missing.append(f"{f.relative_to(ROOT)}:{node.lineno} -> {'.'.join(parts)}")
    assert not missing, f"imports of modules that do not exist: {missing}"


def test_no_test_module_imports_another():
    """Tests share code through tests/*_helpers.py and conftest.py: importing a test module runs its module-level code
    again and pulls its fixtures and tests into the importer's namespace."""

    def imported(node: ast.AST) -> list[str]:  # the tests/ modules a statement imports
        if isinstance(node, ast.Import):
            return [a.name.split(".")[1] for a in node.names if a.name.startswith("tests.")]
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "tests"):
            if node.module in (None, "tests"):
                return [a.name for a in node.names]  # from . import x / from tests import x
            return [node.module.split(".")[-1 if node.level else 1]]
        return []

    offenders = [
        f"{f.relative_to(ROOT)}:{node.lineno} imports {name}"
        for f in sorted((ROOT / "tests").glob("*.py"))
        for node in ast.walk(ast.parse(f.read_text()))
        for name in imported(node)
        if name.startswith("test_")
    ]
    assert not offenders, f"test modules importing test modules (move what they share to a helper): {offenders}"
