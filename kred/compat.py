"""kred as `pykeops`: run libraries written for pykeops (GeomLoss, GPyTorch, your own) on kred, unmodified.

    import kred.compat
    kred.compat.install_as_pykeops()            # in the spirit of PyMySQL's install_as_MySQLdb()
    import geomloss                             # its `from pykeops.torch import LazyTensor` is kred's now

    kred.compat.install_as_pykeops(client=kred.Client("http://127.0.0.1:8000"))   # ... computing on a kred server

For a program one cannot edit: `python -m kred.compat install-pth` writes a `.pth` hook into site-packages that does
nothing unless the environment asks, then `KRED_PYKEOPS=1 python prog.py` (or `KRED_PYKEOPS=http://host:port`, with
`KRED_TOKEN` if the server wants one) runs it on kred.

How: a meta path finder placed first on `sys.meta_path` answers for `pykeops` and the submodules below, building
each module from kred's front ends when it is first imported (so `import pykeops` does not import torch). Real
pykeops, if installed, is untouched until this is asked for; `uninstall()` puts back whatever was imported before.
Names pykeops exposes for its own build machinery (`clean_pykeops`, `set_build_folder`...) are accepted and do
kred's equivalent or nothing; the README's compatibility section lists what differs.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Callable

ENVIRONMENT = "KRED_PYKEOPS"            # "1": in process; "http://...": on that server
PYKEOPS_API = "2.3"                     # the pykeops release whose interface kred follows
PTH_NAME = "kred_as_pykeops.pth"


def _version() -> str:
    import kred
    return f"{PYKEOPS_API}+kred.{kred.__version__}"   # a PEP 440 local version: compares as pykeops 2.3


# The modules --------------------------------------------------------------------------------------------------
# Each builder fills a fresh module from kred; `client` is None (in process) or a kred.Client (remote).

def _gpu_available() -> bool:
    from kred.engine.backends import get_backend
    from kred.engine.errors import BackendError
    try:
        get_backend("cuda")
    except BackendError:
        return False
    return True


def _lazy_attributes(module: types.ModuleType, attributes: dict[str, Callable[[], object]]) -> None:
    """Attributes computed on first access (PEP 562), then kept: `gpu_available` probes the GPU only if read."""
    def __getattr__(name):
        if name in attributes:
            value = attributes[name]()
            setattr(module, name, value)
            return value
        raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
    module.__getattr__ = __getattr__


def _root(module, client):
    import importlib.util

    state = {"verbose": os.environ.get("PYKEOPS_VERBOSE") != "0"}

    def set_verbose(value):
        state["verbose"] = module.verbose = bool(value)

    def clean_pykeops(recompile_jit_binaries=True):
        """pykeops empties its build folder; kred's kernel cache is content-addressed and size-capped: nothing to do."""

    def set_build_folder(path=None):
        """Accepted; kred's kernel cache lives where KRED_CACHE_DIR says (engine/backends/cache.py)."""

    def get_build_folder():
        from kred.engine.backends.cache import cache_dir
        return str(cache_dir())

    def check_health():
        return module.test_numpy_bindings()

    def show_cuda_status():
        print(f"kred: CUDA backend {'available' if _gpu_available() else 'not available'}")

    def test_numpy_bindings():
        return sys.modules["pykeops.numpy"].test_install() if client is None else True

    def test_torch_bindings():
        return sys.modules["pykeops.torch"].test_install() if client is None else True

    module.__version__ = _version()
    module.verbose = state["verbose"]
    module.default_device_id = 0
    module.numpy_found = importlib.util.find_spec("numpy") is not None
    module.torch_found = importlib.util.find_spec("torch") is not None
    for fn in (set_verbose, clean_pykeops, set_build_folder, get_build_folder, check_health, show_cuda_status,
               test_numpy_bindings, test_torch_bindings):
        setattr(module, fn.__name__, fn)
    module.keops_get_build_folder = get_build_folder
    module.kred_client = client
    _lazy_attributes(module, {"config": lambda: _import("pykeops.config"),
                              "numpy": lambda: _import("pykeops.numpy"), "torch": lambda: _import("pykeops.torch"),
                              "common": lambda: _import("pykeops.common")})


