"""Layers that only point down: a static walk (ast) of every import between the modules of mfm_fast/ and
kernels/ (installed as mfm_fast.kernels), module level and inside functions alike.

- no import cycle;
- kernels/ (the Triton backend) and the CUDA backend import only the low-level modules (LOW_LEVEL) and their
  own modules, never a front-end (mfm_fast.loss, corruption, dispatch, pretrain, ...) nor the package itself;
- the low-level modules import only low-level modules;
- the library (everything but mfm_fast/train and its `python -m` aliases) never imports the trainer;
- the library never imports the replica of the released code (mfm_fast._official) at module level, and
  ``import mfm_fast`` (with its trainer) does not load it.

The checker is tested on planted cycles and a planted upward import in a temporary package, so it can fail.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from helpers import ROOT

PACKAGES = {"mfm_fast": os.path.join(ROOT, "mfm_fast"), "mfm_fast.kernels": os.path.join(ROOT, "kernels")}
# What the backends may use from the package: modules that import nothing above them.
LOW_LEVEL = ("mfm_fast._common", "mfm_fast._options", "mfm_fast._validate", "mfm_fast.backends._jit_build",
             "mfm_fast.backends.torch_backend", "mfm_fast.backends.reference")
NATIVE = ("mfm_fast._C",)
TRAINER = "mfm_fast.train"  # the training application: the library never imports it
ENTRY_POINTS = ("mfm_fast.pretrain", "mfm_fast.linprobe", "mfm_fast.visualize", "mfm_fast.finetune",
                "mfm_fast.evaluate")  # its `python -m` aliases


def module_files(packages: dict) -> dict:
    """{dotted module name: file} for every .py under each package folder (subpackages included)."""
    out = {}
    for package, folder in packages.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if os.path.isfile(os.path.join(dirpath, d, "__init__.py"))
                                 and os.path.join(dirpath, d) not in packages.values())
            rel = os.path.relpath(dirpath, folder)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    out[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(dirpath, name)
    return out


def import_graph(packages: dict, native=()) -> dict:
    """{module: {imported module of the packages}}: every `import` / `from ... import` anywhere in the file.
    `from p import x` counts as an import of p.x when that is a module, else of p (an attribute of p's
    __init__); the parent packages that an import of p.x initialises on the way are not counted (every
    submodule would otherwise 'cycle' through them). `native`: compiled modules (leaves, no source)."""
    files = {**module_files(packages), **dict.fromkeys(native)}
    graph = {}
    for module, path in files.items():
        if path is None:
            graph[module] = set()
            continue
        is_package = path.endswith("__init__.py")
        here = module if is_package else module.rsplit(".", 1)[0]
        edges = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    parts = parts[:len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a non-module attribute path
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict) -> list:
    """The import cycles: strongly connected components (Tarjan) of more than one module, sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _is_low_level(module: str) -> bool:
    return module in NATIVE or any(module == m or module.startswith(m + ".") for m in LOW_LEVEL)


def upward_imports(graph: dict, layer: str, allowed) -> list:
    """(module, imported) pairs where a module of `layer` (that package and its submodules) imports a module of
    the packages that is neither in `layer` nor allowed."""
    inside = lambda m: m == layer or m.startswith(layer + ".")  # noqa: E731
    return sorted((m, t) for m, targets in graph.items() if inside(m) for t in targets
                  if not inside(t) and not allowed(t))


# ---- the checker fails on what it should -----------------------------------------------------------------

def _write(folder, files: dict) -> None:
    for rel, text in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def test_checker_finds_a_planted_module_level_cycle(tmp_path):
    _write(tmp_path / "pkg", {"__init__.py": "", "a.py": "from . import b\n", "b.py": "from .c import f\n",
                              "c.py": "import pkg.a\n\ndef f():\n    pass\n", "d.py": "from .a import b\n"})
    graph = import_graph({"pkg": str(tmp_path / "pkg")})
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    _write(tmp_path / "pkg", {"__init__.py": "from .front import api\n", "front.py": "from .low import helper\n\n"
                              "def api():\n    return helper()\n",
                              "low.py": "def helper():\n    from .front import api\n    return api\n"})
    assert cycles(import_graph({"pkg": str(tmp_path / "pkg")})) == [["pkg.front", "pkg.low"]]


