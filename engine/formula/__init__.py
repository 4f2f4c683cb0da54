"""Layer 1: the formula language (nodes, op table, parser, simplification, autodiff).

The op table (ops.py) is a data leaf; its readers register what they own into it when this package loads: the
parser its text templates and the table's validation, autodiff the derivative ops (and the parser's Grad, Diff,
Divergence, Laplacian keywords).
"""
from .build import make
from .nodes import CATEGORY_NAMES, I, J, P, Node, fingerprint, node_budget, to_text, var
from .ops import OPS
from .parse import instantiate, parse, parse_alias, parse_aliases, validate_table
from . import autodiff  # noqa: F401  (registers the derivative ops in the op table)

validate_table()

__all__ = ["CATEGORY_NAMES", "I", "J", "OPS", "P", "Node", "fingerprint", "instantiate", "make", "node_budget",
           "parse", "parse_alias", "parse_aliases", "to_text", "var"]