def _config(module, client):
    import importlib.util

    module.numpy_found = importlib.util.find_spec("numpy") is not None
    module.torch_found = importlib.util.find_spec("torch") is not None
    # remote: whether the server computes on a GPU is the server's business; the client sends tensors either way
    _lazy_attributes(module, {"gpu_available": (lambda: False) if client is not None else _gpu_available})


def _common(module, client):
    module.__path__ = []


def _gpu_utils(module, client):
    """`get_gpu_number()`, which pykeops's GPU examples read: the GPUs kred's CUDA backend sees (remote: 0, as
    `gpu_available`; the server's GPUs are its own business)."""
    def get_gpu_number():
        from kred.engine.backends.cuda import gpu_count
        return 0 if client is not None else gpu_count()
    module.get_gpu_number = get_gpu_number


def _cluster_helpers(torch: bool):
    """pykeops's `*.cluster` names: kred.engine.ranges (one implementation for numpy and torch arrays)."""
    from kred.engine import ranges

    def cluster_centroids(x, lab, Nlab=None, w=None, weights_return=False):
        _, centroids, mass = ranges.cluster_ranges_centroids(x, lab, weights=w)
        return (centroids, mass) if weights_return else centroids

    names = {name: getattr(ranges, name) for name in ("grid_cluster", "from_matrix", "sort_clusters",
                                                       "cluster_ranges", "cluster_ranges_centroids", "swap_axes")}
    names["cluster_centroids"] = cluster_centroids
    return names


def _binding(module, client, framework: str):
    if framework == "torch":
        import kred.torch as local
    else:
        import kred.numpy as local
    names = {name: getattr(local, name) for name in local.__all__}
    if client is not None:
        names.update(_remote_names(client, framework))
    names.update(_cluster_helpers(framework == "torch"))
    module.__dict__.update(names)
    module.__all__ = sorted(n for n in names if n in local.__all__)
    module.__path__ = []                        # a package: `pykeops.torch.cluster` is imported from it


def _remote_names(client, framework: str) -> dict:
    """The binding's reductions bound to `client`: LazyTensor, Vi/Vj/Pm, Genred and the generic_* shorthands."""
    from kred.engine.frontend import generic_helpers
    if framework == "torch":
        from kred.client import torch as remote
    else:
        from kred.client import numpy as remote

    bound = remote.LazyTensor.bind(client)

    def variable(axis, name):
        def make(x_or_index, dim=None):
            return bound(x_or_index, axis=axis) if dim is None else bound((x_or_index, dim, axis))
        make.__name__ = make.__qualname__ = name
        return make

    def Genred(formula, aliases, reduction_op="Sum", axis=0, dtype=None, opt_arg=None, formula2=None,
               cuda_type=None, dtype_acc="auto", use_double_acc=False, sum_scheme="auto", enable_chunks=True,
               rec_multVar_highdim=False, use_fast_math=True):
        # pykeops's positional order; its tuning knobs are the server's business
        options = {"opt_arg": opt_arg, "formula2": formula2, "fast_math": use_fast_math,
                   "dtype_acc": "float64" if use_double_acc else dtype_acc}
        op = remote.Genred(formula, aliases, reduction_op, axis, client=client, **options)
        return _IgnoringBackend(op)

    names = {"LazyTensor": bound, "Vi": variable(0, "Vi"), "Vj": variable(1, "Vj"), "Pm": variable(2, "Pm"),
             "Genred": Genred}
    names.update(zip(("generic_sum", "generic_logsumexp", "generic_argmin", "generic_argkmin"),
                     generic_helpers(Genred)))
    return names


class _IgnoringBackend:
    """A remote Genred called as pykeops's is: `backend=` and `device_id=` name local devices, the server picks."""

    def __init__(self, op):
        self.op = op

    def __call__(self, *args, backend=None, device_id=None, ranges=None, **_):
        return self.op(*args, ranges=ranges)

    def __getattr__(self, name):
        return getattr(self.op, name)


