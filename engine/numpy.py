"""numpy front end, call-compatible with `pykeops.numpy`: change the import and keep the code."""
from __future__ import annotations

from .kernel_solve import KernelSolve  # noqa: F401  (re-exported: engine.numpy.KernelSolve)
from .lazytensor.numpy import ComplexLazyTensor, LazyTensor, Pm, Vi, Vj  # noqa: F401  (as in pykeops.numpy)
from .ranges import (cluster_ranges, cluster_ranges_centroids, from_matrix, grid_cluster,  # noqa: F401
                     sort_clusters, swap_axes)
from .frontend import GenredBase, generic_helpers, install_check
from .run import run

__all__ = ["ComplexLazyTensor", "Genred", "KernelSolve", "LazyTensor", "Pm", "Vi", "Vj", "cluster_ranges",
           "cluster_ranges_centroids", "from_matrix", "generic_argkmin", "generic_argmin", "generic_logsumexp",
           "generic_sum", "grid_cluster", "sort_clusters", "swap_axes", "test_install"]


class Genred(GenredBase):
    """A reduction `reduction_op_j formula(x_i, y_j, p)` (axis=1) or over i (axis=0), compiled on first use.

    >>> op = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], axis=1)
    >>> a = op(x, y, b)        # (N, 2)
    """

    def __call__(self, *args, backend: str = "auto", device_id: int = -1, ranges=None, out=None, cluster=None):
        # backend="cluster" (or cluster=engine.cluster.Cluster(...)) runs the reduction on Ray workers
        return run(self.plan, args, backend=backend, out=out, ranges=ranges, device_id=device_id, cluster=cluster)


generic_sum, generic_logsumexp, generic_argmin, generic_argkmin = generic_helpers(Genred)


def test_install() -> bool:
    """pykeops's installation check: a small reduction compared with numpy; prints the outcome."""
    return install_check(Genred, lambda a: a, lambda a: a)


test_install.__test__ = False       # not a pytest test when imported into a test module
