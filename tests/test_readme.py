"""The README's promises: two Quickstart commands, a Python example that runs."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {title}\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_quickstart_has_exactly_two_commands():
    quick = _section(README.read_text(), "Quickstart")
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    commands = [line for b in blocks for line in b.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    assert "certattn certify" in commands[0]
    assert "pytest" in commands[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and "python -m pytest -q" in commands[1]
    # the README installs what CI installs
    extras = re.search(r'pip install -e "\.\[([a-z,]+)\]"', commands[1]).group(1)
    assert f'-e ".[{extras}]"' in ci


def test_python_example_runs(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    code = re.findall(r"```python\n(.*?)```", _section(README.read_text(), "Python"), re.S)
    assert code
    for block in code:
        exec(compile(block, "README.md", "exec"), {})
