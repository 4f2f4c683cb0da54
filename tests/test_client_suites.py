"""The test suites of libraries built on pykeops, run unmodified on kred through the drop-in.

- TorchDR (dimensionality reduction: t-SNE, UMAP, SNE, PHATE, affinities, silhouette scores) builds its `keops`
  backend on pykeops's LazyTensor: sparse affinities by `Kmin_argKmin`, log-sum-exp normalisations, clamps. Its tests
  whose names say keops compare that backend with its dense torch one. Running them found two defects no test here
  had: K given as a 0-d tensor (`argKmin(K=torch.tensor(90))`) and `clamp(0, float("inf"))` (an infinite number
  must become a parameter).
- GPyTorch's KeOps kernels (RBF, Matérn, periodic) against its dense kernels, and its KeOps GP regression example.

Their tests ship only in their source distributions, which `make install` downloads (for the installed versions:
the `clients` extra) into <venv>/sdists. Each suite runs from its unpacked source (the tests import helpers of their
package), with the drop-in installed by a conftest.py at its root (tests/foreign_suite.py): in process, and once with
the drop-in bound to a real `kred serve` (GPyTorch whole; of TorchDR the cases that found the defects: its whole keops
suite takes minutes over HTTP, and was run so by hand: all 74 pass). Through the server, TorchDR's
`clamp(0, inf)` got a 422 (non-finite inputs were refused by default; now the engine's IEEE answer).
"""
from __future__ import annotations

import importlib.metadata
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from foreign_suite import broken, passed, run_suite, skipped
from service_helpers import served_reductions


@dataclass(frozen=True)
class Suite:
    targets: list[str]          # test paths in the package's sdist
    select: str | None          # pytest -k in process
    fewest: int                 # tests that must pass in process
    served_select: str | None   # pytest -k through a server
    served_fewest: int
    options: tuple[str, ...] = ()


SUITES = {
    "torchdr": Suite(["torchdr/tests/" + f for f in ("test_affinity.py", "test_eval.py", "test_neighbor_embedding.py",
                                                     "test_spectral.py", "test_utils.py")], "keops", 74,
                     "keops and (doubly_stochastic_quadratic or (entropic_affinity and True and float32))", 3),
    # test_prior_type is mis-indented in GPyTorch 1.15 (a module-level function taking `self`): pytest cannot run it
    "gpytorch": Suite(["test/kernels/keops", "test/examples/test_keops_gp_regression.py"], None, 88, None, 88,
                      ("--deselect", "test/kernels/keops/test_periodic_kernel.py::test_prior_type")),
}


def options_for(suite: Suite, select: str | None) -> list[str]:
    return [*suite.options, *(["-k", select] if select else [])]


def sdist(package: str) -> Path:
    version = importlib.metadata.version(package)
    path = Path(sys.prefix) / "sdists" / f"{package}-{version}.tar.gz"
    assert path.is_file(), f"{path} is missing: `make install` downloads {package}'s source distribution"
    return path


def unpacked(package: str, folder: Path) -> Path:
    with tarfile.open(sdist(package)) as tar:
        tar.extractall(folder, filter="data")
    (root,) = [p for p in folder.iterdir() if p.is_dir()]
    return root


@pytest.mark.parametrize("package", list(SUITES))
def test_client_library_keops_tests_pass_on_kred(package, tmp_path):
    suite = SUITES[package]
    root = unpacked(package, tmp_path)
    outcome, run = run_suite(root, [str(root / t) for t in suite.targets], tmp_path,
                             options_for(suite, suite.select), pythonpath=root)
    assert not broken(outcome), f"{package} tests failing on kred: {broken(outcome)}\n{run.stdout[-3000:]}"
    assert not skipped(outcome), f"{package} tests skipped: {skipped(outcome)}"
    files = {t.rsplit("/", 1)[-1].removesuffix(".py") for t in suite.targets if t.endswith(".py")}
    ran = {part for name in passed(outcome) for part in name.split("::")[0].split(".")}
    assert files <= ran, f"files with no passing test: {sorted(files - ran)}"
    assert len(passed(outcome)) >= suite.fewest, f"only {len(passed(outcome))} {package} tests passed"
    assert run.returncode == 0, run.stdout[-3000:]


@pytest.mark.parametrize("package", list(SUITES))
def test_client_library_keops_tests_pass_through_kred_serve(package, tmp_path):
    from safety_helpers import ServerProcess

    suite = SUITES[package]
    root = unpacked(package, tmp_path)
    with ServerProcess(tmp_path, backend="cpu") as server:
        outcome, run = run_suite(root, [str(root / t) for t in suite.targets], tmp_path,
                                 options_for(suite, suite.served_select), pythonpath=root, server=server.url)
        reduced = served_reductions(server.url)
    assert not broken(outcome), f"{package} tests failing through kred serve: {broken(outcome)}\n{run.stdout[-3000:]}"
    assert not skipped(outcome) and len(passed(outcome)) >= suite.served_fewest, \
        f"{package}: {len(passed(outcome))} passed"
    assert reduced > 0, "the suite sent no reduction to the server"
    assert run.returncode == 0, run.stdout[-3000:]
