"""Parallel text: the Debian Reference's paragraphs, aligned across languages.

Debian ships the same document in several languages (``apt-get install
debian-reference-en debian-reference-fr ...``, GPL-2+, read at run time and never copied
into this project).  Its HTML chapters align paragraph by paragraph: the ``i``-th ``<p>``
of ``ch03.fr.html`` translates the ``i``-th of ``ch03.en.html``.  Untranslated
paragraphs (left in English, word for word) are dropped; ``check_language`` also drops
those the language detector does not recognise (slow: about 10 ms a paragraph).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path

from ..errors import InputError

__all__ = ["DEFAULT_ROOT", "LANGS", "corpus", "paragraphs"]

DEFAULT_ROOT = Path("/usr/share/debian-reference")
LANGS = ("en", "fr", "es", "de", "zh-cn")
MAX_FILE_BYTES = 20_000_000


class _Paragraphs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self._depth = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag == "p":
            self._depth += 1
            self._buf = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "p" and self._depth:
            self._depth -= 1
            self.found.append(re.sub(r"\s+", " ", "".join(self._buf)).strip())

    def handle_data(self, data: str) -> None:
        if self._depth:
            self._buf.append(data)


def paragraphs(html: str) -> list[str]:
    """The text of every ``<p>`` element of ``html``, whitespace collapsed."""
    p = _Paragraphs()
    p.feed(html)
    p.close()
    return p.found


def _chapters(root: Path, lang: str) -> dict[str, Path]:
    return {f.name[: -len(f".{lang}.html")]: f for f in sorted(root.glob(f"*.{lang}.html"))}


def corpus(langs: Sequence[str] = LANGS, *, root: str | Path = DEFAULT_ROOT,
           min_chars: int = 60, max_chars: int = 600,
           check_language: bool = False) -> dict[str, list[str]]:
    """Aligned paragraphs: ``out[lang][i]`` translates ``out[other][i]``.

    A paragraph index is kept when, in every language, its text has ``min_chars`` to
    ``max_chars`` characters (CJK text counts three per character, roughly its English
    length), no translation equals its English original, and, with ``check_language``,
    the detector recognises each language.

    Raises
    ------
    InputError
        A language's files are missing (the message names the ``apt-get`` command).
    """
    root = Path(root)
    chapters = {lang: _chapters(root, lang) for lang in langs}
    missing = [lang for lang, ch in chapters.items() if not ch]
    if missing:
        pkgs = " ".join(f"debian-reference-{m}" for m in missing)
        raise InputError(f"no Debian Reference text for {', '.join(missing)} under {root}: "
                         f"apt-get install {pkgs}")
    names = sorted(set.intersection(*(set(ch) for ch in chapters.values())))
    out: dict[str, list[str]] = {lang: [] for lang in langs}
    from .experiment import detect_language

    for name in names:
        texts = {}
        for lang in langs:
            f = chapters[lang][name]
            if f.stat().st_size > MAX_FILE_BYTES:
                raise InputError(f"{f}: larger than {MAX_FILE_BYTES} bytes")
            texts[lang] = paragraphs(f.read_text(encoding="utf-8", errors="replace"))
        n = min(len(t) for t in texts.values())
        if any(len(t) != n for t in texts.values()):
            continue  # the chapters do not align paragraph for paragraph
        for i in range(n):
            row = {lang: texts[lang][i] for lang in langs}
            if not all(min_chars <= _width(s) <= max_chars for s in row.values()):
                continue
            if "en" in row and any(s == row["en"] for lang, s in row.items() if lang != "en"):
                continue  # left untranslated
            if check_language and not all(detect_language(s) == lang for lang, s in row.items()):
                continue
            for lang in langs:
                out[lang].append(row[lang])
    return out


def _width(s: str) -> int:
    return len(s) + 2 * sum(1 for ch in s if ord(ch) >= 0x2E80)
