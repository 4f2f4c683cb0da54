"""Gaussian mixture fitting by expectation-maximisation, with LogSumExp and SumSoftMaxWeight reductions.

Component k has a weight w_k, a mean m_k and an isotropic variance s_k. The E-step's normaliser
l_i = log sum_k w_k N(x_i; m_k, s_k) is one `LogSumExp` over the components; the M-step's sufficient statistics
sum_i r_ik [1, x_i, |x_i|^2] (responsibilities r_ik = exp(log w_k N(...) - l_i)) are one `Sum` over the points; each
point's expected component mean, the colour of the picture, is a `SumSoftMaxWeight`. The checks: the log-likelihood
never decreases (EM's guarantee), and l_i and the statistics agree with dense numpy on a subsample.

    python examples/gmm_em.py --size 1000000 --mode local
"""
from __future__ import annotations

import sys
import time

import numpy as np

from modes import Mode, figure, parser, save_figure

K = 6
ITERATIONS = 15
ALIASES = ["x = Vi(2)", "m = Vj(2)", "c = Vj(1)", "h = Vj(1)"]
LOG_DENSITY = "c - SqDist(x, m) * h"        # c_k = log w_k - log(2 pi s_k), h_k = 1 / (2 s_k): log w_k N(x; m_k, s_k)


def mixture(n: int, rng) -> np.ndarray:
    centres = rng.uniform(-6, 6, size=(K, 2))
    which = rng.choice(K, size=n, p=rng.dirichlet(np.ones(K) * 3))
    return centres[which] + rng.normal(size=(n, 2)) * rng.uniform(0.4, 1.6, size=K)[which, None]


def log_density_params(w, m, s):
    return m, (np.log(w) - np.log(2 * np.pi * s))[:, None], (0.5 / s)[:, None]


def em_step(mode: Mode, x, w, m, s):
    """One EM iteration: the log-likelihood at (w, m, s) and the next parameters."""
    m_, c, h = log_density_params(w, m, s)
    lse = mode.reduce(LOG_DENSITY, ALIASES, x, m_, c, h, reduction_op="LogSumExp", axis=1)      # (N, 1)
    stats = mode.reduce(f"Exp({LOG_DENSITY} - l) * Concat(Concat(IntCst(1), x), SqNorm2(x))",
                        ALIASES + ["l = Vi(1)"], x, m_, c, h, lse, axis=0)                       # (K, 4)
    mass = stats[:, 0]
    mean = stats[:, 1:3] / mass[:, None]
    var = np.maximum((stats[:, 3] / mass - (mean ** 2).sum(1)) / 2, 1e-6)
    return lse, stats, (mass / len(x), mean, var)


def main(argv=None, client=None) -> int:
    args = parser(__doc__, size=1_000_000).parse_args(argv)
    mode = Mode(args, client)
    rng = np.random.default_rng(args.seed)
    x = mixture(args.size, rng)
    params = (np.full(K, 1 / K), x[rng.choice(len(x), K, replace=False)], np.full(K, 4.0))
    likelihood, start = [], time.perf_counter()
    for _ in range(ITERATIONS):
        previous = params
        lse, stats, params = em_step(mode, x, *previous)
        likelihood.append(lse.mean())
    print(f"EM: N={args.size:,}, K={K}, {ITERATIONS} iterations in {time.perf_counter() - start:.2f} s "
          f"({args.mode}); mean log-likelihood {likelihood[0]:.4f} -> {likelihood[-1]:.4f}")

    # Checks: monotone likelihood; the last E- and M-step by dense numpy (rows: a subsample; statistics: all points,
    # as the mixture has only K components)
    mode.check("EM increases the likelihood", np.all(np.diff(likelihood) >= -1e-9),
               f"{ITERATIONS} iterations, smallest change {np.diff(likelihood).min():.2e}")
    w, m, s = previous
    log_p = np.log(w) - np.log(2 * np.pi * s) - ((x[:, None] - m[None]) ** 2).sum(-1) / (2 * s)           # (N, K)
    top = log_p.max(1, keepdims=True)
    dense_lse = top + np.log(np.exp(log_p - top).sum(1, keepdims=True))
    rows = rng.choice(len(x), min(len(x), 1000), replace=False)
    error = np.abs(lse[rows] - dense_lse[rows]).max()
    mode.check("E-step", error < 1e-9, f"max |l_i - dense| = {error:.1e} on {len(rows)} points")
    r = np.exp(log_p - dense_lse)
    dense_stats = np.concatenate([r.sum(0)[:, None], r.T @ x, (r.T @ (x ** 2).sum(1))[:, None]], 1)
    error = np.abs(stats - dense_stats).max() / np.abs(dense_stats).max()
    mode.check("M-step", error < 1e-9, f"relative error of the statistics {error:.1e}")

    fig, (left, right) = figure(1, 2, figsize=(11, 5))
    from matplotlib.patches import Circle
    shown = rng.choice(len(x), min(len(x), 4000), replace=False)
    m_, c, h = log_density_params(*params)
    expected_mean = mode.reduce(LOG_DENSITY, ALIASES + ["v = Vj(2)"], x[shown], m_, c, h, m_,
                                reduction_op="SumSoftMaxWeight", formula2="v", axis=1)
    colour = (expected_mean - x.min(0)) / np.ptp(x, 0)
    left.scatter(*x[shown].T, s=3, c=np.c_[colour, np.full(len(shown), 0.5)].clip(0, 1))
    for k in range(K):
        left.add_patch(Circle(params[1][k], 2 * np.sqrt(params[2][k]), fill=False, color="black"))
    left.set_aspect("equal")
    left.set_title(f"mixture of {K} Gaussians (2 sd circles), N={args.size:,}")
    right.plot(likelihood, "o-")
    right.set_xlabel("EM iteration")
    right.set_ylabel("mean log-likelihood")
    save_figure(fig, args.out, "gmm_em")
    return mode.finish()


if __name__ == "__main__":
    sys.exit(main())
