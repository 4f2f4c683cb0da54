"""Entropic optimal transport between two point clouds: log-domain Sinkhorn with LogSumExp, and its gradient flow.

The dual potentials solve f_i = -eps log sum_j b_j exp((g_j - C_ij) / eps) (and the same for g over i), with the
cost C_ij = |x_i - y_j|^2 / 2: each half-step is one `LogSumExp` reduction, stable for any eps. The transport plan
pi_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) is never stored: its largest entries come from an `ArgKMin`, and the
gradient of the transport cost with respect to x_i, x_i - T(x_i), from a `SumSoftMaxWeight` (T(x_i) is the
barycentre of y under row i of the plan). Following that gradient moves the first cloud onto the second. The checks
recompute, by dense numpy, the plan's marginals and the barycentres T on a subsample.

    python examples/sinkhorn.py --size 100000 --mode local
"""
from __future__ import annotations

import sys
import time

import numpy as np

from modes import Mode, figure, parser, save_figure

EPS = 0.01                      # entropic blur, squared length (the clouds span about 1)
ITERATIONS = 60
FLOW_STEPS = 5
ALIASES = ["x = Vi(2)", "y = Vj(2)", "g = Vj(1)", "lb = Vj(1)", "e = Pm(1)"]
LOG_KERNEL = "(g - SqDist(x, y) * 0.5) * e + lb"       # log of b_j exp((g_j - C_ij) / eps)


def clouds(n: int, rng):
    t = rng.uniform(0, np.pi, n)
    moon = np.stack([np.cos(t) - 0.5, np.sin(t) - 0.2], 1) * 0.5 + rng.normal(scale=0.04, size=(n, 2))
    s = rng.uniform(0, 2 * np.pi, n)
    ring = np.stack([np.cos(s), np.sin(s)], 1) * 0.25 + [0.6, 0.1] + rng.normal(scale=0.02, size=(n, 2))
    return moon, ring


def sinkhorn(mode: Mode, x, y, f=None, g=None):
    """Potentials f, g of the uniform measures on x and y (warm-started from f, g when given)."""
    e = np.array([1 / EPS])
    la, lb = np.full((len(x), 1), -np.log(len(x))), np.full((len(y), 1), -np.log(len(y)))
    g = np.zeros((len(y), 1)) if g is None else g
    for _ in range(ITERATIONS):
        f = -EPS * mode.reduce(LOG_KERNEL, ALIASES, x, y, g, lb, e, reduction_op="LogSumExp")
        g = -EPS * mode.reduce(LOG_KERNEL, ALIASES, y, x, f, la, e, reduction_op="LogSumExp")
    f = -EPS * mode.reduce(LOG_KERNEL, ALIASES, x, y, g, lb, e, reduction_op="LogSumExp")
    return f, g


def barycentres(mode: Mode, x, y, g):
    """T(x_i) = sum_j pi_ij y_j / a_i: the softmax over j of the log-kernel, weighting y."""
    lb = np.full((len(y), 1), -np.log(len(y)))
    return mode.reduce(LOG_KERNEL, ALIASES + ["w = Vj(2)"], x, y, g, lb, np.array([1 / EPS]), y,
                       reduction_op="SumSoftMaxWeight", formula2="w")


def main(argv=None, client=None) -> int:
    args = parser(__doc__, size=100_000).parse_args(argv)
    mode = Mode(args, client)
    rng = np.random.default_rng(args.seed)
    x0, y = clouds(args.size, rng)
    start = time.perf_counter()
    f, g = sinkhorn(mode, x0, y)
    cost = float(f.mean() + g.mean())
    print(f"Sinkhorn: N=M={args.size:,}, eps={EPS}, {ITERATIONS} iterations in {time.perf_counter() - start:.2f} s "
          f"({args.mode}); OT_eps = {cost:.5f}")

    # Checks by dense numpy on a subsample: the plan's rows sum to a_i (exact after an f-step), columns to b_j
    # (up to convergence), and the barycentres
    rows = rng.choice(len(x0), min(len(x0), 200), replace=False)
    log_plan = (f[rows] + g.T - ((x0[rows, None] - y[None]) ** 2).sum(-1) / 2) / EPS
    row_mass = np.exp(log_plan).sum(1) / len(y)
    mode.check("row marginals", np.allclose(row_mass, 1, atol=1e-6), f"max |N sum_j pi_ij - 1| = "
               f"{np.abs(row_mass - 1).max():.1e} on {len(rows)} rows")
    cols = rng.choice(len(y), min(len(y), 200), replace=False)
    log_cols = (f + g[cols].T - ((x0[:, None] - y[None, cols]) ** 2).sum(-1) / 2) / EPS
    col_mass = np.exp(log_cols).sum(0) / len(x0)
    mode.check("column marginals", np.allclose(col_mass, 1, atol=2e-2), f"max |M sum_i pi_ij - 1| = "
               f"{np.abs(col_mass - 1).max():.1e} on {len(cols)} columns")
    target = barycentres(mode, x0, y, g)
    weights = np.exp(log_plan - log_plan.max(1, keepdims=True))
    dense_target = weights @ y / weights.sum(1, keepdims=True)
    error = np.abs(target[rows] - dense_target).max()
    mode.check("barycentres", error < 1e-6, f"max error {error:.1e} against dense numpy")

    # The gradient flow: x <- x - step * (x - T(x)), the Sinkhorn potentials warm-started at every step
    x, frames = x0.copy(), [x0]
    for _ in range(FLOW_STEPS):
        x = x - 0.5 * (x - barycentres(mode, x, y, g))
        f, g = sinkhorn(mode, x, y, f, g)
        frames.append(x)

    fig, (left, right) = figure(1, 2, figsize=(11, 5))
    shown = rng.choice(len(x0), min(len(x0), 300), replace=False)
    _, g0 = sinkhorn(mode, x0, y)
    lb = np.full((len(y), 1), -np.log(len(y)))
    top = mode.reduce("-(" + LOG_KERNEL + ")", ALIASES, x0[shown], y, g0, lb, np.array([1 / EPS]),
                      reduction_op="ArgKMin", opt_arg=3)
    for i, js in zip(shown, top):
        for j in js:
            left.plot([x0[i, 0], y[j, 0]], [x0[i, 1], y[j, 1]], color="gray", lw=0.4, alpha=0.6)
    left.scatter(*x0[shown].T, s=4, color="tab:blue", label="x (source)")
    left.scatter(*y[rng.choice(len(y), 300, replace=False)].T, s=4, color="tab:red", label="y (target)")
    left.set_title("transport plan: 3 largest entries per sampled x_i")
    left.legend(loc="upper left")
    for k, frame in enumerate(frames):
        right.scatter(*frame[shown].T, s=3, color=(0.1, 0.3 + 0.7 * k / FLOW_STEPS, 0.9 - 0.7 * k / FLOW_STEPS))
    right.scatter(*y[rng.choice(len(y), 300, replace=False)].T, s=3, color="tab:red")
    right.set_title(f"gradient flow, {FLOW_STEPS} steps (blue to green)")
    for ax in (left, right):
        ax.set_aspect("equal")
    save_figure(fig, args.out, "sinkhorn")
    return mode.finish()


if __name__ == "__main__":
    sys.exit(main())
