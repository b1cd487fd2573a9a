"""Figures of certattn (matplotlib); each function returns a :class:`matplotlib.figure.Figure`.

matplotlib is an optional dependency: ``pip install "certattn[plots]"``.
"""

try:
    import matplotlib as _matplotlib  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised by the bare-install test
    raise ImportError(
        "certattn's figures need matplotlib: pip install 'certattn[plots]'"
    ) from _exc
