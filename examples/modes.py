"""What every example shares: its command line, and the three ways of running a reduction.

    --mode local     in-process: kred.numpy / kred.torch (compiled CPU kernels, or CUDA when a GPU is visible)
    --mode cluster   the embedded Ray cluster (kred.cluster), or the one at --address
    --mode server    a kred server through kred.Client (--url; tests pass an in-process client instead)

An example asks a `Mode` for reductions (`reduce`, numpy in and out), differentiable reductions (`torch_genred`) and
kernel solves (`kernel_solve`); the mode decides where they run. Checks print one line each, and `finish` turns them
into the exit status, so a failed check fails the script.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

MODES = ("local", "cluster", "server")


def parser(description: str, size: int) -> argparse.ArgumentParser:
    """The options every example takes; `size` is its default problem size."""
    p = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    p.add_argument("--size", type=int, default=size, help=f"number of points (default {size:,})")
    p.add_argument("--mode", choices=MODES, default="local", help="where reductions run (default local)")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for the picture and outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=os.environ.get("KRED_URL", "http://127.0.0.1:8000"), help="server (--mode server)")
    p.add_argument("--address", default=None, help="Ray cluster to join (--mode cluster; default: embedded)")
    return p


class Mode:
    """Runs an example's reductions locally, on the cluster or on a server. `client` overrides --url."""

    def __init__(self, args: argparse.Namespace, client=None):
        self.name, self.client, self.checks = args.mode, client, []
        if self.name == "server" and self.client is None:
            from kred import Client
            self.client = Client(args.url)
        if self.name == "cluster":
            self._start_cluster(args.address)

    @staticmethod
    def _start_cluster(address):
        # backend="cluster" below runs on kred.cluster's default Cluster, started on first use on this Ray; a job
        # file starts a Cluster of its own. A local Ray gets a modest object store (small machines, CI).
        import ray
        if not ray.is_initialized():
            options = {} if address else {"object_store_memory": 256 << 20}
            ray.init(address=address, include_dashboard=False, **options)

    @property
    def backend(self) -> str:
        return "cluster" if self.name == "cluster" else "auto"

    # Reductions --------------------------------------------------------------------------------------------
    def reduce(self, formula: str, aliases, *args, reduction_op="Sum", axis=1, opt_arg=None, formula2=None,
               ranges=None):
        """One reduction, numpy arrays in and out (a tuple for value/index pairs); `ranges`: pykeops' block-sparse
        6-tuple, which every mode takes (the cluster runs a shard per row cluster, the client sends it over HTTP)."""
        if self.name == "server":
            return self.client.reduce(formula, aliases, *args, reduction_op=reduction_op, axis=axis,
                                      opt_arg=opt_arg, formula2=formula2, ranges=ranges)
        from kred.numpy import Genred
        op = Genred(formula, aliases, reduction_op, axis, opt_arg=opt_arg, formula2=formula2)
        return op(*args, backend=self.backend, ranges=ranges)

    def torch_genred(self, formula: str, aliases, reduction_op="Sum", axis=1, opt_arg=None, formula2=None):
        """A differentiable reduction on torch tensors (the backward pass runs where the forward pass did)."""
        if self.name == "server":
            from kred.client.torch import Genred as RemoteGenred
            return RemoteGenred(formula, aliases, reduction_op, axis, opt_arg=opt_arg, formula2=formula2,
                                client=self.client)
        from kred.torch import Genred
        op = Genred(formula, aliases, reduction_op, axis, opt_arg=opt_arg, formula2=formula2)
        return lambda *args: op(*args, backend=self.backend)

    def kernel_solve(self, formula: str, aliases, varinvalias: str, *args, alpha: float, eps: float = 1e-6):
        """Solve (alpha I + K) a = b for a, K = Sum_j formula over j (symmetric, positive), differentiable in torch.

        Locally and on the cluster this is kred.torch.KernelSolve. A server has no solve route: there it is
        conjugate gradient whose products are server reductions, differentiated as KernelSolve is (one more solve
        for the right-hand side, a reduction's vector-Jacobian product for the rest)."""
        if self.name == "server":
            return _RemoteSolve.apply(self, formula, tuple(aliases), varinvalias, alpha, eps, *args)
        from kred.torch import KernelSolve
        solve = KernelSolve(formula, aliases, varinvalias, axis=1)
        return solve(*args, alpha=alpha, eps=eps, backend=self.backend)

    # Checks ------------------------------------------------------------------------------------------------
    def check(self, what: str, ok: bool, detail: str) -> bool:
        self.checks.append(bool(ok))
        print(f"check {'ok    ' if ok else 'FAILED'} {what}: {detail}")
        return bool(ok)

    def finish(self) -> int:
        """The exit status: 0 when every check passed (and there was at least one)."""
        return 0 if self.checks and all(self.checks) else 1


