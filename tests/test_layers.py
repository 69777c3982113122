"""uvjax's layers only point down (issue #31): the import-linter contract in ``.importlinter`` holds for the
package as it is, and it fails on an upward import, also one hidden inside a function; no uvjax module imports
another inside a function (that is how cycles were hidden)."""
import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")

# Function-local uvjax imports that stay, each for its reason (and checked by the contract all the same).
ALLOWED_LOCAL = {
    ("uvjax/__init__.py", "uvjax.runtime_env"),  # `python -m uvjax.X` only: the malloc re-exec, before anything heavy
    ("uvjax/__init__.py", "uvjax.api"),  # uvjax.load on first use: `import uvjax` must not import JAX
    ("uvjax/integrations/lmms_eval.py", "uvjax.integrations.lmms_eval"),  # `-m` run: lmms-eval finds the class by path
}


def _lint(root: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run([LINT, "--no-cache", "--config", os.path.join(root, ".importlinter")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds():
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("where, line, named", [
    # a top-level upward import: a model module importing the trainer
    ("uvjax/models/lora.py", "from uvjax import train  # upward\n", "uvjax.models.lora -> uvjax.train"),
    # the same, hidden in a function (what the 360 function-local imports used to do)
    ("uvjax/data/records.py", "\n\ndef _hidden():\n    from uvjax.evaluation import run  # upward\n    return run\n",
     "uvjax.data.records -> uvjax.evaluation.run"),
    # a cycle inside one layer: remote_lock (imports locks) imported back by locks
    ("uvjax/locks.py", "\n\ndef _cycle():\n    from uvjax import remote_lock\n    return remote_lock\n",
     ".remote_lock -> .locks"),
])
def test_the_contract_fails_on_an_upward_import(tmp_path, where, line, named):
    root = tmp_path / "repo"
    shutil.copytree(os.path.join(REPO, "uvjax"), root / "uvjax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, ".importlinter"), root / ".importlinter")
    with open(root / where, "a") as f:
        f.write(line)
    r = _lint(str(root))
    assert r.returncode != 0, r.stdout[-3000:]
    assert "BROKEN" in r.stdout and named in r.stdout, r.stdout[-3000:]


def _local_uvjax_imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").startswith("uvjax"):
            mods = [f"uvjax.{a.name}" for a in n.names] if n.module == "uvjax" else [n.module]
        elif isinstance(n, ast.Import):
            mods = [a.name for a in n.names if a.name.startswith("uvjax")]
        else:
            continue
        p = parents.get(n)
        while p is not None and not isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.If, ast.Try)):
            p = parents.get(p)
        if p is not None:
            for m in mods:
                yield n.lineno, m


def test_no_function_local_uvjax_imports():
    found = []
    for f in sorted(pathlib.Path(REPO, "uvjax").rglob("*.py")):
        rel = f.relative_to(REPO).as_posix()
        for line, mod in _local_uvjax_imports(f):
            if (rel, mod) not in ALLOWED_LOCAL:
                found.append(f"{rel}:{line}: {mod}")
    assert not found, "uvjax imports inside functions/ifs (put them at the top; layers only point down):\n" + \
        "\n".join(found)


def test_the_local_import_scan_finds_one(tmp_path):
    """The scan above is not vacuous: it reports an import inside a function."""
    p = tmp_path / "m.py"
    p.write_text("import os\n\n\ndef f():\n    from uvjax.config import base_config\n    return base_config\n")
    assert list(_local_uvjax_imports(p)) == [(5, "uvjax.config")]


# Packages every install has (setup.py install_requires) or the standard library: imported at module top.
# What stays inside functions is the optional extras (torch, transformers, wandb, gradio, lmms-eval, google-cloud,
# matplotlib/scipy for one plot and one probe, fsspec for remote paths), or an import under try/except ImportError.
CORE = {"jax", "jaxlib", "numpy", "flax", "PIL", "safetensors", "tqdm", "absl", "ml_dtypes", "grain", "tokenizers",
        "array_record", "optax", "orbax", "etils", "pyarrow", "msgpack", "tensorboardX", "ml_collections"}


def _local_core_imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    for n in ast.walk(tree):
        if not isinstance(n, (ast.Import, ast.ImportFrom)) or (isinstance(n, ast.ImportFrom) and n.level):
            continue
        mods = [n.module] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]
        tops = {m.split(".")[0] for m in mods}
        if not tops & (CORE | set(sys.stdlib_module_names)):
            continue
        p, in_function, in_try = parents.get(n), False, False
        while p is not None:
            if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function = True
            if isinstance(p, ast.Try) and not in_function:
                in_try = True
            p = parents.get(p)
        if in_function and not in_try:
            yield n.lineno, sorted(tops)[0]


def test_core_packages_are_imported_at_module_top(tmp_path):
    found = [f"{f.relative_to(REPO).as_posix()}:{line}: {mod}" for f in sorted(pathlib.Path(REPO, "uvjax").rglob("*.py"))
             for line, mod in _local_core_imports(f)]
    assert not found, "imports of always-installed packages inside functions (move them to the top):\n" + "\n".join(found)
    p = tmp_path / "probe.py"  # the scan is not vacuous: a local numpy import is found, a guarded jax one is not
    p.write_text("def f():\n    import numpy as np\n    try:\n        import jax\n    except ImportError:\n        jax = None\n")
    assert list(_local_core_imports(p)) == [(2, "numpy")]