def _operations(module, client, framework: str):
    module.KernelSolve = _import(f"pykeops.{framework}").KernelSolve
    module.Genred = _import(f"pykeops.{framework}").Genred


def _cluster(module, client, framework: str):
    names = _cluster_helpers(framework == "torch")
    module.__dict__.update(names)
    module.__all__ = sorted(names)


def _utils(module, client, framework: str):
    """`pykeops.numpy.utils` / `pykeops.torch.utils`: the dense kernels pykeops's own tests compare against, written
    for either array library (they only use operators, `.sum`, `exp`, `sqrt`, `log` and `.T`)."""
    if framework == "torch":
        import torch as xp
        matmul = xp.matmul
    else:
        import numpy as xp
        matmul = xp.matmul

    def squared_distances(x, y):
        return (x ** 2).sum(1).reshape(-1, 1) + (y ** 2).sum(1).reshape(1, -1) - 2.0 * matmul(x, y.T)

    def differences(x, y):
        return x.T[:, :, None] - y.T[:, None, :]

    def np_kernel(x, y, s, kernel):
        sq = squared_distances(x, y)
        return {"gaussian": lambda: xp.exp(-sq / (s * s)), "laplacian": lambda: xp.exp(-xp.sqrt(sq) / s),
                "cauchy": lambda: 1.0 / (1 + sq / (s * s)),
                "inverse_multiquadric": lambda: xp.sqrt(1.0 / (1 + sq / (s * s)))}[kernel]()

    def log_np_kernel(x, y, s, kernel):
        sq = squared_distances(x, y)
        return {"gaussian": lambda: -sq / (s * s), "laplacian": lambda: -xp.sqrt(sq) / s,
                "cauchy": lambda: -xp.log(1 + sq / (s * s)),
                "inverse_multiquadric": lambda: -0.5 * xp.log(1.0 + sq / (s * s))}[kernel]()

    def grad_np_kernel(x, y, s, kernel):
        sq = squared_distances(x, y)

        def laplacian():
            t = -xp.sqrt(sq / (s * s))
            return xp.exp(t) / (2 * s * s * t)
        return {"gaussian": lambda: -xp.exp(-sq / (s * s)) / (s * s), "laplacian": laplacian,
                "cauchy": lambda: -1.0 / (s * (sq / (s * s) + 1)) ** 2,
                "inverse_multiquadric": lambda: -0.5 / ((s ** 2) * ((sq / (s * s) + 1) ** 1.5))}[kernel]()

    def np_kernel_sphere(nalpha, nbeta, s, kernel):
        prs = matmul(nalpha, nbeta.T)
        return {"binet": lambda: prs ** 2, "linear": lambda: prs,
                "gaussian_unoriented": lambda: xp.exp((-2.0 + 2.0 * prs * prs) / (s * s)),
                "gaussian_oriented": lambda: xp.exp((-2.0 + 2.0 * prs) / (s * s))}[kernel]()

    def log_sum_exp(mat, axis=0):
        top = mat.max(axis) if framework == "numpy" else mat.max(axis).values
        top_kept = xp.expand_dims(top, axis) if framework == "numpy" else top.unsqueeze(axis)
        return top + xp.log(xp.exp(mat - top_kept).sum(axis))

    def WarmUpGpu():
        """pykeops warms its GPU before timing; kred compiles on first use and caches: nothing to warm."""

    names = {"squared_distances": squared_distances, "differences": differences, "np_kernel": np_kernel,
             "log_np_kernel": log_np_kernel, "grad_np_kernel": grad_np_kernel, "np_kernel_sphere": np_kernel_sphere,
             "log_sum_exp": log_sum_exp, "WarmUpGpu": WarmUpGpu}
    if framework == "torch":
        names["torch_kernel"] = np_kernel
    module.__dict__.update(names)


