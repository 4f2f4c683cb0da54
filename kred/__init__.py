"""kred: KeOps-style formula reductions on CPUs, GPUs and Ray clusters, served over HTTP.

One namespace for everything:

    from kred.numpy import Genred, LazyTensor        # pykeops.numpy, same calls
    from kred.torch import Genred, LazyTensor        # pykeops.torch, autograd to any order
    from kred.cluster import Cluster                 # one reduction over every GPU/CPU Ray can see
    from kred import Client                          # a kred server over HTTP

The repository keeps its layers in top-level folders (engine/, service/, client/); an install (setup.py's
`package_dir`, editable or not) maps them to `kred.engine`, `kred.service` and `kred.client`, and so does
sourcetree.py for a checkout run uninstalled (PYTHONPATH=<checkout>). Attributes below are imported on first use,
so `import kred` costs nothing and needs no optional extra.
"""
from __future__ import annotations

from importlib import import_module as _import_module

__version__ = "0.2.0"

# public name -> module that defines it (imported lazily: the client's extra is not needed to compute locally)
_LAZY = {
    "Client": "kred.client", "AsyncClient": "kred.client", "RemoteError": "kred.client",
    "Cluster": "kred.engine.cluster",
    "KredError": "kred.engine.errors", "FormulaError": "kred.engine.errors", "ArgumentError": "kred.engine.errors",
    "BackendError": "kred.engine.errors", "DimensionError": "kred.engine.errors",
    "reduce": "kred.engine",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kred' has no attribute {name!r}")
