"""Formula text -> nodes, by walking Python's `ast` against the op table.

`ast.parse` only builds a syntax tree; nothing is ever evaluated. The walker accepts a small whitelist (names bound
to variables, calls of ops by name, numeric literals, `+ - * / **`, unary minus, `(x|y)`) and refuses everything else
with a FormulaError that carries the column.
"""
from __future__ import annotations

import ast
import difflib
import functools
import re
import unicodedata
from typing import Mapping

from ..errors import FormulaError
from .build import make
from .nodes import Node, bounded, to_text
from .ops import DERIVATIVES, EXPANSIONS, MAX_INT_PARAM, OPS, ROWS, Registered

MAX_TEXT = 20_000      # characters in one formula
MAX_DEPTH = 150        # nesting of the syntax tree (Python's own parser stops near 200 parentheses)
MAX_LITERAL = 100      # characters in one numeric literal (Python refuses integers past 4300 digits, in its own words)
_LITERAL = re.compile(r"(?<![\w.])\.?\d[\w.]*")    # a number token: digits, not part of a name

_CATEGORIES = {"Vi": 0, "Vj": 1, "Pm": 2}
_BINARY = {ast.Add: "Add", ast.Sub: "Subtract", ast.Mult: "Mult", ast.Div: "Divide", ast.BitOr: "Scalprod"}
# Forms handled by the walker itself rather than a row of the op table.
_SPECIAL = {"Var", "Vi", "Vj", "Pm", "Grad", "Diff", "Laplacian", "Divergence"}


@bounded
def parse(text: str, names: Mapping[str, Node], inline: dict[str, Node] | None = None) -> Node:
    """Parse user formula text; `names` binds alias names to variable nodes. With `inline`, the variables written
    in the text itself (`Var(1, 3, 1)`, `Vj(2, 3)`) are added to it as `Var(pos)`: pykeops counts them as
    arguments even where differentiation or simplification leaves them out of the result."""
    text = _checked_text(text)
    names = _canonical_names(names)
    return _Walker(text, names, {}, inline).node(_syntax(text).body, 0)


def parse_request(formula: str, formula2: str | None, aliases) -> tuple[Node, Node | None, dict[str, Node]]:
    """A request's formulas and its arguments: the aliases, then the inline variables of both texts (checked against
    the aliases: one position, one variable)."""
    names = parse_aliases(aliases)
    inline: dict[str, Node] = {}
    f = parse(formula, names, inline)
    f2 = parse(formula2, names, inline) if formula2 is not None else None
    declared = {node.params[0]: (name, node) for name, node in names.items()}
    for node in inline.values():
        pos = node.params[0]
        if pos in declared and declared[pos][1] is not node:
            alias, other = declared[pos]
            raise FormulaError(f"argument {pos} is used as {to_text(node)} but declared as {alias} = {to_text(other)}")
    arguments = dict(names)
    arguments.update((name, node) for name, node in inline.items() if node.params[0] not in declared)
    return f, f2, arguments


def _var_text(node: Node) -> str:
    return "Var({}, {}, {})".format(*node.params)


@bounded
def instantiate(template: str, names: Mapping[str, Node], fields: Mapping[str, int] | None = None) -> Node:
    """Build a formula from one of the engine's own templates (op-table expansions and gradient rules)."""
    text = template.format(**fields) if fields else template
    return _Walker(text, names, {}).node(_cached_syntax(text.strip()).body, 0)


def parse_template(template: str, arity: int, context: str, with_grad: bool = False) -> None:
    """Check an op-table template's syntax and op names (dims are checked where it is used)."""
    text = re.sub(r"\{[a-z]+\d*\}", "1", template)
    allowed = set("xyz"[:arity]) | ({"g", "out"} if with_grad else set())
    for node in ast.walk(_syntax(text.strip())):
        if isinstance(node, ast.Name) and node.id not in allowed and node.id not in OPS:
            raise AssertionError(f"{context}: template {template!r} uses unknown name {node.id!r}")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in OPS):
            raise AssertionError(f"{context}: template {template!r} calls something that is not an op")


