"""The package's metadata: the extras a user installs, the licence, the classifiers, the changelog."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import kred

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_all_extra_installs_every_extra_but_the_gpu_stack_and_development_tools():
    extras = PROJECT["optional-dependencies"]
    (everything,) = extras["all"]
    named = set(re.fullmatch(r"kred\[(.*)\]", everything).group(1).split(","))
    gpu = {"cuda", "cuda13", "nvrtc", "gpu-static"}
    development = {"bench", "docs", "examples", "test", "clients", "lint"}      # clients: geomloss, gpytorch (tests)
    assert named == set(extras) - {"all"} - gpu - development


def test_licence_and_classifiers():
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "kred developers" in licence
    assert PROJECT["license"] == {"text": "MIT"}
    assert "License :: OSI Approved :: MIT License" in PROJECT["classifiers"]
    assert "Typing :: Typed" in PROJECT["classifiers"] and (ROOT / "kred" / "py.typed").exists()
    assert PROJECT["scripts"]["kred"] == "kred.__main__:main"


def test_changelog_has_the_current_version():
    assert f"## {kred.__version__}" in (ROOT / "CHANGELOG.md").read_text()
