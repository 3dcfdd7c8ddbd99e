"""No pickle, eval or exec anywhere data read from Redis could reach: the README's trust
promise, checked on the source itself (every module of both packages, read as syntax)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("queueing/**/*.py"), *ROOT.glob("workers/**/*.py")])

#: Modules that turn bytes into code or arbitrary objects.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve",
                  "joblib", "jsonpickle", "yaml"}  # fmt: skip
#: Built-ins that run code given as data.
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNSAFE_MODULES]  # fmt: skip
        elif (
            isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES
        ):
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            # eval(...) or builtins.eval(...); re.compile is not the built-in compile.
            name = ""
            if isinstance(func, ast.Name):
                name = func.id
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                name = func.attr if func.value.id == "builtins" else ""
            if name in UNSAFE_CALLS:
                found.append(f"{name}(...)")
            for kw in node.keywords:  # np.load(..., allow_pickle=True); msgpack hooks
                if kw.arg == "allow_pickle" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append("allow_pickle not False")
                if kw.arg in ("ext_hook", "object_hook", "object_pairs_hook", "list_hook"):
                    found.append(f"msgpack {kw.arg}")
        if isinstance(node, ast.Call) and (
            getattr(node.func, "attr", "") == "import_module"
            # `preload`, a `module:callable` model builder and a `module:callable`
            # trace_exporter: module names from the pool's config, never from Redis.
            and path.name not in ("process.py", "checkpoints.py", "tracing.py")
        ):
            found.append("importlib.import_module outside the worker's config-driven imports")
    return [f"{path.relative_to(ROOT)}:{p}" for p in found]


def test_the_packages_are_found() -> None:
    assert len(SOURCES) > 20 and any(p.name == "wire.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unpickling_or_evaluation(path: Path) -> None:
    assert _problems(path) == []
