"""Readable formulas of a Program's values, in plain text and LaTeX: the comments beside
generated statements, each module's FORMULAS, and `bpc show`. Backend-neutral: every backend
and the CLI print the same formulas.
"""
from __future__ import annotations

import functools
import re

import sympy as sp
from sympy.printing.latex import LatexPrinter
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
    return _print_formula(expr, tuple(symbols.items()))


@functools.lru_cache(maxsize=1 << 16)
def _print_formula(expr, symbols):
    # memoised: the comments of forward, backward, per_example_grads, hvp and gnvp repeat the
    # formulas of their shared values over the same names
    expr, table = _named(expr, dict(symbols))
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


class ElementwiseLatexPrinter(LatexPrinter):
    r"""LaTeX of an elementwise expression: a product of two or more tensors is written with
    ``\odot`` (``dH_{1} \odot \left(1 - H_{1}^{2}\right)``), so that juxtaposition is left to
    matrix products; numbers and scalar symbols (``scalars``, and n) multiply by juxtaposition."""

    def __init__(self, symbol_names, scalars=()):
        super().__init__({"symbol_names": symbol_names})
        self.scalars = frozenset(scalars) | {N}

    def _tensor(self, factor):
        return not factor.free_symbols <= self.scalars

    def _tensors(self, expr):
        return sum(1 for f in sp.Mul.make_args(expr) if self._tensor(f))

    def _print_Mul(self, expr):
        numer, denom = sp.fraction(expr, exact=True)
        if self._tensors(numer) < 2 and self._tensors(denom) < 2:
            return super()._print_Mul(expr)
        if expr.could_extract_minus_sign():
            rest = -expr
            tex = self._print(rest)
            return "- " + (rf"\left({tex}\right)" if rest.is_Add else tex)
        if denom != 1:
            return rf"\frac{{{self._print(numer)}}}{{{self._print(denom)}}}"
        factors = numer.as_ordered_factors()
        scalars = [f for f in factors if not self._tensor(f)]
        tensors = [f for f in factors if self._tensor(f)]
        body = r" \odot ".join(self._factor(f, i == 0, i == len(tensors) - 1) for i, f in enumerate(tensors))
        if not scalars:
            return body
        head = self._print(sp.Mul(*scalars))
        return f"{head} {body}"

    def _factor(self, f, first, last):
        tex = self._print(f)
        return rf"\left({tex}\right)" if self._needs_mul_brackets(f, first=first, last=last) else tex


def print_latex(expr, symbols, scalars=()):
    r"""LaTeX of ``expr``; ``symbols`` maps each symbol to its LaTeX text; products of the
    other symbols (tensors) are elementwise (``\odot``), of ``scalars`` and numbers plain."""
    return ElementwiseLatexPrinter({**symbols, N: "n"}, scalars).doprint(expr)


# ---- formulas (text and LaTeX), shared by comments, FORMULAS and `show` ----------------------

def _unit_reshape(node):
    """Whether ``node`` is a reshape that only adds or drops axes of length 1 ((16,) as (1, 16),
    a number as (1, 1)); a reshape that merges axes (an image's pixels into rows) is real."""
    if node.op != "reshape":
        return False
    return [d for d in node.shape if d != 1] == [d for d in node.inputs[0].shape if d != 1]


class Formulas:
    """Readable right-hand sides of each scheduled node, in text and LaTeX."""

    def __init__(self, program):
        self.p = program
        self._lines = {}
        self._chains = {}
        self._forward = None

    def _name(self, node, latex):
        n = self.p.names[node.uid]
        return latex_name(n) if latex else n

    def operand(self, node, latex=False, bare=False):
        if latex and _unit_reshape(node):
            # a reshape that only adds or drops axes of length 1 changes nothing for a reader
            # (its LaTeX is its input's), and its name is an internal
            # one (dM3m, db1T): formulas for people refer to the input instead
            return self.operand(node.inputs[0], latex, bare)
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
    def print_latex(expr, symbols, scalars=()):
        return print_latex(expr, symbols, scalars)

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
        nodes = self._chains.get(grad.uid)
        if nodes is None:     # (once per gradient: its text and its LaTeX walk the same chain)
            nodes = self._chains[grad.uid] = [n for n in ir.topo_order([grad], stop=self._forward)
                                              if n.uid in self.p.backward_only and n.uid not in self.p.inline]
        if not latex:
            return [self.line(n) for n in nodes]
        # for people: reshapes are not lines (see operand), and a gradient that reshapes the
        # adjoint of a helper (db2 = db2_s, the adjoint of b2 as a number) takes its formula
        merged = grad.inputs[0] if _unit_reshape(grad) and grad.inputs[0] in nodes else None
        lines = [self.line(n, True) for n in nodes
                 if not _unit_reshape(n) and n is not merged and n is not grad]
        rhs = self.rhs(merged, True) if merged is not None else self.rhs(grad, True)
        return lines + [f"{self._name(grad, True)} = {rhs}"]
