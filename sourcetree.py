"""kred from a source checkout, not installed: `kred` is this checkout's kred/ folder and kred.engine, kred.service,
kred.client its engine/, service/ and client/ folders, the mapping setup.py's `package_dir` gives an install.

`sitecustomize.py` beside this file installs it in every Python started with PYTHONPATH=<checkout> (the tests and
their subprocesses, Ray workers, the GPU check's steps); tests/conftest.py installs it too. An installed kred
(`pip install .` or `pip install -e .`) needs neither. This file is not part of the package.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LAYERS = ("engine", "service", "client")


class SourceTree:
    """A meta-path finder for `kred` and its three layers only; their own modules are then found inside them."""

    @classmethod
    def find_spec(cls, fullname: str, path=None, target=None):
        if fullname == "kred":
            folder = ROOT / "kred"
        elif fullname.partition(".")[0] == "kred" and fullname[len("kred."):] in LAYERS:
            folder = ROOT / fullname[len("kred."):]
        else:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def install() -> None:
    """Put the finder first (before an editable install of another checkout, whose finder maps the same names)."""
    if not any(getattr(finder, "__name__", None) == "SourceTree" for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceTree)
