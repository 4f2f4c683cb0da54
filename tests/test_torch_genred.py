"""`engine.torch.Genred`: forward values and gradients of every reduction against dense torch autograd.

The oracles are dense computations written here (the N x M x dim tensor of formula values, reduced with
torch.sum / logsumexp / softmax / min / max / topk) differentiated by torch autograd, in float64.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kred.engine.errors import FormulaError
from kred.engine.torch import Genred

F64 = torch.float64


def _randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _pairs(x, y):
    return x[:, None, :], y[None, :, :]


def _grads(output, inputs, weight):
    """Gradients of <weight, output> with respect to inputs (zeros where an input does not contribute)."""
    return torch.autograd.grad((output * weight).sum(), inputs, allow_unused=True, materialize_grads=True)


def _assert_close(got, want, rtol=1e-9, atol=1e-11, what=""):
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (what, k, g.shape, w.shape)
        np.testing.assert_allclose(g.detach().numpy(), w.detach().numpy(), rtol=rtol, atol=atol,
                                   err_msg=f"{what} (input {k})")


# Common ops: Sum reductions and their first derivatives ---------------------------------------------------------

def _sqd(x, y):
    xi, yj = _pairs(x, y)
    return ((xi - yj) ** 2).sum(-1, keepdim=True)


COMMON = {
    "gaussian": ("Exp(-SqDist(x, y) * s) * b", lambda x, y, b, s: torch.exp(-_sqd(x, y) * s) * b[None]),
    "laplace": ("Exp(-Sqrt(SqDist(x, y) + s)) * b", lambda x, y, b, s: torch.exp(-(_sqd(x, y) + s).sqrt()) * b[None]),
    "cauchy": ("Inv(s + SqDist(x, y)) * b", lambda x, y, b, s: b[None] / (s + _sqd(x, y))),
    "log_pow": ("Log(s + Pow(x - y, 2)) + Powf(s + Square(y), b)",
                lambda x, y, b, s: torch.log(s + (x[:, None] - y[None]) ** 2) + (s + y[None] ** 2) ** b[None]),
    "trig": ("Sin(x - y) * Cos(x + y) + Atan(x * y)",
             lambda x, y, b, s: torch.sin(x[:, None] - y[None]) * torch.cos(x[:, None] + y[None])
             + torch.atan(x[:, None] * y[None])),
    "abs_relu_clamp": ("Abs(x - y) + ReLU(x * y) + Clamp(x, -s, s) * b",
                       lambda x, y, b, s: (x[:, None] - y[None]).abs() + torch.relu(x[:, None] * y[None])
                       + torch.clamp(x[:, None], -s, s) * b[None]),
    "normalize_scalprod": ("Normalize(x - y) * (x | y)",
                           lambda x, y, b, s: torch.nn.functional.normalize(x[:, None] - y[None], dim=-1)
                           * (x[:, None] * y[None]).sum(-1, keepdim=True)),
    "matvec_tensorprod": ("MatVecMult(TensorProd(x, y), y) + Min(x - y) + Max(x * y)",
                          lambda x, y, b, s: (x[:, None] * (y[None] * y[None]).sum(-1, keepdim=True))
                          + (x[:, None] - y[None]).min(-1, keepdim=True).values
                          + (x[:, None] * y[None]).max(-1, keepdim=True).values),
    "sqrt_rsqrt_exp": ("Sqrt(s + Square(x)) * Rsqrt(s + Square(y)) * Exp(-b * Sum(x))",
                       lambda x, y, b, s: (s + x[:, None] ** 2).sqrt() / (s + y[None] ** 2).sqrt()
                       * torch.exp(-b[None] * x[:, None].sum(-1, keepdim=True))),
}
COMMON_ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)", "s = Pm(1)"]


@pytest.mark.parametrize("name", COMMON)
def test_common_ops_gradients_match_dense(name, backend):
    formula, dense = COMMON[name]
    x, y, b = _randn(6, 3, seed=1), _randn(5, 3, seed=2), _randn(5, 1, seed=3) * 0.5
    s = torch.tensor([1.3], dtype=F64)
    inputs = [t.clone().requires_grad_() for t in (x, y, b, s)]
    got = Genred(formula, COMMON_ALIASES, axis=1)(*inputs, backend=backend)
    want = dense(*inputs).sum(1)
    _assert_close([got], [want], what=name)
    weight = _randn(*want.shape, seed=4)
    _assert_close(_grads(got, inputs, weight), _grads(want, inputs, weight), what=name)


# Every differentiable reduction, both axes, gradients with respect to i, j and parameter arguments --------------

K = 2


def _dense_reduction(name, f, w, dim):
    """The reduction of formula values f (N, M, d) (and weights w) over `dim`, as the user sees it."""
    if name == "Sum":
        return f.sum(dim)
    if name == "LogSumExp":
        return f.logsumexp(dim)
    if name == "LogSumExpWeight":
        return torch.log((f.exp() * w).sum(dim))
    if name == "SumSoftMaxWeight":
        return (f.softmax(dim) * w).sum(dim)
    if name in ("Min", "Min_ArgMin"):
        return f.min(dim).values
    if name in ("Max", "Max_ArgMax"):
        return f.max(dim).values
    if name in ("KMin", "KMin_ArgKMin", "KMax", "KMax_ArgKMax"):
        values = f.topk(K, dim=dim, largest="KMax" in name).values    # (N, K, d) or (K, M, d)
        values = values if dim == 1 else values.transpose(0, 1)
        return values.reshape(values.shape[0], -1)                      # KeOps layout [k * d + c]
    raise AssertionError(name)


REDUCTIONS = ["Sum", "LogSumExp", "LogSumExpWeight", "SumSoftMaxWeight", "Min", "Max", "Min_ArgMin", "Max_ArgMax",
              "KMin", "KMin_ArgKMin", "KMax", "KMax_ArgKMax"]


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", REDUCTIONS)
def test_reduction_gradients_match_dense(name, axis, backend):
    weighted = name in ("LogSumExpWeight", "SumSoftMaxWeight")
    x, y, s = _randn(7, 3, seed=5), _randn(6, 3, seed=6), torch.tensor([0.8, -0.3, 0.5], dtype=F64)
    inputs = [t.clone().requires_grad_() for t in (x, y, s)]
    aliases = ["x = Vi(3)", "y = Vj(3)", "s = Pm(3)"]
    xi, yj = _pairs(*inputs[:2])
    if weighted:    # a scalar formula and vector weights that depend on every argument
        formula, formula2 = "-SqDist(x, y) * Elem(s, 0)", "Cos(x - y) + s"
        f = -((xi - yj) ** 2).sum(-1, keepdim=True) * inputs[2][0]
        w = torch.cos(xi - yj) + inputs[2]
    else:
        formula, formula2 = "Sin(x - y) * s + x * y", None
        f, w = torch.sin(xi - yj) * inputs[2] + xi * yj, None
    op = Genred(formula, aliases, reduction_op=name, axis=axis, opt_arg=K if name[0] == "K" else None,
                formula2=formula2)
    got = op(*inputs, backend=backend)
    if name.endswith("ArgMin") or name.endswith("ArgMax") or name.endswith("ArgKMin") or name.endswith("ArgKMax"):
        got, index = got
        assert index.dtype == torch.int64 and not index.requires_grad
    want = _dense_reduction(name, f, w, axis)      # axis=1 reduces over j, the dense axis 1
    _assert_close([got], [want], what=f"{name} axis={axis} values")
    weight = _randn(*want.shape, seed=7)
    _assert_close(_grads(got, inputs, weight), _grads(want, inputs, weight), what=f"{name} axis={axis}")


@pytest.mark.parametrize("name", ["ArgMin", "ArgMax", "ArgKMin", "ArgKMax"])
def test_index_reductions_have_zero_gradient(name, backend):
    x = _randn(5, 2, seed=8).requires_grad_()
    y = _randn(4, 2, seed=9)
    op = Genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], reduction_op=name, axis=1,
                opt_arg=K if name.startswith("ArgK") else None)
    index = op(x, y, backend=backend)
    assert index.dtype == torch.int64 and not index.requires_grad and index.grad_fn is None
    dense = ((x[:, None] - y[None]) ** 2).sum(-1)
    want = dense.argmin(1) if name == "ArgMin" else dense.argmax(1) if name == "ArgMax" else \
        dense.topk(K, 1, largest=name == "ArgKMax").indices
    assert torch.equal(index.reshape(want.shape), want)


def test_reduction_without_gradient_rule_says_so():
    x = _randn(4, 2, seed=1).requires_grad_()
    op = Genred("SqDist(x, y)", ["x = Vi(2)", "y = Vj(2)"], reduction_op="Max_SumShiftExp", axis=1)
    out = op(x, _randn(3, 2, seed=2))
    with pytest.raises(FormulaError, match="Max_SumShiftExp has no gradient rule"):
        out.sum().backward()


# Higher orders -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["Exp(-SqDist(x, y))", "Exp(-Norm2(x - y))"], ids=["gaussian", "laplace"])
def test_third_order_through_autograd(kernel, backend):
    """The issue's example: a = K(x, y) b, then gradients of gradients with create_graph=True."""
    x, y, b = _randn(8, 3, seed=11), _randn(6, 3, seed=12), _randn(6, 1, seed=13)
    u = _randn(8, 3, seed=14)

    def dense(x, y, b):
        d2 = ((x[:, None] - y[None]) ** 2).sum(-1)
        return (torch.exp(-d2) if "SqDist" in kernel else torch.exp(-d2.sqrt())) @ b

    op = Genred(f"{kernel} * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1)
    results = []
    for fn in (lambda *a: op(*a, backend=backend), dense):
        inputs = [t.clone().requires_grad_() for t in (x, y, b)]
        a = fn(*inputs)
        g, = torch.autograd.grad((a ** 2).sum(), [inputs[0]], create_graph=True)
        h = torch.autograd.grad((g * u).sum(), inputs, create_graph=True)
        k = torch.autograd.grad((h[0] * u).sum() + (h[1] ** 2).sum(), inputs[:2])
        results.append([a, g, *h, *k])
    _assert_close(results[0], results[1], rtol=1e-8, atol=1e-10, what=kernel)


@pytest.mark.parametrize("name", ["Sum", "LogSumExp", "SumSoftMaxWeight", "Min", "KMin"])
def test_gradcheck_and_gradgradcheck(name, backend):
    # Checked with respect to x (an i-variable) and s (a parameter); y (reduced over) has its first and second
    # derivatives checked above, which keeps the number of distinct compiled kernels here small.
    x, y, s = _randn(4, 2, seed=21), _randn(5, 2, seed=22), torch.tensor([0.7], dtype=F64)
    inputs = tuple(t.clone().requires_grad_() for t in (x, s))
    weighted = name == "SumSoftMaxWeight"
    op = Genred("Exp(-SqDist(x, y) * s)" + ("" if weighted else " + Sin(x - y)"),
                ["x = Vi(2)", "y = Vj(2)", "s = Pm(1)"], reduction_op=name, axis=1,
                opt_arg=K if name == "KMin" else None, formula2="x * y" if weighted else None)

    def fn(x, s):
        return op(x, y, s, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# Shapes, dtypes, options ------------------------------------------------------------------------------------------

def test_float32_and_argument_shapes(backend):
    """float32 in, float32 gradients out, of the arguments' own shapes: (N,) for dim-1 variables, (1, D) params."""
    x, y, b = _randn(9, 2, seed=31), _randn(7, 2, seed=32), _randn(7, seed=33)
    s = torch.tensor([[0.5, 2.0]], dtype=F64)
    formula = "Exp(-WeightedSqDist(s, x, y)) * b"
    aliases = ["x = Vi(2)", "y = Vj(2)", "b = Vj(1)", "s = Pm(2)"]
    want_inputs = [t.clone().requires_grad_() for t in (x, y, b, s)]
    d2 = (((want_inputs[0][:, None] - want_inputs[1][None]) ** 2) * want_inputs[3]).sum(-1)
    want = torch.exp(-d2) @ want_inputs[2][:, None]
    inputs = [t.to(torch.float32).requires_grad_() for t in (x, y, b, s)]
    got = Genred(formula, aliases, axis=1)(*inputs, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (9, 1)
    weight = _randn(9, 1, seed=34)
    grads = _grads(got, inputs, weight.float())
    for g, t in zip(grads, inputs):
        assert g.dtype == torch.float32 and g.shape == t.shape
    _assert_close([got.double(), *(g.double() for g in grads)], [want, *_grads(want, want_inputs, weight)],
                  rtol=1e-4, atol=1e-5, what="float32")


def test_batch_dimensions_in_gradients(backend):
    """(B, N, D) against (1, M, D) and a (B, D) parameter: gradients sum over the broadcast batch axes."""
    x, y, s = _randn(3, 5, 2, seed=41), _randn(1, 4, 2, seed=42), _randn(3, 1, seed=43).abs()
    inputs = [t.clone().requires_grad_() for t in (x, y, s)]
    for name in ("Sum", "Min"):
        op = Genred("Exp(-SqDist(x, y) * s) + Elem(x - y, 0)", ["x = Vi(2)", "y = Vj(2)", "s = Pm(1)"],
                    reduction_op=name, axis=1)
        got = op(*inputs, backend=backend)
        xi, yj = inputs[0][:, :, None, :], inputs[1][:, None, :, :]
        dense = torch.exp(-((xi - yj) ** 2).sum(-1, keepdim=True) * inputs[2][:, None, None, :]) + (xi - yj)[..., :1]
        want = dense.sum(2) if name == "Sum" else dense.min(2).values
        _assert_close([got], [want], what=name)
        weight = _randn(*want.shape, seed=44)
        _assert_close(_grads(got, inputs, weight), _grads(want, inputs, weight), what=f"batched {name}")


def test_out_argument_and_torch_func(backend):
    x, y = _randn(6, 3, seed=51), _randn(5, 3, seed=52)
    op = Genred("Exp(-SqDist(x, y))", ["x = Vi(3)", "y = Vj(3)"], axis=1)
    out = torch.empty(6, 1, dtype=F64)
    assert op(x, y, backend=backend, out=out) is out

    def dense(x, y):
        return torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1)).sum(1, keepdim=True)

    np.testing.assert_allclose(out.numpy(), dense(x, y).numpy(), rtol=1e-12)
    # torch.func: grad, and vmap (mapped axes become batch dimensions), also of a gradient.
    g = torch.func.grad(lambda x: op(x, y, backend=backend).pow(2).sum())(x)
    np.testing.assert_allclose(g.numpy(), torch.func.grad(lambda x: dense(x, y).pow(2).sum())(x).numpy(),
                               rtol=1e-10)
    ys = _randn(4, 5, 3, seed=53)
    mapped = torch.func.vmap(torch.func.grad(lambda y: op(x, y, backend=backend).pow(2).sum()))(ys)
    want = torch.func.vmap(torch.func.grad(lambda y: dense(x, y).pow(2).sum()))(ys)
    np.testing.assert_allclose(mapped.numpy(), want.numpy(), rtol=1e-10)


def test_gradient_with_ranges_matches_dense_mask(backend):
    """Block-sparse ranges reach the backward reductions: the gradient is that of the masked dense sum."""
    x, y = _randn(6, 2, seed=61).requires_grad_(), _randn(5, 2, seed=62).requires_grad_()
    ranges_i = torch.tensor([[0, 3], [3, 6]], dtype=torch.int32)
    slices_i = torch.tensor([1, 3], dtype=torch.int32)
    redranges_j = torch.tensor([[0, 2], [1, 3], [4, 5]], dtype=torch.int32)
    # The same pattern seen from the j side (the gradient with respect to y reduces over i).
    ranges_j = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]], dtype=torch.int32)
    slices_j = torch.tensor([1, 3, 4, 4, 5], dtype=torch.int32)
    redranges_i = torch.tensor([[0, 3], [0, 3], [3, 6], [3, 6], [3, 6]], dtype=torch.int32)
    ranges = (ranges_i, slices_i, redranges_j, ranges_j, slices_j, redranges_i)
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[0:3, 0:2] = True
    mask[3:6, 1:3] = True
    mask[3:6, 4:5] = True
    got = Genred("Exp(-SqDist(x, y))", ["x = Vi(2)", "y = Vj(2)"], axis=1)(x, y, backend=backend, ranges=ranges)
    want = (torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1)) * mask).sum(1, keepdim=True)
    weight = _randn(6, 1, seed=63)
    _assert_close([got, *_grads(got, [x, y], weight)], [want, *_grads(want, [x, y], weight)], what="ranges")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["Sum", "LogSumExp", "Min"])
