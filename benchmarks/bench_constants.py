"""One compile per formula shape (issue 21 part 3): loops that change a float constant, cold and warm.

    python -m benchmarks.bench_constants [--n 10000] [--threads 2] [--name constants] [--literal]

Two loops, each run twice in this process, which starts with an empty kernel cache (a new KRED_CACHE_DIR): the
first pass is cold (kernels compiled), the second warm. Compiles are the lines `builds.log` gained.

- `gaussian`: a LazyTensor Gaussian kernel sum with scales 0.1, 0.2, 0.3, 0.4 (N = M = --n, D = 3, float64, cpu);
- `geomloss_solve_sample` (when GeomLoss is installed): GeomLoss's own `ot.solve_sample` on the same points, through
  `kred.compat.install_as_pykeops()`, checked against its dense path; and, as the peer, the same call on real
  pykeops 2.3 in a child process (a fresh build folder) where pykeops is installed;
- `eps_scaling`: the ε-scaling Sinkhorn loop of `geomloss.ot.solve_sample` (written here with kred LazyTensors, as
  GeomLoss's "online" backend writes it with pykeops's): 400 x 300 points, D = 3, 100 iterations, ε decreasing
  geometrically from diameter² to blur²; each iteration two LogSumExp reductions (over j, over i) whose formulas
  hold 1/ε. The last potentials are checked against the same loop written densely in numpy (float64).

`--literal` keeps constants in the kernels (the behaviour before lifting, `engine.plan.MAX_LIFTED = 0`): the A/B.
The table prints cold and warm seconds, their ratio, the compile count and the compilers' seconds (from builds.log),
and the cold pass without those seconds over the warm pass (1: compiling is the whole difference); the JSON goes to
benchmarks/results/<name>-<host kind>.json under the label "lifted" or "literal", with the machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .run import _git_commit, machine_info, results_path, save_results

SCALES = (0.1, 0.2, 0.3, 0.4)


def builds(cache: Path) -> list[float]:
    """The seconds of each compile so far (builds.log: one line `key seconds pid` per build)."""
    log = cache / "builds.log"
    return [float(line.split()[1].rstrip("s")) for line in log.read_text().splitlines()] if log.exists() else []


def gaussian_loop(LazyTensor, x, y, b):
    out = []
    for s in SCALES:
        x_i, y_j, b_j = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :]), LazyTensor(b[None, :, :])
        out.append(((-s * ((x_i - y_j) ** 2).sum(-1)).exp() * b_j).sum(1, backend="CPU"))
    return out


def gaussian_dense(x, y, b):
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return [np.exp(-s * d2) @ b for s in SCALES]


def epsilons(x, y, iterations: int, blur: float = 0.01) -> list[float]:
    """ε from diameter² down to blur² (p = 2), geometrically, as GeomLoss's epsilon_schedule with `iterations`."""
    diameter = float(np.sqrt(((np.vstack([x, y]).max(0) - np.vstack([x, y]).min(0)) ** 2).sum()))
    return list(np.geomspace(diameter ** 2, blur ** 2, iterations))


def sinkhorn_loop(LazyTensor, x, y, a, b, eps_list):
    """Symmetric-step Sinkhorn with ε-scaling on C = |x - y|² / 2 (GeomLoss's sinkhorn_loop, 'online' softmin)."""
    x_i, y_j = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :])
    c_ij = ((x_i - y_j) ** 2).sum(-1) / 2
    log_a, log_b = np.log(a)[:, None], np.log(b)[:, None]
    f, g = np.zeros((len(x), 1)), np.zeros((len(y), 1))
    for eps in eps_list:
        g_j, f_i = LazyTensor(g[None, :, :]), LazyTensor(f[:, None, :])
        lb_j, la_i = LazyTensor(log_b[None, :, :]), LazyTensor(log_a[:, None, :])
        ft = -eps * (lb_j + (g_j - c_ij) * (1 / eps)).logsumexp(1, backend="CPU")
        gt = -eps * (la_i + (f_i - c_ij) * (1 / eps)).logsumexp(0, backend="CPU")
        f, g = (f + ft) / 2, (g + gt) / 2
    return f, g


