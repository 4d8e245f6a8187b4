"""Where the methods, data sets and encoders come from: selfsup's own (``selfsup.methods``,
``selfsup.datasets``, ``selfsup.models``; every module of the first two packages), then the
modules named in ``$SELFSUP_PLUGINS``: a comma-separated list of importable module names or
paths of ``.py`` files. A plugin module registers what it defines when imported
(``register_method``, ``register_dataset``, ``models.register``) with its settings, which
become options of every command (``--my-setting``) and fields of ``config.json``.

``load`` runs once, when ``selfsup`` is first imported, so that every config is read against
every registered name and setting.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

PLUGINS_ENV = "SELFSUP_PLUGINS"


def _import_file(path: Path) -> None:
    name = f"selfsup_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{PLUGINS_ENV}: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def load() -> None:
    """Import selfsup's plugin packages, then the user's (``$SELFSUP_PLUGINS``).

    Raises:
        ImportError: a module named there that cannot be imported (names it).
    """
    for name in ("selfsup.models", "selfsup.methods", "selfsup.datasets"):
        importlib.import_module(name)
    for entry in filter(None, (e.strip() for e in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            if entry.endswith(".py"):
                _import_file(Path(entry))
            else:
                importlib.import_module(entry)
        except Exception as e:
            raise ImportError(f"{PLUGINS_ENV}: cannot import {entry}: "
                              f"{type(e).__name__}: {e}") from e
