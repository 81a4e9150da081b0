"""Data moments hoisted (issue 16, item 4): for an expression model whose loss is a polynomial
in the per-sample data, with the parameters outside the batch sums, the data reduce once to
sufficient statistics, and the loss and its gradient are functions of those statistics alone:
a step costs the same for 10 or 10 million points.

``plan(model)`` -> MomentsPlan, or None with the reason (``decline_reason``). Backend-neutral:
the backends print its assignments (SymPy expressions) and its statistics.

How. The loss is ``F(params, mean(E_1), mean(E_2), ...)`` where each E_k is an elementwise
expression of the parameters and the data symbols (inputs and targets, one number per sample).
Each data symbol d is centred and scaled, ``d = mean_d + scale_d*u_d`` (``scale_d`` the standard
deviation, 1 for constant data), and E_k is expanded with ``sp.Poly`` in the standardized u's,
whose coefficients are expressions of the parameters, means and scales (the transform back,
done symbolically). ``mean(E_k) = sum_a c_a * M_a`` with ``M_a = mean(prod_d u_d**a_d)``: the
moments of standardized variables, which stay of order 1 (raw power sums of x near 1e3 reach
1e30 at degree 10 and lose every digit of their differences).

When E_k is ``c*R**2`` (a squared residual: MSE, least squares), the quadratic form is kept:
``mean(E_k) = c * r^T G r`` with ``r_b`` the coefficients of R in u and ``G[b, b'] =
M_(b + b')`` (a Gram matrix, positive semi-definite), and the gradient is ``2c (dr/dparam)^T G r``:
the residual's coefficients are formed first, as the per-sample path forms each residual, so
nothing cancels that the per-sample path does not cancel too.

Declined (no ``precompute`` is emitted): models that are not scalar expression models (a
parameter or a data value with more than one number, dropout, batchnorm), a loss with an op
other than elementwise expressions and means, an E_k that is not a polynomial in the data
(``exp(w*x)``, ``log(cosh(p - y))``), more than MAX_MOMENTS moments, or more than MAX_PARAMS
parameters (the symbolic gradient grows with parameters times terms).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy as sp

from compiler.core import ir
from compiler.core.ir import ARG, N

MAX_MOMENTS = 400
MAX_PARAMS = 64      # the symbolic gradient costs (parameters x terms): hoisting is for small fits
MAX_DEGREE = 24


@dataclass(frozen=True)
class MomentsPlan:
    data: tuple          # names of the data leaves (inputs, then targets), one number per sample
    exponents: tuple     # per moment: the exponent of each data leaf's standardized value
    stats: tuple         # names of the statistics, in order: mean_<d>, scale_<d> per datum, then m_<...>
    params: tuple        # parameter names
    assignments: tuple   # (Symbol, expression) in order: statistics and parameters are free symbols
    loss: object         # Symbol of the loss
    grads: tuple         # per parameter: Symbol of its gradient, or None (zero)
    stat_symbols: tuple  # Symbol of each statistic (in ``stats`` order)
    param_symbols: tuple
    quadratic: bool      # every mean is a squared residual's quadratic form

    @property
    def max_power(self):
        """Per datum, the highest power of its standardized value that a moment needs."""
        return tuple(max((e[i] for e in self.exponents), default=0) for i in range(len(self.data)))


class Declined(Exception):
    """Why a model gets no hoisted moments."""


def moment_name(names, exps):
    return "m_" + "_".join(f"{d}{k}" for d, k in zip(names, exps) if k)


def plan(model):
    """The MomentsPlan of ``model``, or None (``decline_reason(model)`` says why)."""
    try:
        return _plan(model)
    except Declined:
        return None


def decline_reason(model):
    try:
        _plan(model)
    except Declined as e:
        return str(e)
    return ""


def _plan(model):
    if model.masks or model.stats:
        raise Declined("dropout and batchnorm draw or normalise per batch")
    if len(model.params) > MAX_PARAMS:
        raise Declined(f"the model has {len(model.params)} parameters (at most {MAX_PARAMS})")
    for p in model.params:
        if p.shape != ():
            raise Declined(f"parameter {p.name!r} is not a number (an expression model's parameters are)")
    leaves = (*model.inputs, *model.targets)
    for x in leaves:
        if tuple(x.shape) != (N,) or x.attr("kind") != "real":
            raise Declined(f"{x.name!r} is not one real number per sample")
    psym = {p.uid: sp.Symbol(p.name, real=True) for p in model.params}
    dsym = {x.uid: sp.Symbol(x.name, real=True) for x in leaves}
    means = []

    def expr_of(node, inside):
        if node.uid in psym:
            return psym[node.uid]
        if node.uid in dsym:
            if not inside:
                raise Declined(f"{node.name!r} is used outside a mean over the batch")
            return dsym[node.uid]
        if node.op == "ew":
            if not inside and N in node.shape:
                pass
            return node.attr("expr").xreplace({ARG[i]: expr_of(inp, inside) for i, inp in enumerate(node.inputs)})
        if node.op == "mean" and not inside:
            e = expr_of(node.inputs[0], True)
            s = sp.Symbol(f"_P{len(means)}", real=True)
            means.append((s, e))
            return s
        raise Declined(f"the loss holds a {node.op}, not only elementwise expressions and means")

    outer = expr_of(model.loss, False)
    if not means:
        raise Declined("the loss has no mean over the batch")
    dnames = [x.name for x in leaves]
    data = [dsym[x.uid] for x in leaves]
    mu = [sp.Symbol(f"mean_{d}", real=True) for d in dnames]
    sc = [sp.Symbol(f"scale_{d}", real=True) for d in dnames]
    u = [sp.Symbol(f"_u_{d}", real=True) for d in dnames]
    to_u = {d: m + s * v for d, m, s, v in zip(data, mu, sc, u)}
    params = [psym[p.uid] for p in model.params]

    moment_syms = {}

    def M(exps):
        exps = tuple(int(k) for k in exps)
        if not any(exps):
            return sp.Integer(1)
        if exps not in moment_syms:
            moment_syms[exps] = sp.Symbol(moment_name(dnames, exps), real=True)
        return moment_syms[exps]

    def poly_u(e, what, limit=MAX_DEGREE):
        if not e.is_polynomial(*data):
            raise Declined(f"{what} is not a polynomial in the data ({', '.join(dnames)})")
        top = _degree(e, set(data))
        if top > limit:     # before expanding: a high power of a sum expands into many terms
            raise Declined(f"{what} has degree {top} in the data (at most {limit})")
        poly = sp.Poly(sp.expand(e.xreplace(to_u)), *u)
        if poly.total_degree() > limit:
            raise Declined(f"{what} has degree {poly.total_degree()} in the data (at most {limit})")
        return poly.terms()

    assignments, quadratic = [], True
    mean_grads = []          # per mean: {param symbol: expression of its derivative}
    k = itertools.count()
    for s, e in means:
        coeff, rest = e.as_coeff_Mul()
        if rest.is_Pow and rest.exp == 2 and rest.base.is_polynomial(*data):
            terms = poly_u(rest.base, "the residual", MAX_DEGREE // 2)
            r = []
            for exps, c in terms:
                sym = sp.Symbol(f"_r{next(k)}", real=True)
                assignments.append((sym, c))
                r.append((exps, sym, c))
            # the Gram form c * r^T G r and its gradient 2c (dr/dp)^T G r
            value = coeff * sp.Add(*[ri * rj * M(tuple(a + b for a, b in zip(ei, ej)))
                                     for ei, ri, _ in r for ej, rj, _ in r])
            g = []
            for ei, ri, ci in r:
                gsym = sp.Symbol(f"_g{next(k)}", real=True)
                assignments.append((gsym, 2 * coeff * sp.Add(*[rj * M(tuple(a + b for a, b in zip(ei, ej)))
                                                                for ej, rj, _ in r])))
                g.append((gsym, ci))
            assignments.append((s, value))
            mean_grads.append({p: sp.Add(*[gs * sp.diff(ci, p) for gs, ci in g]) for p in params})
        else:
            quadratic = False
            terms = poly_u(e, "the loss per sample")
            value = sp.Add(*[c * M(exps) for exps, c in terms])
            assignments.append((s, value))
            mean_grads.append({p: sp.diff(value, p) for p in params})
    if len(moment_syms) > MAX_MOMENTS:
        raise Declined(f"the loss needs {len(moment_syms)} moments of the data (at most {MAX_MOMENTS})")
    L = sp.Symbol("_L", real=True)
    assignments.append((L, outer))
    grads = []
    for p in params:
        total = sp.diff(outer, p) + sp.Add(*[sp.diff(outer, s) * mg[p] for (s, _), mg in zip(means, mean_grads)])
        if total == 0:
            grads.append(None)
            continue
        gs = sp.Symbol(f"_d_{p.name}", real=True)
        assignments.append((gs, total))
        grads.append(gs)
    exps_list = tuple(sorted(moment_syms, key=lambda ex: (sum(ex), tuple(-v for v in ex))))
    stats = tuple([f"mean_{d}" for d in dnames] + [f"scale_{d}" for d in dnames]
                  + [moment_syms[ex].name for ex in exps_list])
    stat_symbols = tuple(mu + sc + [moment_syms[ex] for ex in exps_list])
    return MomentsPlan(tuple(dnames), exps_list, stats, tuple(p.name for p in params), tuple(assignments), L,
                       tuple(grads), stat_symbols, tuple(params), quadratic)


def _degree(e, data):
    """An upper bound of the total degree of the polynomial ``e`` in the symbols ``data``,
    from its expression tree (no expansion)."""
    if e.is_Symbol:
        return 1 if e in data else 0
    if e.is_Add:
        return max(_degree(a, data) for a in e.args)
    if e.is_Mul:
        return sum(_degree(a, data) for a in e.args)
    if e.is_Pow and e.exp.is_Integer and e.exp >= 0:
        return _degree(e.base, data) * int(e.exp)
    return 0 if not (e.free_symbols & data) else MAX_DEGREE + 1


def evaluate_stats(plan_, arrays):
    """Reference statistics in float64 (NumPy), ``arrays`` in the order of ``plan_.data``:
    what the emitted ``precompute`` returns (tests compare against it)."""
    import numpy as np
    out = {}
    us = []
    for name, a in zip(plan_.data, arrays):
        a = np.asarray(a, np.float64).reshape(-1)
        m = float(a.mean())
        s = float(a.std()) or 1.0
        out[f"mean_{name}"], out[f"scale_{name}"] = m, s
        us.append((a - m) / s)
    for exps in plan_.exponents:
        v = np.ones_like(us[0])
        for u, k in zip(us, exps):
            if k:
                v = v * u ** k
        out[moment_name(plan_.data, exps)] = float(v.mean())
    return {k: out[k] for k in plan_.stats}