def test_checker_finds_a_planted_upward_import_from_a_backend_folder(tmp_path):
    _write(tmp_path / "pkg", {"__init__.py": "", "_common.py": "", "front.py": "from . import kern\n"})
    _write(tmp_path / "kern", {"__init__.py": "", "op.py": "from pkg._common import x\nfrom pkg.front import y\n"})
    graph = import_graph({"pkg": str(tmp_path / "pkg"), "pkg.kern": str(tmp_path / "kern")})
    assert upward_imports(graph, "pkg.kern", lambda m: m == "pkg._common") == [("pkg.kern.op", "pkg.front")]
    assert cycles(graph) == []  # front -> kern (the package) only; kern.op -> front is no cycle by itself


def test_checker_sees_no_cycle_in_a_clean_package(tmp_path):
    _write(tmp_path / "pkg", {"__init__.py": "from .b import g\n", "a.py": "x = 1\n", "b.py": "from .a import x\n"})
    assert cycles(import_graph({"pkg": str(tmp_path / "pkg")})) == []


# ---- the package -----------------------------------------------------------------------------------------

GRAPH = import_graph(PACKAGES, NATIVE)


def test_the_walk_sees_the_known_edges():
    assert "mfm_fast.kernels.corrupt" in GRAPH["mfm_fast.kernels"]  # a function-level import of the declaration
    assert "mfm_fast._common" in GRAPH["mfm_fast.kernels.masked_freq_loss"]
    assert {"mfm_fast.dispatch", "mfm_fast._options"} <= GRAPH["mfm_fast.loss"]
    assert "mfm_fast.backends" in GRAPH["mfm_fast.dispatch"]  # the registry (it imports backend modules by name)
    assert GRAPH["mfm_fast.backends"] == set()  # the registry imports nothing of the package
    assert "mfm_fast._C" in GRAPH["mfm_fast.backends.cuda"]


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_kernels_import_only_low_level_modules():
    assert upward_imports(GRAPH, "mfm_fast.kernels", _is_low_level) == []


def test_the_cuda_backend_imports_only_low_level_modules():
    assert upward_imports(GRAPH, "mfm_fast.backends.cuda", _is_low_level) == []


@pytest.mark.parametrize("layer", LOW_LEVEL)
def test_low_level_modules_import_only_low_level_modules(layer):
    assert upward_imports(GRAPH, layer, _is_low_level) == []


def test_the_official_replica_is_never_imported_at_module_level():
    offenders = []
    for module, path in module_files(PACKAGES).items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_official") or \
                    any(n == "_official" or n.endswith("._official") for n in names):
                offenders.append(module)
    assert offenders == []


def trainer_imports(graph: dict, trainer: str, entry_points=()) -> list:
    """(module, imported) pairs where a module outside the `trainer` package (and not one of its entry points)
    imports the trainer or one of its modules."""
    inside = lambda m: m == trainer or m.startswith(trainer + ".")  # noqa: E731
    return sorted((m, t) for m, targets in graph.items() if not inside(m) and m not in entry_points
                  for t in targets if inside(t))


def test_the_trainer_check_fails_on_a_planted_import(tmp_path):
    _write(tmp_path / "pkg", {"__init__.py": "", "loss.py": "def f():\n    from .train import engine\n",
                              "main.py": "from .train.engine import run\n", "train/__init__.py": "",
                              "train/engine.py": "from .. import loss\n\ndef run():\n    pass\n"})
    graph = import_graph({"pkg": str(tmp_path / "pkg")})
    assert trainer_imports(graph, "pkg.train") == [("pkg.loss", "pkg.train.engine"), ("pkg.main", "pkg.train.engine")]
    assert trainer_imports(graph, "pkg.train", entry_points=("pkg.main",)) == [("pkg.loss", "pkg.train.engine")]


def test_the_library_never_imports_the_trainer():
    """No module outside mfm_fast/train but its `python -m` aliases imports it, at module level or in a function."""
    assert "mfm_fast.train.engine" in GRAPH["mfm_fast.train.pretrain"]  # the trainer is in the walk
    assert trainer_imports(GRAPH, TRAINER, ENTRY_POINTS) == []


def test_import_of_the_package_and_its_trainer_does_not_load_the_official_replica():
    code = ("import sys, mfm_fast, mfm_fast.train.pretrain, mfm_fast.train.linprobe, mfm_fast.info; "
            "print('mfm_fast._official' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