def parse_alias(text: str, index: int) -> tuple[str, Node]:
    """`x = Vi(3)`, `Vj(dim)`, `Pm(dim)`, `Vi(pos, dim)`, `Var(pos, dim, cat)`; position defaults to `index`."""
    if not isinstance(text, str):
        raise FormulaError(f"alias {index} must be a string like 'x = Vi(3)', got {type(text).__name__}")
    name, sep, rhs = text.partition("=")
    name = canonical_name(name.strip())
    if not sep or not name.isidentifier() or name in OPS or name in _SPECIAL:
        raise FormulaError(f"alias {text!r}: expected 'name = Vi(dim)', 'name = Vj(pos, dim)' or "
                           f"'name = Var(pos, dim, cat)' with a name that is not an op")
    rhs = _checked_text(rhs)
    call = _syntax(rhs).body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in ("Vi", "Vj", "Pm", "Var")):
        raise FormulaError(f"alias {text!r}: the right-hand side must be Vi(...), Vj(...), Pm(...) or Var(...)")
    walker = _Walker(rhs, {}, {})
    ints = [walker.integer(a) for a in call.args]
    if call.keywords:
        raise FormulaError(f"alias {text!r}: keyword arguments are not allowed")
    kind = call.func.id
    if kind == "Var":
        if len(ints) != 3:
            raise FormulaError(f"alias {text!r}: Var takes (position, dimension, category)")
        pos, dim, cat = ints
    else:
        if len(ints) not in (1, 2):
            raise FormulaError(f"alias {text!r}: {kind} takes (dimension) or (position, dimension)")
        pos, dim = (index, ints[0]) if len(ints) == 1 else ints
        cat = _CATEGORIES[kind]
    try:
        return name, make("Var", (), (pos, dim, cat))
    except FormulaError as e:
        raise type(e)(f"alias {text!r}: {e}") from None


def parse_aliases(aliases) -> dict[str, Node]:
    if isinstance(aliases, str):
        raise FormulaError("aliases must be a list of strings such as ['x = Vi(3)', 'y = Vj(3)']")
    names: dict[str, Node] = {}
    written: dict[str, str] = {}
    for index, text in enumerate(aliases):
        name, node = parse_alias(text, index)
        if name in names:
            spelled = text.partition("=")[0].strip()
            if spelled != written[name]:
                raise FormulaError(f"aliases {written[name]!r} and {spelled!r} are the same name {name!r} once "
                                   "normalised (NFKC, as Python identifiers are): rename one of them")
            raise FormulaError(f"alias {name!r} is defined twice")
        names[name], written[name] = node, text.partition("=")[0].strip()
    return names


def canonical_name(name: str) -> str:
    """A name as the parser sees it in formula text: NFKC-normalised, as Python identifiers are (`ſ` is `s`)."""
    return unicodedata.normalize("NFKC", name)


def _canonical_names(names: Mapping[str, Node]) -> Mapping[str, Node]:
    if all(name.isascii() for name in names):
        return names
    canonical: dict[str, Node] = {}
    for name, node in names.items():
        key = canonical_name(name)
        if key in canonical and canonical[key] is not node:
            raise FormulaError(f"two names are {key!r} once normalised (NFKC, as Python identifiers are)")
        canonical[key] = node
    return canonical


# Syntax -----------------------------------------------------------------------------------------------

