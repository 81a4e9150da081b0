"""Readable formulas of a Program's values, in plain text and LaTeX: the comments beside
generated statements, each module's FORMULAS, and `bpc show`. Backend-neutral: every backend
and the CLI print the same formulas.
"""
from __future__ import annotations

import re

import sympy as sp
from sympy.printing.str import StrPrinter

from compiler.core import ir, ops
from compiler.core.ir import N


def _named(expr, symbols):
    """Swap symbols for ones named by their code, so terms print in a stable, readable order
    (polynomials by descending degree)."""
    named = {s: sp.Symbol(code, real=True) for s, code in symbols.items()}
    return expr.xreplace(named), {v: v.name for v in named.values()}



class FormulaPrinter(StrPrinter):
    """Plain-text math, with symbols shown by name."""

    def __init__(self, symbols):
        super().__init__()
        self.symbols = symbols

    def _print_Symbol(self, s):
        return "n" if s == N else self.symbols.get(s, s.name)


def print_formula(expr, symbols):
    expr, table = _named(expr, symbols)
    return FormulaPrinter(table).doprint(expr)


def latex_name(name):
    """``dZ2`` -> ``dZ_{2}``, ``W_hidden`` -> ``W_{hidden}``."""
    m = re.match(r"^(.*?)(\d+)$", name)
    if m and m.group(1):
        return f"{_latex_word(m.group(1))}_{{{m.group(2)}}}"
    if "_" in name:
        head, tail = name.split("_", 1)
        return f"{_latex_word(head)}_{{{_latex_word(tail)}}}"
    return _latex_word(name)


def _latex_word(w):
    w = w.replace("_", r"\_")
    return w if len(w) == 1 else r"\mathrm{" + w + "}"


def print_latex(expr, symbols):
    """LaTeX of ``expr``; ``symbols`` maps each symbol to its LaTeX text."""
    return sp.latex(expr, symbol_names={**symbols, N: "n"})


# ---- formulas (text and LaTeX), shared by comments, FORMULAS and `show` ----------------------

class Formulas:
    """Readable right-hand sides of each scheduled node, in text and LaTeX."""

    def __init__(self, program):
        self.p = program
        self._lines = {}
        self._forward = None

    def _name(self, node, latex):
        n = self.p.names[node.uid]
        return latex_name(n) if latex else n

    def operand(self, node, latex=False, bare=False):
        if node.uid in self.p.inline:
            rhs = self.rhs(node, latex)
            if bare or not node.inputs:
                return rhs
            return r"\left(" + rhs + r"\right)" if latex else "(" + rhs + ")"
        return self._name(node, latex)

    def rhs(self, node, latex=False):
        op = ops.get(node.op)
        a = [self.operand(i, latex, bare=op.reduction) for i in node.inputs]
        return op.latex(node, a, self) if latex else op.text(node, a, self)

    # the scalar printers, for the op records' formulas
    @staticmethod
    def print_text(expr, symbols):
        return print_formula(expr, symbols)

    @staticmethod
    def print_latex(expr, symbols):
        return print_latex(expr, symbols)

    def line(self, node, latex=False):
        # memoised: the chains of a deep network share most of their lines (linear compile time)
        key = (node.uid, latex)
        text = self._lines.get(key)
        if text is None:
            text = self._lines[key] = f"{self._name(node, latex)} = {self.rhs(node, latex)}"
        return text

    def chain(self, grad, latex=False):
        """The backward statements ``grad`` depends on, in order, as formulas."""
        # loss() values hold no backward statement: not walking them keeps each chain's cost
        # to its own length (a walk of the whole graph per parameter is quadratic)
        if self._forward is None:
            self._forward = frozenset(n.uid for n in ir.topo_order([self.p.loss]))
        nodes = [n for n in ir.topo_order([grad], stop=self._forward)
                 if n.uid in self.p.backward_only and n.uid not in self.p.inline]
        return [self.line(n, latex) for n in nodes]
