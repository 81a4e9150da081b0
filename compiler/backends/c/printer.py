"""C99 printer of scalar expressions, for the C backend (double or float).

Like the NumPy printer it is strict: an unknown function raises UnsupportedError. Small integer
powers become products, rationals and constants become floating literals (``1.0/3.0``, never
the integer division ``1/3``), and the batch size prints as the floating local ``_nf``.
The float and double variants differ only in class attributes (function suffix, literal suffix).
Functions are spelled by the table of scalar functions (``core.scalar_functions``); stable
primitives print as calls of ``bpc_*`` helpers, whose definitions the table holds too, and the
printer records which functions' helpers an expression needs.
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from compiler.core import scalar_functions
from compiler.errors import UnsupportedError
from compiler.core.ir import N
from compiler.backends.constants import numeric_constants_to_floats


@scalar_functions.route_functions
class CPrinter(StrPrinter):
    """Prints an elementwise expression as a C99 double expression; symbols map to code."""

    printmethod = "_bpc_c"
    real = "double"
    fsuffix = ""        # appended to math function names (expf, tanhf, ...)
    lsuffix = ""        # appended to floating literals (1.0f)
    max_literal = 1.7976931348623157e308   # the largest finite value of the type

    def __init__(self, symbols):
        super().__init__()
        self.symbols = symbols
        self.helpers = set()

    def _lit(self, value):
        try:
            number = float(value)
        except OverflowError:
            number = float("inf")
        if not abs(number) <= self.max_literal:   # also nan
            raise UnsupportedError(f"the constant {value} is beyond the range of C {self.real}")
        text = repr(number)
        if "e" not in text and "." not in text:
            text += ".0"
        return text + self.lsuffix

    def _print_Symbol(self, s):
        if s == N:
            return "_nf"
        try:
            return self.symbols[s]
        except KeyError:
            raise UnsupportedError(f"internal: unbound symbol {s} in generated C code") from None

    def _print_Integer(self, e):
        return self._lit(int(e))

    def _print_Rational(self, e):
        return f"{self._lit(int(e.p))}/{self._lit(int(e.q))}"

    def _print_Float(self, e):
        return self._lit(float(e))

    def _print_NumberSymbol(self, e):
        return self._lit(float(e))

    _print_Exp1 = _print_NumberSymbol
    _print_Pi = _print_NumberSymbol

    def _print_Mul(self, e):
        # -x prints as -x, not -1.0*x
        c, rest = e.as_coeff_Mul()
        if c == -1 and rest != 1:
            return "-" + self.parenthesize(rest, PRECEDENCE["Mul"], strict=False)
        return super()._print_Mul(e)

    def _print_Pow(self, e):
        base, ex = e.as_base_exp()
        pb = self.parenthesize(base, PRECEDENCE["Pow"], strict=True)
        one = self._lit(1)
        if ex.is_Integer and 1 <= int(ex) <= 4:
            return "(" + "*".join([pb] * int(ex)) + ")" if int(ex) > 1 else pb
        if ex.is_Integer and -4 <= int(ex) <= -1:
            return f"{one}/" + ("(" + "*".join([pb] * -int(ex)) + ")" if int(ex) < -1 else pb)
        if ex == sp.Rational(1, 2):
            return f"sqrt{self.fsuffix}({self._print(base)})"
        if ex == -sp.Rational(1, 2):
            return f"{one}/sqrt{self.fsuffix}({self._print(base)})"
        if base == sp.E:
            return self._print(sp.exp(ex, evaluate=False))   # the table's (vectorisable) exp
        return f"pow{self.fsuffix}({self._print(base)}, {self._print(ex)})"

    def _print_Function(self, e):
        # spelled by the table of scalar functions; Max and Min fold over their arguments
        f = scalar_functions.lookup(e)
        if f is None or f.c is None or not f.takes(len(e.args)):
            raise UnsupportedError(f"function {type(e).__name__} is not supported by the C backend")
        if f.c_helper:
            self.helpers.add(f.name)
        fn = f.c + self.fsuffix
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"{fn}({out}, {self._print(a)})"
        return out if f.arity != 1 else f"{fn}({out})"

    def emptyPrinter(self, e):
        raise UnsupportedError(f"{type(e).__name__} ({e}) is not supported by the C backend")

    def _print_NaN(self, e):
        raise UnsupportedError("the expression evaluates to nan")

    def _print_Infinity(self, e):
        raise UnsupportedError("the expression is infinite")

    _print_NegativeInfinity = _print_Infinity
    _print_ComplexInfinity = _print_Infinity


class CPrinterFloat(CPrinter):
    """The float (single-precision) variant: expf, tanhf, ... and 1.0f literals."""

    real = "float"
    fsuffix = "f"
    lsuffix = "f"
    max_literal = 3.4028234663852886e38


PRINTERS = {"float64": CPrinter, "float32": CPrinterFloat}


def print_c(expr, symbols, dtype="float64"):
    """(code, helpers needed) for a scalar expression; ``symbols`` maps symbol -> C code."""
    named = {s: sp.Symbol(code, real=True) for s, code in symbols.items()}
    expr = numeric_constants_to_floats(expr).xreplace(named)
    p = PRINTERS[dtype]({v: v.name for v in named.values()})
    return p.doprint(expr), p.helpers
