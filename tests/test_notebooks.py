"""Execute every notebook in ``notebooks/`` headless at its light size.

The notebooks are jupytext percent-format ``.py`` files.  With the ``notebooks`` extra
(jupytext, nbclient, ipykernel) each one is converted to a notebook and run cell by cell
in a fresh kernel, exactly as a researcher would run it; without it, the file is run as a
plain script in a subprocess.  Either way ``MPLBACKEND=Agg``, and any error, or a
deprecation warning of certattn's in the output, fails the test.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEPRECATED = "is deprecated; use"  # the message of every deprecated alias (CONTRIBUTING)
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))
_HAVE_KERNEL = all(
    importlib.util.find_spec(m) is not None for m in ("jupytext", "nbclient", "ipykernel")
)


def _light_env() -> dict[str, str]:
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("CERTATTN_NOTEBOOK_FULL", None)
    return env


def test_notebooks_exist() -> None:
    names = {p.name for p in NOTEBOOKS}
    assert {"01_certify_budgets.py", "02_bounds_gallery.py", "03_gaussian_rule.py"} <= names
    for p in NOTEBOOKS:
        text = p.read_text()
        assert "# %% [markdown]" in text and "\n# %%\n" in text, f"{p.name}: not percent format"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _light_env()
    if _HAVE_KERNEL:
        import jupytext
        from nbclient import NotebookClient

        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("CERTATTN_NOTEBOOK_FULL", raising=False)
        nb = jupytext.read(path)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
        client = NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}})
        client.execute()  # raises CellExecutionError on the first failing cell
        n_code = sum(c.cell_type == "code" for c in nb.cells)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert n_code >= 3 and not errors
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                       for o in c.get("outputs", []) if o.get("output_type") == "stream")
        assert DEPRECATED not in text, "a notebook uses a deprecated name"
    else:
        proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert DEPRECATED not in proc.stderr, "a notebook uses a deprecated name"
