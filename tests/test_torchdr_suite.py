"""TorchDR's own tests of its KeOps backend, run unmodified on kred through the drop-in.

TorchDR (dimensionality reduction: t-SNE, UMAP, SNE, PHATE, affinities, silhouette scores...) builds its `keops`
backend on pykeops's LazyTensor: sparse affinities by `Kmin_argKmin`, log-sum-exp normalisations, clamps. Its tests
compare that backend with its dense torch one. They ship only in its source distribution, which `make install`
downloads beside the installed wheel (the `clients` extra pins the version) into <venv>/sdists. The suite runs from
the unpacked source (its tests import `torchdr.tests.utils`), every test whose name says keops, with the pykeops
drop-in installed by a conftest.py at its root. Running it found two defects no test here had: K given as a 0-d
tensor (`argKmin(K=torch.tensor(90))`) and `clamp(0, float("inf"))` (an infinite number must be a parameter).
"""
from __future__ import annotations

import importlib.metadata
import sys
import tarfile
from pathlib import Path

from foreign_suite import broken, passed, run_suite, skipped

FILES = ["test_affinity.py", "test_eval.py", "test_neighbor_embedding.py", "test_spectral.py", "test_utils.py"]


def torchdr_sdist() -> Path:
    version = importlib.metadata.version("torchdr")
    sdist = Path(sys.prefix) / "sdists" / f"torchdr-{version}.tar.gz"
    assert sdist.is_file(), f"{sdist} is missing: `make install` downloads TorchDR's source distribution"
    return sdist


def test_torchdr_keops_tests_pass_on_kred(tmp_path):
    with tarfile.open(torchdr_sdist()) as tar:
        tar.extractall(tmp_path, filter="data")
    (root,) = [p for p in tmp_path.iterdir() if p.name.startswith("torchdr-")]
    tests = root / "torchdr" / "tests"
    outcome, run = run_suite(root, [str(tests / f) for f in FILES], tmp_path, ["-k", "keops"], pythonpath=root)
    assert not broken(outcome), f"TorchDR tests failing on kred: {broken(outcome)}\n{run.stdout[-3000:]}"
    assert not skipped(outcome), f"TorchDR keops tests skipped: {skipped(outcome)}"
    ran = {name.split("::")[0].rsplit(".", 1)[-1] + ".py" for name in passed(outcome)}
    assert ran == set(FILES), f"files with no passing keops test: {sorted(set(FILES) - ran)}"
    assert len(passed(outcome)) >= 70, f"only {len(passed(outcome))} TorchDR keops tests passed"
    assert run.returncode == 0, run.stdout[-3000:]
