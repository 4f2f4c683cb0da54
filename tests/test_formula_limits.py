"""Issue 10, engine rows: symbolic work is bounded while it happens (2), names are normalised once (8), huge
literals are refused in the formula's own words (13)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kred.engine.errors import FormulaError
from kred.engine.formula import node_budget, parse, parse_aliases
from kred.engine.spec import Spec, make_plan
from kred.engine.run import run

ROOT = Path(__file__).parents[1]
CORE = "Exp(-SqDist(x,y))*Sin(Sum(x*y))"


def nested_laplacians(levels: int) -> str:
    text = CORE
    for _ in range(levels):
        text = f"Laplacian(Sum({text}), x)"
    return text


# Row 2: nested Laplacians ------------------------------------------------------------------------------------

def test_the_reported_formulas_are_the_reported_lengths():
    assert [len(nested_laplacians(k)) for k in (4, 5)] == [107, 126]


@pytest.mark.parametrize("levels", [4, 5])
def test_nested_laplacians_are_refused_fast_and_leave_nothing_behind(levels):
    """In a fresh process: refused with a FormulaError, in well under the seconds it took to grow to GBs, with the
    peak memory barely moved and every node it built freed again (the intern table back to its size before)."""
    script = textwrap.dedent(f"""
        import gc, json, resource, time
        from kred.engine.errors import FormulaError
        from kred.engine.formula import nodes, parse, parse_aliases
        names = parse_aliases(["x = Vi(3)", "y = Vj(3)"])
        parse({CORE!r}, names)                       # imports and templates warm
        gc.collect()
        before_nodes, before_rss = len(nodes._TABLE), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        try:
            parse({nested_laplacians(levels)!r}, names)
            message = None
        except FormulaError as e:
            message = str(e)
        seconds = time.perf_counter() - start
        gc.collect()
        print(json.dumps(dict(message=message, seconds=seconds, nodes=len(nodes._TABLE) - before_nodes,
                              peak_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_rss)))
    """)
    env = dict(os.environ, KRED_MAX_FORMULA_NODES="20000")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(ROOT))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["message"] is not None and "too large" in result["message"]
    assert "20000 nodes" in result["message"] and "KRED_MAX_FORMULA_NODES" in result["message"]
    assert result["seconds"] < 3.0              # about 0.4 s on the 2-core CI machine; unbounded: 5 s and GBs
    assert result["peak_kib"] < 100 * 1024
    assert result["nodes"] < 50                 # nothing of the refused formula stays interned


def test_three_nested_laplacians_still_work_and_are_right():
    """The budget leaves room for real formulas: three nested Laplacians of a 1-D Gaussian, checked against its
    sixth derivative written by hand (Hermite polynomial H6), dense in float64."""
    names = parse_aliases(["x = Vi(1)", "y = Vj(1)"])
    f = parse("Laplacian(Laplacian(Laplacian(Exp(-SqDist(x,y)), x), x), x)", names)
    assert f.dim == 1
    # in one dimension, with r = x - y: d^6/dx^6 exp(-r^2) = (64 r^6 - 480 r^4 + 720 r^2 - 120) exp(-r^2)
    x, y = np.array([[0.3], [-0.7]]), np.array([[0.1], [1.2], [-0.4]])
    plan = make_plan(Spec("Laplacian(Laplacian(Laplacian(Exp(-SqDist(x,y)), x), x), x)", ["x = Vi(1)", "y = Vj(1)"],
                     axis=1))
    got = run(plan, [x, y], backend="reference")
    r = x - y.T
    want = ((64 * r**6 - 480 * r**4 + 720 * r**2 - 120) * np.exp(-r**2)).sum(1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_a_smaller_budget_can_be_opened_around_any_symbolic_work():
    names = parse_aliases(["x = Vi(3)", "y = Vj(3)"])
    with node_budget(300):
        with pytest.raises(FormulaError, match="more than 300 nodes"):
            parse(nested_laplacians(2), names)
    assert parse(nested_laplacians(1), names).dim == 1          # the budget closed with its block


def test_budgets_are_per_thread():
    """A budget open in one thread does not charge the nodes another thread builds."""
    import threading

    names = parse_aliases(["x = Vi(3)", "y = Vj(3)"])
    errors = []

    def other():
        try:
            parse(nested_laplacians(2), names)
        except FormulaError as e:       # pragma: no cover - the failure this test looks for
            errors.append(e)

    with node_budget(5):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert errors == []


# Row 8: aliases that are one name once normalised ----------------------------------------------------------

def test_aliases_equal_after_nfkc_are_refused():
    with pytest.raises(FormulaError, match=r"aliases 's' and 'ſ' are the same name 's' once normalised \(NFKC"):
        make_plan(Spec("s - ſ", ["s = Vi(1)", "ſ = Vj(1)"], axis=1))


def test_a_non_ascii_alias_is_the_name_the_formula_text_uses():
    """`ſ` alone is the variable `s` in the formula text (Python's parser normalises it, so must the aliases)."""
    plan = make_plan(Spec("ſ - y", ["ſ = Vi(1)", "y = Vj(1)"], axis=1))
    x, y = np.array([[1.0], [2.0]]), np.array([[0.5], [0.25], [4.0]])
    np.testing.assert_allclose(run(plan, [x, y], backend="reference"), (x - y.T).sum(1, keepdims=True))
    assert parse_aliases(["ﬁ = Vi(2)"]).keys() == {"fi"}


def test_an_alias_that_normalises_to_an_op_name_is_refused():
    with pytest.raises(FormulaError, match="not an op"):
        parse_aliases(["Ｅxp = Vi(1)"])


# Row 13: a 5,000-digit integer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["x * " + "7" * 5000, "7" * 5000, "x + 1." + "5" * 5000])
def test_a_huge_literal_names_its_length_and_the_limit(text):
    with pytest.raises(FormulaError) as info:
        parse(text, parse_aliases(["x = Vi(1)"]))
    message = str(info.value)
    assert "characters long; the limit is 100" in message
    assert str(len(text.split(" ")[-1])) in message
    assert "sys." not in message and "set_int_max_str_digits" not in message and len(message) < 300