def sinkhorn_dense(x, y, a, b, eps_list):
    c = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) / 2
    f, g = np.zeros((len(x), 1)), np.zeros((len(y), 1))

    def lse(z, axis):
        m = z.max(axis, keepdims=True)
        return m + np.log(np.exp(z - m).sum(axis, keepdims=True))

    for eps in eps_list:
        ft = -eps * lse(np.log(b)[None, :] + (g.T - c) / eps, 1)
        gt = -eps * lse(np.log(a)[:, None] + (f - c) / eps, 0).T
        f, g = (f + ft) / 2, (g + gt) / 2
    return f, g


def geomloss_solve_sample(x, y, iterations: int, dense: bool = False):
    """GeomLoss's own `ot.solve_sample` (its KeOps path, through kred's pykeops drop-in; `dense`: its dense path):
    its ε-scaling loop changes 1/ε in the formulas at every iteration."""
    import torch
    from geomloss import _backends, ot
    saved = _backends.keops_available
    _backends.keops_available = saved and not dense
    try:
        result = ot.solve_sample(torch.from_numpy(x), torch.from_numpy(y), reg=1e-4, max_iter=iterations)
    finally:
        _backends.keops_available = saved
    return result.value.item()


def pykeops_peer(x, y, iterations: int) -> dict:
    """The peer, in a child process: the same `solve_sample` on real pykeops 2.3 (a fresh build folder, so its cold
    pass compiles what it needs; pykeops passes float constants as parameters, one compile per formula shape)."""
    import subprocess
    import sys
    folder = tempfile.mkdtemp(prefix="kred-bench-pykeops-")
    np.save(Path(folder) / "x.npy", x)
    np.save(Path(folder) / "y.npy", y)
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_constants", "--peer-child", folder,
                           "--iterations", str(iterations)], capture_output=True, text=True, timeout=1800,
                          cwd=Path(__file__).parent.parent)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def peer_child(folder: str, iterations: int) -> None:
    import pykeops
    pykeops.set_verbose(False)
    pykeops.set_build_folder(str(Path(folder) / "build"))
    import geomloss.ot  # noqa: F401  (finds real pykeops: no drop-in in this process)
    x, y = np.load(Path(folder) / "x.npy"), np.load(Path(folder) / "y.npy")
    row = {"pykeops": pykeops.__version__}
    for phase in ("cold", "warm"):
        start = time.perf_counter()
        value = geomloss_solve_sample(x, y, iterations)
        row[f"{phase}_s"] = time.perf_counter() - start
    row["cold_over_warm"], row["value"] = row["cold_s"] / row["warm_s"], value
    print(json.dumps(row))


