"""torch front end, call-compatible with `pykeops.torch`: Genred and KernelSolve with autograd to any order, and the
LazyTensor interface (engine/torch/lazytensor.py)."""
from ..ranges import (cluster_ranges, cluster_ranges_centroids, from_matrix, grid_cluster, sort_clusters,
                      swap_axes)
from ..frontend import generic_helpers, install_check
from .genred import Genred
from .kernel_solve import KernelSolve
from .lazytensor import ComplexLazyTensor, LazyTensor, Pm, Vi, Vj

__all__ = ["ComplexLazyTensor", "Genred", "KernelSolve", "LazyTensor", "Pm", "Vi", "Vj", "cluster_ranges",
           "cluster_ranges_centroids", "from_matrix", "generic_argkmin", "generic_argmin", "generic_logsumexp",
           "generic_sum", "grid_cluster", "sort_clusters", "swap_axes", "test_install"]

generic_sum, generic_logsumexp, generic_argmin, generic_argkmin = generic_helpers(Genred)



def test_install() -> bool:
    """pykeops's installation check: a small reduction on torch tensors compared with numpy; prints the outcome."""
    import torch
    return install_check(Genred, torch.from_numpy, lambda t: t.numpy())


test_install.__test__ = False       # not a pytest test when imported into a test module