MODULES: dict[str, tuple[Callable, bool]] = {
    # name -> (builder(module, client), is a package)
    "pykeops": (_root, True),
    "pykeops.config": (_config, False),
    "pykeops.common": (_common, True),
    "pykeops.common.gpu_utils": (_gpu_utils, False),
}
for _fw in ("torch", "numpy"):
    MODULES[f"pykeops.{_fw}"] = (functools.partial(_binding, framework=_fw), True)
    MODULES[f"pykeops.{_fw}.cluster"] = (functools.partial(_cluster, framework=_fw), False)
    MODULES[f"pykeops.{_fw}.operations"] = (functools.partial(_operations, framework=_fw), False)
    MODULES[f"pykeops.{_fw}.utils"] = (functools.partial(_utils, framework=_fw), False)
del _fw


def _import(name: str):
    import importlib
    return importlib.import_module(name)


# The finder ---------------------------------------------------------------------------------------------------

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, client):
        self.client = client

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "pykeops" or fullname.startswith("pykeops."):
            if fullname not in MODULES:
                return None         # pykeops's internals (generic_red, keops_io...): ModuleNotFoundError
            return importlib.machinery.ModuleSpec(fullname, self, is_package=MODULES[fullname][1])
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        build, package = MODULES[module.__name__]
        module.__kred__ = True                  # so a caller can tell the drop-in from the real pykeops
        if package and not hasattr(module, "__path__"):
            module.__path__ = []
        build(module, self.client)


_state: dict = {"finder": None, "saved": {}}


def installed() -> bool:
    return _state["finder"] is not None


def install_as_pykeops(client=None) -> None:
    """Make `import pykeops` (and pykeops.torch, pykeops.numpy, their cluster, operations and utils modules) resolve
    to kred in this process. With `client` (a kred.Client), LazyTensor, Genred and the generic_* shorthands compute
    on that server (kred.client.torch / kred.client.numpy); KernelSolve and the cluster helpers stay local.

    Call it before importing the library that imports pykeops: modules that already did `from pykeops... import`
    keep what they got. Installing again (say with another client) replaces the previous installation."""
    if installed():
        uninstall()
    saved = {name: mod for name, mod in sys.modules.items() if name == "pykeops" or name.startswith("pykeops.")}
    for name in saved:
        del sys.modules[name]
    finder = _Finder(client)
    sys.meta_path.insert(0, finder)
    _state.update(finder=finder, saved=saved)


def uninstall() -> None:
    """Undo install_as_pykeops(): drop kred's pykeops modules and put back those imported before (if any)."""
    finder = _state["finder"]
    if finder is None:
        return
    sys.meta_path.remove(finder)
    for name in [n for n in sys.modules if n == "pykeops" or n.startswith("pykeops.")]:
        del sys.modules[name]
    sys.modules.update(_state["saved"])
    _state.update(finder=None, saved={})


def install_from_environment() -> bool:
    """The `.pth` hook's entry: install when KRED_PYKEOPS is set ("1"/"true": in process; a URL: that server)."""
    value = os.environ.get(ENVIRONMENT, "").strip()
    if value.lower() in ("", "0", "false", "no"):
        return False
    client = None
    if value.lower().startswith(("http://", "https://")):
        from kred.client import Client
        client = Client(value, os.environ.get("KRED_TOKEN") or None)
    install_as_pykeops(client)
    return True


def write_pth(directory: str | None = None) -> str:
    """Write the opt-in `.pth` hook into `directory` (default: this interpreter's site-packages). It imports kred
    only when KRED_PYKEOPS is set, so an interpreter without it starts as before."""
    import site
    import sysconfig
    directory = directory or sysconfig.get_paths()["purelib"] or site.getsitepackages()[0]
    path = os.path.join(directory, PTH_NAME)
    line = (f"import os; os.environ.get({ENVIRONMENT!r}, '').strip().lower() not in ('', '0', 'false', 'no') "
            "and __import__('kred.compat').compat.install_from_environment()\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(line)
    return path


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m kred.compat", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pth = commands.add_parser("install-pth", help=f"write {PTH_NAME} (active only when {ENVIRONMENT} is set)")
    pth.add_argument("--dir", default=None, help="the site directory (default: this interpreter's site-packages)")
    args = parser.parse_args(argv)
    print(write_pth(args.dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
