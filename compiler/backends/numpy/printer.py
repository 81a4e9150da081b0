"""The NumPy printer of scalar expressions (formulas in text and LaTeX: compiler.core.formulas).

The code printer is strict: a function it does not know raises UnsupportedError instead of
emitting something that fails at run time. Small integer powers are expanded into products
(NumPy's ``x**3`` is two orders of magnitude slower than ``x*x*x``), and every numeric
constant is printed as a Python float literal, which keeps float32 arrays float32.
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from compiler.errors import UnsupportedError
from compiler.backends.constants import numeric_constants_to_floats
from compiler.core.functions import relu, sigmoid, softplus, step
from compiler.core.ir import N


class NumpyPrinter(StrPrinter):
    """Prints an elementwise expression as NumPy code; symbols map to code strings."""

    printmethod = "_bpc_numpy"

    # SymPy function class name -> (code template, helper it needs)
    FUNCTIONS = {
        "exp": ("np.exp({0})", None), "log": ("np.log({0})", None), "tanh": ("np.tanh({0})", None),
        "sinh": ("np.sinh({0})", None), "cosh": ("np.cosh({0})", None), "sin": ("np.sin({0})", None),
        "cos": ("np.cos({0})", None), "tan": ("np.tan({0})", None), "atan": ("np.arctan({0})", None),
        "asinh": ("np.arcsinh({0})", None), "Abs": ("np.abs({0})", None), "sign": ("np.sign({0})", None),
        "sigmoid": ("_sigmoid({0})", "sigmoid"), "softplus": ("np.logaddexp(0.0, {0})", None),
        "relu": ("np.maximum({0}, 0.0)", None), "step": ("np.heaviside({0}, 0.0)", None),
        "erf": ("_erf({0})", "erf"),
    }

    def __init__(self, symbols):
        super().__init__()
        self.symbols = symbols
        self.helpers = set()

    def _print_Symbol(self, s):
        if s == N:
            return "n"
        try:
            return self.symbols[s]
        except KeyError:
            raise UnsupportedError(f"internal: unbound symbol {s} in generated code") from None

    def _print_Integer(self, e):
        return str(int(e))

    def _print_Rational(self, e):
        return f"{int(e.p)}/{int(e.q)}"

    def _print_Float(self, e):
        return repr(float(e))

    def _print_Pow(self, e):
        base, ex = e.as_base_exp()
        pb = self.parenthesize(base, PRECEDENCE["Mul"], strict=False)
        atomic = base.is_Symbol or base.is_Number
        if ex == 2 and not atomic:
            return f"np.square({self._print(base)})"
        if ex == -2 and not atomic:
            return f"1/np.square({self._print(base)})"
        if ex.is_Integer and 1 <= int(ex) <= 4 and atomic:
            return "*".join([pb] * int(ex))
        if ex.is_Integer and -4 <= int(ex) <= -1 and atomic:
            return "1/" + ("(" + "*".join([pb] * -int(ex)) + ")" if int(ex) < -1 else pb)
        if ex == sp.Rational(1, 2):
            return f"np.sqrt({self._print(base)})"
        if ex == -sp.Rational(1, 2):
            return f"1/np.sqrt({self._print(base)})"
        if base == sp.E:
            return f"np.exp({self._print(ex)})"
        return f"{self.parenthesize(base, PRECEDENCE['Pow'], strict=True)}**{self.parenthesize(ex, PRECEDENCE['Pow'], strict=True)}"

    def _print_Mul(self, e):
        # ``2*(Z - y)/n`` costs two passes over the array; ``(Z - y)*(2/n)`` folds the scalars first
        coeff, factors = e.as_coeff_mul()
        scalars = [f for f in factors if f.free_symbols <= {N}]
        arrays = [f for f in factors if not f.free_symbols <= {N}]
        if coeff not in (1, -1) and scalars and arrays:
            return (f"{self.parenthesize(sp.Mul(*arrays), PRECEDENCE['Mul'], strict=False)}"
                    f"*({self._print(coeff * sp.Mul(*scalars))})")
        return super()._print_Mul(e)

    def _print_Max(self, e):
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"np.maximum({out}, {self._print(a)})"
        return out

    def _print_Min(self, e):
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"np.minimum({out}, {self._print(a)})"
        return out

    def _print_Function(self, e):
        name = type(e).__name__
        entry = self.FUNCTIONS.get(name)
        if entry is None or len(e.args) != 1:
            raise UnsupportedError(f"function {name} is not supported by the NumPy backend")
        template, helper = entry
        if helper:
            self.helpers.add(helper)
        return template.format(self._print(e.args[0]))

    _print_exp = _print_Function
    _print_log = _print_Function
    _print_Abs = _print_Function
    _print_sign = _print_Function

    def emptyPrinter(self, e):
        raise UnsupportedError(f"{type(e).__name__} ({e}) is not supported by the NumPy backend")

    def _print_NumberSymbol(self, e):
        return repr(float(e))

    _print_Exp1 = _print_NumberSymbol
    _print_Pi = _print_NumberSymbol

    def _print_NaN(self, e):
        raise UnsupportedError("the expression evaluates to nan")

    def _print_Infinity(self, e):
        raise UnsupportedError("the expression is infinite")

    _print_NegativeInfinity = _print_Infinity
    _print_ComplexInfinity = _print_Infinity


def _named(expr, symbols):
    """Swap symbols for ones named by their code, so terms print in a stable, readable order
    (polynomials by descending degree)."""
    named = {s: sp.Symbol(code, real=True) for s, code in symbols.items()}
    return expr.xreplace(named), {v: v.name for v in named.values()}


def print_numpy(expr, symbols):
    """(code, helpers needed) for an elementwise expression; ``symbols`` maps symbol -> code."""
    expr, table = _named(numeric_constants_to_floats(expr), symbols)
    p = NumpyPrinter(table)
    return p.doprint(expr), p.helpers


__all__ = ["print_numpy", "relu", "sigmoid", "softplus", "step"]
