"""torch front end, call-compatible with `pykeops.torch`: Genred and KernelSolve with autograd to any order, and the
LazyTensor interface (engine/torch/lazytensor.py)."""
from ..ranges import (cluster_ranges, cluster_ranges_centroids, from_matrix, grid_cluster, sort_clusters,
                      swap_axes)
from ..frontend import generic_helpers
from .genred import Genred
from .kernel_solve import KernelSolve
from .lazytensor import LazyTensor, Pm, Vi, Vj

__all__ = ["Genred", "KernelSolve", "LazyTensor", "Pm", "Vi", "Vj", "cluster_ranges", "cluster_ranges_centroids",
           "from_matrix", "generic_argkmin", "generic_argmin", "generic_logsumexp", "generic_sum", "grid_cluster",
           "sort_clusters", "swap_axes"]

generic_sum, generic_logsumexp, generic_argmin, generic_argkmin = generic_helpers(Genred)
