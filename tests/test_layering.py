"""The import layering, kept by a machine (``make lint`` and ``make test`` run this).

- models import nothing of training, data or the methods: only the leaves (ops, labels, label_sets,
  paths, errors);
- the DDB ops (bridging, augmentation, losses, prototypes, ensemble) import no model, no
  data and no training code: only each other and the leaves;
- the input pipeline imports no training code: only itself and the leaves;
- the methods sit below the training loop: nothing in ddb_jax/methods imports
  ``ddb_jax.train`` (nor the pipeline or the entry points), at module level or inside a
  function;
- nothing outside tests/ imports from tests/; the PyTorch transcriptions (torch_ref/) import
  nothing of the project, and the project imports them only from tests and benchmarks;
- torch is never imported at module level by the package (it is a test dependency; the
  .pth readers import it where they need it).
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEAVES = (
    "ddb_jax.ops", "ddb_jax.labels", "ddb_jax.label_sets", "ddb_jax.paths", "ddb_jax.errors",
    "ddb_jax.runtime.deadline",
)  # fmt: skip
# The domain-adaptation ops (ddb_jax/uda/): every module of the folder.
DDB_OPS = tuple(
    f"ddb_jax.uda.{name[:-3]}"
    for name in sorted(os.listdir(os.path.join(ROOT, "ddb_jax", "uda")))
    if name.endswith(".py") and name != "__init__.py"
)
TRAINING = ("ddb_jax.train", "ddb_jax.pipeline", "ddb_jax.main", "ddb_jax.stages")
PROJECT = ("ddb_jax", "input_pipeline", "configs", "tools", "benchmarks", "tests", "torch_ref")


def python_files(folder: str) -> list[str]:
    out = []
    for base, _, files in os.walk(os.path.join(ROOT, folder)):
        out += [os.path.join(base, f) for f in files if f.endswith(".py")]
    return sorted(out)


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def imports(path: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            out += [(n, id(node) in top) for n in names]
    return out


def project_imports(path: str) -> list[str]:
    return [name for name, _ in imports(path) if name.split(".")[0] in PROJECT]


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(files: list[str], allowed) -> list[str]:
    return [
        f"{os.path.relpath(path, ROOT)} imports {name}"
        for path in files
        for name in project_imports(path)
        if not within(name, allowed)
    ]


def test_the_rules_see_imports():
    """A check that cannot fail is no check: the parser finds a known import."""
    names = project_imports(os.path.join(ROOT, "ddb_jax", "methods", "self_training.py"))
    assert "ddb_jax.uda.bridging" in names and "ddb_jax.methods.base" in names


def test_models_import_only_models_and_leaves():
    files = python_files("ddb_jax/models")
    assert files
    assert violations(files, ("ddb_jax.models", *LEAVES)) == []


def test_ddb_ops_import_no_model_no_data_no_training():
    assert "ddb_jax.uda.bridging" in DDB_OPS and "ddb_jax.uda.adversarial" in DDB_OPS
    files = [os.path.join(ROOT, *m.split(".")) + ".py" for m in DDB_OPS + LEAVES]
    assert violations(files, DDB_OPS + LEAVES) == []


def test_methods_sit_below_the_training_loop():
    files = python_files("ddb_jax/methods")
    assert len(files) > 5
    bad = [
        f"{os.path.relpath(path, ROOT)} imports {name}"
        for path in files
        for name, _ in imports(path)
        if within(name, TRAINING)
    ]
    assert bad == []
    # The rule sees what it forbids: the loop itself imports the methods.
    loop = os.path.join(ROOT, "ddb_jax", "train", "loop.py")
    assert within("ddb_jax.train.loop", TRAINING) and "ddb_jax.methods" in project_imports(loop)


def test_input_pipeline_imports_no_training_code():
    files = python_files("input_pipeline")
    assert files
    assert violations(files, ("input_pipeline", *LEAVES)) == []


@pytest.mark.parametrize("folder", ["ddb_jax", "input_pipeline", "tools", "benchmarks", "configs"])
def test_nothing_outside_tests_imports_tests_or_the_package_torch_ref(folder):
    bad = [
        f"{os.path.relpath(path, ROOT)} imports {name}"
        for path in python_files(folder)
        for name in project_imports(path)
        if within(name, ("tests",)) or (folder != "benchmarks" and within(name, ("torch_ref",)))
    ]
    assert bad == []


def test_torch_ref_imports_nothing_of_the_project():
    files = python_files("torch_ref")
    assert files
    assert violations(files, ("torch_ref",)) == []


def test_the_package_never_imports_torch_at_module_level():
    bad = [
        os.path.relpath(path, ROOT)
        for folder in ("ddb_jax", "input_pipeline")
        for path in python_files(folder)
        for name, top in imports(path)
        if top and name.split(".")[0] == "torch"
    ]
    assert bad == []
