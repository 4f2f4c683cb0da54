"""Symbolic differentiation: gradients are formulas built from the op table's gradient rules."""
from __future__ import annotations

from ..errors import FormulaError


def derivative_op(name: str, args: list):
    raise FormulaError(f"{name} is not available yet")
