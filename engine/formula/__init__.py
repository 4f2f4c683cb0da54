"""Layer 1: the formula language (nodes, op table, parser, simplification, autodiff)."""
from .build import make
from .nodes import CATEGORY_NAMES, I, J, P, Node, fingerprint, node_budget, to_text, var
from .ops import OPS, validate_table
from .parse import instantiate, parse, parse_alias, parse_aliases, parse_request

validate_table()

__all__ = ["CATEGORY_NAMES", "I", "J", "OPS", "P", "Node", "fingerprint", "instantiate", "make", "node_budget",
           "parse", "parse_alias", "parse_aliases", "parse_request", "to_text", "var"]
