"""The formula language: parsing, aliases, hash-consing, simplification, errors, and hostile input.

Expected trees are written with `make`/`var` (the node constructors), never by parsing another text.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kred.engine.backends.reference import evaluate
from kred.engine.errors import ArgumentError, DimensionError, FormulaError, KredError
from kred.engine.formula import (
    I,
    J,
    Node,
    P,
    make,
    parse,
    parse_alias,
    parse_aliases,
    to_text,
    var,
)

X, Y, B, S = var(0, 3, I), var(1, 3, J), var(2, 2, J), var(3, 1, P)
NAMES = {"x": X, "y": Y, "b": B, "s": S}


def mk(op, *children, params=()):
    return make(op, tuple(children), tuple(params))


# Parsing and precedence -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("x", X),
    ("x + y", mk("Add", X, Y)),
    ("x*y+x", mk("Add", mk("Mult", X, Y), X)),
    ("x + y*x", mk("Add", X, mk("Mult", Y, X))),
    ("(x + y)*x", mk("Mult", mk("Add", X, Y), X)),
    ("x - y - x", mk("Subtract", mk("Subtract", X, Y), X)),
    ("x / y / x", mk("Divide", mk("Divide", X, Y), X)),
    ("-x**3", mk("Minus", mk("Pow", X, params=(3,)))),           # ** binds tighter than unary minus
    ("-x**2", mk("Minus", mk("Square", X))),
    ("x**-1", mk("Pow", X, params=(-1,))),
    ("(x|y)", mk("Sum", mk("Mult", X, Y))),                      # scalar product, expanded
    ("(x|y) * s", mk("Mult", mk("Sum", mk("Mult", X, Y)), S)),
    ("+x", X),
    ("Exp(-SqDist(x, y)) * b", mk("Mult", mk("Exp", mk("Minus", mk("Sum", mk("Square", mk("Subtract", X, Y))))), B)),
    ("Elem(b, 1)", mk("Elem", B, params=(1,))),
    ("Pow(x, -2)", mk("Pow", X, params=(-2,))),
    ("x * 2.5", mk("Mult", X, mk("Const", params=(2.5,)))),
    ("x * Const(2)", mk("Mult", X, mk("Const", params=(2.0,)))),
    ("x * 3", mk("Mult", X, mk("IntCst", params=(3,)))),
])
def test_parse_builds_the_expected_tree(text, expected):
    assert parse(text, NAMES) is expected


def test_integer_power_is_pow_and_real_power_is_powf():
    assert parse("x**3", NAMES) is mk("Pow", X, params=(3,))
    assert parse("x**2", NAMES) is mk("Pow", X, params=(2,))          # Pow(x, 2), normalised to Square(x)
    assert parse("x**2", NAMES).op == "Square"
    assert parse("x**0.5", NAMES) is mk("Powf", X, mk("Const", params=(0.5,)))
    assert parse("x**y", NAMES) is mk("Powf", X, Y)


def test_inline_variables():
    assert parse("Vi(0, 3)", {}) is X
    assert parse("Vj(1, 3)", {}) is Y
    assert parse("Pm(3, 1)", {}) is S
    assert parse("Var(0, 3, 0)", {}) is X
    assert parse("Var(2, 2, 1) * Vi(0, 2)", {}).op == "Mult"
    with pytest.raises(FormulaError, match=r"Vi\(position, dimension\)"):
        parse("Vi(3)", {})


@pytest.mark.parametrize("text, index, name, node", [
    ("x = Vi(3)", 0, "x", var(0, 3, I)),
    ("y=Vj(2)", 4, "y", var(4, 2, J)),                # the position defaults to the alias's index
    (" p = Pm(5) ", 1, "p", var(1, 5, P)),
    ("y = Vj(7, 2)", 0, "y", var(7, 2, J)),           # explicit position
    ("w = Var(3, 4, 2)", 0, "w", var(3, 4, P)),
    ("v = Var(0, 1, 1)", 0, "v", var(0, 1, J)),
])
def test_alias_forms(text, index, name, node):
    assert parse_alias(text, index) == (name, node)


@pytest.mark.parametrize("text, message", [
    ("x Vi(3)", "expected 'name = Vi"),
    ("Exp = Vi(3)", "not an op"),
    ("1x = Vi(3)", "expected 'name = Vi"),
    ("x = Vk(3)", "must be Vi"),
    ("x = Vi(3, 4, 5)", "Vi takes"),
    ("x = Var(1, 2)", "Var takes"),
    ("x = Var(0, 2, 3)", "category 3"),
    ("x = Vi(0)", "dimension 0"),
    ("x = Vi(-1, 2)", "position -1"),
    ("x = Vi(2.5)", "integer"),
    ("x = Vi(n=3)", "keyword"),
    ("x = Vi(1000000000)", "outside"),
])
def test_bad_aliases_are_refused(text, message):
    with pytest.raises(FormulaError, match=message):
        parse_alias(text, 0)


def test_aliases_list():
    assert parse_aliases(["x = Vi(3)", "y = Vj(3)"]) == {"x": var(0, 3, I), "y": var(1, 3, J)}
    with pytest.raises(FormulaError, match="defined twice"):
        parse_aliases(["x = Vi(3)", "x = Vj(3)"])
    with pytest.raises(FormulaError, match="list of strings"):
        parse_aliases("x = Vi(3)")
    with pytest.raises(FormulaError, match="must be a string"):
        parse_aliases([3])


# Hash-consing and canonical text --------------------------------------------------------------------

def test_hash_consing_shares_equal_nodes():
    a = parse("Exp(-SqDist(x, y)) * b", NAMES)
    assert a is parse("Exp( - SqDist(x,y) )*b", NAMES)
    assert a is parse("Exp(-Sum(Square(x - y))) * b", NAMES)       # SqDist expands to the same primitives
    assert mk("Add", X, Y) is mk("Add", X, Y)
    assert mk("Add", X, Y) is not mk("Add", Y, X)
    # common sub-expressions are one object: Square(x - y) appears once in the walk
    shared = parse("Square(x - y) + Square(x - y) * x", NAMES)
    assert sum(n.op == "Square" for n in shared.postorder()) == 1
    with pytest.raises(AttributeError):
        a.op = "Add"


@pytest.mark.parametrize("text", [
    "Exp(-SqDist(x, y)) * b", "x**3 - y/x", "IfElse(x - y, Sin(x), Cos(y))", "Concat(b, s) * 2.5",
    "MatVecMult(Concat(x, y), Elem(x, 0)) + Concat(Atan2(x, y), y)", "Mod(x, s, Const(-0.5))", "Round(x, 2) + Pow(y, -3)",
    "WeightedSqDist(TensorProd(x, y), x, y)", "x * -1.5 + Const(-2)", "ClampInt(x, -1, 4) + Normalize(y)",
])
def test_to_text_round_trip(text):
    node = parse(text, NAMES)
    assert parse(to_text(node), {}) is node


# A small grammar of well-formed formulas over x, y (dim 3) and s (dim 1), for round-trip properties.
UNARY = ["Exp", "Sin", "Cos", "Abs", "Minus", "Square", "Atan", "Sign", "ReLU", "Normalize", "Floor"]
BINARY = ["+", "-", "*", "/"]
leaves = st.sampled_from(["x", "y", "s", "2", "0", "1", "0.5", "Const(-1.5)", "Vi(0,3)", "Sum(y)"])
formulas = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(lambda op, a: f"{op}({a})", st.sampled_from(UNARY), inner),
        st.builds(lambda a, op, b: f"({a} {op} {b})", inner, st.sampled_from(BINARY), inner),
        st.builds(lambda a: f"-{a}", inner),
        st.builds(lambda a, k: f"Pow({a}, {k})", inner, st.integers(-3, 4)),
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(formulas)
def test_random_formulas_round_trip(text):
    node = parse(text, NAMES)
    assert isinstance(node, Node)
    assert parse(to_text(node), {}) is node
    assert 1 <= node.dim <= 3


# Simplification rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("0*x", mk("Zero", params=(3,))),
    ("x*0", mk("Zero", params=(3,))),
    ("1*x", X),
    ("x*1", X),
    ("x/1", X),
    ("--x", X),
    ("-(-x)", X),
    ("x + 0", X),
    ("0 + x", X),
    ("x - 0", X),
    ("0 - x", mk("Minus", X)),
    ("(-x) * (-y)", mk("Mult", X, Y)),
    ("2*3 + x", mk("Add", mk("IntCst", params=(6,)), X)),
    ("(1 + 2) * x", mk("Mult", mk("IntCst", params=(3,)), X)),
    ("x * (2.5 * 2)", mk("Mult", X, mk("IntCst", params=(5,)))),
    ("x * (0.5 * 0.5)", mk("Mult", X, mk("Const", params=(0.25,)))),
    ("x * -(3)", mk("Mult", X, mk("IntCst", params=(-3,)))),
    ("Pow(x, 1)", X),
    ("Sum(s)", S),
    ("Extract(x, 0, 3)", X),
    ("Sum(Zero(3))", mk("Zero", params=(1,))),
])
def test_simplification_rules(text, expected):
    assert parse(text, NAMES) is expected


def test_simplification_never_changes_the_dimension():
    # 0 * x has the dimension of x (3), not of the scalar zero; s * 1 with s scalar stays scalar.
    assert parse("0*x", NAMES).dim == 3
    assert parse("Zero(1) * x", NAMES).dim == 3
    assert parse("x * Zero(1) + y", NAMES) is Y


# Errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, error, message", [
    ("x + b", DimensionError, r"Add: dimensions 3 and 2 differ in `x \+ b`"),
    ("Exp(x) * b", DimensionError, r"Mult: dimensions 3 and 2 differ in `Exp\(x\) \* b`"),
    ("SqDist(x, b)", DimensionError, r"SqDist: dimensions 3 and 2 differ in `SqDist\(x, b\)`"),
    ("Elem(x, 3)", DimensionError, r"Elem: index 3 out of range for dimension 3"),
    ("SumT(x, 2)", DimensionError, r"SumT: operand 1 must have dimension 1, not 3"),
    ("MatVecMult(x, b)", DimensionError, r"MatVecMult: matrix dimension 3 is not a multiple of vector dimension 2"),
    ("Extract(x, 2, 2)", DimensionError, r"Extract: slice \[2, 4\) out of range for dimension 3"),
    ("(x | b)", DimensionError, r"Scalprod: dimensions 3 and 2 differ"),
    ("Pow(x)", FormulaError, r"Pow: expects 1 operand\(s\) and 1 integer parameter\(s\), got 1"),
    ("Exp(x, y)", FormulaError, r"Exp: expects 1 operand\(s\), got 2"),
    ("Pow(x, 2.5)", FormulaError, r"expected an integer literal, got the literal 2.5"),
    ("Pow(x, y)", FormulaError, r"expected an integer literal, got Name"),
    ("x + 1e400", FormulaError, r"Const: value inf is not finite"),
])
def test_errors_name_the_op_and_the_text(text, error, message):
    with pytest.raises(error, match=message):
        parse(text, NAMES)


@pytest.mark.parametrize("text, column", [("x +* y", 4), ("Exp(x", 4), ("x + (y", 5), ("x y", 3)])
def test_syntax_errors_give_the_column(text, column):
    with pytest.raises(FormulaError, match="syntax error") as info:
        parse(text, NAMES)
    assert info.value.column == column
    assert f"(column {column})" in str(info.value)
    assert str(info.value).endswith(" " * (column - 1) + "^")      # the caret sits under the culprit


def test_errors_point_at_the_culprit():
    with pytest.raises(DimensionError) as info:
        parse("Exp(x) + Sin(x + b)", NAMES)
    assert info.value.column == len("Exp(x) + Sin(") + 1
    assert "`x + b`" in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("x + yy", r"unknown name 'yy'; did you mean 'y'\? \(aliases: b, s, x, y\)"),
    ("Exxp(x)", r"unknown op 'Exxp'; did you mean 'Exp'\?"),
    ("SqDst(x, y)", r"did you mean 'SqDist'"),
    ("frobnicate(x)", r"unknown op 'frobnicate'"),
    ("Sqdist", r"unknown name 'Sqdist'; did you mean 'SqDist'"),
])
def test_unknown_names_come_with_suggestions(text, message):
    with pytest.raises(FormulaError, match=message):
        parse(text, NAMES)


@pytest.mark.parametrize("text", ["", "   ", None, 3, b"x"])
def test_empty_or_non_text_formulas(text):
    with pytest.raises(FormulaError, match="empty|must be a string"):
        parse(text, NAMES)


# Hostile input ------------------------------------------------------------------------------------------

HOSTILE = [
    "__import__('os').system('touch PWNED')",
    "open('PWNED', 'w')",
    "exec(\"open('PWNED', 'w')\")",
    "eval(\"open('PWNED', 'w')\")",
    "compile('1', 'PWNED', 'exec')",
    "breakpoint()",
    "x.__class__",
    "x.__class__.__bases__[0].__subclasses__()",
    "Exp.__globals__",
    "getattr(x, 'op')",
    "(lambda: open('PWNED', 'w'))()",
    "lambda: x",
    "[open('PWNED', 'w') for _ in x]",
    "{k: x for k in y}",
    "(open('PWNED', 'w') for _ in x)",
    "f\"{open('PWNED', 'w')}\"",
    "f'{x}'",
    "x[0]",
    "x[0:2]",
    "Exp(x=1)",
    "Exp(**d)",
    "Exp(*d)",
    "Exp(x)(y)",
    "(x := y)",
    "x if y else b",
    "x < y",
    "x and y",
    "not x",
    "~x",
    "x @ y",
    "x % y",
    "x // y",
    "x << y",
    "[x, y]",
    "{x}",
    "(x, y)",
    "'PWNED'",
    "b'x'",
    "1j * x",
    "...",
    "None",
    "True * x",
    "await x",
    "yield x",
    "x\n+ y",
    "x; import os",
    "import os",
    "# comment",
    "x = y",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_is_refused_without_running_anything(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FormulaError):
        parse(text, NAMES)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text, message", [
    ("-" * 10000 + "x", "nests too deeply|nests deeper"),
    ("-" * 200 + "x", "nests deeper than 150"),
    ("Exp(" * 10000 + "x" + ")" * 10000, "characters long"),
    ("Exp(" * 1000 + "x" + ")" * 1000, "nests deeper than 150"),
    ("(" * 5000 + "x" + ")" * 5000, "nests deeper than 150"),
    ("(" * 19000 + "x", "nests deeper than 150"),
    ("x" + " + x" * 4000, "nests"),
    ("x" + "**x" * 5000, "nests"),
    ("9" * 5000, "numeric literal is 5000 characters long; the limit is 100"),
    ("9" * 4000 + " * x", "numeric literal is 4000 characters long"),
    ("9" * 40 + " * x", r"integer 99999999\.\.\.\(40 digits\) is outside"),
    ("Pow(x, " + "9" * 3000 + ")", "numeric literal is 3000 characters long"),
    ("Zero(1000000000)", "outside"),
    ("Vi(0, 1000000000)", "outside"),
    ("Zero(1048576)", "dimension 1048576 is outside 1..65536"),
    ("OneHot(s, 1048576)", "outside 1..65536"),
    ("SumT(s, 1000000)", "outside 1..65536"),
    ("TensorProd(" * 12 + "x" + ", x)" * 12, "TensorProd: dimension .* is outside 1..65536"),
    ("x" * 30000, "the limit is 20000"),
])
def test_oversized_input_is_refused(text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FormulaError, match=message):
        parse(text, NAMES)
    assert os.listdir(tmp_path) == []


def test_huge_alias_dimensions_are_refused():
    with pytest.raises(FormulaError, match="outside"):
        parse_aliases(["x = Vi(1000000000)"])
    with pytest.raises(DimensionError, match="dimension 100000 is outside"):
        parse_aliases(["x = Vi(100000)"])


# Property tests: whatever the text, only KredError subclasses come out.
TOKENS = ["x", "y", "b", "s", "(", ")", ",", "+", "-", "*", "/", "**", "|", " ", "0", "1", "2.5", "1e400", "9" * 30,
          "Exp", "Sum", "Pow", "SqDist", "Elem", "Vi", "Vj", "Var", "Pm", "Zero", "TensorProd", "IfElse", "Concat",
          "=", ".", "[", "]", "{", "}", "'", '"', ":", "lambda", "__import__", "\n", "\\", "#", "@", "%", "~", "!"]
messy_text = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(TOKENS), max_size=40).map("".join),
    formulas.map(lambda f: f[:-1]),                            # a well-formed formula, truncated
    st.tuples(formulas, st.sampled_from(TOKENS), formulas).map("".join),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messy_text)
def test_any_text_gives_a_node_or_a_kred_error(text):
    try:
        node = parse(text, NAMES)
    except KredError:
        return
    assert isinstance(node, Node) and 1 <= node.dim <= 65536


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.lists(st.sampled_from(TOKENS), max_size=12).map("".join),
                          st.builds(lambda n, k, a: f"{n} = {k}({a})", st.sampled_from(["x", "y", "Exp", "1"]),
                                    st.sampled_from(["Vi", "Vj", "Pm", "Var", "Exp"]),
                                    st.sampled_from(["3", "0, 2", "1, 2, 1", "-1", "x", "2.5", "10**9"]))),
                max_size=4))
def test_any_aliases_give_variables_or_a_kred_error(aliases):
    try:
        names = parse_aliases(aliases)
    except KredError:
        return
    assert all(node.op == "Var" for node in names.values())


def test_long_flat_sums_are_not_nesting():
    # 1000 terms: a left-leaning chain is walked as a loop and is not counted as depth (unlike 150 parentheses)
    names = parse_aliases(["x = Vi(1)", "y = Vj(1)"])
    text = " + ".join("x*y" if k % 2 else "y" for k in range(1000))
    f = parse(text, names)
    x, y = np.array([[0.5], [2.0]]), np.array([[3.0], [-1.0], [0.25]])
    values = evaluate(f, [x, y], (0, 2), (0, 3), np.dtype(np.float64))[..., 0]
    np.testing.assert_allclose(values, 500 * x * y.T + 500 * y.T, rtol=1e-12)


# pykeops's spellings (issue 21 part 5) --------------------------------------------------------------------------

def test_list_literals_are_integer_list_parameters():
    """`Kron(x, y, [2, 3, 2], [2, 2, 3])` as pykeops writes it: the same node as with Ind(...), values vs numpy.kron."""
    from kred.engine.formula import parse_aliases as aliases_of
    names = aliases_of(["x = Vi(12)", "y = Vj(12)"])
    listed = parse("Kron(x, y, [2, 3, 2], [2, 2, 3])", names)
    assert listed is parse("Kron(x, y, Ind(2, 3, 2), Ind(2, 2, 3))", names)
    from kred.numpy import Genred
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 12)), rng.standard_normal((2, 12))
    got = Genred("Kron(x, y, [2, 3, 2], [2, 2, 3])", ["x = Vi(12)", "y = Vj(12)"], axis=1)(x, y, backend="reference")
    want = np.stack([sum(np.kron(x[i].reshape(2, 3, 2), y[j].reshape(2, 2, 3)).reshape(-1) for j in range(2))
                     for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    with pytest.raises(FormulaError, match="integer literal"):
        parse("Kron(x, y, [2, 3.5, 2], [2, 2, 3])", names)
    with pytest.raises(FormulaError, match="a list"):
        parse("x + [1, 2]", names)


def test_inline_variables_count_as_arguments():
    """pykeops counts every Var written in the text as an argument, even one differentiation removes:
    Grad(Grad(x + Var(1,3,1), x, Var(2,3,0)), x, Var(3,3,0)) is 0 but takes 4 arrays (x and the three Vars)."""
    from kred.numpy import Genred
    op = Genred("Grad(Grad(x + Var(1,3,1), x, Var(2,3,0)), x, Var(3,3,0))", ["x=Vi(0,3)"], axis=1)
    assert [(a.name, a.dim, a.cat) for a in op.plan.args] == [("x", 3, 0), ("Var(1)", 3, 1), ("Var(2)", 3, 0),
                                                               ("Var(3)", 3, 0)]
    rng = np.random.default_rng(1)
    x, y, e, u = rng.standard_normal((5, 3)), rng.standard_normal((4, 3)), rng.standard_normal((5, 3)), \
        rng.standard_normal((5, 3))
    np.testing.assert_array_equal(op(x, y, e, u, backend="reference"), np.zeros((5, 3)))
    with pytest.raises(ArgumentError, match="expected 4 arrays"):
        op(x, backend="reference")
    # an inline Var that contradicts an alias at the same position, or another inline Var, is refused
    with pytest.raises(FormulaError, match="argument 0 is used as Var\\(0,2,0\\) but declared as x = Var\\(0,3,0\\)"):
        Genred("Sum(x) + Sum(Var(0,2,0))", ["x=Vi(0,3)"], axis=1)
    with pytest.raises(FormulaError, match="argument 1 is written both"):
        Genred("Sum(Var(1,3,1)) + Sum(Var(1,2,1))", ["x=Vi(0,3)"], axis=1)
