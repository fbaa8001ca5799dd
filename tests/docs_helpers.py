"""The docs build's hook module (docs/hooks.py, not a package) for tests that check what the docs generate."""

from __future__ import annotations

import functools
import importlib.util

from .conftest import ROOT


@functools.cache
def docs_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
