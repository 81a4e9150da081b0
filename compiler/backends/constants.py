"""Numeric constants as every code printer needs them: a float64 value for each, or a clear
refusal. Shared by the NumPy and C printers (siblings: neither imports the other).
"""
from __future__ import annotations

import functools

import sympy as sp

from compiler.core.functions import float64_problem, float64_value, show_constant
from compiler.errors import UnsupportedError


@functools.lru_cache(maxsize=1 << 15)
def numeric_constants_to_floats(expr):
    """Replace irrational numeric subexpressions (pi, sqrt(2), ...) by Float values.

    Every constant must have a float64 value: one beyond its range (a derivative or a fusion
    can multiply two large constants of a valid model) raises UnsupportedError, where printing
    it would give ``inf`` (a NameError in Python, an infinite loss in C) or a silent 0.
    """
    if isinstance(expr, (sp.Integer, sp.Rational, sp.Float)):
        if float64_value(expr) is None:
            raise UnsupportedError(f"the constant {show_constant(expr)} {float64_problem(expr)}")
        if isinstance(expr, sp.Rational) and not isinstance(expr, sp.Integer) \
                and (float64_value(sp.Integer(expr.p)) is None or float64_value(sp.Integer(expr.q)) is None):
            return sp.Float(expr, 17)   # a tiny fraction: its numerator or denominator alone overflows
        return expr
    if expr.is_number:
        value = expr.evalf(17)
        if not value.is_real:
            raise UnsupportedError(f"the constant {expr} is not a real number")
        if value.is_infinite or value == sp.nan or float64_value(value) is None:
            raise UnsupportedError(f"the constant {show_constant(expr)} {float64_problem(value)}")
        return sp.Float(value, 17)
    if not expr.args:
        return expr
    return expr.func(*[numeric_constants_to_floats.__wrapped__(a) for a in expr.args])
