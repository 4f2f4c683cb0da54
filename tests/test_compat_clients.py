"""Real pykeops clients, unmodified, on kred through the drop-in (kred.compat.install_as_pykeops): GeomLoss and
GPyTorch's KeOps paths against their own dense backends (values and gradients), and once through a real
`kred serve` on 127.0.0.1. Small sizes: the whole file stays within the CI budget.

Each library is imported after the drop-in is installed (its modules bind pykeops's names when imported), and
dropped from sys.modules again afterwards so no other test sees a library bound to kred."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

from kred import compat

geomloss_missing = importlib.util.find_spec("geomloss") is None
gpytorch_missing = importlib.util.find_spec("gpytorch") is None
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
LIBRARIES = ("geomloss", "gpytorch.kernels.keops", "linear_operator.operators.keops_linear_operator")


def _forget_libraries():
    for name in [n for n in sys.modules if n.startswith(LIBRARIES)]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def dropin():
    _forget_libraries()
    compat.install_as_pykeops()
    yield
    compat.uninstall()
    _forget_libraries()


def _points(n, m, d, seed=0, shared=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, dtype=torch.float64, generator=g)
    y = torch.rand(m, d, dtype=torch.float64, generator=g)
    x[:shared] = y[:shared]                 # coinciding points: the singular gradients of |x - y|
    return x, y


def _loss_and_grad(loss, x, y):
    x = x.clone().requires_grad_()
    value = loss(x, y)
    (g,) = torch.autograd.grad(value, x)
    return value.detach(), g


# GeomLoss -----------------------------------------------------------------------------------------------------
# Its dense ("tensorized") backend takes |x - y| as sqrt(max(|x - y|^2, 1e-8)), 1e-4 at a coinciding pair where
# KeOps (and kred) have 0: the energy and Laplacian values differ by about 1e-4 * (coinciding pairs / N M), hence
# their atol; their gradients agree exactly (the clamp's gradient is 0 there, Sqrt's subgradient). For Sinkhorn
# p=1 the dense side is given the exact cost, torch.cdist (subgradient 0 at 0 too). GeomLoss's online Sinkhorn
# passes 1/eps to its reduction as `torch.Tensor([1 / eps])`, a float32 (it does so with pykeops too): its Sinkhorn
# values and gradients match the dense ones to ~1e-8 relative, not to float64 rounding, hence SINKHORN_RTOL.
SINKHORN_RTOL = 1e-7
GEOMLOSS = {    # case: (SamplesLoss options, dense-only options, value atol)
    "sinkhorn p=2": ({"loss": "sinkhorn", "p": 2, "blur": 0.1}, {}, 1e-12),
    "sinkhorn p=1": ({"loss": "sinkhorn", "p": 1, "blur": 0.1}, {"cost": lambda x, y: torch.cdist(x, y)}, 1e-12),
    "energy": ({"loss": "energy"}, {}, 1e-5),
    "gaussian": ({"loss": "gaussian", "blur": 0.3}, {}, 1e-12),
    "laplacian": ({"loss": "laplacian", "blur": 0.3}, {}, 1e-5),
}


def _rtol(case):
    return SINKHORN_RTOL if case.startswith("sinkhorn") else 1e-9


def _grad_atol(case):       # Sinkhorn gradients are ~1e-3 here: SINKHORN_RTOL of their scale
    return 1e-8 if case.startswith("sinkhorn") else 1e-10


@pytest.mark.skipif(geomloss_missing, reason="the 'clients' extra (geomloss) is not installed")
@pytest.mark.parametrize("case", list(GEOMLOSS))
def test_geomloss_online_matches_tensorized(dropin, case):
    from geomloss import SamplesLoss
    options, dense_options, value_atol = GEOMLOSS[case]
    x, y = _points(40, 30, 3)
    got, got_grad = _loss_and_grad(SamplesLoss(backend="online", **options), x, y)
    want, want_grad = _loss_and_grad(SamplesLoss(backend="tensorized", **options, **dense_options), x, y)
    assert torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, rtol=_rtol(case), atol=value_atol)
    torch.testing.assert_close(got_grad, want_grad, rtol=_rtol(case), atol=_grad_atol(case))


@pytest.mark.skipif(geomloss_missing, reason="the 'clients' extra (geomloss) is not installed")
def test_geomloss_multiscale_ranges_match_a_dense_block_sparse_oracle(dropin, monkeypatch):
    """backend="multiscale" reduces over block-sparse `ranges` (from grid_cluster, cluster_ranges_centroids,
    from_matrix, swap_axes): the same run with GeomLoss's KeOps log-sum-exp replaced by a dense torch one that
    honours the same ranges (written here) must give the same loss and gradient."""
    from geomloss import SamplesLoss
    from geomloss._legacy import sinkhorn_samples

    def dense_lse(cost, D, dtype="float32"):
        assert cost == "(SqDist(X,Y) / IntCst(2))"     # p = 2: |x - y|^2 / 2, as written below

        def log_conv(x, y, b, p, ranges=None):
            c = ((x[:, None] - y[None]) ** 2).sum(-1) / 2
            terms = b.view(1, -1) - p * c
            if ranges is not None:          # ranges_i, slices_i, redranges_j: row cluster k reads its j ranges
                ranges_i, slices_i, redranges_j = ranges[:3]
                keep = torch.zeros_like(terms, dtype=torch.bool)
                start = 0
                for k, (i0, i1) in enumerate(ranges_i.tolist()):
                    for j0, j1 in redranges_j[start:int(slices_i[k])].tolist():
                        keep[i0:i1, j0:j1] = True
                    start = int(slices_i[k])
                terms = torch.where(keep, terms, torch.full_like(terms, -torch.inf))
            return torch.logsumexp(terms, 1, keepdim=True)
        return log_conv

    x, y = _points(200, 180, 2, seed=1, shared=0)
    y = y + 0.3
    loss = SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.7, truncate=2, cluster_scale=0.2, backend="multiscale")
    got, got_grad = _loss_and_grad(loss, x, y)
    monkeypatch.setattr(sinkhorn_samples, "keops_lse", dense_lse)
    want, want_grad = _loss_and_grad(loss, x, y)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-10)


@pytest.mark.skipif(geomloss_missing, reason="the 'clients' extra (geomloss) is not installed")
def test_geomloss_ot_solve_sample_matches_dense(dropin, monkeypatch):
    """geomloss.ot.solve_sample builds its cost as a LazyTensor (the drop-in's) when KeOps is available, else as a
    dense matrix: the same call both ways (values, potentials, gradient)."""
    from geomloss import _backends, ot
    a, b = _points(40, 30, 3, seed=2)

    def run():
        x = a.clone().requires_grad_()
        result = ot.solve_sample(x, b, reg=0.1, max_iter=6)
        (g,) = torch.autograd.grad(result.value, x)
        return result.value.detach(), result.potential_a.detach(), g

    lazy = run()
    monkeypatch.setattr(_backends, "keops_available", False)
    dense = run()
    for got, want in zip(lazy, dense):
        torch.testing.assert_close(got, want, rtol=SINKHORN_RTOL, atol=1e-10)


# GPyTorch -----------------------------------------------------------------------------------------------------

KERNELS = [("RBFKernel", {}), ("MaternKernel", {"nu": 0.5}), ("MaternKernel", {"nu": 1.5}),
           ("MaternKernel", {"nu": 2.5})]


@pytest.mark.skipif(gpytorch_missing, reason="the 'clients' extra (gpytorch) is not installed")
@pytest.mark.parametrize("name, options", KERNELS, ids=[f"{n}{o}" for n, o in KERNELS])
def test_gpytorch_keops_kernel_matvec(dropin, name, options):
    import gpytorch
    keops = importlib.import_module("gpytorch.kernels.keops")
    x1, x2 = _points(50, 40, 3, seed=3)
    v = torch.randn(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for module in (keops, gpytorch.kernels):
        kernel = getattr(module, name)(**options).double()
        kernel.lengthscale = 0.4
        with gpytorch.settings.max_cholesky_size(0):        # KeOps from the first point on
            product = kernel(x1, x2) @ v
        (g,) = torch.autograd.grad(product.sum(), kernel.raw_lengthscale)
        results.append((product, g))
    (got, got_grad), (want, want_grad) = results
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-9)


def _gp_step(kernel, x, y, lr=0.1):
    """One Adam step of exact GP training (the marginal likelihood by CG/Lanczos, as GPyTorch does at scale)."""
    import gpytorch

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean = gpytorch.means.ConstantMean()
            self.covariance = gpytorch.kernels.ScaleKernel(kernel)

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean(z), self.covariance(z))

    model = GP().double()
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(5)                                       # the same probe vectors for both kernels
    with gpytorch.settings.max_cholesky_size(0):
        loss = -mll(model(x), y)
        loss.backward()
    optimizer.step()
    return loss.detach(), [p.detach().clone() for p in model.parameters()]


@pytest.mark.skipif(gpytorch_missing, reason="the 'clients' extra (gpytorch) is not installed")
def test_gpytorch_training_step(dropin):
    import gpytorch
    keops = importlib.import_module("gpytorch.kernels.keops")
    g = torch.Generator().manual_seed(6)
    x = torch.rand(60, 2, dtype=torch.float64, generator=g)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(60, dtype=torch.float64, generator=g)
    got_loss, got_params = _gp_step(keops.RBFKernel(), x, y)
    want_loss, want_params = _gp_step(gpytorch.kernels.RBFKernel(), x, y)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-8, atol=1e-10)
    for got, want in zip(got_params, want_params):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


# Through a real `kred serve` ------------------------------------------------------------------------------------

@pytest.mark.skipif(geomloss_missing, reason="the 'clients' extra (geomloss) is not installed")
def test_geomloss_through_kred_serve(tmp_path):
    """The same unmodified GeomLoss, its LazyTensors bound to a kred server: Sinkhorn p=2 and the energy distance
    (values and gradients) against its dense backend."""
    from kred.client import Client
    from safety_helpers import ServerProcess

    with ServerProcess(tmp_path) as server:
        client = Client(server.url)
        _forget_libraries()
        compat.install_as_pykeops(client=client)
        try:
            from geomloss import SamplesLoss
            x, y = _points(20, 15, 2, seed=7)
            for case in ("sinkhorn p=2", "energy"):
                options, dense_options, value_atol = GEOMLOSS[case]
                got, got_grad = _loss_and_grad(SamplesLoss(backend="online", **options), x, y)
                want, want_grad = _loss_and_grad(SamplesLoss(backend="tensorized", **options, **dense_options), x, y)
                torch.testing.assert_close(got, want, rtol=_rtol(case), atol=value_atol)
                torch.testing.assert_close(got_grad, want_grad, rtol=_rtol(case), atol=_grad_atol(case))
        finally:
            compat.uninstall()
            _forget_libraries()
            client.close()
