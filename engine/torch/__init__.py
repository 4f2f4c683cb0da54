"""torch front end, call-compatible with `pykeops.torch`: Genred and KernelSolve with autograd to any order, and the
LazyTensor interface (engine/torch/lazytensor.py)."""
from ..ranges import (cluster_ranges, cluster_ranges_centroids, from_matrix, grid_cluster, sort_clusters,
                      swap_axes)
from .genred import Genred
from .kernel_solve import KernelSolve

__all__ = ["Genred", "KernelSolve", "cluster_ranges", "cluster_ranges_centroids", "from_matrix", "grid_cluster",
           "sort_clusters", "swap_axes"]

try:  # LazyTensor is written alongside (helper "lazytensor"); export it once it exists
    from .lazytensor import LazyTensor, Pm, Vi, Vj  # noqa: F401
except ModuleNotFoundError as _missing:  # pragma: no cover - only while lazytensor.py is absent
    if _missing.name != f"{__name__}.lazytensor":
        raise
else:
    __all__ += ["LazyTensor", "Pm", "Vi", "Vj"]
