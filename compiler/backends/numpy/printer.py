"""The NumPy printer of scalar expressions (formulas in text and LaTeX: compiler.core.formulas).

The code printer is strict: a function it does not know raises UnsupportedError instead of
emitting something that fails at run time. Small integer powers are expanded into products
(NumPy's ``x**3`` is two orders of magnitude slower than ``x*x*x``), and every numeric
constant is printed as a Python float literal, which keeps float32 arrays float32.
"""
from __future__ import annotations

import functools

import sympy as sp
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from compiler.errors import UnsupportedError
from compiler.backends.constants import numeric_constants_to_floats
from compiler.core import scalar_functions
from compiler.core.ir import N


@scalar_functions.route_functions
class NumpyPrinter(StrPrinter):
    """Prints an elementwise expression as NumPy code; symbols map to code strings."""

    printmethod = "_bpc_numpy"

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

    def _print_Function(self, e):
        # spelled by the table of scalar functions; Max and Min fold over their arguments
        f = scalar_functions.lookup(e)
        if f is None or f.numpy is None or not f.takes(len(e.args)):
            raise UnsupportedError(f"function {type(e).__name__} is not supported by the NumPy backend")
        if f.numpy_helper:
            self.helpers.add(f.name)
        out = self._print(e.args[0])
        if f.arity == 1:
            return f.numpy.format(out)
        for a in e.args[1:]:
            out = f.numpy.format(out, self._print(a))
        return out

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
    return _print_numpy(expr, tuple(symbols.items()))


@functools.lru_cache(maxsize=1 << 16)
def _print_numpy(expr, symbols):
    # memoised: a value shared by forward, backward, per_example_grads, hvp and gnvp is printed
    # in each of them over the same names (a 12-block transformer prints most lines 4-5 times)
    expr, table = _named(numeric_constants_to_floats(expr), dict(symbols))
    p = NumpyPrinter(table)
    return p.doprint(expr), frozenset(p.helpers)


__all__ = ["print_numpy"]
