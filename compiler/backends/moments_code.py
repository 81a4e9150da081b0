"""The hoisted-moments entry points (compiler.core.moments) as code: the statements of
``loss_from_moments`` / ``backward_from_moments`` for a scalar printer, shared by the NumPy
module and the C target (each passes its own printer)."""
from __future__ import annotations

import sympy as sp

from compiler.core.moments import moment_name


def stat_locals(plan):
    """Statistic symbol -> local name (``_s0``, ...: no model name starts with an underscore)."""
    return {s: f"_s{i}" for i, s in enumerate(plan.stat_symbols)}


def needed(plan, roots):
    """The assignments that ``roots`` (symbols) depend on, in order."""
    want = set(roots)
    out = []
    for sym, e in reversed(plan.assignments):
        if sym in want:
            out.append((sym, e))
            want |= e.free_symbols
    return out[::-1]


def statements(plan, roots, printer, declare="", prefix=""):
    """Lines computing ``roots``: each assignment after its own common subexpressions (SymPy's
    cse), printed by ``printer(expr, symbols) -> code``; ``declare`` prefixes every new local
    (C: ``const double ``); parameters are named ``prefix`` + their name (C: ``v_``, which no
    C keyword or library name starts with)."""
    symbols = {p: prefix + p.name for p in plan.param_symbols}
    symbols.update(stat_locals(plan))
    lines = []
    for k, (sym, e) in enumerate(needed(plan, roots)):
        symbols[sym] = sym.name
        reps, (body,) = sp.cse(e, symbols=sp.numbered_symbols(f"_c{k}_"))
        for rs, re_ in reps:
            symbols[rs] = rs.name
            lines.append(f"{declare}{rs.name} = {printer(re_, symbols)}")
        lines.append(f"{declare}{sym.name} = {printer(body, symbols)}")
    return lines


def doc(plan):
    return (f"statistics {', '.join(plan.stats)}: the mean and standard deviation of each of "
            f"{', '.join(plan.data)}, and the means of products of powers of their standardized values "
            f"(m_x2_y1 = mean(u_x**2 * u_y), u_x = (x - mean_x)/scale_x)")


def powers(plan):
    """(datum index, power) pairs, in order, that the moments need (power 1 is the standardized value)."""
    return [(i, k) for i, top in enumerate(plan.max_power) for k in range(1, top + 1)]


def product_terms(plan):
    """For each moment: the list of (datum index, power) factors."""
    return [[(i, k) for i, k in enumerate(exps) if k] for exps in plan.exponents]


__all__ = ["stat_locals", "needed", "statements", "doc", "powers", "product_terms", "moment_name"]
