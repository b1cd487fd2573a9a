"""The theorem registry is complete and consistent (issue 6).

Every statement of :data:`certattn.theorems.THEOREMS` has a SymPy proof registered in
``proofs/`` (unless it is empirical), importable functions, existing property tests and
a batch check in :mod:`certattn.verify`; every proof names a registered id; the generated
``docs/theorems.md`` is up to date and the README mentions every id.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from certattn.theorems import KINDS, THEOREMS, by_id, readme_table, to_markdown
from certattn.verify import CHECKS
from proofs import load_all

ROOT = Path(__file__).resolve().parent.parent
_PROOFS = load_all()
_IDS = [t.id for t in THEOREMS]


def _resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` and walk the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def _test_names(path: Path) -> set[str]:
    return set(re.findall(r"^\s*def (test_\w+)", path.read_text(), flags=re.M))


def test_ids_unique_and_entries_well_formed():
    assert len(set(_IDS)) == len(_IDS) == len(by_id())
    for t in THEOREMS:
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(-[A-Z0-9]+)*", t.id), t.id
        assert t.kind in KINDS, t.id
        assert t.section in (2, 3, 4, 5, 6, 8), t.id
        assert t.statement and t.source.startswith(("[paper]", "[derived]")), t.id
        assert t.functions and t.tests, t.id


def test_every_section_of_the_theory_is_covered():
    assert {t.section for t in THEOREMS} == {2, 3, 4, 5, 6, 8}


@pytest.mark.parametrize("t", THEOREMS, ids=_IDS)
def test_every_theorem_has_a_proof_unless_empirical(t):
    registered = {f"proofs/{p.module.split('.')[-1]}.py::{p.func.__name__}" for p in _PROOFS
                  if p.theorem == t.id}
    if t.kind == "empirical":
        assert not t.proofs, f"{t.id} is empirical but lists proofs"
        return
    assert registered, f"{t.id} has no @proof in proofs/"
    assert set(t.proofs) <= registered, f"{t.id} lists unregistered proofs"
    assert t.proofs, f"{t.id} lists none of its proofs"


def test_every_registered_proof_names_a_registry_id():
    unknown = sorted({p.theorem for p in _PROOFS} - set(_IDS))
    assert not unknown, f"proofs name ids missing from the registry: {unknown}"


@pytest.mark.parametrize("t", THEOREMS, ids=_IDS)
def test_listed_functions_import(t):
    for dotted in t.functions:
        assert dotted.startswith("certattn.")
        assert callable(_resolve(dotted)), dotted


@pytest.mark.parametrize("t", THEOREMS, ids=_IDS)
def test_listed_tests_exist(t):
    for ref in t.tests:
        path, _, name = ref.partition("::")
        file = ROOT / path
        assert file.is_file(), ref
        assert name in _test_names(file), ref


def test_every_theorem_has_a_verify_check():
    assert set(CHECKS) == set(_IDS)
    assert all(t.verify in CHECKS for t in THEOREMS)


def test_docs_theorems_md_is_generated_from_the_registry():
    text = (ROOT / "docs" / "theorems.md").read_text()
    assert text == to_markdown(), "regenerate: python -m certattn.theorems > docs/theorems.md"
    for tid in _IDS:
        assert f"### {tid}" in text


def test_markdown_table_has_one_row_per_theorem():
    rows = [ln for ln in to_markdown(table_only=True).splitlines() if ln.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == _IDS


def test_readme_mentions_every_theorem():
    readme = (ROOT / "README.md").read_text()
    missing = [tid for tid in _IDS if tid not in readme]
    assert not missing, f"README lacks {missing}: paste to_markdown(table_only=True)"
    start = readme.index("<!-- theorems:start -->\n") + len("<!-- theorems:start -->\n")
    table = readme[start : readme.index("<!-- theorems:end -->")]
    assert table.strip() == readme_table().strip(), (
        "README theorem table is stale: paste certattn.theorems.readme_table()"
    )
