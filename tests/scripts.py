"""Loads a file under scripts/ as a module, for tests of its functions.

scripts/ is not a package (each file is run as `python scripts/NAME.py`), so tests load
the file by path. Each script is loaded once per test process.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from tests.cli import ROOT


def path(name: str) -> Path:
    """scripts/<name>.py, to run as a program."""
    return ROOT / "scripts" / f"{name}.py"


def load(name: str) -> ModuleType:
    """scripts/<name>.py as a module; registered in sys.modules, where dataclasses look it up."""
    module_name = f"impala_script_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path(name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]  # a later test retries and sees the error, not half a module
            raise
    return sys.modules[module_name]
