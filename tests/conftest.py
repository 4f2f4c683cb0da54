"""Shared test setup: the backends present, the `gpu` marker, and the environment for Ray tests.

Tests that should hold on every backend take the `backend` fixture (or parametrize over `BACKENDS`): it always holds
"reference", "cpu" when the compiled CPU backend can be built here, and "cuda" (marked `gpu`) when a GPU is visible.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

# Ray refuses to start a local cluster without a token unless auth is disabled; set before anything imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# ... and keep it on loopback: without this Ray binds the machine's network address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# The tests run this checkout's kred, installed or not: sourcetree.py maps kred's layers to its folders, and
# PYTHONPATH carries the checkout to subprocesses and Ray workers (its sitecustomize.py installs the same finder).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
import sourcetree  # noqa: E402

sourcetree.install()

import pytest  # noqa: E402

from kred.engine.backends import get_backend  # noqa: E402
from kred.engine.errors import BackendError  # noqa: E402


@functools.cache
def gpu_visible() -> bool:
    """True when the CUDA driver loads and reports at least one device (no CUDA toolkit needed)."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def backend_present(name: str) -> bool:
    try:
        get_backend(name)
    except BackendError:
        return False
    return True


def _backend_params() -> list:
    params = [pytest.param("reference", id="reference")]
    if backend_present("cpu"):
        params.append(pytest.param("cpu", id="cpu"))
    if gpu_visible():
        # Not guarded by backend_present: with a GPU visible, a missing cuda backend must fail loudly.
        params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))
    return params


BACKENDS = _backend_params()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """The name of each engine backend present, in turn."""
    return request.param


def pytest_collection_modifyitems(config, items):
    if gpu_visible():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible")
    for item in items:
        if item.get_closest_marker("gpu") is not None:   # not `in item.keywords`: it holds folder names
            item.add_marker(skip)


def start_ray(**options) -> None:
    """`ray.init` for a test module, tried twice: on a loaded 2-core runner the local GCS can miss its first
    connection deadline, and one flaky start would otherwise error every test of the module."""
    import ray

    # address="local": always a fresh Ray of the test's own, never one another process left on this machine
    options = {"address": "local", "include_dashboard": False, "log_to_driver": False, **options}
    try:
        ray.init(**options)
    except Exception:  # Ray raises RaySystemError / ConnectionError / TimeoutError for a GCS that came up late
        ray.shutdown()
        ray.init(**options)
