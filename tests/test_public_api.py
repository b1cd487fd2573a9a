"""The public surface, the capability table, the layering and the import graph.

In the style of array-api-extra's ``test_public_api``: every exported name exists, every
root function declares how it runs on each array library (and does so, device-faithfully,
on array-api-strict's second device), the core never imports the applications, and the
import graph has no cycle.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest

import certattn
from certattn._array import device_of
from certattn._backends import BACKENDS, CAPABILITIES, capability_markdown

ROOT = Path(certattn.__file__).parent
README = ROOT.parent / "README.md"

CORE = {
    "_array", "_backends", "_fp", "_results", "_soundness", "_topk_array", "_topk_generic",
    "_topk_numba", "_topk_numba_kernels", "_topk_numpy", "_topk_triton",
    "_topk_triton_kernels", "_validate", "attention", "blocks", "bounds",
    "cells", "distribution", "errors", "gaussian", "kept", "masks", "output", "policies",
    "quant", "search", "topk",
}
"""The certificate core: imports nothing from the applications or the theory artefacts."""
APPLICATIONS = {"cli", "budget", "io", "models", "reproduce", "plots", "verify", "theorems",
                "approx", "corpus", "_dask",
                "_corpus", "geometry", "gaussian_mc", "hf"}


def _modules() -> list[str]:
    out = ["certattn"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="certattn."):
        out.append(info.name)
    return out


def test_every_exported_name_exists():
    for name in _modules():
        if name.endswith("__main__"):
            continue
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:  # an optional dependency (matplotlib, sympy, numba, torch)
            if "certattn" in str(exc):
                raise
            continue
        for attr in getattr(mod, "__all__", ()):
            assert hasattr(mod, attr), f"{name}.__all__ names {attr!r}, which is missing"


def test_root_functions_declare_their_capability():
    functions = {
        n for n in certattn.__all__
        if inspect.isfunction(getattr(certattn, n)) and not n.startswith("_")
    }
    missing = functions - set(CAPABILITIES)
    assert not missing, f"add these root functions to certattn._backends.CAPABILITIES: {missing}"
    stale = set(CAPABILITIES) - functions
    assert not stale, f"CAPABILITIES names functions the root does not export: {stale}"


def test_readme_table_comes_from_the_capability_table():
    assert capability_markdown() in README.read_text(), (
        "README backend table is stale: paste certattn._backends.capability_markdown()"
    )


def _examples() -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, (3, 16))
    x[0, :2] = -np.inf
    kept = rng.random((3, 16)) < 0.5
    kept[:, 2] = True
    q, k, v = rng.normal(size=(4, 3)), rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
    lo, up = -np.abs(x[1:, :4]) - 1, np.abs(x[1:, :4]) + 1
    sizes = np.array([1, 4, 2, 3])
    return {
        "certify_topk": ((x, 0.1), lambda r: r.tail_upper),
        "certify_topp": ((x, 0.9), lambda r: r.tail_upper),
        "certify_kept": ((x, kept), lambda r: r.tail_upper),
        "certify_scores": ((q, k, 0.1), lambda r: r.tail_upper),
        "certify_attention": ((q, k, v, 0.1), lambda r: r.error_bound),
        "certified_search": ((q, k, v, 0.1), lambda r: r.tail_upper),
        "tail_mass": ((x, kept), lambda r: r),
        "log_partition": ((x,), lambda r: r),
        "topk_mask": ((x, 3), lambda r: r),
        "truncation_divergences": ((x, kept), lambda r: r.kl),
        "tail_bound": ((x, 3), lambda r: r),
        "gap_bound": ((x, 3), lambda r: r),
        "block_tail_bounds": ((lo, up, sizes, np.array([True, False, True, False])),
                              lambda r: r[1]),
        "output_bounds": ((x, np.ones((16, 2)), kept), lambda r: r.best),
        "head_tail_terms": ((x, np.ones((16, 2)), kept), lambda r: r.tau),
    }


@pytest.mark.parametrize("name", sorted(_examples()))
def test_native_and_host_functions_stay_on_the_input_device(name):
    """array-api-strict's second device catches any array created on the wrong device."""
    xs = pytest.importorskip("array_api_strict")
    dev = xs.Device("device1")
    args, pick = _examples()[name]
    assert CAPABILITIES[name].kind in ("native", "host")
    moved = [xs.asarray(xs.asarray(a), device=dev) if isinstance(a, np.ndarray) else a
             for a in args]
    out = pick(getattr(certattn, name)(*moved))
    assert device_of(out) == dev, f"{name} answered on {device_of(out)}"


def _imports(path: Path, modname: str) -> set[str]:
    """certattn modules imported by ``path`` (top-level and function-level)."""
    tree = ast.parse(path.read_text())
    pkg = modname if path.name == "__init__.py" else modname.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("certattn"):
                out.add(target)
                for alias in node.names:  # `from . import policies`
                    out.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("certattn")}
    return out


def _graph() -> dict[str, set[str]]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        name = name.removesuffix(".__init__")
        mods[name] = path
    return {m: {t for t in _imports(p, m) if t in mods and t != m} for m, p in mods.items()}


def test_core_never_imports_the_applications():
    graph = _graph()
    for core in CORE:
        for target in graph.get(f"certattn.{core}", ()):
            top = target.split(".")[1] if target.count(".") else target
            assert top not in APPLICATIONS, f"core module {core} imports {target}"


def test_no_import_cycles():
    """Tarjan's strongly connected components over every internal import (the package
    root excluded: it imports everything by design, and imports nothing back)."""
    graph = {m: {t for t in e if t != "certattn"} for m, e in _graph().items()}
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in list(graph):
        if v not in index:
            visit(v)
    # a subpackage __init__ re-exporting its own private modules is not a cycle of logic
    real = [c for c in sccs if not all(m.startswith(min(c, key=len)) for m in c)]
    assert not real, f"import cycles: {real}"


def test_unit_roundoff_is_defined_once():
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in ROOT.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"2(\.0)?\s*\*\*\s*-\s*53", line)
    ]
    assert hits == ["_fp.py:" + hits[0].split(":")[1]] and len(hits) == 1, hits


def test_backend_table_drives_the_fixture():
    from .conftest import _backends

    ids = {p.id for p in _backends()}
    assert {"numpy", "strict", "strict-dev1"} <= ids
    assert {b.name for b in BACKENDS} >= {"numpy", "strict", "cupy"}
