"""Package layout (metadata lives in pyproject.toml): the repository's engine/, service/ and client/ folders are
installed beneath one `kred` namespace, so the wheel has a single top-level package. `pip install -e .` maps the
same names to the same folders (setuptools' editable finder, no repository root on sys.path); a checkout run
uninstalled gets the mapping from sourcetree.py (tests/test_package.py holds all three)."""
from setuptools import find_packages, setup

LAYERS = ("engine", "service", "client")

setup(
    packages=find_packages(include=["kred", "kred.*"])
    + [f"kred.{name}" for layer in LAYERS for name in find_packages(include=[layer, f"{layer}.*"])],
    package_dir={"kred": "kred", **{f"kred.{layer}": layer for layer in LAYERS}},
    package_data={"kred": ["py.typed"]},
)
