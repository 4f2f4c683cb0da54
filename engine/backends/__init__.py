"""Layer 4: backends. `get_backend(name)` returns a ready backend; "auto" picks the best one present."""
from __future__ import annotations

import functools
import warnings

from ..errors import BackendError
from .base import Backend
from .reference import ReferenceBackend

NAMES = ("auto", "reference", "cpu", "cuda", "cluster")


@functools.cache
def _instance(name: str) -> Backend:
    if name == "reference":
        return ReferenceBackend()
    if name == "cpu":
        from .cpu import CpuBackend     # raises BackendError when no working C compiler is found
        return CpuBackend()
    if name == "cuda":
        from .cuda import create        # raises BackendError without CuPy or a visible GPU; CUDA stays uninitialised
        return create()
    raise BackendError(f"backend {name!r} is not available in this installation")


def get_backend(name: str = "auto") -> Backend:
    if name not in NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    if name == "auto":
        return _instance(auto_choice())
    return _instance(name)


@functools.cache
def auto_choice() -> str:
    """The best backend present, decided once per process: cuda when a GPU is visible, else cpu, else reference."""
    from .cuda import gpu_count         # asks NVML: does not initialise CUDA (safe before fork)
    if gpu_count() > 0:
        try:
            _instance("cuda")
            return "cuda"
        except BackendError as e:
            warnings.warn(f"a GPU is visible but the CUDA backend cannot run: {e}", RuntimeWarning, stacklevel=3)
    try:
        _instance("cpu")
        return "cpu"
    except BackendError as e:
        warnings.warn(f"{e}. Falling back to the slow numpy reference backend.", RuntimeWarning, stacklevel=3)
        return "reference"


__all__ = ["Backend", "NAMES", "auto_choice", "get_backend"]
