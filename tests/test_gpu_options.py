"""Every derived plan carries the caller's numeric options (issue 22 row 3): use_fast_math=False and dtype_acc reach
the backward plans of every gradient rule, forward mode, KernelSolve (numpy and torch, and its transpose), the
service's grad requests and the remote torch gradient. A plan built without them would run the fast path (float32
dot-product forms, approximate exp2) where the caller asked for exact arithmetic."""
from __future__ import annotations

import numpy as np
import pytest
from kred.engine.numpy import Genred
from kred.engine.reductions.gradients import gradient, with_indices

ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)", "s = Pm(1)"]
CASES = [("Exp(-s * SqDist(x, y)) * b", "Sum", None, None), ("-s * SqDist(x, y)", "LogSumExp", None, None),
         ("-s * SqDist(x, y)", "LogSumExp", None, "b"), ("-s * SqDist(x, y)", "SumSoftMaxWeight", None, "b"),
         ("SqDist(x, y)", "Min", None, None), ("SqDist(x, y)", "KMin", 3, None)]


def derived(rule):
    return [p for p in (getattr(rule, "plan", None), getattr(rule, "logsumexp", None)) if p is not None]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("formula, reduction, k, weight", CASES, ids=[f"{c[1]}{'-w' if c[3] else ''}" for c in CASES])
def test_every_gradient_rule_carries_the_options(formula, reduction, k, weight, fast):
    op = Genred(formula, ALIASES, reduction, 1, opt_arg=k, formula2=weight, dtype_acc="float64",
                use_fast_math=fast)
    plans = [with_indices(op.plan)] + [p for pos in range(4) for p in derived(gradient(op.plan, pos))]
    assert len(plans) >= 5
    for plan in plans:
        assert (plan.fast_math, plan.dtype_acc) == (fast, "float64"), plan


def test_second_order_gradients_carry_the_options():
    op = Genred("Exp(-SqDist(x, y)) * b", ALIASES, "Sum", 1, dtype_acc="float32", use_fast_math=False)
    first = gradient(op.plan, 0).plan
    second = gradient(first, 1).plan
    assert (second.fast_math, second.dtype_acc) == (False, "float32")


@pytest.mark.parametrize("reduction, weight", [("Sum", None), ("LogSumExp", None), ("LogSumExp", "b"),
                                               ("SumSoftMaxWeight", "b")])
def test_forward_mode_carries_the_options(reduction, weight):
    from kred.engine.torch.forward import tangent

    formula = "Exp(-s * SqDist(x, y)) * b" if reduction == "Sum" else "-s * SqDist(x, y)"
    op = Genred(formula, ALIASES, reduction, 1, formula2=weight, dtype_acc="float64", use_fast_math=False)
    plan = tangent(op.plan, (0,)).plan
    assert (plan.fast_math, plan.dtype_acc) == (False, "float64")


@pytest.mark.parametrize("front", ["numpy", "torch"])
def test_kernel_solve_carries_the_options(front):
    from kred.engine.kernel_solve import transpose

    if front == "numpy":
        from kred.engine.numpy import KernelSolve
    else:
        pytest.importorskip("torch")
        from kred.engine.torch import KernelSolve
    solve = KernelSolve("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(2)"], "b", axis=1,
                        dtype_acc="float64", use_fast_math=False)
    for plan in (solve.system.plan, transpose(solve.system).plan, gradient(solve.system.plan, 0).plan):
        assert (plan.fast_math, plan.dtype_acc) == (False, "float64")


def test_service_grad_request_carries_the_options():
    """The service differentiates a grad request with engine.reductions.gradients from the request's own plan."""
    from kred.engine.spec import Spec
    from kred.service import planning
    from kred.service.settings import Settings

    spec = Spec("Exp(-SqDist(x, y)) * b", ALIASES[:3], "Sum", 1, dtype_acc="float64", fast_math=False)
    plan = planning.build(spec, "x", Settings())
    rule = gradient(plan, planning.argument_index(plan, "x"))
    assert (rule.plan.fast_math, rule.plan.dtype_acc) == (False, "float64")


def test_remote_torch_gradient_carries_the_options():
    pytest.importorskip("torch")
    from kred.client.torch import Genred as RemoteGenred

    op = RemoteGenred("Exp(-SqDist(x, y)) * b", ALIASES[:3], "Sum", 1, url="http://127.0.0.1:9",
                      dtype_acc="float64", fast_math=False)
    op._signature = {"args": [{"name": n, "position": p, "category": c} for p, (n, c) in
                              enumerate([("x", "Vi"), ("y", "Vj"), ("b", "Vj")])], "outputs": [{"dim": 2}]}
    grad = op.gradient(0)
    assert (grad.spec.fast_math, grad.spec.dtype_acc) == (False, "float64")
    np.testing.assert_equal(grad.spec.axis, 1)
