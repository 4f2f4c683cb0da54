"""The pykeops drop-in (kred.compat): which modules and names `import pykeops` gives, that it is opt-in (real pykeops
untouched until asked, restored by uninstall), the `.pth` / KRED_PYKEOPS route, and pykeops's dense test helpers."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kred import compat

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def dropin():
    compat.install_as_pykeops()
    yield
    compat.uninstall()


def test_names_libraries_import(dropin):
    import pykeops
    import pykeops.config
    from pykeops.numpy import Genred as NumpyGenred
    from pykeops.numpy import LazyTensor as NumpyLazyTensor
    from pykeops.numpy.cluster import grid_cluster as numpy_grid_cluster
    from pykeops.torch import (
        ComplexLazyTensor,
        Genred,
        KernelSolve,
        LazyTensor,
        Pm,
        Vi,
        Vj,
        generic_argkmin,
        generic_argmin,
        generic_logsumexp,
    )
    from pykeops.torch.cluster import (
        cluster_centroids,
        cluster_ranges,
        cluster_ranges_centroids,
        from_matrix,
        grid_cluster,
        sort_clusters,
        swap_axes,
    )
    from pykeops.torch.operations import KernelSolve as OperationsKernelSolve

    import kred.numpy
    import kred.torch
    assert pykeops.__kred__ and pykeops.__version__.startswith("2.3+kred.")
    assert LazyTensor is kred.torch.LazyTensor and Genred is kred.torch.Genred and KernelSolve is OperationsKernelSolve
    assert NumpyLazyTensor is kred.numpy.LazyTensor and NumpyGenred is kred.numpy.Genred
    assert numpy_grid_cluster is grid_cluster
    assert isinstance(pykeops.config.gpu_available, bool) and pykeops.config.torch_found
    pykeops.set_verbose(False)
    assert pykeops.verbose is False
    pykeops.clean_pykeops()
    assert all(callable(f) for f in (ComplexLazyTensor, Pm, Vi, Vj, generic_argkmin, generic_argmin,
                                     generic_logsumexp, cluster_ranges, cluster_ranges_centroids, from_matrix,
                                     sort_clusters, swap_axes))
    # cluster_centroids (pykeops's signature): weighted means per label, against numpy
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    w = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    centroids, mass = cluster_centroids(x, labels, w=w, weights_return=True)
    np.testing.assert_allclose(centroids.numpy(), [[1.5, 0.0], [5.0, 5.0]])
    np.testing.assert_allclose(mass.numpy(), [4.0, 2.0])
    from pykeops.common.gpu_utils import get_gpu_number    # pykeops's GPU examples read it
    assert get_gpu_number() == torch.cuda.device_count()
    with pytest.raises(ModuleNotFoundError):
        import pykeops.torch.generic.generic_red


def test_generic_sum_through_dropin_matches_dense(dropin):
    from pykeops.torch import generic_sum
    rng = np.random.default_rng(0)
    x, y, b = (torch.from_numpy(rng.standard_normal(s)) for s in ((9, 3), (7, 3), (7, 2)))
    op = generic_sum("Exp(-SqDist(X, Y)) * B", "A = Vi(2)", "X = Vi(3)", "Y = Vj(3)", "B = Vj(2)")
    want = torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1)) @ b
    torch.testing.assert_close(op(x, y, b, backend="CPU"), want)


def test_real_pykeops_untouched_then_restored():
    """Before install and after uninstall, `import pykeops` is whatever was there (the real package if installed)."""
    code = ("import sys, kred.compat as c\n"
            "import importlib.util\n"
            "real = importlib.util.find_spec('pykeops')\n"
            "print('real' if real is not None else 'none')\n"
            "c.install_as_pykeops(); import pykeops; print(getattr(pykeops, '__kred__', False))\n"
            "c.uninstall(); print('pykeops' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120,
                         env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}).stdout.split()
    assert out[1:] == ["True", "False"], out
    # and kred itself never imports pykeops: the drop-in is the only way in
    code = "import kred, kred.torch, kred.numpy, kred.compat, sys; print('pykeops' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120,
                         env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}).stdout.split()
    assert out == ["False"]


@pytest.mark.parametrize("value, expect", [("1", "True"), ("", "False"), ("0", "False")])
def test_pth_hook_is_opt_in_by_environment(tmp_path, value, expect):
    path = compat.write_pth(str(tmp_path))
    assert os.path.basename(path) == compat.PTH_NAME
    code = (f"import site; site.addsitedir({str(tmp_path)!r}); import pykeops; "
            "print(getattr(pykeops, '__kred__', False))")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), compat.ENVIRONMENT: value}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300, env=env)
    if expect == "False" and result.returncode != 0:          # no real pykeops here: then the import must fail
        assert "No module named 'pykeops'" in result.stderr
        return
    assert result.stdout.split()[-1] == expect, result.stderr[-2000:]


def test_pykeops_test_helpers(dropin):
    """pykeops.numpy.utils's dense kernels (its own tests import them), against formulas written here."""
    from pykeops.numpy.utils import (
        differences,
        grad_np_kernel,
        log_np_kernel,
        log_sum_exp,
        np_kernel,
        squared_distances,
    )
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((4, 3))
    sq = ((x[:, None] - y[None]) ** 2).sum(-1)
    np.testing.assert_allclose(squared_distances(x, y), sq, atol=1e-12)
    np.testing.assert_allclose(differences(x, y), np.moveaxis(x[:, None] - y[None], -1, 0))
    np.testing.assert_allclose(np_kernel(x, y, 0.7, "gaussian"), np.exp(-sq / 0.49))
    np.testing.assert_allclose(np_kernel(x, y, 0.7, "laplacian"), np.exp(-np.sqrt(sq) / 0.7))
    np.testing.assert_allclose(log_np_kernel(x, y, 0.7, "cauchy"), -np.log(1 + sq / 0.49))
    np.testing.assert_allclose(grad_np_kernel(x, y, 0.7, "gaussian"), -np.exp(-sq / 0.49) / 0.49)
    m = rng.standard_normal((4, 6))
    np.testing.assert_allclose(log_sum_exp(m, axis=1), np.log(np.exp(m).sum(1)))
