"""The package's public surface as the README uses it.

``import certattn`` must stay light (no matplotlib, no SymPy), yet every submodule the
README names (``certattn.gaussian.keps_fraction``, ``certattn.geometry.maps.Gated``, ...)
must be reachable from it without a further import: a module-level ``__getattr__`` in
``certattn/__init__.py`` that imports submodules on first use (issue 16.13).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_MODULES = ("attention|blocks|bounds|budget|cells|cli|distribution|errors|gaussian|gaussian_mc|"
            "geometry|io|models|output|plots|reproduce|search|theorems|topk|verify")
_NOT_ATTRIBUTES = {"models.make_sample"}  # a script: ``python -m certattn.models.make_sample``


def readme_names() -> list[str]:
    """Dotted names ``module.attr[.attr]`` of certattn submodules used in the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = set(re.findall(rf"(?<![\w./])(?:certattn\.)?((?:{_MODULES})(?:\.[A-Za-z_]\w*)+)",
                           text))
    return sorted(n for n in found if n not in _NOT_ATTRIBUTES
                  and n.rsplit(".", 1)[-1] not in ("py", "md", "npz", "npy"))


_PROBE = r"""
import importlib, json, sys
import certattn
missing = []
for name in json.loads(sys.argv[1]):
    head, *rest = name.split(".")
    try:
        obj = getattr(certattn, head)  # the lazy part: no explicit import of the submodule
    except AttributeError:
        missing.append(name)
        continue
    path = "certattn." + head
    for i, part in enumerate(rest):
        path += "." + part
        nxt = rest[i + 1] if i + 1 < len(rest) else None
        attr = getattr(obj, part, None)
        if attr is not None and (nxt is None or hasattr(attr, nxt)):
            obj = attr
            continue
        try:  # geometry.curvature: a function of that name shadows the submodule
            obj = importlib.import_module(path)
        except ImportError:
            missing.append(name)
            break
print(json.dumps(missing))
"""


def test_readme_names_are_found():
    names = readme_names()
    assert "gaussian.keps_fraction" in names and "geometry.maps.Gated" in names
    assert len(names) > 40


def test_readme_submodules_reachable():
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(readme_names())],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(proc.stdout) == []


def test_import_certattn_stays_light():
    """``import certattn`` loads neither matplotlib nor SymPy (nor the CLI's verify runner)."""
    code = ("import sys, certattn; print(sorted(m for m in ('matplotlib', 'sympy', "
            "'certattn.verify', 'certattn.plots', 'certattn.geometry') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    assert proc.stdout.strip() == "[]"