def _checked_text(text) -> str:
    if not isinstance(text, str):
        raise FormulaError(f"a formula must be a string, got {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise FormulaError(f"formula is {len(text)} characters long; the limit is {MAX_TEXT}")
    text = text.strip()
    if not text:
        raise FormulaError("formula is empty")
    return text


def _syntax(text: str) -> ast.Expression:
    """User text: checked before Python's parser sees it, and not cached (a cache of user texts is memory a client
    could fill)."""
    _check_nesting(text)
    _check_literals(text)
    return _parsed(text)


@functools.lru_cache(maxsize=4096)
def _cached_syntax(text: str) -> ast.Expression:
    """The engine's own templates (a few hundred short texts)."""
    return _parsed(text)


def _parsed(text: str) -> ast.Expression:
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        col = e.offset if e.lineno in (None, 1) else None
        raise FormulaError(f"syntax error: {e.msg}", text, col) from None
    except (RecursionError, MemoryError) as e:      # Python's parser gives up on very deep or long chains
        raise FormulaError(f"formula nests too deeply to be parsed ({type(e).__name__}); "
                           f"the limit is about {MAX_DEPTH} levels") from None
    except (ValueError, OverflowError) as e:
        raise FormulaError(f"formula cannot be parsed: {type(e).__name__}") from None
    _check_depth(tree, text)
    return tree


def _check_nesting(text: str) -> None:
    depth = 0
    for col, ch in enumerate(text, 1):
        if ch in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                raise FormulaError(f"formula nests deeper than {MAX_DEPTH} levels", text, col)
        elif ch in ")]}":
            depth -= 1


def _check_literals(text: str) -> None:
    for match in _LITERAL.finditer(text):
        if len(match.group()) > MAX_LITERAL:
            raise FormulaError(f"a numeric literal is {len(match.group())} characters long; the limit is {MAX_LITERAL}",
                               text[:match.start() + 20] + "...", match.start() + 1)


def _check_depth(tree: ast.AST, text: str) -> None:
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FormulaError(f"formula nests deeper than {MAX_DEPTH} levels", text, getattr(node, "col_offset", 0) + 1)
        for child in ast.iter_child_nodes(node):
            # the left operand of a chain `a + b - c ...` stays at its parent's depth: long sums are not nesting
            flat = child is getattr(node, "left", None) and _chained(node) and _chained(child)
            stack.append((child, depth if flat else depth + 1))


def _chained(node: ast.AST) -> bool:
    return isinstance(node, ast.BinOp) and type(node.op) in _BINARY


# Walker -----------------------------------------------------------------------------------------------

class _Walker:
    def __init__(self, text: str, names: Mapping[str, Node], fields: dict, inline: dict | None = None):
        self.text, self.names, self.inline = text, names, inline

    def fail(self, message: str, node: ast.AST, error=FormulaError):
        col = getattr(node, "col_offset", None)
        raise error(message, self.text, None if col is None else col + 1)

    def segment(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or self.text

    def build(self, op: str, children: tuple, params: tuple, node: ast.AST) -> Node:
        try:
            return make(op, children, params)
        except FormulaError as e:
            message = str(e).split("\n")[0]
            self.fail(f"{message} in `{self.segment(node)}`", node, type(e))

    def node(self, node: ast.AST, depth: int) -> Node:
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.Constant):
            return self.literal(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = self.node(node.operand, depth + 1)
            return operand if isinstance(node.op, ast.UAdd) else self.build("Minus", (operand,), (), node)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            return self.power(node, depth)
        if _chained(node):
            return self.chain(node, depth)
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        self.fail(f"{_describe(node)} is not allowed in a formula", node)

    def chain(self, node: ast.BinOp, depth: int) -> Node:
        """A left-leaning chain `a + b - c * d ...` is walked as a loop, so a long sum costs no recursion."""
        spine = []
        while _chained(node):
            spine.append(node)
            node = node.left
        value = self.node(node, depth + 1)
        for link in reversed(spine):
            value = self.build(_BINARY[type(link.op)], (value, self.node(link.right, depth + 1)), (), link)
        return value

    def name(self, node: ast.Name) -> Node:
        if node.id in self.names:
            return self.names[node.id]
        candidates = list(self.names) + list(OPS)
        close = difflib.get_close_matches(node.id, candidates, n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        known = ", ".join(sorted(self.names)) or "none"
        self.fail(f"unknown name {node.id!r}{hint} (aliases: {known})", node)

    def literal(self, node: ast.Constant) -> Node:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"literal {value!r} is not a number", node)
        if isinstance(value, int):
            if abs(value) > MAX_INT_PARAM:
                self.fail(f"integer {_short(value)} is outside ±{MAX_INT_PARAM}; write it as a float", node)
            return self.build("IntCst", (), (value,), node)
        return self.build("Const", (), (value,), node)

    def integer(self, node: ast.AST) -> int:
        """An integer parameter: a literal, possibly negated."""
        sign = 1
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            sign, node = -1, node.operand
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            if abs(node.value) > MAX_INT_PARAM:
                self.fail(f"integer {_short(node.value)} is outside ±{MAX_INT_PARAM}", node)
            return sign * node.value
        self.fail(f"expected an integer literal, got {_describe(node)}", node)

    def power(self, node: ast.BinOp, depth: int) -> Node:
        base = self.node(node.left, depth + 1)
        exponent = node.right
        negative = isinstance(exponent, ast.UnaryOp) and isinstance(exponent.op, ast.USub)
        literal = exponent.operand if negative else exponent
        if isinstance(literal, ast.Constant) and isinstance(literal.value, int) and not isinstance(literal.value, bool):
            return self.build("Pow", (base,), (self.integer(exponent),), node)
        return self.build("Powf", (base, self.node(exponent, depth + 1)), (), node)

    def call(self, node: ast.Call, depth: int) -> Node:
        if not isinstance(node.func, ast.Name):
            self.fail(f"only ops can be called, not {_describe(node.func)}", node)
        name = node.func.id
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            self.fail(f"{name}: keyword or starred arguments are not allowed", node)
        if name in ("Var", "Vi", "Vj", "Pm"):
            return self.inline_variable(name, node)
        if name in DERIVATIVES:                # registered by autodiff
            return self.derivative(name, node, depth)
        row = OPS.get(name)
        if row is None or row.name == "Var":
            close = difflib.get_close_matches(name, list(OPS), n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            self.fail(f"unknown op {name!r}{hint}", node.func)
        if name == "Const":     # one literal, possibly negated: to_text writes Const(-1.5)
            arg = node.args[0] if len(node.args) == 1 else None
            negative = isinstance(arg, ast.UnaryOp) and isinstance(arg.op, ast.USub)
            literal = arg.operand if negative else arg
            if not isinstance(literal, ast.Constant):
                self.fail("Const takes one numeric literal", node)
            if isinstance(literal.value, float):
                return self.build("Const", (), (-literal.value if negative else literal.value,), node)
            return self.build("Const", (), (float(self.integer(arg)),), node)
        expected = row.arity + len(row.params)
        if not expected - len(row.defaults) <= len(node.args) <= expected:
            params = f" and {len(row.params)} integer parameter(s)" if row.params else ""
            self.fail(f"{name}: expects {row.arity} operand(s){params}, got {len(node.args)} argument(s) "
                      f"in `{self.segment(node)}`", node)
        children = tuple(self.node(a, depth + 1) for a in node.args[:row.arity])
        params = tuple(self.parameter(a) for a in node.args[row.arity:])
        params += row.defaults[len(row.defaults) - (expected - len(node.args)):] if len(node.args) < expected else ()
        return self.build(name, children, params, node)

    def parameter(self, node: ast.AST):
        """An integer parameter, or a list of them written `Ind(2, 3)` (as KeOps writes TensorDot's shapes) or as a
        list literal `[2, 3]` (as pykeops's Python layer accepts them): read from the syntax tree, never evaluated."""
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Ind":
            if node.keywords:
                self.fail("Ind: keyword arguments are not allowed", node)
            return tuple(self.integer(a) for a in node.args)
        if isinstance(node, ast.List):
            return tuple(self.integer(a) for a in node.elts)
        return self.integer(node)

    def inline_variable(self, name: str, node: ast.Call) -> Node:
        ints = [self.integer(a) for a in node.args]
        if name == "Var" and len(ints) == 3:
            params = tuple(ints)
        elif name != "Var" and len(ints) == 2:
            params = (ints[0], ints[1], _CATEGORIES[name])
        else:
            form = "Var(position, dimension, category)" if name == "Var" else f"{name}(position, dimension)"
            self.fail(f"inside a formula a variable is written {form}", node)
        variable = self.build("Var", (), params, node)
        if self.inline is not None:
            name = f"Var({params[0]})"
            known = self.inline.setdefault(name, variable)
            if known is not variable:
                self.fail(f"argument {params[0]} is written both {_var_text(known)} and {_var_text(variable)}", node)
        return variable

    def derivative(self, name: str, node: ast.Call, depth: int) -> Node:
        args = [self.node(a, depth + 1) for a in node.args]
        try:
            return DERIVATIVES[name](args)
        except FormulaError as e:
            self.fail(f"{str(e).splitlines()[0]} in `{self.segment(node)}`", node, type(e))


def _short(value: int) -> str:
    """An integer for an error message: a 4000-digit literal is shown by its length."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:8]}...({len(text)} digits)"


def _describe(node: ast.AST) -> str:
    kinds = {
        ast.Attribute: "attribute access", ast.Subscript: "subscripting", ast.Lambda: "a lambda",
        ast.ListComp: "a comprehension", ast.GeneratorExp: "a comprehension", ast.SetComp: "a comprehension",
        ast.DictComp: "a comprehension", ast.JoinedStr: "an f-string", ast.Compare: "a comparison",
        ast.BoolOp: "a boolean operator", ast.IfExp: "a conditional expression", ast.List: "a list",
        ast.Tuple: "a tuple", ast.Dict: "a dict", ast.Set: "a set", ast.NamedExpr: "an assignment",
        ast.Await: "await", ast.Starred: "a starred expression", ast.Slice: "a slice",
    }
    if isinstance(node, ast.Constant):
        text = repr(node.value)
        return f"the literal {text if len(text) <= 24 else text[:20] + '...'}"
    if isinstance(node, ast.BinOp):
        return f"the operator {type(node.op).__name__}"
    if isinstance(node, ast.UnaryOp):
        return f"the unary operator {type(node.op).__name__}"
    return kinds.get(type(node), type(node).__name__)


# The op table's text templates (`expand` given as formula text) are read by this parser: registered in the table's
# EXPANSIONS here, so that building a node (`make`) expands them without importing the parser.

def _template_expansion(template: str):
    def expand(children, params, make):
        return instantiate(template, dict(zip("xyz", children)), {f"p{k}": p for k, p in enumerate(params)})
    return expand


EXPANSIONS.update({row.name: _template_expansion(row.expand) for row in ROWS if isinstance(row.expand, str)})


def validate_table() -> None:
    """Check every row of the op table once, when the formula package loads: names unique, arities consistent,
    grad/expand formulas parse, every registered expansion registered."""
    if len(OPS) != len(ROWS):
        raise AssertionError("op table: duplicate op names")
    for row in ROWS:
        if row.leaf:
            continue
        if (row.numpy is None) == (row.expand is None):
            raise AssertionError(f"op table: {row.name} needs exactly one of numpy or expand")
        if row.broadcast and row.c is None:
            raise AssertionError(f"op table: elementwise {row.name} has no C template")
        if isinstance(row.expand, str):
            parse_template(row.expand, arity=row.arity, context=f"{row.name}.expand")
        if isinstance(row.expand, Registered) and row.expand.name not in EXPANSIONS:
            raise AssertionError(f"op table: {row.name}'s expansion is not registered")
        if isinstance(row.grad, tuple):
            if len(row.grad) != row.arity:
                raise AssertionError(f"op table: {row.name} has {len(row.grad)} gradient rules for {row.arity} operands")
            for rule in row.grad:
                if rule is not None:
                    parse_template(rule, arity=row.arity, context=f"{row.name}.grad", with_grad=True)
