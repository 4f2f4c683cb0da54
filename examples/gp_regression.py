"""Gaussian-process (kernel ridge) regression with KernelSolve, its length scale fitted by torch autograd.

The weights solve (alpha I + K) a = y for the Gaussian kernel K_ij = exp(-|x_i - x_j|^2 g) with g = 1 / (2 l^2);
predictions are K(x_new, x) a. The length scale l is fitted by Adam on the validation error, differentiating through
the solve (KernelSolve's backward is one more solve and a reduction). The checks: the solve's residual on a
subsample of rows by dense numpy, and the gradient of the validation error against dense torch autograd on a
sub-problem.

    python examples/gp_regression.py --size 20000 --mode local
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from modes import Mode, figure, parser, save_figure

ALIASES = ["x = Vi(1)", "y = Vj(1)", "b = Vj(1)", "g = Pm(1)"]
KERNEL = "Exp(-SqDist(x, y) * g) * b"
ALPHA = 0.1                     # noise variance (ridge)
STEPS = 12


def truth(x):
    return np.sin(x) + 0.3 * np.sin(3 * x)


def data(n: int, rng):
    x = rng.uniform(0, 10, size=(n, 1))
    return x, truth(x) + rng.normal(scale=0.3, size=(n, 1))


def validation_error(mode: Mode, log_l, xt, yt, xv, yv):
    """Mean squared error on (xv, yv) of kernel ridge regression fitted on (xt, yt), as a torch scalar."""
    g = (0.5 * torch.exp(-2 * log_l)).reshape(1)
    a = mode.kernel_solve(KERNEL, ALIASES, "b", xt, xt, yt, g, alpha=ALPHA, eps=1e-8)
    predict = mode.torch_genred(KERNEL, ALIASES, "Sum", axis=1)
    return ((predict(xv, xt, a, g) - yv) ** 2).mean(), a, g


def dense_validation_error(log_l, xt, yt, xv, yv):
    """The same in dense float64 torch: the independent oracle."""
    g = 0.5 * torch.exp(-2 * log_l)
    a = torch.linalg.solve(ALPHA * torch.eye(len(xt), dtype=xt.dtype) + torch.exp(-(xt - xt.T) ** 2 * g), yt)
    return ((torch.exp(-(xv - xt.T) ** 2 * g) @ a - yv) ** 2).mean()


def main(argv=None, client=None) -> int:
    args = parser(__doc__, size=20_000).parse_args(argv)
    mode = Mode(args, client)
    rng = np.random.default_rng(args.seed)
    xt, yt, xv, yv = (torch.as_tensor(v) for v in (*data(args.size, rng), *data(max(args.size // 4, 50), rng)))
    log_l = torch.tensor(np.log(2.0), requires_grad=True)
    optimizer = torch.optim.Adam([log_l], lr=0.15)
    history, start = [], time.perf_counter()
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss, _, _ = validation_error(mode, log_l, xt, yt, xv, yv)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    loss, a, g = validation_error(mode, log_l, xt, yt, xv, yv)
    length = float(torch.exp(log_l.detach()))
    print(f"GP regression: N={args.size:,}, {STEPS} Adam steps in {time.perf_counter() - start:.2f} s ({args.mode}): "
          f"length scale {length:.3f}, validation MSE {history[0]:.4f} -> {loss.item():.4f}")

    # Check 1: the solve, by dense numpy on a subsample of rows: (alpha I + K) a = y there
    x, weights = xt.numpy(), a.detach().numpy()
    rows = rng.choice(len(x), min(len(x), 300), replace=False)
    lhs = ALPHA * weights[rows] + np.exp(-(x[rows] - x.T) ** 2 * float(g.detach())) @ weights
    residual = np.abs(lhs - yt.numpy()[rows]).max()
    mode.check("kernel solve", residual < 1e-4, f"max residual {residual:.1e} on {len(rows)} rows (dense numpy)")
    # Check 2: the hyperparameter's gradient, against dense torch autograd on a 300-point sub-problem
    sub_t, sub_v = slice(0, min(300, len(xt))), slice(0, min(100, len(xv)))
    problem = (xt[sub_t], yt[sub_t], xv[sub_v], yv[sub_v])
    point = log_l.detach().clone().requires_grad_(True)
    ours, = torch.autograd.grad(validation_error(mode, point, *problem)[0], point)
    theirs, = torch.autograd.grad(dense_validation_error(point, *problem), point)
    mode.check("gradient", torch.allclose(ours, theirs, rtol=1e-4, atol=1e-8),
               f"d MSE / d log l = {ours.item():.6g} here, {theirs.item():.6g} by dense torch autograd")

    fig, (left, right) = figure(1, 2, figsize=(10, 4))
    shown = rng.choice(len(x), min(len(x), 2000), replace=False)
    left.scatter(x[shown, 0], yt.numpy()[shown, 0], s=2, color="gray", label="training data")
    grid = torch.linspace(0, 10, 400, dtype=xt.dtype)[:, None]
    fit = mode.torch_genred(KERNEL, ALIASES, "Sum", axis=1)(grid, xt, a.detach(), g.detach())
    left.plot(grid[:, 0], truth(grid.numpy())[:, 0], "k--", label="truth")
    left.plot(grid[:, 0], fit.detach()[:, 0], "r", label=f"fit, l = {length:.2f}")
    left.legend(loc="lower left")
    left.set_title(f"kernel ridge regression, N={args.size:,}")
    right.plot(history, "o-")
    right.set_xlabel("Adam step")
    right.set_ylabel("validation MSE")
    save_figure(fig, args.out, "gp_regression")
    return mode.finish()


if __name__ == "__main__":
    sys.exit(main())