def save_figure(fig, out: Path, name: str) -> Path:
    """Write the example's picture as out/name.png and say where."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    print(f"picture: {path}")
    return path


def figure(*args, **kwargs):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kwargs)


def conjugate_gradient(matvec, b: np.ndarray, alpha: float, eps: float, max_iter: int = 1000) -> np.ndarray:
    """(alpha I + K) a = b column by column, |residual| <= eps |b|, with K given by `matvec`."""
    a = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = (r * r).sum(0)
    goal = eps ** 2 * (b * b).sum(0)
    for _ in range(max_iter):
        if np.all(rr <= goal):
            break
        q = alpha * p + matvec(p)
        step = rr / np.maximum((p * q).sum(0), np.finfo(b.dtype).tiny)
        a += step * p
        r -= step * q
        rr, previous = (r * r).sum(0), rr
        p = r + rr / np.maximum(previous, np.finfo(b.dtype).tiny) * p
    return a


def _remote_solve_arrays(mode: Mode, formula, aliases, varinvalias, alpha, eps, arrays):
    names = [alias.split("=")[0].strip() for alias in aliases]
    pos = names.index(varinvalias)

    def matvec(v):
        return mode.reduce(formula, aliases, *[v if k == pos else a for k, a in enumerate(arrays)], axis=1)
    return conjugate_gradient(matvec, arrays[pos], alpha, eps), pos


try:
    import torch

    class _RemoteSolve(torch.autograd.Function):
        """KernelSolve through a server's reductions: forward by conjugate gradient, backward as KernelSolve's."""

        @staticmethod
        def forward(ctx, mode, formula, aliases, varinvalias, alpha, eps, *tensors):
            arrays = [t.detach().cpu().numpy() for t in tensors]
            solution, pos = _remote_solve_arrays(mode, formula, aliases, varinvalias, alpha, eps, arrays)
            ctx.setup = (mode, formula, aliases, varinvalias, alpha, eps, pos)
            out = torch.as_tensor(solution, dtype=tensors[pos].dtype)
            ctx.save_for_backward(*tensors, out)
            return out

        @staticmethod
        def backward(ctx, grad):
            mode, formula, aliases, varinvalias, alpha, eps, pos = ctx.setup
            *tensors, out = ctx.saved_tensors
            arrays = [t.detach().numpy() for t in tensors]
            # K is symmetric: the right-hand side's gradient is one more solve, lam = (alpha I + K)^-1 grad
            arrays[pos] = grad.detach().numpy()
            lam, _ = _remote_solve_arrays(mode, formula, aliases, varinvalias, alpha, eps, arrays)
            lam = torch.as_tensor(lam, dtype=out.dtype)
            grads = [None] * len(tensors)
            grads[pos] = lam
            # everything else: d/dtheta of -<lam, K(theta) out>, a reduction's vector-Jacobian product
            wanted = [k for k in range(len(tensors)) if k != pos and ctx.needs_input_grad[6 + k]]
            if wanted:
                product = mode.torch_genred(formula, list(aliases), "Sum", 1)
                with torch.enable_grad():
                    inputs = [out if k == pos else t.detach().requires_grad_(k in wanted)
                              for k, t in enumerate(tensors)]
                    value = product(*inputs)
                    found = torch.autograd.grad(value, [inputs[k] for k in wanted], -lam)
                for k, g in zip(wanted, found):
                    grads[k] = g
            return (None,) * 6 + tuple(grads)
except ImportError:                      # torch is optional: only the examples that differentiate need it
    _RemoteSolve = None
