"""Scalar functions for elementwise nodes: rewrites into the stable primitives, activations,
the check that generated code supports an expression.

The functions themselves (``sigmoid``, ``softplus``, ``relu``, ``step`` and SymPy's) and
everything known about each are the records of ``scalar_functions.SCALAR_FUNCTIONS``.
``stabilize`` rewrites what users write by hand (``log(1 + exp(u))``, ``1/(1 + exp(-u))``,
``Max(0, u)``, ``Heaviside(u)``, ``log(sigmoid(u))``) into those primitives.
"""
from __future__ import annotations

import math

import sympy as sp

from compiler.core import scalar_functions
from compiler.core.scalar_functions import relu, sigmoid, softplus
from compiler.errors import ModelError, UnsupportedError


def _is_one_plus_exp(e):
    """If ``e`` is 1 + exp(u), return u."""
    if isinstance(e, sp.Add) and len(e.args) == 2:
        a, b = e.args
        if a == 1 and isinstance(b, sp.exp):
            return b.args[0]
        if b == 1 and isinstance(a, sp.exp):
            return a.args[0]
    return None


def stabilize(expr):
    """Rewrite hand-written unstable forms into the stable primitives (bottom-up)."""
    if not isinstance(expr, sp.Basic) or not expr.args:
        return expr
    args = [stabilize(a) for a in expr.args]
    expr = expr.func(*args) if args != list(expr.args) else expr
    if isinstance(expr, sp.log) and isinstance(expr.args[0], sp.cosh):
        # log(cosh(u)) = |u| + log(1 + exp(-2|u|)) - log(2): cosh overflows at |u| ~ 710
        u = expr.args[0].args[0]
        return sp.Abs(u) + softplus(-2 * sp.Abs(u)) - sp.log(2)
    if isinstance(expr, sp.log):
        u = _is_one_plus_exp(expr.args[0])
        if u is not None:
            return softplus(u)
        inner = expr.args[0]
        if isinstance(inner, sigmoid):
            return -softplus(-inner.args[0])
        if isinstance(inner, sp.Add) and len(inner.args) == 2 and 1 in inner.args:
            other = inner.args[0] if inner.args[1] == 1 else inner.args[1]
            if isinstance(other, sp.Mul) and other.args[0] == -1 and len(other.args) == 2 and isinstance(other.args[1], sigmoid):
                return -softplus(other.args[1].args[0])  # log(1 - sigmoid(u))
    if isinstance(expr, sp.Pow) and expr.exp == -1:
        u = _is_one_plus_exp(expr.base)
        if u is not None:
            return sigmoid(-u)
    if isinstance(expr, sp.Mul):
        factors = list(expr.args)
        # sinh(u)/cosh(u) -> tanh(u), finite where both overflow
        for i, f in enumerate(factors):
            if isinstance(f, sp.sinh):
                for j, g in enumerate(factors):
                    if isinstance(g, sp.Pow) and g.exp == -1 and isinstance(g.base, sp.cosh) \
                            and g.base.args[0] == f.args[0]:
                        rest = [h for k, h in enumerate(factors) if k not in (i, j)]
                        return stabilize(sp.Mul(*rest) * sp.tanh(f.args[0]))
        # exp(u)/(1 + exp(u)) arrives here as exp(u) * sigmoid(-u)  ->  sigmoid(u)
        for i, f in enumerate(factors):
            if isinstance(f, sigmoid):
                for j, g in enumerate(factors):
                    if j != i and isinstance(g, sp.exp) and sp.expand(g.args[0] + f.args[0]) == 0:
                        rest = [h for k, h in enumerate(factors) if k not in (i, j)]
                        return sp.Mul(*rest) * sigmoid(g.args[0])
    if isinstance(expr, sp.Max) and len(expr.args) == 2 and 0 in expr.args:
        other = expr.args[0] if expr.args[1] == 0 else expr.args[1]
        return relu(other)
    if isinstance(expr, sp.Min) and len(expr.args) == 2 and 0 in expr.args:
        other = expr.args[0] if expr.args[1] == 0 else expr.args[1]
        return -relu(-other)
    f = scalar_functions.lookup(expr)
    if f is not None and f.stable is not None:
        return f.stable.xreplace({scalar_functions.X: expr.args[0]})   # Heaviside(u) -> step(u)
    return expr


_x = scalar_functions.X   # the argument of every activation expression

GELU_C = sp.sqrt(2 / sp.pi)