def cold_and_warm(cache: Path, run) -> dict:
    results = {}
    for phase in ("cold", "warm"):
        before = len(builds(cache))
        start = time.perf_counter()
        value = run()
        results[f"{phase}_s"] = time.perf_counter() - start
        compiled = builds(cache)[before:]
        results[f"{phase}_compiles"], results[f"{phase}_compile_s"] = len(compiled), sum(compiled)
    results["cold_over_warm"] = results["cold_s"] / results["warm_s"]
    # what the cold pass costs besides the C compiler, in warm passes: 1 when compiling is the whole difference
    results["cold_without_compiles_over_warm"] = (results["cold_s"] - results["cold_compile_s"]) / results["warm_s"]
    return results, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="constants")
    parser.add_argument("--literal", action="store_true", help="constants stay in the kernels (before lifting)")
    parser.add_argument("--label", default=None, help="the run's label in the JSON (default: lifted or literal)")
    parser.add_argument("--peer-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_child:
        peer_child(args.peer_child, args.iterations)
        return 0
    os.environ["KRED_NUM_THREADS"] = str(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="kred-bench-constants-"))
    os.environ["KRED_CACHE_DIR"] = str(cache)          # empty: the first pass compiles what it needs
    from kred.engine import plan as plan_module
    from kred.engine.backends import get_backend

    from kred.numpy import LazyTensor

    if args.literal:
        plan_module.MAX_LIFTED = 0
    get_backend("cpu")                                   # its compiler probe is not a kernel of the loops
    rng = np.random.default_rng(0)
    rows = {}

    x, y, b = rng.random((args.n, 3)), rng.random((args.n, 3)), rng.random((args.n, 1))
    rows["gaussian"], got = cold_and_warm(cache, lambda: gaussian_loop(LazyTensor, x, y, b))
    check = min(args.n, 2000)          # the dense check on the first rows (it holds N x M)
    want = gaussian_dense(x[:check], y, b)
    rows["gaussian"]["max_rel_error"] = max(float(np.abs(g[:check] - w).max() / np.abs(w).max())
                                            for g, w in zip(got, want))

    x, y = rng.random((400, 3)), rng.random((300, 3)) + 0.5
    a, w = np.full(400, 1 / 400), np.full(300, 1 / 300)
    eps_list = epsilons(x, y, args.iterations)
    rows["eps_scaling"], (f, g) = cold_and_warm(cache, lambda: sinkhorn_loop(LazyTensor, x, y, a, w, eps_list))
    f_want, g_want = sinkhorn_dense(x, y, a, w, eps_list)
    rows["eps_scaling"]["max_abs_error"] = float(max(np.abs(f - f_want).max(), np.abs(g - g_want).max()))

    if importlib.util.find_spec("geomloss") is not None:    # the real client, when the 'clients' extra is there
        from kred.compat import install_as_pykeops
        install_as_pykeops()                             # before geomloss looks for pykeops
        import geomloss.ot                               # noqa: F401  its import is not part of the cold pass
        rows["geomloss_solve_sample"], value = cold_and_warm(
            cache, lambda: geomloss_solve_sample(x, y, args.iterations))
        want = geomloss_solve_sample(x, y, args.iterations, dense=True)
        rows["geomloss_solve_sample"]["max_abs_error"] = abs(value - want)
        if importlib.util.find_spec("pykeops") is not None and not args.literal:
            peer = pykeops_peer(x, y, args.iterations)
            if "value" in peer:
                peer["max_abs_error"] = abs(peer.pop("value") - want)
            rows["geomloss_solve_sample"]["pykeops"] = peer

    info = machine_info()
    path = results_path(args.name, info)
    stored = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    label = args.label or ("literal" if args.literal else "lifted")
    stored["runs"][label] = {"settings": vars(args), "commit": _git_commit(), "machine": info,
                             "load": os.getloadavg(), "results": rows}
    print(f"{'label':14} {'loop':22} {'cold s':>7} {'warm s':>7} {'cold/warm':>9} {'compiles':>8} "
          f"{'compile s':>9} {'(cold-compile)/warm':>19} {'warm compiles':>13}  error")
    for run_label, run in stored["runs"].items():
        for loop, r in run["results"].items():
            error = r.get("max_rel_error", r.get("max_abs_error"))
            rest = r.get("cold_without_compiles_over_warm")
            print(f"{run_label:14} {loop:22} {r['cold_s']:7.2f} {r['warm_s']:7.2f} {r['cold_over_warm']:9.2f} "
                  f"{r['cold_compiles']:8d} {r.get('cold_compile_s', float('nan')):9.2f} "
                  f"{rest if rest is not None else float('nan'):19.2f} {r['warm_compiles']:13d}  {error:.1e}")
    for run_label, run in stored["runs"].items():
        peer = run["results"].get("geomloss_solve_sample", {}).get("pykeops")
        if peer and "cold_s" in peer:
            print(f"{run_label:14} {'solve_sample, pykeops':22} {peer['cold_s']:7.2f} {peer['warm_s']:7.2f} "
                  f"{peer['cold_over_warm']:9.2f}  (pykeops {peer['pykeops']}, same data)")
    save_results(path, stored)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