def test_cuda_tensors_stay_on_the_device(name):
    """CUDA tensors in, CUDA tensors out (forward and backward), matching dense torch on the CPU."""
    x, y, b = _randn(300, 3, seed=71), _randn(200, 3, seed=72), _randn(200, 2, seed=73)
    op = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], reduction_op=name, axis=1)
    inputs = [t.cuda().requires_grad_() for t in (x, y, b)]
    got = op(*inputs)
    assert got.is_cuda
    weight = _randn(*got.shape, seed=74)
    grads = _grads(got, inputs, weight.cuda())
    assert all(g.is_cuda for g in grads)
    cpu_inputs = [t.clone().requires_grad_() for t in (x, y, b)]
    f = torch.exp(-((cpu_inputs[0][:, None] - cpu_inputs[1][None]) ** 2).sum(-1, keepdim=True)) * cpu_inputs[2][None]
    want = _dense_reduction(name, f, None, 1)
    _assert_close([got.cpu(), *(g.cpu() for g in grads)], [want, *_grads(want, cpu_inputs, weight)], what="cuda")


def test_pykeops_constructor_arguments_positionally():
    # pykeops 2.x torch order: formula, aliases, reduction_op, axis, dtype, opt_arg, formula2, cuda_type, dtype_acc,
    # use_double_acc, sum_scheme, enable_chunks, rec_multVar_highdim, use_fast_math.
    x, y = _randn(6, 3, seed=1), _randn(11, 3, seed=2)
    op = Genred("SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], "ArgKMin", 1, "float64", 3, None, "float64", "auto",
                False, "block_sum", False, True, True)
    d2 = ((x[:, None] - y[None]) ** 2).sum(-1)
    assert torch.equal(op(x, y), torch.argsort(d2, dim=1, stable=True)[:, :3])