# name -> expression of _x; and whether He (relu-like) or Glorot initialisation suits it: the
# scalar functions marked as activations in the table, under their names, and compositions
ACTIVATIONS = {
    "identity": (_x, "glorot"),
    "linear": (_x, "glorot"),
    **{f.name: (f.sympy(_x), f.activation) for f in scalar_functions.SCALAR_FUNCTIONS if f.activation},
    "leaky_relu": (relu(_x) - sp.Rational(1, 100) * relu(-_x), "he"),
    "swish": (_x * sigmoid(_x), "he"),
    "silu": (_x * sigmoid(_x), "he"),
    # the constant as published (a Float: it prints as 0.044715, not 8943/200000)
    "gelu": (_x / 2 * (1 + sp.tanh(GELU_C * (_x + sp.Float("0.044715") * _x**3))), "he"),
    "mish": (_x * sp.tanh(softplus(_x)), "he"),
}


def activation(spec):
    """Return (expression of one symbol ``x``, init scheme) for a name or a SymPy expression.

    ``spec`` is a built-in name, or a SymPy expression / Lambda of a single symbol.
    """
    if isinstance(spec, str):
        try:
            expr, init = ACTIVATIONS[spec]
        except KeyError:
            raise ModelError(
                f"unknown activation {spec!r}; built-ins are: {', '.join(sorted(ACTIVATIONS))}, "
                "or give a SymPy expression of one symbol") from None
        return expr, init
    if isinstance(spec, sp.Lambda):
        if len(spec.variables) != 1:
            raise ModelError(f"an activation takes one argument, {spec} takes {len(spec.variables)}")
        expr = spec.expr.xreplace({spec.variables[0]: _x})
    elif isinstance(spec, sp.Basic):
        free = sorted(spec.free_symbols, key=str)
        if len(free) > 1:
            raise ModelError(f"activation {spec} must be a function of one symbol, it has {', '.join(map(str, free))}")
        expr = spec.xreplace({free[0]: _x}) if free else spec
    else:
        raise ModelError(f"activation must be a name or a SymPy expression, got {type(spec).__name__}")
    expr = stabilize(realify(expr))
    check_supported(expr, "activation")
    for builtin, scheme in ACTIVATIONS.values():
        if expr == builtin:
            return expr, scheme          # log(1 + exp(x)) is initialised like "softplus"
    return expr, ("he" if expr.has(relu) else "glorot")


def realify(expr):
    """Replace every symbol by a real one of the same name (so that diff(Abs) is sign)."""
    return expr.xreplace({s: sp.Symbol(s.name, real=True) for s in expr.free_symbols if not s.is_real})


_SUPPORTED = (sp.Add, sp.Mul, sp.Pow, sp.Symbol, sp.Number, sp.NumberSymbol, *scalar_functions.PRINTED)


def check_supported(expr, where):
    for sub in sp.preorder_traversal(expr):
        if isinstance(sub, sp.Basic) and not isinstance(sub, _SUPPORTED) and not sub.is_number:
            raise UnsupportedError(f"{where}: {type(sub).__name__} ({sub}) is not supported in generated code")
    check_finite(expr, where)


def float64_value(number):
    """The float64 value of a SymPy number, or None when it has none: it overflows to inf, is
    nan or infinite, is not real, or is nonzero but rounds to 0 (below 4.9e-324)."""
    try:
        value = float(number)
    except (OverflowError, TypeError, ValueError):
        return None
    if not math.isfinite(value) or (value == 0 and not number.is_zero):
        return None
    return value


def show_constant(e):
    """``exp(1400) (about 1.09e+608)``: the constant as written (if short), and its size."""
    try:
        approx = f"{sp.Float(e.evalf(3), 3)}".lower()
    except (TypeError, ValueError):
        approx = ""
    text = str(e)
    if len(text) > 40 or isinstance(e, sp.Float):
        return approx or text[:37] + "..."
    return f"{text} (about {approx})" if approx and approx != text else text


def check_finite(expr, where):
    """Refuse an expression with a numeric constant that float64 cannot hold (``x*1e308*1e308``,
    ``exp(700)*exp(700)``, ``x/1e-320``, ``2**1023*4``; or ``1e-400``, which would be 0): SymPy
    folds such constants exactly, but generated code could only hold them as inf or 0, and a
    model whose every value is inf, nan or 0 is not the model that was written. Raises
    ModelError naming ``where`` and the constant."""
    stack = [expr]
    while stack:   # no recursion: user expressions may be deeper than Python's recursion limit
        e = stack.pop()
        if not isinstance(e, sp.Basic):
            continue
        if e.is_number:
            if float64_value(e) is None:
                raise ModelError(f"{where}: the constant {show_constant(e)} {float64_problem(e)}; "
                                 "rescale the model")
            continue
        stack.extend(e.args)


def float64_problem(number):
    """Why ``number`` has no float64 value (see float64_value), as words."""
    try:
        tiny = number.is_real and float(abs(number)) == 0.0 and not number.is_zero
    except (OverflowError, TypeError, ValueError):
        tiny = False
    if tiny:
        return "is below float64 range (it would be 0)"
    return "is not a finite float64 number (beyond +-1.8e308, or nan)"
